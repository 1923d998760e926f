//! The `OperationState` contract, method by method, on both states: every change is
//! guarded (a claim must still hold its lease, a queued operation must still be queued),
//! so a stale lease, a second claim or a late requeue changes nothing. These are the unit
//! tests of the Redis scripts (one per method) and of the in-memory maps alike.

use std::sync::Arc;
use std::time::SystemTime;

use lre_server::scheduler::model::{Claimed, NewOperation};
use lre_server::scheduler::{failed, Job, Lease, OperationState, Queue, Stage};
use tonic::Code;

use crate::harness::*;

on_both_backends!(
    a_claim_takes_the_head_once,
    a_claim_takes_a_batch_in_order_and_stops_at_its_bound,
    a_stale_lease_changes_nothing,
    an_uncounted_requeue_gives_the_attempt_back,
    failing_a_queue_completes_only_what_is_queued,
);

async fn submit(state: &Arc<dyn OperationState>, job: Arc<Job>, priority: i32) -> String {
    let queue = Queue::new(&job.key.instance, props(&[]));
    state
        .submit(NewOperation {
            id: uuid::Uuid::new_v4().to_string(),
            job,
            queue,
            priority,
            queued_at: SystemTime::now(),
        })
        .await
        .unwrap()
        .id
}

fn queue() -> Queue {
    Queue::new("", props(&[]))
}

async fn claim_one(state: &Arc<dyn OperationState>, queue: &Queue) -> Option<Claimed> {
    let mut c = state.claim(queue, "me", 1, None).await.unwrap();
    assert!(c.claimed.len() <= 1);
    c.claimed.pop()
}

async fn a_claim_takes_the_head_once(b: Backend) {
    let h = Harness::new(b).await;
    let later = submit(&h.state, job("", 1), 1).await;
    let first = submit(&h.state, job("", 2), 0).await;
    let c1 = claim_one(&h.state, &queue()).await.unwrap();
    assert_eq!((c1.id.as_str(), c1.lease.attempt), (first.as_str(), 1));
    assert_eq!(c1.lease.holder, "me");
    assert_eq!(c1.job.key, job("", 2).key);
    let c2 = claim_one(&h.state, &queue()).await.unwrap();
    assert_eq!(c2.id, later);
    assert!(claim_one(&h.state, &queue()).await.is_none());
    assert!(claim_one(&h.state, &Queue::new("other", props(&[])))
        .await
        .is_none());
    assert_eq!(h.state.executing().await.unwrap(), 2);
    assert!(h.state.queues().await.unwrap().is_empty());
}

async fn a_claim_takes_a_batch_in_order_and_stops_at_its_bound(b: Backend) {
    let h = Harness::new(b).await;
    let mut urgent = Vec::new();
    for i in 0..5 {
        urgent.push(submit(&h.state, job("", i), 0).await);
    }
    let later = submit(&h.state, job("", 9), 5).await;
    // Cancelled while queued: a claim passes over it.
    let why = failed(Code::Cancelled, "cancelled");
    assert!(h.state.finish(&urgent[1], None, why).await.unwrap());

    let none = h.state.claim(&queue(), "me", 0, None).await.unwrap();
    assert!(none.claimed.is_empty());
    let c = h.state.claim(&queue(), "me", 3, None).await.unwrap();
    let ids: Vec<&str> = c.claimed.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, [&urgent[0], &urgent[2], &urgent[3]]);
    assert!(c
        .claimed
        .iter()
        .all(|c| c.lease.attempt == 1 && c.lease.holder == "me"));
    for c in &c.claimed {
        assert_eq!(h.stage(&c.id).await, Some(Stage::Executing { attempt: 1 }));
    }
    let head = h.state.queues().await.unwrap()[0].head;
    assert_eq!(c.next, Some(head), "the next head is the queue's");
    assert_eq!(head.0, 0, "the next head is the last urgent one");

    // Another queue's head ranks between the urgent one left and the later one: the
    // claim takes the urgent one only, however many slots it has.
    let c = h
        .state
        .claim(&queue(), "me", 10, Some((1, 0)))
        .await
        .unwrap();
    let ids: Vec<&str> = c.claimed.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, [&urgent[4]]);
    assert_eq!(c.next.map(|n| n.0), Some(5));
    // Ranked at the bound itself: not taken either.
    let c = h.state.claim(&queue(), "me", 10, c.next).await.unwrap();
    assert!(c.claimed.is_empty());

    let c = h.state.claim(&queue(), "me", 10, None).await.unwrap();
    let ids: Vec<&str> = c.claimed.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, [&later]);
    assert_eq!(c.next, None);
    assert_eq!(h.state.executing().await.unwrap(), 5);
    assert!(h.state.queues().await.unwrap().is_empty());
}

async fn a_stale_lease_changes_nothing(b: Backend) {
    let h = Harness::new(b).await;
    let id = submit(&h.state, job("", 1), 0).await;
    let l1 = claim_one(&h.state, &queue()).await.unwrap().lease;
    assert!(h.state.requeue(&id, &l1, true).await.unwrap());
    assert!(
        !h.state.requeue(&id, &l1, true).await.unwrap(),
        "requeued twice"
    );
    let l2 = claim_one(&h.state, &queue()).await.unwrap().lease;
    assert_eq!(l2.attempt, 2);

    assert!(!h.state.finish(&id, Some(&l1), ran_by("old")).await.unwrap());
    assert_eq!(
        h.state.renew(&[(id.clone(), l1.clone())]).await.unwrap(),
        vec![id.clone()]
    );
    assert!(h
        .state
        .renew(&[(id.clone(), l2.clone())])
        .await
        .unwrap()
        .is_empty());
    let elsewhere = Lease {
        holder: "another replica".into(),
        attempt: 2,
    };
    assert!(!h
        .state
        .finish(&id, Some(&elsewhere), ran_by("x"))
        .await
        .unwrap());

    assert!(h.state.finish(&id, Some(&l2), ran_by("new")).await.unwrap());
    assert_eq!(h.stage(&id).await, Some(Stage::Completed(ran_by("new"))));
    assert_eq!(
        h.state.renew(&[(id.clone(), l2.clone())]).await.unwrap(),
        vec![id.clone()]
    );
    assert!(!h.state.requeue(&id, &l2, true).await.unwrap());
    assert_eq!(h.state.executing().await.unwrap(), 0);
}

async fn an_uncounted_requeue_gives_the_attempt_back(b: Backend) {
    let h = Harness::new(b).await;
    let id = submit(&h.state, job("", 1), 0).await;
    let l1 = claim_one(&h.state, &queue()).await.unwrap().lease;
    assert!(h.state.requeue(&id, &l1, false).await.unwrap());
    let again = claim_one(&h.state, &queue()).await.unwrap();
    assert_eq!(
        again.lease.attempt, 1,
        "a claim that never ran used up an attempt"
    );
}

async fn failing_a_queue_completes_only_what_is_queued(b: Backend) {
    let h = Harness::new(b).await;
    let running = submit(&h.state, job("", 1), 0).await;
    let queued = [
        submit(&h.state, job("", 2), 0).await,
        submit(&h.state, job("", 3), 0).await,
        submit(&h.state, job("", 4), 0).await,
    ];
    assert_eq!(claim_one(&h.state, &queue()).await.unwrap().id, running);
    let why = failed(Code::FailedPrecondition, "nothing can run it");
    assert_eq!(
        h.state.fail_queued(&queue(), why.clone(), 2).await.unwrap(),
        2
    );
    assert_eq!(
        h.stage(&queued[0]).await,
        Some(Stage::Completed(why.clone()))
    );
    assert_eq!(
        h.stage(&queued[1]).await,
        Some(Stage::Completed(why.clone()))
    );
    assert_eq!(
        h.stage(&queued[2]).await,
        Some(Stage::Queued),
        "past the batch"
    );
    assert_eq!(
        h.stage(&running).await,
        Some(Stage::Executing { attempt: 1 })
    );
    assert_eq!(h.state.fail_queued(&queue(), why, 10).await.unwrap(), 1);
    assert!(h.state.queues().await.unwrap().is_empty());
}
