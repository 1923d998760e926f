//! The S3 tier against `object_store` used directly, on the same 3-node Garage cluster in
//! the same run (the baseline): what the store's verified writes, part buffering and
//! fast-tier fills cost on top of the client library.
//!
//!   cargo bench -p lre-store --bench s3        (needs `garage`; LRE_BENCH_QUICK=1: smaller)

use std::sync::Arc;
use std::time::{Duration, Instant};

use lre_store::metrics::StoreMetrics;
use lre_store::store::{BlobStore, FastSlowStore, Key, MemStore, S3Store};
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload, WriteMultipart};

use lre_test_support::{noise, put, read_all, sha, Garage};

fn mib_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let quick = std::env::var_os("LRE_BENCH_QUICK").is_some();
    let (small_n, big) = if quick {
        (20, 32 << 20)
    } else {
        (100, 128 << 20)
    };
    let g = Garage::up(3);
    let raw = g.raw(1);
    let s3 = Arc::new(S3Store::open(&g.config(1)).await.expect("open"));

    let smalls: Vec<Vec<u8>> = (0..small_n)
        .map(|i| noise(1 << 20, 100 + i as u64))
        .collect();
    let large = noise(big, 7);
    println!(
        "3-node Garage on loopback, {small_n} × 1 MiB blobs and one {} MiB blob",
        big >> 20
    );
    println!("{:<58} {:>12} {:>10}", "what", "MiB/s", "vs direct");

    // Writes: object_store put (baseline) vs the store's verified upload.
    let t = Instant::now();
    for (i, b) in smalls.iter().enumerate() {
        raw.put(
            &Path::from(format!("bench/small/{i}")),
            PutPayload::from(b.clone()),
        )
        .await
        .unwrap();
    }
    let base_w = mib_s(small_n << 20, t.elapsed());
    let t = Instant::now();
    let mut keys = Vec::new();
    for b in &smalls {
        keys.push(put(s3.as_ref(), b).await);
    }
    let ours_w = mib_s(small_n << 20, t.elapsed());
    println!(
        "{:<58} {:>12.1} {:>10}",
        "baseline: object_store put, 1 MiB × N", base_w, "1.00"
    );
    println!(
        "{:<58} {:>12.1} {:>10.2}",
        "S3Store write (hashed, verified), 1 MiB × N",
        ours_w,
        ours_w / base_w
    );

    let t = Instant::now();
    let mut up = WriteMultipart::new_with_chunk_size(
        raw.put_multipart(&Path::from("bench/big")).await.unwrap(),
        8 << 20,
    );
    for c in large.chunks(1 << 20) {
        up.wait_for_capacity(1).await.unwrap();
        up.write(c);
    }
    up.finish().await.unwrap();
    let base_bw = mib_s(big, t.elapsed());
    let t = Instant::now();
    let kbig = put(s3.as_ref(), &large).await;
    let ours_bw = mib_s(big, t.elapsed());
    println!(
        "{:<58} {:>12.1} {:>10}",
        "baseline: object_store multipart, one large blob", base_bw, "1.00"
    );
    println!(
        "{:<58} {:>12.1} {:>10.2}",
        "S3Store write, one large blob (parts, then copy)",
        ours_bw,
        ours_bw / base_bw
    );

    // Reads.
    let t = Instant::now();
    for i in 0..small_n {
        raw.get(&Path::from(format!("bench/small/{i}")))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    }
    let base_r = mib_s(small_n << 20, t.elapsed());
    let t = Instant::now();
    for k in &keys {
        read_all(s3.as_ref(), k, 0).await.unwrap();
    }
    let ours_r = mib_s(small_n << 20, t.elapsed());
    println!(
        "{:<58} {:>12.1} {:>10}",
        "baseline: object_store get, 1 MiB × N", base_r, "1.00"
    );
    println!(
        "{:<58} {:>12.1} {:>10.2}",
        "S3Store read, 1 MiB × N",
        ours_r,
        ours_r / base_r
    );
    let t = Instant::now();
    raw.get(&Path::from("bench/big"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let base_br = mib_s(big, t.elapsed());
    let t = Instant::now();
    read_all(s3.as_ref(), &kbig, 0).await.unwrap();
    let ours_br = mib_s(big, t.elapsed());
    println!(
        "{:<58} {:>12.1} {:>10}",
        "baseline: object_store get, one large blob", base_br, "1.00"
    );
    println!(
        "{:<58} {:>12.1} {:>10.2}",
        "S3Store read, one large blob (streamed)",
        ours_br,
        ours_br / base_br
    );

    // A fast tier in front: first read fills it (hashing the slow copy), the second is local.
    let fast = Arc::new(MemStore::new(1 << 30, StoreMetrics::default()));
    let tiers = FastSlowStore::new(fast, s3.clone());
    let t = Instant::now();
    for k in &keys {
        read_all(&tiers, k, 0).await.unwrap();
    }
    let fill = mib_s(small_n << 20, t.elapsed());
    let t = Instant::now();
    for k in &keys {
        read_all(&tiers, k, 0).await.unwrap();
    }
    let hot = mib_s(small_n << 20, t.elapsed());
    println!(
        "{:<58} {:>12.1} {:>10.2}",
        "fast-slow read, cold (fill from Garage, verified)",
        fill,
        fill / base_r
    );
    println!(
        "{:<58} {:>12.1} {:>10.2}",
        "fast-slow read, warm (memory tier)",
        hot,
        hot / base_r
    );

    // Lookups cost one HEAD per digest the fast tier lacks: how that grows.
    for n in [100usize, 1000] {
        let mut ask: Vec<Key> = keys.iter().cycle().take(n / 2).copied().collect();
        ask.extend((0..n - ask.len()).map(|i| Key::Cas(sha(&i.to_le_bytes()))));
        let t = Instant::now();
        let found = s3.lookup(&ask).await.unwrap();
        let d = t.elapsed();
        assert_eq!(found.iter().filter(|f| f.is_some()).count(), n / 2);
        println!(
            "{:<58} {:>12} {:>10}",
            format!("S3Store lookup of {n} digests (half present)"),
            format!("{:.1} ms", d.as_secs_f64() * 1e3),
            format!("{:.0} µs/dgst", d.as_secs_f64() * 1e6 / n as f64)
        );
    }
}
