//! `cargo bench -p lre-cli --bench execute`: 2,000 trivial actions through Execute on an
//! in-process server with 4 local workers, against the same commands run directly as
//! local processes (plain, and inside the same bubblewrap sandbox) as baselines.
//!
//! Prints numbers; asserts nothing. LRE_BENCH_ACTIONS overrides the count.

use std::time::{Duration, Instant};

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::longrunning::operation;
use futures::StreamExt;
use prost::Message;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use re::execution_client::ExecutionClient;
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;

const WORKERS: usize = 4;
const IN_FLIGHT: usize = 16;

fn digest(b: &[u8]) -> re::Digest {
    re::Digest {
        hash: hex::encode(Sha256::digest(b)),
        size_bytes: b.len() as i64,
    }
}

fn argv(i: usize) -> Vec<String> {
    // Distinct arguments make distinct actions: no cache hits, no deduplication.
    vec!["/bin/true".into(), format!("action-{i}")]
}

fn secs(t: &Option<bazel_remote_apis::google::protobuf::Timestamp>) -> f64 {
    t.as_ref()
        .map(|t| t.seconds as f64 + t.nanos as f64 / 1e9)
        .unwrap_or(0.0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn execute(ch: Channel, action: re::Digest) -> (Duration, Duration) {
    let t = Instant::now();
    let mut s = ExecutionClient::new(ch)
        .execute(re::ExecuteRequest {
            action_digest: Some(action),
            skip_cache_lookup: true,
            ..Default::default()
        })
        .await
        .expect("execute")
        .into_inner();
    let mut last = None;
    while let Some(op) = s.message().await.expect("operation stream") {
        last = Some(op);
    }
    let total = t.elapsed();
    let resp = match last.and_then(|o| o.result) {
        Some(operation::Result::Response(a)) => re::ExecuteResponse::decode(&a.value[..]).unwrap(),
        other => panic!("no response: {other:?}"),
    };
    let r = resp.result.expect("result");
    assert_eq!(r.exit_code, 0);
    let m = r.execution_metadata.unwrap_or_default();
    let worker = Duration::from_secs_f64(
        (secs(&m.worker_completed_timestamp) - secs(&m.worker_start_timestamp)).max(0.0),
    );
    (total, worker)
}

/// The same commands with no scheduler: plain processes, or the worker's own sandbox.
async fn local_baseline(n: usize, sandboxed: bool) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let cfg = lre_worker::SandboxConfig {
        bwrap: "bwrap".into(),
        ro_paths: lre_worker::default_ro_paths(),
        network: false,
        host_proc: false,
        action_uids: lre_worker::ActionUids::Off,
    };
    let t = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let (dir, cfg) = (dir.path().to_path_buf(), cfg.clone());
            async move {
                let a = argv(i);
                let ok = if sandboxed {
                    let (out, err) = (dir.join(format!("{i}.out")), dir.join(format!("{i}.err")));
                    let spawn = lre_worker::sandbox::Spawn {
                        exec_root: &dir,
                        workdir: &dir,
                        argv: &a,
                        env: &[],
                        stdout: &out,
                        stderr: &err,
                        timeout: Duration::from_secs(60),
                        uid: None,
                    };
                    lre_worker::sandbox::run(&cfg, &spawn, tokio::sync::watch::channel(false).1)
                        .await
                        .unwrap()
                        .exit_code
                        == 0
                } else {
                    tokio::process::Command::new(&a[0])
                        .args(&a[1..])
                        .status()
                        .await
                        .unwrap()
                        .success()
                };
                assert!(ok);
            }
        })
        .buffer_unordered(WORKERS)
        .collect::<Vec<()>>()
        .await;
    n as f64 / t.elapsed().as_secs_f64()
}

fn report(results: &[(Duration, Duration)]) {
    let mut total: Vec<Duration> = results.iter().map(|r| r.0).collect();
    let mut added: Vec<Duration> = results.iter().map(|r| r.0.saturating_sub(r.1)).collect();
    let mut worker: Vec<Duration> = results.iter().map(|r| r.1).collect();
    total.sort();
    added.sort();
    worker.sort();
    println!(
        "  end-to-end latency per action      median {:?}  p99 {:?}",
        pct(&total, 0.5),
        pct(&total, 0.99)
    );
    println!(
        "  worker time (fetch, run, upload)   median {:?}  p99 {:?}",
        pct(&worker, 0.5),
        pct(&worker, 0.99)
    );
    println!(
        "  added by scheduler, server, gRPC   median {:?}  p99 {:?}",
        pct(&added, 0.5),
        pct(&added, 0.99)
    );
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("LRE_BENCH_ACTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let plain = local_baseline(n, false).await;
    println!(
        "baseline  {n} local processes, {WORKERS} at a time              {plain:8.1} actions/s"
    );
    let boxed = local_baseline(n, true).await;
    println!(
        "baseline  {n} local processes in bwrap, {WORKERS} at a time     {boxed:8.1} actions/s"
    );

    let dir = tempfile::tempdir().unwrap();
    let mut c = lre_server::Config::ephemeral();
    c.execution.enabled = true;
    let secret = "bench-worker-secret";
    c.auth
        .tokens
        .push(lre_server::auth::TokenConfig::for_secret(
            "bench",
            secret,
            lre_server::auth::Scope::Worker,
        ));
    let server = lre_server::start(c).await.unwrap();
    let url = format!("http://{}", server.grpc_addr);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let ro_paths = lre_worker::default_ro_paths();
    for i in 0..WORKERS {
        let mut opts = lre_worker::WorkerOptions::local(
            url.clone(),
            format!("bench-{i}"),
            dir.path().join(format!("w{i}")),
            vec![],
            ro_paths.clone(),
        );
        opts.credential = lre_worker::Credential::bearer(secret).unwrap();
        tokio::spawn(lre_worker::run(opts, shutdown.clone()));
    }
    let ch = Channel::from_shared(url).unwrap().connect().await.unwrap();

    // Upload every Command and Action up front; the input root is the empty directory.
    let empty_root = digest(&re::Directory::default().encode_to_vec());
    let mut actions = Vec::new();
    let mut blobs = Vec::new();
    for i in 0..n {
        let cmd = re::Command {
            arguments: argv(i),
            ..Default::default()
        }
        .encode_to_vec();
        let act = re::Action {
            command_digest: Some(digest(&cmd)),
            input_root_digest: Some(empty_root.clone()),
            ..Default::default()
        }
        .encode_to_vec();
        actions.push(digest(&act));
        blobs.push(cmd);
        blobs.push(act);
    }
    for chunk in blobs.chunks(2000) {
        let requests = chunk
            .iter()
            .map(|b| re::batch_update_blobs_request::Request {
                digest: Some(digest(b)),
                data: b.clone(),
                compressor: 0,
            })
            .collect();
        ContentAddressableStorageClient::new(ch.clone())
            .batch_update_blobs(re::BatchUpdateBlobsRequest {
                requests,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // Time only once every worker has registered.
    let scheduler = server.scheduler.clone().expect("execution is enabled");
    while scheduler.worker_count() < WORKERS {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Throughput: many in flight, so workers never idle.
    let t = Instant::now();
    let results: Vec<(Duration, Duration)> =
        futures::stream::iter(actions.iter().cloned().map(|a| execute(ch.clone(), a)))
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    println!("lre       {n} actions via Execute, {WORKERS} workers, {IN_FLIGHT} in flight  {rate:8.1} actions/s = {:.2} of local bwrap", rate / boxed);
    report(&results);
    // Latency: one at a time, so nothing queues and the difference is the server's own.
    let seq = n.min(500);
    let mut results = Vec::with_capacity(seq);
    for a in actions.iter().take(seq) {
        results.push(execute(ch.clone(), a.clone()).await);
    }
    println!("lre       {seq} actions via Execute, one at a time");
    report(&results);
    let _ = stop.send(true);
    server.shutdown().await;
}
