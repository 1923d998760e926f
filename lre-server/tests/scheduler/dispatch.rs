//! Who runs what: the platform and instance a worker offers, deduplication, the order of
//! the queue, spreading work, and capacity.

use std::time::{Duration, UNIX_EPOCH};

use lre_server::scheduler::{Stage, WorkerSpec, MAX_CLAIM};

use crate::harness::*;

on_both_backends!(
    an_action_runs_on_a_worker_that_offers_its_platform,
    a_worker_limited_to_instances_runs_only_theirs,
    identical_actions_run_once_and_every_waiter_gets_the_result,
    the_queue_runs_by_priority_then_arrival,
    one_pass_fills_every_slot_in_the_order_across_queues,
    more_free_slots_than_one_claim_takes_are_all_filled_in_one_pass,
    work_spreads_to_the_least_busy_worker,
    a_worker_never_runs_more_than_its_capacity,
);

async fn an_action_runs_on_a_worker_that_offers_its_platform(b: Backend) {
    let h = Harness::new(b).await;
    let mut plain = h.worker("plain", spec(&[("OSFamily", "Linux")], 4));
    let mut gpu = h.worker("gpu", spec(&[("OSFamily", "Linux"), ("gpu", "yes")], 4));
    h.advance(Duration::from_secs(5));
    let submitted_at = h.clock_wall_ms();
    let op = h.submit(job("", 1), props(&[("gpu", "yes")]), 0).await;
    // Handed out by submit itself when the state is this process's, else by dispatch.
    h.dispatch().await;
    let (ran, attempt) = gpu.run();
    assert_eq!((ran.as_str(), attempt), (op.as_str(), 1));
    assert!(plain.idle());
    assert_eq!(h.stage(&op).await, Some(Stage::Executing { attempt: 1 }));

    assert!(h.report(&gpu, &op, ran_by("gpu")).await);
    assert_eq!(message(&h.outcome(&op).await), "ran by gpu");
    // queued_timestamp: when it was submitted, by the scheduler's clock.
    let snap = h.sched.snapshot(&op).await.unwrap().unwrap();
    let queued_ms = snap
        .queued_at
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    assert_eq!(queued_ms, submitted_at);
}

async fn a_worker_limited_to_instances_runs_only_theirs(b: Backend) {
    let h = Harness::new(b).await;
    let mut main_only = h.worker(
        "main-only",
        WorkerSpec {
            instances: Some(vec!["main".into()]),
            ..spec(&[], 2)
        },
    );
    let other = h.submit(job("other", 1), props(&[]), 0).await;
    h.dispatch().await;
    assert!(
        main_only.idle(),
        "ran an action of an instance it may not serve"
    );
    let main = h.submit(job("main", 2), props(&[]), 0).await;
    h.dispatch().await;
    assert_eq!(main_only.run().0, main);
    assert_eq!(h.stage(&other).await, Some(Stage::Queued));

    let mut any = h.worker("any", spec(&[], 1));
    h.dispatch().await;
    assert_eq!(any.run().0, other);
}

async fn identical_actions_run_once_and_every_waiter_gets_the_result(b: Backend) {
    let h = Harness::new(b).await;
    let mut w = h.worker("w", spec(&[], 4));
    let first = h.sched.submit(job("", 7), props(&[]), 0).await.unwrap();
    let second = h.sched.submit(job("", 7), props(&[]), 0).await.unwrap();
    assert!(!first.joined && second.joined);
    assert_eq!(first.operation, second.operation);
    // The same action in another instance is another action.
    let elsewhere = h
        .sched
        .submit(job("other", 7), props(&[]), 0)
        .await
        .unwrap();
    assert!(!elsewhere.joined);

    h.dispatch().await;
    let mut ran = w.runs();
    ran.sort();
    let mut want = vec![first.operation.clone(), elsewhere.operation.clone()];
    want.sort();
    assert_eq!(ran, want, "the identical action ran twice");

    // Joined while it runs: still the same operation.
    let third = h.sched.submit(job("", 7), props(&[]), 0).await.unwrap();
    assert!(third.joined);
    assert!(h.report(&w, &first.operation, ran_by("w")).await);
    let (mut a, mut b2) = (first.stage, second.stage);
    for rx in [&mut a, &mut b2] {
        let s = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| s.is_done()))
            .await
            .expect("every waiter hears the result")
            .unwrap()
            .clone();
        assert_eq!(s, Stage::Completed(ran_by("w")));
    }
    // Once it completed, the action runs again if asked (the cache answers repeats).
    let again = h.sched.submit(job("", 7), props(&[]), 0).await.unwrap();
    assert!(!again.joined);
    assert_ne!(again.operation, first.operation);
}

async fn the_queue_runs_by_priority_then_arrival(b: Backend) {
    let h = Harness::new(b).await;
    // It can run both queues: actions asking for nothing, and for pool=x.
    let mut w = h.worker("w", spec(&[("pool", "x")], 1));
    let busy = h.submit(job("", 0), props(&[]), 0).await;
    h.dispatch().await;
    assert_eq!(w.run().0, busy);

    // Lower values run sooner (REAPI); equal ones first come, first served, across queues.
    let x = props(&[("pool", "x")]);
    let late = h.submit(job("", 1), props(&[]), 5).await;
    let first_zero = h.submit(job("", 2), props(&[]), 0).await;
    let urgent = h.submit(job("", 3), x.clone(), -3).await;
    let second_zero = h.submit(job("", 4), x, 0).await;

    let mut order = Vec::new();
    let mut current = busy;
    for _ in 0..4 {
        assert!(h.report(&w, &current, ran_by("w")).await);
        h.dispatch().await;
        current = w.run().0;
        order.push(current.clone());
    }
    assert_eq!(order, vec![urgent, first_zero, second_zero, late]);
}

/// A pass claims several actions from a queue at once (one round trip for a replica with
/// many free slots), but never past another queue's head that comes first.
async fn one_pass_fills_every_slot_in_the_order_across_queues(b: Backend) {
    let h = Harness::new(b).await;
    let x = props(&[("pool", "x")]);
    let a1 = h.submit(job("", 1), props(&[]), 0).await;
    let a2 = h.submit(job("", 2), props(&[]), 0).await;
    let b1 = h.submit(job("", 3), x.clone(), 0).await;
    let a3 = h.submit(job("", 4), props(&[]), 0).await;
    let b2 = h.submit(job("", 5), x, 0).await;
    let a4 = h.submit(job("", 6), props(&[]), 0).await;
    // It comes after them all, so one pass hands out every slot.
    let mut w = h.worker("w", spec(&[("pool", "x")], 4));
    h.dispatch().await;
    assert_eq!(w.runs(), vec![a1, a2, b1, a3]);
    for left in [b2, a4] {
        assert_eq!(h.stage(&left).await, Some(Stage::Queued));
    }
}

/// A claim is bounded (one script holds Redis for its whole batch); the pass claims again
/// until the slots are full, still in queue order.
async fn more_free_slots_than_one_claim_takes_are_all_filled_in_one_pass(b: Backend) {
    let h = Harness::new(b).await;
    let n = 2 * MAX_CLAIM + 5;
    let ops = submit_jobs(&h, n as u64 + 3).await;
    let mut w = h.worker("w", spec(&[], n));
    h.dispatch().await;
    assert_eq!(w.runs(), ops[..n].to_vec());
    for left in &ops[n..] {
        assert_eq!(h.stage(left).await, Some(Stage::Queued));
    }
}

async fn work_spreads_to_the_least_busy_worker(b: Backend) {
    let h = Harness::new(b).await;
    let mut a = h.worker("a", spec(&[], 2));
    let mut c = h.worker("c", spec(&[], 2));
    for n in 0..4 {
        h.submit(job("", n), props(&[]), 0).await;
    }
    h.dispatch().await;
    assert_eq!((a.runs().len(), c.runs().len()), (2, 2));
}

async fn a_worker_never_runs_more_than_its_capacity(b: Backend) {
    let h = Harness::new(b).await;
    let mut w = h.worker("w", spec(&[], 2));
    let ops: Vec<String> = submit_jobs(&h, 5).await;
    h.dispatch().await;
    let first = w.runs();
    assert_eq!(first, ops[..2].to_vec());
    h.dispatch().await;
    assert!(w.idle(), "a third action while two run");
    assert!(h.report(&w, &first[0], ran_by("w")).await);
    h.dispatch().await;
    assert_eq!(w.runs(), vec![ops[2].clone()]);
    let views = h.sched.local_workers();
    assert_eq!((views[0].capacity, views[0].running), (2, 2));
}

/// Submits jobs 0..n in order.
async fn submit_jobs(h: &Harness, n: u64) -> Vec<String> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(h.submit(job("", i), props(&[]), 0).await);
    }
    v
}
