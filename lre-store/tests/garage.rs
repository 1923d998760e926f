//! The S3 store and the fast/slow layer against a real 3-node Garage cluster.
//!
//! Ignored by a plain `cargo test` because they need the `garage` binary; `scripts/test`
//! (and so CI) runs them with `--include-ignored` after `.ci/run` installed it.

use std::sync::Arc;

use futures::TryStreamExt;
use lre_store::metrics::StoreMetrics;
use lre_store::store::{
    BlobStore, CasUpload, FastSlowStore, Key, KeyKind, MemStore, S3Store, VerifyStore,
};
use lre_store::StoreError;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};

use lre_test_support::{noise, put, read_all, sha, Garage};

async fn objects(g: &Garage, prefix: &str) -> Vec<String> {
    g.raw(1)
        .list(Some(&Path::from(prefix)))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .expect("list")
}

#[tokio::test]
#[ignore = "needs garage: scripts/test runs it"]
async fn small_and_multipart_blobs_round_trip_and_leave_no_temporary_objects() {
    let g = Garage::up(3);
    let s3 = S3Store::open(&g.config(1)).await.expect("open");

    let small = noise(1000, 1);
    let k = put(&s3, &small).await;
    assert_eq!(s3.lookup(&[k]).await.unwrap(), vec![Some(1000)]);
    assert_eq!(s3.get(&k).await.unwrap().unwrap(), small);
    assert_eq!(read_all(&s3, &k, 100).await.unwrap(), small[100..]);
    assert_eq!(read_all(&s3, &k, 1000).await.unwrap(), b"");

    // 20 MiB: three parts, a multipart upload completed and copied to its name.
    let big = noise(20 << 20, 2);
    let kb = put(&s3, &big).await;
    assert!(read_all(&s3, &kb, 0).await.unwrap() == big);
    assert!(read_all(&s3, &kb, (9 << 20) + 7).await.unwrap() == big[(9 << 20) + 7..]);
    assert_eq!(
        s3.lookup(&[kb, Key::Cas(sha(b"absent"))]).await.unwrap(),
        vec![Some(20 << 20), None]
    );
    assert!(
        objects(&g, "tmp").await.is_empty(),
        "temporary objects left behind"
    );

    // The same small bytes under BLAKE3: another object, listed under its own kind.
    let k3 = Key::Blake3Cas(*blake3::hash(&small).as_bytes());
    let mut up = CasUpload::for_key(&s3, k3, Some(1000)).await.unwrap();
    up.write(&small).await.unwrap();
    up.finish().await.unwrap();
    assert_eq!(s3.get(&k3).await.unwrap().unwrap(), small);
    assert_eq!(s3.list(KeyKind::Blake3Cas).await.unwrap(), vec![k3]);
    assert!(!s3.list(KeyKind::Cas).await.unwrap().contains(&k3));
    assert_eq!(objects(&g, "cas-blake3").await.len(), 1);

    // A Nix binary cache's narinfo: its own kind, under `narinfo/`.
    let ni = Key::nar_info("main", "0c6kzph7l0dcbfmjap64f0czdafn3b7x");
    let mut w = s3.writer(Some(12)).await.unwrap();
    w.write(b"StorePath: x").await.unwrap();
    w.commit(ni).await.unwrap();
    assert_eq!(s3.get(&ni).await.unwrap().unwrap(), &b"StorePath: x"[..]);
    assert_eq!(s3.list(KeyKind::NarInfo).await.unwrap(), vec![ni]);
    assert_eq!(objects(&g, "narinfo").await.len(), 1);

    s3.remove(&kb).await.unwrap();
    assert_eq!(s3.lookup(&[kb]).await.unwrap(), vec![None]);
    assert!(s3.get(&kb).await.unwrap().is_none());
    assert!(s3.open(&kb, 0, None).await.unwrap().is_none());
}

#[tokio::test]
#[ignore = "needs garage: scripts/test runs it"]
async fn a_wrong_digest_or_an_abandoned_upload_stores_nothing() {
    let g = Garage::up(3);
    let s3 = S3Store::open(&g.config(1)).await.expect("open");

    for len in [1000usize, 12 << 20] {
        let data = noise(len, 3);
        let claimed = sha(b"something else");
        let mut up = CasUpload::for_key(&s3, Key::Cas(claimed), Some(len as u64))
            .await
            .unwrap();
        for c in data.chunks(1 << 20) {
            up.write(c).await.unwrap();
        }
        let e = up.finish().await.unwrap_err();
        assert!(matches!(e, StoreError::DigestMismatch { .. }), "{e}");
        assert_eq!(
            s3.lookup(&[Key::Cas(claimed), Key::Cas(sha(&data))])
                .await
                .unwrap(),
            vec![None, None]
        );

        // A client that goes away half way: the writer is dropped, not committed.
        let mut up = CasUpload::for_key(&s3, Key::Cas(sha(&data)), Some(len as u64))
            .await
            .unwrap();
        up.write(&data[..len / 2]).await.unwrap();
        drop(up);
        assert_eq!(
            s3.lookup(&[Key::Cas(sha(&data))]).await.unwrap(),
            vec![None]
        );
    }
    assert!(
        objects(&g, "cas").await.is_empty(),
        "{:?}",
        objects(&g, "cas").await
    );
    assert!(
        objects(&g, "tmp").await.is_empty(),
        "{:?}",
        objects(&g, "tmp").await
    );
}

#[tokio::test]
#[ignore = "needs garage: scripts/test runs it"]
async fn the_fast_tier_refills_from_the_slow_one_and_a_corrupt_slow_blob_is_never_served() {
    let g = Garage::up(3);
    let fast = Arc::new(MemStore::new(64 << 20, StoreMetrics::default()));
    let slow = Arc::new(S3Store::open(&g.config(1)).await.expect("open"));
    let tiers = FastSlowStore::new(fast.clone(), slow.clone());

    // Write-through: both tiers have it once the write is acknowledged.
    let data = noise(3 << 20, 4);
    let k = put(&tiers, &data).await;
    assert_eq!(fast.lookup(&[k]).await.unwrap(), vec![Some(3 << 20)]);
    assert_eq!(slow.lookup(&[k]).await.unwrap(), vec![Some(3 << 20)]);

    // Evicted locally: still found, read from the slow tier, and back in the fast one.
    fast.remove(&k).await.unwrap();
    assert_eq!(tiers.lookup(&[k]).await.unwrap(), vec![Some(3 << 20)]);
    assert!(read_all(&tiers, &k, 5).await.unwrap() == data[5..]);
    assert_eq!(fast.lookup(&[k]).await.unwrap(), vec![Some(3 << 20)]);

    // Gone from both: a miss.
    tiers.remove(&k).await.unwrap();
    assert_eq!(tiers.lookup(&[k]).await.unwrap(), vec![None]);

    // Someone wrote other bytes under a blob's name in the bucket: not served, not copied
    // into the fast tier, and deleted so that the next upload repairs it.
    let good = noise(5000, 5);
    let name = Key::Cas(sha(&good));
    g.raw(1)
        .put(
            &Path::from(name.to_string()),
            PutPayload::from(noise(5000, 6)),
        )
        .await
        .unwrap();
    assert!(tiers.get(&name).await.unwrap().is_none());
    assert!(tiers.open(&name, 0, None).await.unwrap().is_none());
    assert_eq!(fast.lookup(&[name]).await.unwrap(), vec![None]);
    assert_eq!(slow.lookup(&[name]).await.unwrap(), vec![None]);
    put(&tiers, &good).await;
    fast.remove(&name).await.unwrap();
    assert!(tiers.get(&name).await.unwrap().unwrap() == good);

    // The same tampering under a `verify` layer straight over S3: a stream of the bad
    // object ends in an error, never a clean EOF, and the object is removed.
    let verified = VerifyStore::new(slow.clone());
    assert!(read_all(&verified, &name, 100).await.unwrap() == good[100..]);
    g.raw(1)
        .put(
            &Path::from(name.to_string()),
            PutPayload::from(noise(5000, 7)),
        )
        .await
        .unwrap();
    let (_, mut r) = verified
        .open(&name, 0, None)
        .await
        .unwrap()
        .expect("listed");
    let mut sink = Vec::new();
    let e = tokio::io::AsyncReadExt::read_to_end(&mut r, &mut sink)
        .await
        .expect_err("a corrupt object never reads clean");
    assert!(e.to_string().contains("not served"), "{e}");
    let mut removed = false;
    for _ in 0..50 {
        if slow.lookup(&[name]).await.unwrap() == vec![None] {
            removed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(removed, "the corrupt object is deleted from the bucket");
}

#[tokio::test]
#[ignore = "needs garage: scripts/test runs it"]
async fn with_one_garage_node_down_reads_hit_and_writes_go_on() {
    let g = Garage::up(3);
    let s3 = S3Store::open(&g.config(1)).await.expect("open");
    let before: Vec<(Key, Vec<u8>)> = {
        let mut v = Vec::new();
        for i in 0..8 {
            let d = noise(100_000 + i, 10 + i as u64);
            v.push((put(&s3, &d).await, d));
        }
        v
    };
    g.stop_node(3);
    for (k, d) in &before {
        assert!(
            s3.get(k).await.unwrap().as_deref() == Some(&d[..]),
            "read with node 3 down"
        );
    }
    let during = noise(9 << 20, 30);
    let kd = put(&s3, &during).await;
    g.start_nodes(&[3]);
    // The node that was down serves what was written meanwhile (Garage reads by quorum),
    // once it has rejoined; until then it may refuse, but never answers wrongly.
    let mut refusals = Vec::new();
    for _ in 0..120 {
        let attempt = async {
            let via3 = S3Store::open(&g.config(3)).await?;
            let (_, mut r) = via3
                .open(&kd, 0, None)
                .await?
                .expect("absent through node 3");
            let mut v = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut r, &mut v)
                .await
                .map_err(StoreError::from)?;
            Ok::<_, StoreError>(v)
        };
        match attempt.await {
            Ok(v) => {
                assert!(v == during, "node 3 served other bytes");
                return;
            }
            Err(e) => refusals.push(e.to_string()),
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    panic!("node 3 never served the blob written while it was down: {refusals:?}");
}

#[tokio::test]
#[ignore = "needs garage: scripts/test runs it"]
async fn an_unreachable_or_refusing_backend_is_a_clear_error_never_a_miss() {
    let g = Garage::up(3);

    // Nothing listens there: the error at start names the endpoint.
    let mut c = g.config(1);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    c.endpoint = Some(format!("http://127.0.0.1:{port}"));
    let e = S3Store::open(&c).await.err().expect("must fail");
    assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");

    // A wrong secret: refused at start, naming the bucket.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("secret");
    std::fs::write(&bad, "0".repeat(64)).unwrap();
    let mut c = g.config(1);
    c.secret_access_key_file = Some(bad);
    let e = S3Store::open(&c).await.err().expect("must fail");
    assert!(e.to_string().contains("\"lre\""), "{e}");

    // The whole cluster goes away while running: UNAVAILABLE, not "absent"; then it
    // comes back and so does the store.
    let fast = Arc::new(MemStore::new(64 << 20, StoreMetrics::default()));
    let slow = Arc::new(S3Store::open(&g.config(1)).await.expect("open"));
    let tiers = FastSlowStore::new(fast.clone(), slow.clone());
    let d = noise(70_000, 40);
    let k = put(&tiers, &d).await;
    fast.remove(&k).await.unwrap();
    // A multipart upload under way when the cluster goes: its next part fails.
    let big = noise(20 << 20, 41);
    let mut torn = CasUpload::for_key(slow.as_ref(), Key::Cas(sha(&big)), Some(big.len() as u64))
        .await
        .unwrap();
    torn.write(&big[..4 << 20]).await.unwrap();
    for i in 1..=3 {
        g.stop_node(i);
    }
    let e = torn.write(&big[4 << 20..9 << 20]).await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
    for r in [
        tiers.lookup(&[k]).await.map(|_| ()),
        tiers.get(&k).await.map(|_| ()),
        tiers.open(&k, 0, None).await.map(|_| ()),
    ] {
        let e = r.expect_err("must not succeed with the backend down");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
    }
    let mut w = tiers.writer(Some(10)).await.unwrap();
    w.write(b"0123456789").await.unwrap();
    let e = w.commit(Key::Cas(sha(b"0123456789"))).await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
    assert_eq!(
        fast.lookup(&[Key::Cas(sha(b"0123456789"))]).await.unwrap(),
        vec![None],
        "a write the shared tier refused must not be acknowledged locally"
    );
    g.start_nodes(&[1, 2, 3]);
    // Its lost part cannot be made up for: no retry or resume may ever commit it. (The
    // upload itself refuses now: any store error but "no room" tears it.)
    let e = torn.write(&big[4 << 20..9 << 20]).await.unwrap_err();
    assert!(e.to_string().contains("start again at offset 0"), "{e}");
    assert!(torn.finish().await.is_err());
    // Until every node is back it may answer UNAVAILABLE (no quorum), never other bytes.
    let mut seen = Vec::new();
    let mut back = false;
    for _ in 0..100 {
        match tiers.get(&k).await {
            Ok(Some(v)) => {
                assert!(
                    v == d,
                    "recovered with other bytes ({} of {})",
                    v.len(),
                    d.len()
                );
                back = true;
                break;
            }
            Ok(None) => seen.push("absent".to_owned()),
            Err(e) => seen.push(e.to_string()),
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(back, "the store did not recover; it answered: {seen:?}");
    assert!(
        !seen.iter().any(|s| s == "absent"),
        "a present blob read as absent while the cluster came back: {seen:?}"
    );
    assert_eq!(
        slow.lookup(&[Key::Cas(sha(&big))]).await.unwrap(),
        vec![None],
        "the torn upload was stored"
    );
}
