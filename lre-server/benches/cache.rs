//! `cargo bench -p lre-server --bench cache`: throughput, latency and memory of a real
//! lre-server process on a filesystem store, against this machine's raw SHA-256 speed
//! (the ceiling: every byte written is hashed once, every byte read crosses gRPC once).
//!
//! BLAKE3 writes are reported against BLAKE3's own single-core speed, measured here too.
//!
//! Prints numbers; asserts nothing. LRE_BENCH_QUICK=1 shrinks the sizes for a smoke run;
//! LRE_BENCH_SERVER=path runs another lre-server build under the same client.

use lre_test_support::noise;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream::{
    byte_stream_client::ByteStreamClient, ReadRequest, WriteRequest,
};
use lre_server::digest::DigestFunction;
use re::action_cache_client::ActionCacheClient;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;

const MIB: usize = 1 << 20;
const CHUNK: usize = MIB;

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn spawn(store: &std::path::Path) -> Server {
        // LRE_BENCH_SERVER: another build (say, the previous commit's) measured by the same
        // client, for a before/after in one sitting.
        let bin = std::env::var_os("LRE_BENCH_SERVER")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_lre-server").into());
        let mut child = Command::new(bin)
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--no-http",
                "--max-size",
                "8GiB",
                "--store-dir",
            ])
            .arg(store)
            .env("LRE_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn lre-server");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let url = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| {
                l.trim()
                    .strip_prefix("grpc: grpc://")
                    .map(|a| format!("http://{a}"))
            })
            .expect("server address");
        std::thread::spawn(move || lines.for_each(drop));
        Server { child, url }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Peak and current resident memory, in MiB, from /proc.
    fn memory_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .map(|kb| kb / 1024.0)
                .unwrap_or(f64::NAN)
        };
        (field("VmHWM:"), field("VmRSS:"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Chunk `i` of a synthetic blob: a fixed random MiB stamped with the chunk index and seed,
/// so large blobs can be regenerated on the fly instead of held in memory.
fn chunk(base: &[u8], seed: u64, i: usize, len: usize) -> Vec<u8> {
    let mut c = base[..len].to_vec();
    c[..8].copy_from_slice(&(i as u64).to_le_bytes());
    c[8..16].copy_from_slice(&seed.to_le_bytes());
    c
}

fn chunks(size: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..size.div_ceil(CHUNK)).map(move |i| (i, CHUNK.min(size - i * CHUNK)))
}

fn digest_of(base: &[u8], seed: u64, size: usize) -> re::Digest {
    digest_in(DigestFunction::Sha256, base, seed, size)
}

fn digest_in(f: DigestFunction, base: &[u8], seed: u64, size: usize) -> re::Digest {
    let mut h = f.hasher();
    for (i, len) in chunks(size) {
        h.update(&chunk(base, seed, i, len));
    }
    re::Digest {
        hash: hex::encode(h.finalize()),
        size_bytes: size as i64,
    }
}

/// Uploads a synthetic blob whose digest the caller computed (outside any timing).
async fn write_blob(ch: Channel, base: &[u8], seed: u64, d: &re::Digest) {
    write_blob_in(DigestFunction::Sha256, ch, base, seed, d).await
}

/// `write_blob` under digest function `f` (`blobs/blake3/...` for BLAKE3).
async fn write_blob_in(f: DigestFunction, ch: Channel, base: &[u8], seed: u64, d: &re::Digest) {
    let size = d.size_bytes as usize;
    let function = match f {
        DigestFunction::Sha256 => String::new(),
        other => format!("{}/", other.name()),
    };
    let name = format!(
        "uploads/{}/blobs/{function}{}/{}",
        uuid::Uuid::new_v4(),
        d.hash,
        d.size_bytes
    );
    let base = base.to_vec();
    let reqs = futures::stream::iter(chunks(size).map(move |(i, len)| WriteRequest {
        resource_name: if i == 0 { name.clone() } else { String::new() },
        write_offset: (i * CHUNK) as i64,
        finish_write: (i + 1) * CHUNK >= size,
        data: chunk(&base, seed, i, len),
    }));
    let resp = ByteStreamClient::new(ch)
        .write(reqs)
        .await
        .expect("write")
        .into_inner();
    assert_eq!(resp.committed_size, size as i64);
}

async fn read_blob(ch: Channel, d: &re::Digest) -> usize {
    let mut s = ByteStreamClient::new(ch)
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", d.hash, d.size_bytes),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .expect("read")
        .into_inner();
    let mut n = 0;
    while let Some(m) = s.message().await.expect("read stream") {
        n += m.data.len();
    }
    n
}

/// Flushes every dirty page (`sync`) before a timed write, so no write pays for the
/// write-back of the ones before it: the store holds up to `max_unsynced` dirty, and the
/// kernel throttles writers past its own dirty limit.
fn settle() {
    let _ = Command::new("sync").status();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let quick = std::env::var_os("LRE_BENCH_QUICK").is_some();
    let big = if quick { 32 * MIB } else { 256 * MIB };
    let huge = if quick { 128 * MIB } else { 1024 * MIB };
    let small_count = if quick { 20 } else { 200 };
    let base: Vec<u8> = noise::noise(CHUNK, 1);

    // Baseline: raw SHA-256 over the same kind of data, in this process.
    let t = Instant::now();
    let mut h = Sha256::new();
    for (i, len) in chunks(big) {
        h.update(chunk(&base, 0, i, len));
    }
    std::hint::black_box(h.finalize());
    let sha = mbps(big, t.elapsed());
    println!(
        "baseline  sha256 (this machine, 1 core)          {sha:9.1} MiB/s   = 1.00 of ceiling"
    );
    // BLAKE3's own ceiling: one core (the crate's `update`, no threads), SIMD as detected.
    let t = Instant::now();
    let mut h = DigestFunction::Blake3.hasher();
    for (i, len) in chunks(big) {
        h.update(&chunk(&base, 0, i, len));
    }
    std::hint::black_box(h.finalize());
    let b3 = mbps(big, t.elapsed());
    println!(
        "baseline  blake3 (this machine, 1 core)          {b3:9.1} MiB/s   = {:.2}x sha256",
        b3 / sha
    );

    let dir = tempfile::tempdir_in(
        std::env::var("LRE_BENCH_DIR")
            .unwrap_or_else(|_| std::env::temp_dir().display().to_string()),
    )
    .unwrap();
    // Second baseline: the store's disk itself, written and fsynced like a committed blob.
    let t = Instant::now();
    {
        use std::io::Write;
        let mut f = std::fs::File::create(dir.path().join("disk-baseline")).unwrap();
        for (i, len) in chunks(big) {
            f.write_all(&chunk(&base, 0, i, len)).unwrap();
        }
        f.sync_all().unwrap();
    }
    let disk = mbps(big, t.elapsed());
    std::fs::remove_file(dir.path().join("disk-baseline")).unwrap();
    println!(
        "baseline  disk write+fsync {} MiB (store's fs)    {disk:9.1} MiB/s",
        big / MIB
    );

    // The page cache alone: the same bytes written without an fsync, and read back into
    // 1 MiB buffers (the limits for a write acknowledged before it is synced, and a read).
    let page_file = dir.path().join("page-baseline");
    let t = Instant::now();
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&page_file).unwrap();
        for (i, len) in chunks(big) {
            f.write_all(&chunk(&base, 0, i, len)).unwrap();
        }
    }
    let page_write = mbps(big, t.elapsed());
    let t = Instant::now();
    {
        use std::io::Read;
        let mut f = std::fs::File::open(&page_file).unwrap();
        let mut buf = vec![0u8; CHUNK];
        while f.read(&mut buf).unwrap() > 0 {}
    }
    let file_read = mbps(big, t.elapsed());
    std::fs::remove_file(&page_file).unwrap();
    println!(
        "baseline  page-cache write {} MiB, no fsync        {page_write:9.1} MiB/s",
        big / MIB
    );
    println!(
        "baseline  file read {} MiB, 1 MiB buffers         {file_read:9.1} MiB/s",
        big / MIB
    );

    // And one fsynced file per 1 MiB blob, as the old protocol paid for every blob.
    let t = Instant::now();
    for i in 0..small_count {
        use std::io::Write;
        let p = dir.path().join(format!("disk-baseline-{i}"));
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&chunk(&base, i as u64, 0, MIB)).unwrap();
        f.sync_all().unwrap();
    }
    let disk_small = mbps(small_count * MIB, t.elapsed());
    println!(
        "baseline  disk write+fsync 1 MiB files x{small_count:<4}        {disk_small:9.1} MiB/s"
    );

    let server = Server::spawn(&dir.path().join("store"));
    let ch = server.channel().await;
    let report = |name: &str, bytes: usize, d: Duration| {
        let v = mbps(bytes, d);
        println!(
            "{name:<48} {v:9.1} MiB/s   = {:.2} of sha256, {:.2} of disk, {:.2} of page cache",
            v / sha,
            v / disk,
            v / page_write
        );
    };

    // 1 MiB blobs, sequential.
    let small: Vec<re::Digest> = (0..small_count)
        .map(|i| digest_of(&base, 1000 + i as u64, MIB))
        .collect();
    settle();
    let t = Instant::now();
    for (i, d) in small.iter().enumerate() {
        write_blob(ch.clone(), &base, 1000 + i as u64, d).await;
    }
    let small_write = mbps(small_count * MIB, t.elapsed());
    report(
        &format!("bytestream write 1 MiB x{small_count}"),
        small_count * MIB,
        t.elapsed(),
    );
    let t = Instant::now();
    for d in &small {
        read_blob(ch.clone(), d).await;
    }
    report(
        &format!("bytestream read  1 MiB x{small_count}"),
        small_count * MIB,
        t.elapsed(),
    );

    // One big blob.
    let d = digest_of(&base, 7, big);
    settle();
    let t = Instant::now();
    write_blob(ch.clone(), &base, 7, &d).await;
    let single_write = mbps(big, t.elapsed());
    report(
        &format!("bytestream write {} MiB", big / MIB),
        big,
        t.elapsed(),
    );
    let t = Instant::now();
    assert_eq!(read_blob(ch.clone(), &d).await, big);
    let v = mbps(big, t.elapsed());
    println!(
        "{:<48} {v:9.1} MiB/s   = {:.2} of sha256, {:.2} of the file read",
        format!("bytestream read  {} MiB", big / MIB),
        v / sha,
        v / file_read
    );

    // The same two writes under BLAKE3, against BLAKE3's ceiling and the SHA-256 writes.
    let b3_report = |name: &str, bytes: usize, d: Duration, sha_write: f64| {
        let v = mbps(bytes, d);
        println!(
            "{name:<48} {v:9.1} MiB/s   = {:.2} of blake3, {:.2}x the sha256 write",
            v / b3,
            v / sha_write
        );
    };
    let small_b3: Vec<re::Digest> = (0..small_count)
        .map(|i| digest_in(DigestFunction::Blake3, &base, 3000 + i as u64, MIB))
        .collect();
    settle();
    let t = Instant::now();
    for (i, d) in small_b3.iter().enumerate() {
        write_blob_in(
            DigestFunction::Blake3,
            ch.clone(),
            &base,
            3000 + i as u64,
            d,
        )
        .await;
    }
    b3_report(
        &format!("bytestream write 1 MiB x{small_count} (blake3)"),
        small_count * MIB,
        t.elapsed(),
        small_write,
    );
    let d3 = digest_in(DigestFunction::Blake3, &base, 8, big);
    settle();
    let t = Instant::now();
    write_blob_in(DigestFunction::Blake3, ch.clone(), &base, 8, &d3).await;
    b3_report(
        &format!("bytestream write {} MiB (blake3)", big / MIB),
        big,
        t.elapsed(),
        single_write,
    );

    // Four writes of a quarter each at once, against one write of the same bytes (above).
    let quarter = big / 4;
    let ds: Vec<re::Digest> = (0..4).map(|i| digest_of(&base, 70 + i, quarter)).collect();
    settle();
    let t = Instant::now();
    let writes: Vec<_> = ds
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let (ch, base, d) = (ch.clone(), base.clone(), d.clone());
            tokio::spawn(async move { write_blob(ch, &base, 70 + i as u64, &d).await })
        })
        .collect();
    for w in writes {
        w.await.unwrap();
    }
    let v = mbps(big, t.elapsed());
    println!(
        "{:<48} {v:9.1} MiB/s   = {:.2} of sha256, {:.2}x the single write",
        format!("bytestream write 4 x {} MiB at once", quarter / MIB),
        v / sha,
        v / single_write
    );

    // BatchUpdateBlobs / BatchReadBlobs of 1,000 x 4 KiB, against the same 4 MiB as one
    // ByteStream write.
    let small4k: Vec<Vec<u8>> = (0..1000u32)
        .map(|i| {
            let mut b = base[..4096].to_vec();
            b[..4].copy_from_slice(&i.to_le_bytes());
            b[4..8].copy_from_slice(b"4kib");
            b
        })
        .collect();
    let reqs: Vec<re::batch_update_blobs_request::Request> = small4k
        .iter()
        .map(|b| re::batch_update_blobs_request::Request {
            digest: Some(re::Digest {
                hash: hex::encode(Sha256::digest(b)),
                size_bytes: b.len() as i64,
            }),
            data: b.clone(),
            compressor: 0,
        })
        .collect();
    let mut cas = ContentAddressableStorageClient::new(ch.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let t = Instant::now();
    cas.batch_update_blobs(re::BatchUpdateBlobsRequest {
        instance_name: String::new(),
        requests: reqs.clone(),
        digest_function: 0,
    })
    .await
    .unwrap();
    let up = t.elapsed();
    let t = Instant::now();
    let got = cas
        .batch_read_blobs(re::BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: reqs.iter().filter_map(|r| r.digest.clone()).collect(),
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let down = t.elapsed();
    assert_eq!(got.responses.len(), 1000);
    let one = digest_of(&base, 4096, 4 * MIB);
    let t = Instant::now();
    write_blob(ch.clone(), &base, 4096, &one).await;
    let one_write = mbps(4 * MIB, t.elapsed());
    println!(
        "batch_update_blobs 1000 x 4 KiB                  {:9.0} blobs/s {:7.1} MiB/s = {:.2} of one 4 MiB bytestream write",
        1000.0 / up.as_secs_f64(),
        mbps(4000 * 1024, up),
        mbps(4000 * 1024, up) / one_write
    );
    println!(
        "batch_read_blobs   1000 x 4 KiB                  {:9.0} blobs/s {:7.1} MiB/s",
        1000.0 / down.as_secs_f64(),
        mbps(4000 * 1024, down)
    );

    // FindMissingBlobs with 1k, 10k and 100k digests, half of them present: how its cost
    // grows with the request (the 1k request's cost per digest is the baseline).
    let present_n: u32 = if quick { 5_000 } else { 50_000 };
    let mut present: Vec<re::Digest> = Vec::new();
    let mut batch = Vec::new();
    for i in 0..present_n {
        let data = format!("small blob {i}").into_bytes();
        present.push(re::Digest {
            hash: hex::encode(Sha256::digest(&data)),
            size_bytes: data.len() as i64,
        });
        batch.push(re::batch_update_blobs_request::Request {
            digest: present.last().cloned(),
            data,
            compressor: 0,
        });
    }
    for b in batch.chunks(1000) {
        ContentAddressableStorageClient::new(ch.clone())
            .batch_update_blobs(re::BatchUpdateBlobsRequest {
                instance_name: String::new(),
                requests: b.to_vec(),
                digest_function: 0,
            })
            .await
            .unwrap();
    }
    let mut per_digest_1k = None;
    for n in [1_000usize, 10_000, 100_000].map(|n| if quick { n / 10 } else { n }) {
        let mut digests: Vec<re::Digest> = present[..n / 2].to_vec();
        for i in 0..n / 2 {
            let data = format!("absent blob {i}").into_bytes();
            digests.push(re::Digest {
                hash: hex::encode(Sha256::digest(&data)),
                size_bytes: data.len() as i64,
            });
        }
        let mut times = Vec::new();
        for _ in 0..if n >= 100_000 { 7 } else { 20 } {
            let t = Instant::now();
            let missing = ContentAddressableStorageClient::new(ch.clone())
                .max_encoding_message_size(64 << 20)
                .find_missing_blobs(re::FindMissingBlobsRequest {
                    instance_name: String::new(),
                    blob_digests: digests.clone(),
                    digest_function: 0,
                })
                .await
                .unwrap()
                .into_inner()
                .missing_blob_digests;
            times.push(t.elapsed());
            assert_eq!(missing.len(), n / 2);
        }
        times.sort();
        let median = percentile(&times, 0.5);
        let per = median.as_secs_f64() * 1e6 / n as f64;
        let base = *per_digest_1k.get_or_insert(per);
        println!(
            "find_missing_blobs {n} digests ({} present)  median {median:?}  p99 {:?}  {per:.2} µs/digest ({:.2} of the smallest request's)",
            n / 2,
            percentile(&times, 0.99),
            per / base
        );
    }

    // GetActionResult on a hit with two outputs (completeness check included).
    let action = re::Digest {
        hash: hex::encode(Sha256::digest(b"bench action")),
        size_bytes: 12,
    };
    let result = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out".into(),
            digest: Some(small[0].clone()),
            ..Default::default()
        }],
        stdout_digest: Some(present[0].clone()),
        ..Default::default()
    };
    let mut ac = ActionCacheClient::new(ch.clone());
    ac.update_action_result(re::UpdateActionResultRequest {
        action_digest: Some(action.clone()),
        action_result: Some(result),
        ..Default::default()
    })
    .await
    .unwrap();
    let n = if quick { 200 } else { 2000 };
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        ac.get_action_result(re::GetActionResultRequest {
            action_digest: Some(action.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "get_action_result hit x{n}                        median {:?}  p99 {:?}",
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );
    drop(server);

    // Peak memory of a fresh server while a blob far larger than its buffers streams in.
    let server = Server::spawn(&dir.path().join("store-mem"));
    let ch = server.channel().await;
    let (idle_peak, _) = server.memory_mib();
    let d = digest_of(&base, 99, huge);
    settle();
    let t = Instant::now();
    write_blob(ch.clone(), &base, 99, &d).await;
    let elapsed = t.elapsed();
    let (peak, now) = server.memory_mib();
    report(
        &format!("bytestream write {} MiB (fresh server)", huge / MIB),
        huge,
        elapsed,
    );
    println!("server memory during {} MiB upload: peak RSS {peak:.1} MiB (idle peak {idle_peak:.1} MiB, after {now:.1} MiB)", huge / MIB);
}
