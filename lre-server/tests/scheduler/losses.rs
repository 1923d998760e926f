//! Losing an action: its worker disconnects, or holds it past its timeout. It goes back to
//! its queue at its old place, until it has used `max_attempts`; then it fails with a
//! status that says why. A report of an earlier attempt never completes a later one.

use std::time::Duration;

use lre_server::scheduler::{Lease, Stage};
use tonic::Code;

use crate::harness::*;

on_both_backends!(
    a_lost_worker_s_action_is_requeued_until_its_attempts_run_out,
    an_action_held_past_its_timeout_is_retried_then_fails_with_deadline_exceeded,
    a_late_report_of_an_earlier_attempt_is_ignored,
    a_requeued_action_keeps_its_place_in_the_queue,
);

fn setup(max_attempts: u32) -> Setup {
    let mut s = Setup::default();
    s.config.max_attempts = max_attempts;
    s.config.deadline_grace = Duration::from_secs(5);
    s
}

async fn a_lost_worker_s_action_is_requeued_until_its_attempts_run_out(b: Backend) {
    let h = Harness::with(b, setup(2)).await;
    let op = h.submit(job("", 1), props(&[]), 0).await;

    let mut a = h.worker("a", spec(&[], 1));
    h.dispatch().await;
    assert_eq!(a.run(), (op.clone(), 1));
    h.disconnect(&a).await;
    assert_eq!(
        h.stage(&op).await,
        Some(Stage::Queued),
        "lost once: back in the queue"
    );

    let mut c = h.worker("c", spec(&[], 1));
    h.dispatch().await;
    assert_eq!(c.run(), (op.clone(), 2));
    h.disconnect(&c).await;

    let o = h.outcome(&op).await;
    assert_eq!(code(&o), Code::Unavailable);
    assert!(message(&o).contains("lost 2 times"), "{o:?}");
    let mut d = h.worker("d", spec(&[], 1));
    h.dispatch().await;
    assert!(d.idle(), "a failed action ran a third time");
}

async fn an_action_held_past_its_timeout_is_retried_then_fails_with_deadline_exceeded(b: Backend) {
    let h = Harness::with(b, setup(2)).await;
    let op = h
        .submit(
            job_with_timeout("", 1, Duration::from_secs(10)),
            props(&[]),
            0,
        )
        .await;
    let mut a = h.worker("a", spec(&[], 1));
    h.dispatch().await;
    assert_eq!(a.run(), (op.clone(), 1));

    // Within its timeout and the grace: nothing happens.
    h.advance(Duration::from_secs(14));
    h.tick().await;
    assert_eq!(h.stage(&op).await, Some(Stage::Executing { attempt: 1 }));
    // Past both: its worker is dropped (it keeps its keepalives, but not the work) and
    // the action goes back to the queue.
    h.advance(Duration::from_secs(2));
    h.tick().await;
    assert!(a.dropped(), "the late worker's connection was not ended");
    assert_eq!(h.stage(&op).await, Some(Stage::Queued));

    let mut c = h.worker("c", spec(&[], 1));
    h.dispatch().await;
    assert_eq!(c.run(), (op.clone(), 2));
    h.advance(Duration::from_secs(16));
    h.tick().await;
    let o = h.outcome(&op).await;
    assert_eq!(code(&o), Code::DeadlineExceeded);
    assert!(message(&o).contains("past its timeout"), "{o:?}");
}

async fn a_late_report_of_an_earlier_attempt_is_ignored(b: Backend) {
    let h = Harness::with(b, setup(3)).await;
    let op = h.submit(job("", 1), props(&[]), 0).await;
    let mut a = h.worker("a", spec(&[], 1));
    h.dispatch().await;
    assert_eq!(a.run().1, 1);
    h.disconnect(&a).await;
    let mut c = h.worker("c", spec(&[], 1));
    h.dispatch().await;
    assert_eq!(c.run().1, 2);

    // The first attempt's report, however it arrives, is not the action's result.
    assert!(!h.report(&a, &op, ran_by("a")).await);
    let first = Lease {
        holder: h.sched.holder().to_string(),
        attempt: 1,
    };
    assert!(!h
        .state
        .finish(&op, Some(&first), ran_by("a"))
        .await
        .unwrap());
    assert!(!h.state.requeue(&op, &first, true).await.unwrap());
    assert_eq!(h.stage(&op).await, Some(Stage::Executing { attempt: 2 }));

    assert!(h.report(&c, &op, ran_by("c")).await);
    assert_eq!(message(&h.outcome(&op).await), "ran by c");
    // And once completed, nothing completes it again.
    let second = Lease {
        holder: h.sched.holder().to_string(),
        attempt: 2,
    };
    assert!(!h
        .state
        .finish(&op, Some(&second), ran_by("c again"))
        .await
        .unwrap());
    assert!(!h.state.finish(&op, None, ran_by("cancel")).await.unwrap());
    assert_eq!(message(&h.outcome(&op).await), "ran by c");
}

async fn a_requeued_action_keeps_its_place_in_the_queue(b: Backend) {
    let h = Harness::with(b, setup(3)).await;
    let first = h.submit(job("", 1), props(&[]), 0).await;
    let second = h.submit(job("", 2), props(&[]), 0).await;
    let mut a = h.worker("a", spec(&[], 1));
    h.dispatch().await;
    assert_eq!(a.run().0, first);
    h.disconnect(&a).await;
    let mut c = h.worker("c", spec(&[], 1));
    h.dispatch().await;
    assert_eq!(c.run(), (first, 2), "the lost action goes first again");
    assert_eq!(h.stage(&second).await, Some(Stage::Queued));
}
