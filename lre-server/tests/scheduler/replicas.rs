//! What only the shared (Redis) state does: replicas that share one queue. A worker of
//! any replica runs what any replica queued; identical actions run once across them;
//! CancelOperation on one stops the action on another; a replica that stops renewing its
//! leases (it died) loses its actions to the others, which rerun them as the next attempt,
//! and its late report changes nothing. The status overview shows every replica's workers.

use std::time::Duration;

use lre_server::scheduler::{Stage, WorkerCommand};
use tonic::Code;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_of_one_replica_runs_what_another_queued() {
    let a = Harness::new(Backend::Redis).await;
    let b = a.replica().await;
    let mut w = b.worker("on-b", spec(&[("pool", "x")], 2));
    b.tick().await; // publishes its worker
    a.tick().await; // reads it
    a.advance(Duration::from_secs(120)); // past the start grace: only workers count now

    let op = a.submit(job("", 1), props(&[("pool", "x")]), 0).await;
    let joined = b
        .sched
        .submit(job("", 1), props(&[("pool", "x")]), 0)
        .await
        .unwrap();
    assert!(
        joined.joined && joined.operation == op,
        "the same action queued twice"
    );
    b.dispatch().await;
    assert_eq!(w.run(), (op.clone(), 1));
    a.dispatch().await;
    assert!(w.idle());

    let overview = a.sched.overview().await;
    assert_eq!(overview.replicas, 2);
    assert_eq!(overview.executing, 1);
    let seen: Vec<(&str, &str, bool)> = overview
        .workers
        .iter()
        .map(|w| (w.id.as_str(), w.replica.as_str(), w.here))
        .collect();
    assert_eq!(seen, vec![("on-b", b.sched.holder(), false)]);

    assert!(b.report(&w, &op, ran_by("on-b")).await);
    // Watchers on either replica hear it.
    assert_eq!(message(&a.outcome(&op).await), "ran by on-b");
    assert_eq!(message(&b.outcome(&op).await), "ran by on-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_on_one_replica_stops_the_action_on_another() {
    let a = Harness::new(Backend::Redis).await;
    let b = a.replica().await;
    let mut w = b.worker("on-b", spec(&[], 1));
    let op = b.submit(job("", 1), props(&[]), 0).await;
    let next = b.submit(job("", 2), props(&[]), 0).await;
    b.dispatch().await;
    assert_eq!(w.run().0, op);

    assert!(a.sched.cancel(&op).await.unwrap());
    assert_eq!(code(&b.outcome(&op).await), Code::Cancelled);
    // b learns it when it renews its leases (or sooner, from the events channel).
    b.tick().await;
    match w.next() {
        Some(WorkerCommand::Cancel { operation }) => assert_eq!(operation, op),
        other => panic!("the worker on b was not told to stop: {other:?}"),
    }
    b.dispatch().await;
    assert!(
        w.idle(),
        "b gave the slot away before its worker released it"
    );
    assert!(!b.report(&w, &op, ran_by("on-b")).await);
    b.dispatch().await;
    assert_eq!(w.run().0, next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stops_renewing_loses_its_actions_to_another() {
    let setup = Setup {
        lease: Duration::from_millis(400),
        ..Setup::default()
    };
    let a = Harness::with(Backend::Redis, setup).await;
    let b = a.replica().await;
    let mut on_a = a.worker("on-a", spec(&[], 1));
    let mut on_b = b.worker("on-b", spec(&[], 1));
    let op = a.submit(job("", 1), props(&[]), 0).await;
    a.dispatch().await;
    assert_eq!(on_a.run(), (op.clone(), 1));

    // a stops ticking (as if killed): its lease runs out by Redis's clock.
    tokio::time::sleep(Duration::from_millis(900)).await;
    b.tick().await;
    b.dispatch().await;
    let mut rerun = on_b.next();
    for _ in 0..50 {
        if rerun.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        b.tick().await;
        b.dispatch().await;
        rerun = on_b.next();
    }
    match rerun {
        Some(WorkerCommand::Run {
            operation, attempt, ..
        }) => assert_eq!((operation.as_str(), attempt), (op.as_str(), 2)),
        other => panic!("b did not take the action over: {other:?}"),
    }

    // a comes back and reports attempt 1: not the result.
    a.complete_anyway(&on_a, &op).await;
    assert_eq!(b.stage(&op).await, Some(Stage::Executing { attempt: 2 }));
    // Its next renewal finds the lease gone and stops the action there.
    a.tick().await;
    assert!(matches!(on_a.next(), Some(WorkerCommand::Cancel { .. })));

    assert!(b.report(&on_b, &op, ran_by("on-b")).await);
    assert_eq!(message(&a.outcome(&op).await), "ran by on-b");
}
