//! Scheduler replicas sharing their state in a real redis-server (`execution.redis`), with
//! real workers (bubblewrap) attached to different replicas: Execute on a replica without
//! workers runs on another's; WaitExecution and GetOperation answer on any replica;
//! identical actions run once across replicas; a replica stopped with actions queued loses
//! none; a replica stopped mid-action hands it to another replica's worker; Redis away is
//! UNAVAILABLE, and back is business as usual. The CAS and action cache are in the same
//! Redis, so every replica sees every blob.

mod common;
use lre_test_support::redis as redis_server;

use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::longrunning::{
    operations_client::OperationsClient, GetOperationRequest, Operation,
};
use common::{outcome, prepare, stdout_of, Exec};
use lre_server::config::StoreConfig;
use lre_store::config::RedisConfig;
use re::execution_client::ExecutionClient;
use redis_server::Redis;
use tonic::transport::Channel;
use tonic::Code;

fn replica_config(url: &str) -> lre_server::Config {
    let mut c = lre_server::Config::ephemeral();
    let mut r = RedisConfig::new(url);
    r.request_timeout_seconds = 2;
    c.store = StoreConfig::Redis(r.clone());
    c.execution.enabled = true;
    c.execution.keepalive_seconds = 1;
    c.execution.lease_seconds = 3;
    // Actions may wait for a worker that is not attached yet (a restart).
    c.execution.known_platforms = vec![Default::default()];
    c.execution.redis = Some(r);
    c.shutdown_grace_seconds = 1;
    c.auth
        .tokens
        .push(lre_server::auth::TokenConfig::for_secret(
            "w",
            WORKER_SECRET,
            lre_server::auth::Scope::Worker,
        ));
    c
}

const WORKER_SECRET: &str = "cluster-test-worker-secret";

async fn replica(redis: &Redis) -> lre_server::RunningServer {
    lre_server::start(replica_config(&redis.url)).await.unwrap()
}

/// Actions the workers connected to this replica run.
fn running_here(s: &lre_server::RunningServer) -> usize {
    s.scheduler
        .as_ref()
        .unwrap()
        .local_workers()
        .iter()
        .map(|w| w.running)
        .sum()
}

async fn channel(s: &lre_server::RunningServer) -> Channel {
    Channel::from_shared(format!("http://{}", s.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

struct Worker {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    _work: tempfile::TempDir,
}

fn attach(s: &lre_server::RunningServer, id: &str) -> Worker {
    let work = tempfile::tempdir().unwrap();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let mut opts = lre_worker::WorkerOptions::local(
        format!("http://{}", s.grpc_addr),
        id.into(),
        work.path().to_path_buf(),
        vec![],
        lre_worker::default_ro_paths(),
    );
    opts.credential = lre_worker::Credential::bearer(WORKER_SECRET).unwrap();
    Worker {
        stop,
        task: tokio::spawn(async move {
            if let Err(e) = lre_worker::run(opts, shutdown).await {
                eprintln!("worker ended: {e}");
            }
        }),
        _work: work,
    }
}

impl Worker {
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

fn sh<'a>(script: &'a str, argv: &'a mut Vec<&'a str>) -> Exec<'a> {
    argv.extend(["/bin/sh", "-c", script]);
    Exec {
        instance: "",
        argv,
        input: b"cluster test input",
        secret: None,
        invocation: None,
    }
}

/// Starts an Execute of an uploaded action; the stream, after its CacheCheck message.
async fn start_execute(ch: &Channel, action: &re::Digest) -> tonic::Streaming<Operation> {
    let mut ops = ExecutionClient::new(ch.clone())
        .execute(re::ExecuteRequest {
            action_digest: Some(action.clone()),
            skip_cache_lookup: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = ops.message().await.unwrap().unwrap();
    assert!(!first.done);
    ops
}

/// The rest of an operation stream; its last message and the name it ran under.
async fn finish(
    mut ops: tonic::Streaming<Operation>,
) -> (Result<re::ExecuteResponse, tonic::Status>, String) {
    let mut last = None;
    let mut name = String::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(60), ops.message()).await {
            Ok(Ok(Some(op))) => {
                name = op.name.clone();
                last = Some(op);
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => return (Err(e), name),
            Err(_) => panic!("the operation did not finish within 60s"),
        }
    }
    (outcome(last), name)
}

async fn wait_registered(s: &lre_server::RunningServer, n: usize) {
    assert!(common::wait_workers(s, n).await, "worker never attached");
    // Registrations are published every 2 s; give every replica time to read them.
    tokio::time::sleep(Duration::from_millis(4500)).await;
}

/// With no grace at all and no `known_platforms`, a replica without workers still takes
/// an action another replica's registered worker can run (it once refused it: only
/// registrations seen within the grace counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_grace_a_replica_still_executes_on_another_replicas_worker() {
    let redis = Redis::up(&[]);
    let mut config = replica_config(&redis.url);
    config.execution.known_platforms = vec![];
    config.execution.worker_grace_seconds = 0;
    let a = lre_server::start(config.clone()).await.unwrap();
    let b = lre_server::start(config).await.unwrap();
    let ca = channel(&a).await;
    let w = attach(&b, "on-b");
    wait_registered(&b, 1).await;
    let mut argv = vec![];
    let r = common::execute(&ca, sh("echo ran", &mut argv))
        .await
        .expect("refused although B's worker can run it");
    assert_eq!(stdout_of(&ca, "", None, &r).await, "ran\n");
    w.stop().await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_replica_executes_on_any_replicas_worker_and_answers_for_any_operation() {
    let redis = Redis::up(&[]);
    let a = replica(&redis).await;
    let b = replica(&redis).await;
    let (ca, cb) = (channel(&a).await, channel(&b).await);
    let w = attach(&b, "on-b");
    wait_registered(&b, 1).await;

    // A has no worker: its Execute runs on B's.
    let mut argv = vec![];
    let r = common::execute(&ca, sh("cat in.txt; echo ' ran'", &mut argv))
        .await
        .unwrap();
    assert_eq!(
        stdout_of(&ca, "", None, &r).await,
        "cluster test input ran\n"
    );

    // An operation submitted on A is visible, and awaitable, on B.
    let mut argv = vec![];
    let action = prepare(&ca, &sh("sleep 2; echo slow", &mut argv))
        .await
        .unwrap();
    let mut ops = start_execute(&ca, &action).await;
    let queued = ops.message().await.unwrap().unwrap();
    let got = OperationsClient::new(cb.clone())
        .get_operation(GetOperationRequest {
            name: queued.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.name.as_str(), got.done), (queued.name.as_str(), false));
    let wait = ExecutionClient::new(cb.clone())
        .wait_execution(re::WaitExecutionRequest {
            name: queued.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let (on_b, name_b) = finish(wait).await;
    let (on_a, _) = finish(ops).await;
    assert_eq!(name_b, queued.name);
    assert_eq!(stdout_of(&cb, "", None, &on_b.unwrap()).await, "slow\n");
    assert_eq!(stdout_of(&ca, "", None, &on_a.unwrap()).await, "slow\n");

    // Identical actions sent to both replicas at once run once: the same operation, the
    // same output (nanoseconds of the one run).
    let mut argv = vec![];
    let action = prepare(&ca, &sh("sleep 1; date +%s%N", &mut argv))
        .await
        .unwrap();
    let (x, y) = tokio::join!(start_execute(&ca, &action), start_execute(&cb, &action));
    let ((rx, nx), (ry, ny)) = tokio::join!(finish(x), finish(y));
    assert_eq!(nx, ny, "the second Execute joined the first's operation");
    let (sx, sy) = (
        stdout_of(&ca, "", None, &rx.unwrap()).await,
        stdout_of(&cb, "", None, &ry.unwrap()).await,
    );
    assert_eq!(sx, sy, "one run, one output");
    assert!(sx.trim().parse::<u128>().is_ok(), "{sx:?}");

    // A name that is no operation: NOT_FOUND on every replica.
    for ch in [&ca, &cb] {
        let e = OperationsClient::new(ch.clone())
            .get_operation(GetOperationRequest { name: uuid_like() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
    w.stop().await;
    a.shutdown().await;
    b.shutdown().await;
}

fn uuid_like() -> String {
    "00000000-0000-4000-8000-000000000000".into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_actions_survive_their_replica_and_a_stopped_replica_hands_its_action_on() {
    let redis = Redis::up(&[]);
    let a = replica(&redis).await;
    let ca = channel(&a).await;

    // No worker anywhere: the action waits in Redis, not in A.
    let mut argv = vec![];
    let action = prepare(&ca, &sh("echo survived", &mut argv)).await.unwrap();
    let mut ops = start_execute(&ca, &action).await;
    let queued = ops.message().await.unwrap().unwrap();
    assert!(!queued.done);
    a.shutdown().await;
    drop(ops);

    // A brand-new replica, with the first worker the cluster ever had, runs it; the
    // client finds it by name there.
    let c = replica(&redis).await;
    let cc = channel(&c).await;
    let w1 = attach(&c, "w1");
    let wait = ExecutionClient::new(cc.clone())
        .wait_execution(re::WaitExecutionRequest {
            name: queued.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let (r, _) = finish(wait).await;
    assert_eq!(stdout_of(&cc, "", None, &r.unwrap()).await, "survived\n");

    // A replica stopped mid-action: the action its worker was running goes back to the
    // shared queue, and a worker on another replica runs it (attempt 2).
    let d = replica(&redis).await;
    let cd = channel(&d).await;
    wait_registered(&c, 1).await;
    let mut argv = vec![];
    let action = prepare(&cc, &sh("sleep 6; echo handed on", &mut argv))
        .await
        .unwrap();
    let ops = start_execute(&cd, &action).await;
    // Wait until w1 runs it, then stop w1's replica.
    let mut ran = false;
    for _ in 0..100 {
        if running_here(&c) == 1 {
            ran = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ran, "w1 never got the action");
    // Long enough for a reaper pass to find the action's queue empty and forget it: the
    // action given back must name its queue again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    c.shutdown().await;
    let w2 = attach(&d, "w2");
    let (r, _) = finish(ops).await;
    let r = r.unwrap();
    let ran_on = r
        .result
        .as_ref()
        .and_then(|x| x.execution_metadata.as_ref())
        .map(|m| m.worker.clone())
        .unwrap_or_default();
    assert_eq!(ran_on, "w2", "the second attempt ran on replica D's worker");
    assert_eq!(stdout_of(&cd, "", None, &r).await, "handed on\n");
    w2.stop().await;
    w1.stop().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_away_is_unavailable_at_start_and_while_running_and_recovery_follows() {
    // Unreachable at start: an error naming the key and the server.
    let dead = format!("redis://127.0.0.1:{}", redis_server::dead_port());
    let mut c = replica_config(&dead);
    c.store = StoreConfig::memory(64 << 20);
    let e = lre_server::start(c).await.err().expect("start must fail");
    let msg = e.to_string();
    assert!(
        msg.contains("execution.redis") && msg.contains("redis at"),
        "{msg}"
    );

    // A Redis that may evict any key could drop the queue or a lease: refused at start.
    let lru = Redis::up(&["--maxmemory-policy", "allkeys-lru"]);
    let e = lre_server::start(replica_config(&lru.url))
        .await
        .err()
        .expect("an allkeys-lru Redis must be refused");
    let msg = e.to_string();
    assert!(
        msg.contains("execution.redis") && msg.contains("allkeys-lru"),
        "{msg}"
    );
    drop(lru);

    let redis = Redis::up(&[]);
    let a = replica(&redis).await;
    let ca = channel(&a).await;
    let w = attach(&a, "w");
    wait_registered(&a, 1).await;
    let mut argv = vec![];
    let action = prepare(&ca, &sh("echo before", &mut argv)).await.unwrap();
    let (r, _) = finish(start_execute(&ca, &action).await).await;
    assert_eq!(stdout_of(&ca, "", None, &r.unwrap()).await, "before\n");

    redis.kill();
    let e = ExecutionClient::new(ca.clone())
        .execute(re::ExecuteRequest {
            action_digest: Some(action.clone()),
            skip_cache_lookup: true,
            ..Default::default()
        })
        .await;
    let code = match e {
        Err(e) => e.code(),
        Ok(s) => {
            let (r, _) = finish(s.into_inner()).await;
            r.unwrap_err().code()
        }
    };
    assert_eq!(code, Code::Unavailable);

    // Back (empty: the CAS went with it): the worker is registered again, new actions run.
    redis.start();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut argv = vec![];
    let r = common::execute(&ca, sh("echo after", &mut argv))
        .await
        .unwrap();
    assert_eq!(stdout_of(&ca, "", None, &r).await, "after\n");
    w.stop().await;
    a.shutdown().await;
}

fn redis_cli(redis: &Redis, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .arg("-p")
        .arg(redis.port.to_string())
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_lost_while_the_action_still_runs_here_is_taken_back_not_failed() {
    let redis = Redis::up(&[]);
    let a = replica(&redis).await;
    let ca = channel(&a).await;
    let w = attach(&a, "only");
    wait_registered(&a, 1).await;
    let mut argv = vec![];
    let action = prepare(&ca, &sh("sleep 5; echo kept", &mut argv))
        .await
        .unwrap();
    let mut ops = start_execute(&ca, &action).await;
    let name = ops.message().await.unwrap().unwrap().name;
    let mut running = false;
    for _ in 0..100 {
        if running_here(&a) == 1 {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(running, "the worker never got the action");
    // As if this replica had not renewed in time (a Redis blip): the lease runs out, a
    // reaper requeues the action, and this replica, the only one with a worker, claims it
    // again while its first run goes on.
    // What the reaper does to an expired lease, done here so it happens now.
    let requeue = "local op = 'lre:sched:op:' .. ARGV[1]
        local f = redis.call('HMGET', op, 'queue', 'member', 'priority', 'qid', 'qmeta')
        redis.call('HSET', op, 'stage', 'queued')
        redis.call('HDEL', op, 'lease')
        redis.call('ZREM', 'lre:sched:leases', ARGV[1])
        redis.call('ZADD', f[1], f[3], f[2])
        redis.call('HSET', 'lre:sched:queues', f[4], f[5])
        redis.call('PUBLISH', 'lre:sched:events', 'work')
        return 1";
    assert_eq!(redis_cli(&redis, &["EVAL", requeue, "0", &name]), "1");
    let (r, _) = finish(ops).await;
    let r = r.expect("the action is not failed as lost");
    assert_eq!(stdout_of(&ca, "", None, &r).await, "kept\n");
    assert_eq!(
        redis_cli(
            &redis,
            &["HGET", &format!("lre:sched:op:{name}"), "attempts"]
        ),
        "2",
        "requeued once, claimed again once, and the running attempt reported under it"
    );
    w.stop().await;
    a.shutdown().await;
}

/// As in one process, an action no worker can run any more fails, naming why, instead of
/// waiting forever: here the only worker (on replica B) leaves while one action of replica
/// A's runs on it and another waits, and there are no `known_platforms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_actions_no_worker_anywhere_can_run_any_more_fail_instead_of_waiting() {
    let redis = Redis::up(&[]);
    let mut config = replica_config(&redis.url);
    config.execution.known_platforms = vec![];
    let a = lre_server::start(config.clone()).await.unwrap();
    let b = lre_server::start(config).await.unwrap();
    let ca = channel(&a).await;
    let w = attach(&b, "the-only-worker");
    wait_registered(&b, 1).await;

    let (mut argv1, mut argv2) = (vec![], vec![]);
    let running = prepare(&ca, &sh("sleep 300", &mut argv1)).await.unwrap();
    let waiting = prepare(&ca, &sh("echo never", &mut argv2)).await.unwrap();
    let first = start_execute(&ca, &running).await;
    // Capacity 1: once the first runs, the second waits in the queue.
    let mut t = 0;
    while redis_cli(&redis, &["ZCARD", "lre:sched:leases"]) != "1" {
        t += 1;
        assert!(t < 100, "the first action never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = start_execute(&ca, &waiting).await;
    w.stop().await;

    for (what, ops) in [("the running action", first), ("the queued action", second)] {
        let (r, _) = finish(ops).await;
        let e = r.expect_err(what);
        assert_eq!(e.code(), Code::FailedPrecondition, "{what}: {e:?}");
        assert!(
            e.message()
                .contains("no worker on any replica can run it any more")
                && e.message().contains("no worker is connected or configured"),
            "{what}: {e:?}"
        );
    }
    assert_eq!(redis_cli(&redis, &["SCARD", "lre:sched:live"]).trim(), "0");
    a.shutdown().await;
    b.shutdown().await;
}
