//! The action cache's completeness rule (`CompletenessChecking`) over memory stores: a
//! result is served only while every blob it references is in the CAS, and what it
//! references is decided when it is written, so lookups read no output Tree.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use lre_store::metrics::StoreMetrics;
use lre_store::store::{BlobStore, CompletenessChecking, Key, MemStore};
use lre_test_support::Counting;
use prost::Message;
use sha2::{Digest as _, Sha256};

async fn put(store: &dyn BlobStore, key: Key, data: &[u8]) {
    let mut w = store.writer(Some(data.len() as u64)).await.unwrap();
    w.write(data).await.unwrap();
    w.commit(key).await.unwrap();
}

async fn cas_put(store: &dyn BlobStore, data: &[u8]) -> re::Digest {
    let hash: [u8; 32] = Sha256::digest(data).into();
    put(store, Key::Cas(hash), data).await;
    re::Digest {
        hash: hex::encode(hash),
        size_bytes: data.len() as i64,
    }
}

#[tokio::test]
async fn a_result_is_served_only_while_everything_it_references_is_in_the_cas() {
    let mem =
        || -> Arc<dyn BlobStore> { Arc::new(MemStore::new(1 << 20, StoreMetrics::default())) };
    let (results, cas) = (mem(), mem());
    let withheld = Arc::new(AtomicUsize::new(0));
    let w = withheld.clone();
    let layer = CompletenessChecking::new(
        results.clone(),
        cas.clone(),
        Box::new(move |_| {
            w.fetch_add(1, Ordering::SeqCst);
        }),
    );
    let out = cas_put(cas.as_ref(), b"an output").await;
    let inner_file = cas_put(cas.as_ref(), b"a file inside a tree").await;
    let tree = re::Tree {
        root: Some(re::Directory {
            files: vec![re::FileNode {
                name: "f".into(),
                digest: Some(inner_file.clone()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        children: vec![],
    };
    let tree_digest = cas_put(cas.as_ref(), &tree.encode_to_vec()).await;
    let result = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out".into(),
            digest: Some(out.clone()),
            ..Default::default()
        }],
        output_directories: vec![re::OutputDirectory {
            path: "dir".into(),
            tree_digest: Some(tree_digest),
            ..Default::default()
        }],
        ..Default::default()
    };
    let key = Key::ac("", lre_store::digest::DigestFunction::Sha256, &[1; 32]);
    put(results.as_ref(), key, &result.encode_to_vec()).await;
    assert!(layer.get(&key).await.unwrap().is_some());
    assert_eq!(withheld.load(Ordering::SeqCst), 0);

    // A file inside the output tree is evicted: withheld, and kept for when it returns.
    let inner_key = Key::Cas(hex::decode(&inner_file.hash).unwrap().try_into().unwrap());
    cas.remove(&inner_key).await.unwrap();
    assert!(layer.get(&key).await.unwrap().is_none());
    assert!(layer.open(&key, 0, None).await.unwrap().is_none());
    assert_eq!(withheld.load(Ordering::SeqCst), 2);
    assert!(results.get(&key).await.unwrap().is_some(), "not deleted");
    cas_put(cas.as_ref(), b"a file inside a tree").await;
    assert!(layer.get(&key).await.unwrap().is_some());

    // Not an ActionResult: withheld and removed.
    let junk = Key::ac("", lre_store::digest::DigestFunction::Sha256, &[2; 32]);
    put(results.as_ref(), junk, &[0xff, 0xff, 0xff]).await;
    assert!(layer.get(&junk).await.unwrap().is_none());
    assert!(results.get(&junk).await.unwrap().is_none());

    // The same bytes through `unchecked` (an asset record's path) are left alone.
    put(results.as_ref(), junk, &[0xff, 0xff, 0xff]).await;
    assert!(layer.unchecked().get(&junk).await.unwrap().is_some());
}

/// Issue 21, defect 4: a 16 MiB Tree of empty file nodes cost about 1 GiB on every
/// read-only GetActionResult. Now what a result references is found once, when it is
/// written, by walking the Tree's encoding; reads look the list up and read no Tree.
#[tokio::test]
async fn a_huge_output_tree_is_read_once_when_written_and_never_on_lookups() {
    let counting = Arc::new(Counting::new(MemStore::new(
        1 << 30,
        StoreMetrics::default(),
    )));
    let read = counting.served.clone();
    let cas: Arc<dyn BlobStore> = counting;
    let results: Arc<dyn BlobStore> = Arc::new(MemStore::new(1 << 30, StoreMetrics::default()));
    let layer = CompletenessChecking::new(results.clone(), cas.clone(), Box::new(|_| {}));
    let empty = re::FileNode {
        name: String::new(),
        digest: Some(re::Digest {
            hash: hex::encode(Sha256::digest(b"")),
            size_bytes: 0,
        }),
        ..Default::default()
    };
    let real = cas_put(cas.as_ref(), b"one real file").await;
    let mut files = vec![empty; 16 << 20 >> 6];
    files.push(re::FileNode {
        name: "real".into(),
        digest: Some(real.clone()),
        ..Default::default()
    });
    let tree = re::Tree {
        root: Some(re::Directory {
            files,
            ..Default::default()
        }),
        children: vec![],
    };
    let tree_raw = tree.encode_to_vec();
    assert!(tree_raw.len() > 8 << 20, "{}", tree_raw.len());
    let tree_digest = cas_put(cas.as_ref(), &tree_raw).await;
    let result = re::ActionResult {
        output_directories: vec![re::OutputDirectory {
            path: "out".into(),
            tree_digest: Some(tree_digest),
            ..Default::default()
        }],
        ..Default::default()
    };
    let key = Key::ac("", lre_store::digest::DigestFunction::Sha256, &[3; 32]);
    let entry = layer
        .entry_for(
            lre_store::digest::DigestFunction::Sha256,
            &result,
            lre_store::ac_entry::Provenance::default(),
        )
        .await
        .unwrap();
    assert!(
        entry.len() < 4096,
        "the references, not the Tree: {}",
        entry.len()
    );
    put(results.as_ref(), key, &entry).await;
    read.store(0, Ordering::Relaxed);
    for _ in 0..3 {
        assert!(layer.get(&key).await.unwrap().is_some());
    }
    assert_eq!(
        read.load(Ordering::Relaxed),
        0,
        "no CAS blob was read by the lookups"
    );
    // The file inside goes: the next lookup says so, still without reading the Tree.
    let real_key = Key::Cas(hex::decode(&real.hash).unwrap().try_into().unwrap());
    cas.remove(&real_key).await.unwrap();
    assert!(layer.get(&key).await.unwrap().is_none());
    assert_eq!(read.load(Ordering::Relaxed), 0);
    // An entry of the earlier form with such a Tree reads as a miss, unread.
    let legacy = Key::ac("", lre_store::digest::DigestFunction::Sha256, &[4; 32]);
    put(results.as_ref(), legacy, &result.encode_to_vec()).await;
    cas_put(cas.as_ref(), b"one real file").await;
    read.store(0, Ordering::Relaxed);
    assert!(layer.get(&legacy).await.unwrap().is_none());
    assert_eq!(read.load(Ordering::Relaxed), 0);
    // A write naming a Tree the CAS lacks is refused, naming the directory.
    let missing = re::ActionResult {
        output_directories: vec![re::OutputDirectory {
            path: "gone".into(),
            tree_digest: Some(re::Digest {
                hash: "ab".repeat(32),
                size_bytes: 10,
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let e = layer
        .entry_for(
            lre_store::digest::DigestFunction::Sha256,
            &missing,
            lre_store::ac_entry::Provenance::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, lre_store::StoreError::FailedPrecondition(_)),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("\"gone\"") && e.to_string().contains("not in the CAS"),
        "{e}"
    );
}
