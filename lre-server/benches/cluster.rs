//! `cargo bench -p lre-server --bench cluster`: Execute throughput through scheduler
//! replicas that share their state in a real redis-server (`execution.redis`), 3 replicas
//! against 1, with the in-memory scheduler of one process as the reference.
//!
//! The workers are instant: they speak the worker protocol and report success at once,
//! so what is measured is the scheduling path (Execute, the CAS reads Execute does, the
//! queue, claiming, dispatch, the result reaching the caller), not sandboxes. Replicas
//! run in this one process, on this machine's cores: the 3-replica number says what the
//! shared state costs and whether it scales here, not what three hosts would do.
//!
//! Every replica keeps its CAS and action cache in the same Redis (Execute reads the
//! action, command and input root from it), the reference included, so the rows differ
//! only in where the scheduler's state lives.
//!
//! Prints numbers; asserts nothing beyond every action succeeding. LRE_BENCH_QUICK=1
//! shrinks the run.

use lre_test_support::redis as redis_server;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use lre_server::digest::Digest;
use lre_worker_protocol::v1::{
    server_message, worker_message, worker_service_client::WorkerServiceClient, ActionFinished,
    Register, WorkerMessage,
};
use prost::Message;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use re::execution_client::ExecutionClient;
use tonic::transport::Channel;

const SECRET: &str = "bench-worker-secret";
const CONCURRENCY: usize = 32;

/// A replica with its CAS and action cache in Redis (so replicas share blobs), and its
/// scheduler in Redis too when `shared`.
fn config(url: &str, shared: bool) -> lre_server::Config {
    let mut c = lre_server::Config::ephemeral();
    c.execution.enabled = true;
    c.execution.known_platforms = vec![Default::default()];
    let r = lre_store::config::RedisConfig::new(url);
    c.store = lre_server::config::StoreConfig::Redis(r.clone());
    if shared {
        c.execution.redis = Some(r);
    }
    c.auth
        .tokens
        .push(lre_server::auth::TokenConfig::for_secret(
            "w",
            SECRET,
            lre_server::auth::Scope::Worker,
        ));
    c
}

async fn channel(s: &lre_server::RunningServer) -> Channel {
    Channel::from_shared(format!("http://{}", s.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A worker that reports every action done, exit code 0, the moment it gets it.
async fn instant_worker(ch: Channel, id: String, capacity: u32) {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tx.send(WorkerMessage {
        message: Some(worker_message::Message::Register(Register {
            worker_id: id,
            properties: vec![],
            capacity,
        })),
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {SECRET}").parse().unwrap());
    let mut down = WorkerServiceClient::new(ch)
        .attach(req)
        .await
        .unwrap()
        .into_inner();
    let done = re::ActionResult::default().encode_to_vec();
    while let Ok(Some(m)) = down.message().await {
        if let Some(server_message::Message::Run(run)) = m.message {
            let f = ActionFinished {
                operation: run.operation,
                status_code: 0,
                status_message: String::new(),
                result: done.clone(),
                missing_blobs: vec![],
            };
            if tx
                .send(WorkerMessage {
                    message: Some(worker_message::Message::Finished(f)),
                })
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// `n` distinct actions over one empty input root, uploaded; their digests.
async fn actions(ch: &Channel, n: usize, salt: &str) -> Vec<re::Digest> {
    let root = re::Directory::default().encode_to_vec();
    let mut blobs = vec![root.clone()];
    let mut out = Vec::new();
    for i in 0..n {
        let cmd = re::Command {
            arguments: vec!["true".into(), format!("{salt}-{i}")],
            ..Default::default()
        }
        .encode_to_vec();
        let act = re::Action {
            command_digest: Some(Digest::of(&cmd).to_proto()),
            input_root_digest: Some(Digest::of(&root).to_proto()),
            do_not_cache: true,
            ..Default::default()
        }
        .encode_to_vec();
        out.push(Digest::of(&act).to_proto());
        blobs.push(cmd);
        blobs.push(act);
    }
    for chunk in blobs.chunks(500) {
        ContentAddressableStorageClient::new(ch.clone())
            .batch_update_blobs(re::BatchUpdateBlobsRequest {
                requests: chunk
                    .iter()
                    .map(|b| re::batch_update_blobs_request::Request {
                        digest: Some(Digest::of(b).to_proto()),
                        data: b.clone(),
                        compressor: 0,
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    out
}

/// Executes every action, CONCURRENCY at a time, spread over the replicas' channels;
/// actions per second.
async fn run(chans: &[Channel], actions: Vec<re::Digest>) -> f64 {
    let actions = Arc::new(actions);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..CONCURRENCY {
        let (actions, next, ch) = (
            actions.clone(),
            next.clone(),
            chans[t % chans.len()].clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(a) = actions.get(i) else { return };
                let mut s = ExecutionClient::new(ch.clone())
                    .execute(re::ExecuteRequest {
                        action_digest: Some(a.clone()),
                        skip_cache_lookup: true,
                        ..Default::default()
                    })
                    .await
                    .expect("Execute")
                    .into_inner();
                let mut last = None;
                while let Some(op) = s.message().await.expect("operation stream") {
                    last = Some(op);
                }
                assert!(last.is_some_and(|o| o.done), "the operation finished");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    actions.len() as f64 / start.elapsed().as_secs_f64()
}

/// `replicas` servers, each with `workers` instant workers of 8 slots; actions/s.
async fn scenario(
    url: &str,
    shared: bool,
    replicas: usize,
    workers: usize,
    n: usize,
    salt: &str,
) -> f64 {
    let mut servers = Vec::new();
    let mut chans = Vec::new();
    for r in 0..replicas {
        let s = lre_server::start(config(url, shared)).await.unwrap();
        let ch = channel(&s).await;
        for w in 0..workers {
            tokio::spawn(instant_worker(ch.clone(), format!("r{r}-w{w}"), 8));
        }
        chans.push(ch);
        servers.push(s);
    }
    // Workers attach, and every replica reads every registration (every 2 s).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let acts = actions(&chans[0], n, salt).await;
    // Warm-up: connections, script loading.
    run(&chans, acts[..n / 10].to_vec()).await;
    let rate = run(&chans, acts[n / 10..].to_vec()).await;
    for s in servers {
        s.shutdown().await;
    }
    rate
}

fn main() {
    let quick = std::env::var_os("LRE_BENCH_QUICK").is_some();
    let n = if quick { 500 } else { 5000 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let redis = redis_server::Redis::up(&["--save", ""]);
    rt.block_on(async {
        println!(
            "Execute throughput, {CONCURRENCY} concurrent callers, {} actions measured (after {} warm-up), instant workers with 8 slots:",
            n - n / 10,
            n / 10
        );
        let mem = scenario(&redis.url, false, 1, 2, n, "mem").await;
        println!("  in-memory scheduler, 1 replica, 2 workers:     {mem:8.0} actions/s (reference)");
        let one = scenario(&redis.url, true, 1, 2, n, "one").await;
        println!("  Redis-shared, 1 replica, 2 workers (baseline): {one:8.0} actions/s ({:.2}x the in-memory one)", one / mem);
        let three = scenario(&redis.url, true, 3, 2, n, "three").await;
        println!("  Redis-shared, 3 replicas, 2 workers each:      {three:8.0} actions/s ({:.2}x baseline)", three / one);
    });
}
