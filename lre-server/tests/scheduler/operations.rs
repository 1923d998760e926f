//! Operations as clients query them: one answered without running (a cache hit) is
//! queryable like any other; the queue is bounded; completed operations are forgotten
//! after `keep_finished`; names that are not ours are unknown, never errors.

use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2::ExecuteResponse;
use lre_server::error::Error;
use lre_server::scheduler::{Bounds, Stage};

use crate::harness::*;

on_both_backends!(
    an_operation_answered_without_running_is_queryable,
    the_queue_is_bounded_and_joining_is_free,
    completed_operations_are_forgotten_after_keep_finished,
    completed_operations_past_max_operations_are_forgotten_oldest_first,
    names_that_are_not_operations_are_unknown,
);

async fn an_operation_answered_without_running_is_queryable(b: Backend) {
    let h = Harness::new(b).await;
    let hit = ExecuteResponse {
        cached_result: true,
        message: "from the cache".into(),
        ..Default::default()
    };
    let j = job("main", 1);
    let op = h.sched.record_answered(&j.key, hit.clone()).await.unwrap();
    let snap = h.sched.snapshot(&op).await.unwrap().expect("queryable");
    assert_eq!(snap.stage, Stage::Completed(Ok(hit.clone())));
    assert_eq!(snap.key, j.key);
    assert_eq!(h.outcome(&op).await, Ok(hit));
    // It is no action in flight: the same action submitted runs.
    let sub = h.sched.submit(j, props(&[]), 0).await.unwrap();
    assert!(!sub.joined);
}

async fn the_queue_is_bounded_and_joining_is_free(b: Backend) {
    let setup = Setup {
        bounds: Bounds {
            max_queued: 2,
            ..Bounds::default()
        },
        ..Setup::default()
    };
    let h = Harness::with(b, setup).await;
    let first = h.submit(job("", 1), props(&[]), 0).await;
    h.submit(job("", 2), props(&[]), 0).await;
    match h.sched.submit(job("", 3), props(&[]), 0).await {
        Err(Error::ResourceExhausted(why)) => {
            assert!(why.contains("max_queued_actions"), "{why}")
        }
        Err(e) => panic!("expected RESOURCE_EXHAUSTED, got {e}"),
        Ok(_) => panic!("queued past execution.max_queued_actions"),
    }
    // Joining an action in flight adds nothing to wait for.
    assert!(
        h.sched
            .submit(job("", 1), props(&[]), 0)
            .await
            .unwrap()
            .joined
    );
    // The bound is on actions waiting: one taken by a worker makes room.
    let mut w = h.worker("w", spec(&[], 1));
    h.dispatch().await;
    assert_eq!(w.run().0, first);
    h.submit(job("", 3), props(&[]), 0).await;
}

async fn completed_operations_are_forgotten_after_keep_finished(b: Backend) {
    let setup = Setup {
        bounds: Bounds {
            keep_finished: Duration::from_secs(1),
            ..Bounds::default()
        },
        ..Setup::default()
    };
    let h = Harness::with(b, setup).await;
    let mut w = h.worker("w", spec(&[], 1));
    let done = h.submit(job("", 1), props(&[]), 0).await;
    let waiting = h.submit(job("", 2), props(&[]), 0).await;
    h.dispatch().await;
    let (ran, _) = w.run();
    assert!(h.report(&w, &ran, ran_by("w")).await);
    assert!(h.stage(&done).await.is_some_and(|s| s.is_done()));
    h.outlive_finished().await;
    assert_eq!(
        h.stage(&done).await,
        None,
        "a completed operation is kept forever"
    );
    assert!(h.sched.watch(&done).await.unwrap().is_none());
    // Unfinished ones are never forgotten.
    assert!(h.stage(&waiting).await.is_some_and(|s| !s.is_done()));
}

async fn completed_operations_past_max_operations_are_forgotten_oldest_first(b: Backend) {
    // A stream of cache hits must not fill the state within keep_finished.
    let setup = Setup {
        bounds: Bounds {
            max_operations: 3,
            ..Bounds::default()
        },
        ..Setup::default()
    };
    let h = Harness::with(b, setup).await;
    let mut ops = Vec::new();
    for n in 0..5 {
        let hit = ExecuteResponse {
            cached_result: true,
            ..Default::default()
        };
        ops.push(h.sched.record_answered(&job("", n).key, hit).await.unwrap());
    }
    for (n, op) in ops.iter().enumerate() {
        let known = h.stage(op).await.is_some();
        assert_eq!(known, n >= 2, "operation {n} of 5, with room for 3");
    }
}

async fn names_that_are_not_operations_are_unknown(b: Backend) {
    let h = Harness::new(b).await;
    for name in [
        "",
        "nope",
        "00000000-0000-0000-0000-000000000000",
        "../../op:x",
        "*",
        &"a".repeat(10_000),
    ] {
        assert_eq!(h.stage(name).await, None, "{name:?}");
        assert!(h.sched.watch(name).await.unwrap().is_none(), "{name:?}");
    }
}
