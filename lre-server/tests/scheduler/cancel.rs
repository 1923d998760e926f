//! CancelOperation: the operation completes CANCELLED at once, for every waiter. A queued
//! one never runs; a running one's worker is told to stop, and its slot stays busy until
//! the worker says the action is gone, so the next action never finds the worker full
//! (the defect: "more actions than the worker's capacity are running").

use std::time::Duration;

use lre_server::scheduler::{Stage, WorkerCommand};
use tonic::Code;

use crate::harness::*;

on_both_backends!(
    a_cancelled_action_s_slot_stays_busy_until_its_worker_says_it_is_gone,
    a_queued_action_is_cancelled_without_running,
    a_worker_that_never_confirms_a_cancel_is_dropped_after_the_grace,
);

async fn a_cancelled_action_s_slot_stays_busy_until_its_worker_says_it_is_gone(b: Backend) {
    let h = Harness::new(b).await;
    let mut w = h.worker("w", spec(&[], 1));
    let running = h.submit(job("", 1), props(&[]), 0).await;
    let next = h.submit(job("", 2), props(&[]), 0).await;
    h.dispatch().await;
    assert_eq!(w.run().0, running);

    assert!(h.sched.cancel(&running).await.unwrap());
    assert_eq!(code(&h.outcome(&running).await), Code::Cancelled);
    match w.next() {
        Some(WorkerCommand::Cancel { operation }) => assert_eq!(operation, running),
        other => panic!("expected the worker to be told to stop, got {other:?}"),
    }
    // The worker has not said the action is gone: its one slot is still taken.
    h.dispatch().await;
    assert!(
        w.idle(),
        "the slot was given away before the worker released it"
    );
    assert_eq!(h.stage(&next).await, Some(Stage::Queued));
    assert_eq!(h.sched.local_workers()[0].running, 1);

    // Its report (whatever it says) is the action being gone, not its result.
    assert!(!h.report(&w, &running, ran_by("w")).await);
    assert_eq!(code(&h.outcome(&running).await), Code::Cancelled);
    h.dispatch().await;
    assert_eq!(w.run().0, next);
    // A second cancel of a finished operation changes nothing.
    assert!(!h.sched.cancel(&running).await.unwrap());
}

async fn a_queued_action_is_cancelled_without_running(b: Backend) {
    let h = Harness::new(b).await;
    let op = h.submit(job("", 1), props(&[]), 0).await;
    let joined = h.sched.submit(job("", 1), props(&[]), 0).await.unwrap();
    assert!(joined.joined);
    assert!(h.sched.cancel(&op).await.unwrap());
    assert_eq!(code(&h.outcome(&op).await), Code::Cancelled);
    let mut w = h.worker("w", spec(&[], 1));
    h.dispatch().await;
    assert!(w.idle(), "a cancelled action ran");
    assert_eq!(h.sched.overview().await.queued, 0);
    // Unknown names are not cancelled (nor errors).
    assert!(!h
        .sched
        .cancel("00000000-0000-0000-0000-000000000000")
        .await
        .unwrap());
    assert!(!h.sched.cancel("../../etc").await.unwrap());
}

async fn a_worker_that_never_confirms_a_cancel_is_dropped_after_the_grace(b: Backend) {
    let mut setup = Setup::default();
    setup.config.deadline_grace = Duration::from_secs(5);
    let h = Harness::with(b, setup).await;
    let mut w = h.worker("w", spec(&[], 1));
    let op = h.submit(job("", 1), props(&[]), 0).await;
    h.dispatch().await;
    assert_eq!(w.run().0, op);
    assert!(h.sched.cancel(&op).await.unwrap());
    assert!(matches!(w.next(), Some(WorkerCommand::Cancel { .. })));
    h.advance(Duration::from_secs(4));
    h.tick().await;
    assert!(!w.dropped());
    h.advance(Duration::from_secs(2));
    h.tick().await;
    assert!(
        w.dropped(),
        "a worker that ignores a cancel keeps its slot forever"
    );
    assert_eq!(h.sched.worker_count(), 0);
    assert_eq!(code(&h.outcome(&op).await), Code::Cancelled);
}
