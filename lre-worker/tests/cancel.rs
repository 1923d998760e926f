//! CancelOperation under load, as Bazel does it whenever a build fails or is interrupted:
//! half of a stream of actions on a small worker is cancelled, some while queued, some
//! while running (and ignoring SIGTERM). Every action nobody cancelled must succeed (the
//! freed slot was once handed on before the worker released it, and about a fifth of them
//! failed with "more actions than the worker's capacity are running"); no exec root may be
//! left in the worker's work directory; no process of a cancelled action may outlive the
//! worker. A real server, a real worker, real bubblewrap.

mod common;

use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::longrunning::{
    operations_client::OperationsClient, CancelOperationRequest,
};
use common::{outcome, prepare, stdout_of, Exec};
use re::execution_client::ExecutionClient;
use tonic::transport::Channel;
use tonic::Code;

const ACTIONS: usize = 200;
const CAPACITY: u32 = 2;

/// Processes whose command line holds `token`: what a cancelled action left running.
fn processes_with(token: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(token) {
            found.push(format!("{}: {text}", e.file_name().to_string_lossy()));
        }
    }
    found
}

fn exec_roots_left(work: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(work.join("actions"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// One Execute: its operation's name (from the first message) goes out on `named`, then
/// the stream is read to its end.
async fn execute(
    ch: Channel,
    action: re::Digest,
    named: tokio::sync::oneshot::Sender<String>,
) -> Result<re::ExecuteResponse, tonic::Status> {
    let mut ops = ExecutionClient::new(ch)
        .execute(re::ExecuteRequest {
            action_digest: Some(action),
            skip_cache_lookup: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut named = Some(named);
    let mut last = None;
    while let Some(op) = ops.message().await? {
        if let Some(tx) = named.take() {
            let _ = tx.send(op.name.clone());
        }
        last = Some(op);
    }
    outcome(last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_half_of_a_stream_of_actions_harms_none_of_the_others() {
    let setup = common::with_worker("small", CAPACITY).await;
    let (server, ch, work) = (&setup.server, setup.channel.clone(), &setup.work);

    // Cancelled actions would run for a minute, ignoring SIGTERM: only a kill of the
    // whole sandbox ends them. The token in their command line finds any that survive.
    let token = format!("lre-cancel-stress-{}", std::process::id());
    let mut runs = Vec::new();
    for i in 0..ACTIONS {
        let cancel = i % 2 == 1;
        let script = match cancel {
            true => format!("trap '' TERM; sleep 60; : {token}-{i}"),
            false => format!("sleep 0.05; echo ok-{i}"),
        };
        let argv = ["/bin/sh", "-c", script.as_str()];
        let action = prepare(
            &ch,
            &Exec {
                instance: "",
                argv: &argv,
                input: b"cancel stress",
                secret: None,
                invocation: None,
            },
        )
        .await
        .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let run = tokio::spawn(execute(ch.clone(), action, tx));
        if cancel {
            // Spread over queued and running: a different delay for each.
            let delay = Duration::from_millis((i as u64 * 37) % 400);
            let ch = ch.clone();
            tokio::spawn(async move {
                let Ok(name) = rx.await else { return };
                tokio::time::sleep(delay).await;
                let _ = OperationsClient::new(ch)
                    .cancel_operation(CancelOperationRequest { name })
                    .await;
            });
        }
        runs.push((i, cancel, run));
    }

    let mut failures = Vec::new();
    let mut cancelled = 0;
    for (i, cancel, run) in runs {
        let r = tokio::time::timeout(Duration::from_secs(300), run)
            .await
            .unwrap_or_else(|_| panic!("action {i} never ended"))
            .unwrap();
        match (cancel, r) {
            (false, Ok(resp)) => {
                let out = stdout_of(&ch, "", None, &resp).await;
                assert_eq!(out.trim(), format!("ok-{i}"));
            }
            (false, Err(e)) => failures.push(format!("action {i}: {e}")),
            (true, Err(e)) if e.code() == Code::Cancelled => cancelled += 1,
            (true, other) => failures.push(format!("cancelled action {i} ended {other:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(cancelled, ACTIONS / 2);

    // The worker says each cancelled action is gone once its sandbox is; then its slot
    // frees. Wait (bounded) for every slot, then look at what is left.
    let sched = server.scheduler.clone().unwrap();
    for _ in 0..600 {
        if sched.local_workers().iter().all(|w| w.running == 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        sched.local_workers().iter().all(|w| w.running == 0),
        "slots never freed"
    );
    assert_eq!(
        exec_roots_left(work.path()),
        Vec::<String>::new(),
        "exec roots left behind"
    );
    assert_eq!(
        processes_with(&token),
        Vec::<String>::new(),
        "processes of cancelled actions"
    );

    setup.shut_down().await;
    assert_eq!(
        processes_with(&token),
        Vec::<String>::new(),
        "processes outlived the worker"
    );
}
