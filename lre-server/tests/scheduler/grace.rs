//! Waiting for workers that may come, and failing what nothing can run: an action no
//! worker can run waits through the start grace (workers reconnect after a restart), and
//! while a worker kind that could run it was seen within the grace, or a configured
//! platform (`known_platforms`) offers it. Otherwise Execute is refused, and actions
//! already queued fail with FAILED_PRECONDITION naming what nothing offers.

use std::time::Duration;

use lre_server::error::Error;
use lre_server::scheduler::Stage;
use tonic::Code;

use crate::harness::*;

on_both_backends!(
    an_action_nothing_can_run_waits_through_the_start_grace_then_is_refused,
    a_departed_worker_s_actions_wait_for_it_through_the_grace,
    queued_actions_fail_once_nothing_has_been_able_to_run_them_for_the_grace,
    known_platforms_keep_actions_waiting_without_a_worker,
);

async fn an_action_nothing_can_run_waits_through_the_start_grace_then_is_refused(b: Backend) {
    let h = Harness::new(b).await;
    let _w = h.worker("w", spec(&[("OSFamily", "Linux")], 1));
    let early = h.submit(job("", 1), props(&[("gpu", "yes")]), 0).await;
    assert_eq!(h.stage(&early).await, Some(Stage::Queued));

    h.advance(Duration::from_secs(31));
    match h
        .sched
        .submit(job("", 2), props(&[("gpu", "yes")]), 0)
        .await
    {
        Err(Error::FailedPrecondition(why)) => assert!(why.contains("gpu"), "{why}"),
        Err(e) => panic!("expected FAILED_PRECONDITION, got {e}"),
        Ok(_) => panic!("queued an action no worker can ever run"),
    }
    // What a worker offers still queues.
    h.submit(job("", 3), props(&[("OSFamily", "Linux")]), 0)
        .await;
}

async fn a_departed_worker_s_actions_wait_for_it_through_the_grace(b: Backend) {
    let h = Harness::new(b).await;
    h.advance(Duration::from_secs(60)); // long past the start grace
    let gpu = spec(&[("gpu", "yes")], 1);
    let w = h.worker("gpu-1", gpu.clone());
    h.tick().await;
    h.disconnect(&w).await;
    h.tick().await;

    h.advance(Duration::from_secs(10));
    let op = h.submit(job("", 1), props(&[("gpu", "yes")]), 0).await;
    h.advance(Duration::from_secs(15));
    h.tick().await;
    assert_eq!(
        h.stage(&op).await,
        Some(Stage::Queued),
        "failed within the grace"
    );

    let mut back = h.worker("gpu-1", gpu);
    h.dispatch().await;
    assert_eq!(back.run().0, op);
}

async fn queued_actions_fail_once_nothing_has_been_able_to_run_them_for_the_grace(b: Backend) {
    let h = Harness::new(b).await;
    let mut w = h.worker("w", spec(&[("OSFamily", "Linux")], 1));
    let ops = [
        h.submit(job("", 1), props(&[("gpu", "yes")]), 0).await,
        h.submit(job("", 2), props(&[("gpu", "yes")]), 0).await,
    ];
    let fine = h
        .submit(job("", 3), props(&[("OSFamily", "Linux")]), 0)
        .await;
    h.tick().await;
    h.advance(Duration::from_secs(20));
    h.tick().await;
    assert_eq!(h.stage(&ops[0]).await, Some(Stage::Queued));
    h.advance(Duration::from_secs(15));
    h.tick().await;
    for op in &ops {
        let o = h.outcome(op).await;
        assert_eq!(code(&o), Code::FailedPrecondition);
        assert!(
            message(&o).contains("gpu"),
            "the error names what is missing: {o:?}"
        );
    }
    // What the worker can run is untouched.
    assert!(h.stage(&fine).await.is_some_and(|s| !s.is_done()));
    h.dispatch().await;
    assert_eq!(w.run().0, fine);
}

async fn known_platforms_keep_actions_waiting_without_a_worker(b: Backend) {
    let mut setup = Setup::default();
    setup.config.known_platforms = vec![props(&[("pool", "big"), ("OSFamily", "Linux")])];
    let h = Harness::with(b, setup).await;
    h.advance(Duration::from_secs(300));
    let op = h.submit(job("", 1), props(&[("pool", "big")]), 0).await;
    for _ in 0..3 {
        h.advance(Duration::from_secs(60));
        h.tick().await;
    }
    assert_eq!(h.stage(&op).await, Some(Stage::Queued));
    let mut big = h.worker("big", spec(&[("pool", "big"), ("OSFamily", "Linux")], 1));
    h.dispatch().await;
    assert_eq!(big.run().0, op);
}
