//! A worker outlives its scheduler: when the server restarts, the worker reconnects with
//! backoff, registers again, and runs the new server's actions, including the ones sent
//! before it was back.

mod common;

use common::{execute, wait_workers, Exec};
use tonic::transport::Channel;

const WORKER_SECRET: &str = "reconnect-test-worker-secret";

async fn server(addr: std::net::SocketAddr) -> lre_server::RunningServer {
    let mut c = lre_server::Config {
        grpc_listen: addr,
        ..lre_server::Config::ephemeral()
    };
    c.execution.enabled = true;
    c.auth
        .tokens
        .push(lre_server::auth::TokenConfig::for_secret(
            "w",
            WORKER_SECRET,
            lre_server::auth::Scope::Worker,
        ));
    c.execution.keepalive_seconds = 1;
    c.shutdown_grace_seconds = 1;
    lre_server::start(c).await.unwrap()
}

/// Runs `/bin/true` through the server at `addr`: its exit code (a failure panics).
async fn run_true(addr: std::net::SocketAddr) -> i32 {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let e = Exec {
        instance: "",
        argv: &["/bin/true"],
        input: b"",
        secret: None,
        invocation: None,
    };
    match execute(&ch, e).await {
        Ok(r) => r.result.expect("an ActionResult").exit_code,
        Err(status) => panic!("the action failed: {status:?}"),
    }
}

/// A worker dialling `addr` (over and over, as a real one does), working in `work`; it
/// stops when the sender is told `true`.
fn start_worker(
    addr: std::net::SocketAddr,
    work: &std::path::Path,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<lre_worker::error::Result<()>>,
) {
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let mut opts = lre_worker::WorkerOptions::local(
        format!("http://{addr}"),
        "w".into(),
        work.to_path_buf(),
        vec![],
        lre_worker::default_ro_paths(),
    );
    opts.credential = lre_worker::Credential::bearer(WORKER_SECRET).unwrap();
    (stop, tokio::spawn(lre_worker::run(opts, shutdown)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_reconnects_after_a_server_restart() {
    let first = server("127.0.0.1:0".parse().unwrap()).await;
    let addr = first.grpc_addr;
    let work = tempfile::tempdir().unwrap();
    let (stop, worker) = start_worker(addr, work.path());
    assert!(wait_workers(&first, 1).await, "worker never registered");
    assert_eq!(run_true(first.grpc_addr).await, 0);
    first.shutdown().await;

    // Same address, brand-new scheduler: nothing but the worker's own retries brings it back.
    let second = server(addr).await;
    assert!(
        wait_workers(&second, 1).await,
        "worker did not reconnect to the restarted server"
    );
    assert_eq!(run_true(second.grpc_addr).await, 0);
    let _ = stop.send(true);
    worker.await.unwrap().unwrap();
    second.shutdown().await;
}

/// A restarted server takes Execute before its workers are back (they are in their
/// reconnect backoff, and Bazel retries at once): the action waits for a worker, within the
/// scheduler's worker grace, instead of failing for want of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_sent_before_any_worker_is_back_waits_for_one() {
    let s = server("127.0.0.1:0".parse().unwrap()).await;
    let sched = s.scheduler.clone().unwrap();
    let action = tokio::spawn(run_true(s.grpc_addr));
    let mut waited = 0;
    while sched.overview().await.queued == 0 {
        waited += 1;
        assert!(waited < 300, "the action was never queued");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(sched.worker_count(), 0);

    let work = tempfile::tempdir().unwrap();
    let (stop, worker) = start_worker(s.grpc_addr, work.path());
    let exit = action
        .await
        .expect("the action failed instead of waiting for the worker");
    assert_eq!(exit, 0);
    let _ = stop.send(true);
    worker.await.unwrap().unwrap();
    s.shutdown().await;
}
