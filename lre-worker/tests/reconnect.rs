//! A worker outlives its scheduler: when the server restarts, the worker reconnects with
//! backoff, registers again, and runs the new server's actions.

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

async fn run_true(s: &lre_server::RunningServer) -> i32 {
    let ch = Channel::from_shared(format!("http://{}", s.grpc_addr))
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
    execute(&ch, e).await.unwrap().result.unwrap().exit_code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_reconnects_after_a_server_restart() {
    let first = server("127.0.0.1:0".parse().unwrap()).await;
    let addr = first.grpc_addr;
    let work = tempfile::tempdir().unwrap();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let mut opts = lre_worker::WorkerOptions::local(
        format!("http://{addr}"),
        "w".into(),
        work.path().to_path_buf(),
        vec![],
        lre_worker::default_ro_paths(),
    );
    opts.credential = lre_worker::Credential::bearer(WORKER_SECRET).unwrap();
    let worker = tokio::spawn(lre_worker::run(opts, shutdown));
    assert!(wait_workers(&first, 1).await, "worker never registered");
    assert_eq!(run_true(&first).await, 0);
    first.shutdown().await;

    // Same address, brand-new scheduler: nothing but the worker's own retries brings it back.
    let second = server(addr).await;
    assert!(
        wait_workers(&second, 1).await,
        "worker did not reconnect to the restarted server"
    );
    assert_eq!(run_true(&second).await, 0);
    let _ = stop.send(true);
    worker.await.unwrap().unwrap();
    second.shutdown().await;
}
