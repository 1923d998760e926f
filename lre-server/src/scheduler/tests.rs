use super::*;

type S = Scheduler<String, String>;

fn key(n: u8) -> ActionKey {
    ActionKey {
        instance: String::new(),
        action: Digest::of(&[n]),
    }
}

fn props(pairs: &[(&str, &str)]) -> Properties {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn linux() -> Properties {
    props(&[("OSFamily", "Linux")])
}

/// The job sent with the next Run command, or None if the channel is empty.
fn next_run(
    rx: &mut mpsc::UnboundedReceiver<WorkerCommand<String>>,
) -> Option<(OperationId, String, u32)> {
    match rx.try_recv() {
        Ok(WorkerCommand::Run {
            operation,
            job,
            attempt,
        }) => Some((operation, job, attempt)),
        Ok(WorkerCommand::Cancel { operation }) => panic!("unexpected cancel of {operation}"),
        Err(_) => None,
    }
}

fn completed(rx: &watch::Receiver<Stage<String>>) -> Option<Result<String, Failure>> {
    match &*rx.borrow() {
        Stage::Completed(r) => Some(r.clone()),
        _ => None,
    }
}

#[test]
fn runs_on_a_matching_worker_and_reports_the_result() {
    let s = S::new(SchedulerConfig::default());
    let mut w = s.register_worker("w1".into(), linux(), 1);
    let sub = s.submit(key(1), linux(), 0, "job-1".into()).unwrap();
    assert!(!sub.deduplicated);
    let (op, job, attempt) = next_run(&mut w).expect("dispatched");
    assert_eq!(
        (op.as_str(), job.as_str(), attempt),
        (sub.operation.as_str(), "job-1", 1)
    );
    assert!(matches!(&*sub.stage.borrow(), Stage::Executing { worker, .. } if worker == "w1"));
    s.complete("w1", &op, Ok("result".into()));
    assert_eq!(completed(&sub.stage), Some(Ok("result".into())));
    // Still queryable after completion.
    assert!(s.watch(&op).is_some());
}

#[test]
fn routes_by_platform_properties() {
    let s = S::new(SchedulerConfig::default());
    let mut a = s.register_worker(
        "a".into(),
        props(&[("OSFamily", "Linux"), ("pool", "a")]),
        4,
    );
    let mut b = s.register_worker(
        "b".into(),
        props(&[("OSFamily", "Linux"), ("pool", "b")]),
        4,
    );
    for i in 0..3 {
        s.submit(key(i), props(&[("pool", "b")]), 0, format!("b{i}"))
            .unwrap();
    }
    s.submit(key(10), props(&[("pool", "a")]), 0, "a0".into())
        .unwrap();
    let on_b: Vec<String> = std::iter::from_fn(|| next_run(&mut b))
        .map(|r| r.1)
        .collect();
    let on_a: Vec<String> = std::iter::from_fn(|| next_run(&mut a))
        .map(|r| r.1)
        .collect();
    assert_eq!(on_b, vec!["b0", "b1", "b2"]);
    assert_eq!(on_a, vec!["a0"]);
}

/// A scheduler whose start grace is long over: an action that waits now waits for a worker
/// that left, not for the start's.
fn started_long_ago(config: SchedulerConfig) -> S {
    let mut s = S::new(config);
    let ago = s.config.worker_grace + Duration::from_secs(1);
    s.started = Instant::now()
        .checked_sub(ago)
        .expect("the machine has been up longer than the grace");
    s.state.get_mut().unwrap().grace_ends = None;
    s
}

#[test]
fn unmatchable_actions_fail_at_once_naming_the_property() {
    let s = started_long_ago(SchedulerConfig::default());
    let _w = s.register_worker("w".into(), linux(), 1);
    let err = s
        .submit(
            key(1),
            props(&[("container-image", "docker://r/x@sha256:ab")]),
            0,
            "j".into(),
        )
        .err()
        .expect("must fail");
    assert_eq!(err.code, tonic::Code::FailedPrecondition);
    assert!(
        err.message
            .contains("container-image=docker://r/x@sha256:ab"),
        "{}",
        err.message
    );
    // With no worker at all (and no grace for one to connect), the message says so.
    let empty = S::new(SchedulerConfig {
        worker_grace: Duration::ZERO,
        ..Default::default()
    });
    let err = empty.submit(key(1), linux(), 0, "j".into()).err().unwrap();
    assert!(err.message.contains("no worker"), "{}", err.message);
}

/// A moment after the default `worker_grace` has run out.
fn after_grace() -> Instant {
    Instant::now() + SchedulerConfig::default().worker_grace + Duration::from_secs(1)
}

#[test]
fn after_a_restart_actions_wait_for_the_workers_to_reconnect_then_fail() {
    // A server that just started has no worker yet: its workers are in their reconnect
    // backoff, and a build retrying at once must not fail for that moment.
    let s = S::new(SchedulerConfig::default());
    let early = s.submit(key(1), linux(), 0, "early".into()).unwrap();
    assert_eq!(*early.stage.borrow(), Stage::Queued);
    let mut w = s.register_worker("w".into(), linux(), 1);
    assert_eq!(next_run(&mut w).unwrap().1, "early");
    // Workers come back one by one: with the Linux one back, the GPU one may still be in
    // its backoff, so a GPU action waits for it too.
    let gpu = s
        .submit(key(2), props(&[("pool", "gpu")]), 0, "gpu".into())
        .expect("waits during the start's grace");
    assert_eq!(*gpu.stage.borrow(), Stage::Queued);
    let mut g = s.register_worker("g".into(), props(&[("pool", "gpu")]), 1);
    assert_eq!(next_run(&mut g).unwrap().1, "gpu");

    // If no worker ever comes, the queued actions fail when the grace runs out.
    let lonely = S::new(SchedulerConfig::default());
    let waits = lonely.submit(key(3), linux(), 0, "j".into()).unwrap();
    lonely.expire_graces(Instant::now());
    assert_eq!(
        *waits.stage.borrow(),
        Stage::Queued,
        "failed before its time"
    );
    lonely.expire_graces(after_grace());
    let err = completed(&waits.stage).expect("must not hang").unwrap_err();
    assert_eq!(err.code, tonic::Code::FailedPrecondition);
    assert!(err.message.contains("no worker"), "{}", err.message);
}

#[test]
fn a_worker_back_within_its_grace_runs_what_waited_for_it() {
    let s = started_long_ago(SchedulerConfig::default());
    let pool = props(&[("pool", "x")]);
    let mut w = s.register_worker("w".into(), pool.clone(), 1);
    let first = s.submit(key(1), pool.clone(), 0, "a".into()).unwrap();
    assert!(next_run(&mut w).is_some());
    s.worker_lost("w"); // a restart, say
    let second = s.submit(key(2), pool.clone(), 0, "b".into()).unwrap();
    let mut back = s.register_worker("w".into(), pool.clone(), 2);
    let mut ran: Vec<String> = std::iter::from_fn(|| next_run(&mut back))
        .map(|r| r.1)
        .collect();
    ran.sort();
    assert_eq!(ran, ["a", "b"]);
    for sub in [&first, &second] {
        assert!(
            matches!(&*sub.stage.borrow(), Stage::Executing { .. }),
            "not running on the worker that came back: {:?}",
            sub.stage.borrow()
        );
    }
}

#[test]
fn departed_workers_are_remembered_within_a_bound() {
    let s = started_long_ago(SchedulerConfig::default());
    for i in 0..(MAX_DEPARTED + 500) {
        let id = format!("w{i}");
        drop(s.register_worker(id.clone(), props(&[("n", &i.to_string())]), 1));
        s.worker_lost(&id);
    }
    assert_eq!(s.state().departed.len(), MAX_DEPARTED);
    // The newest are the ones kept: the last to leave may still come back.
    let last = (MAX_DEPARTED + 499).to_string();
    assert!(s.could_run("", &props(&[("n", &last)])));
    assert!(!s.could_run("", &props(&[("n", "0")])));
}

#[test]
fn configured_platforms_let_actions_wait_for_their_workers() {
    let s = S::new(SchedulerConfig {
        known_platforms: vec![props(&[("pool", "gpu")])],
        ..Default::default()
    });
    let sub = s
        .submit(key(1), props(&[("pool", "gpu")]), 0, "j".into())
        .unwrap();
    assert_eq!(*sub.stage.borrow(), Stage::Queued);
    let mut w = s.register_worker("gpu-1".into(), props(&[("pool", "gpu")]), 1);
    assert_eq!(next_run(&mut w).unwrap().1, "j");
}

#[test]
fn lower_priority_values_run_first_then_fifo() {
    // Queue everything before the worker connects, so the order is the queue's alone.
    let s = S::new(SchedulerConfig {
        known_platforms: vec![linux()],
        ..Default::default()
    });
    let p = |i: u8, prio: i32| {
        s.submit(key(i), linux(), prio, format!("p{prio}-{i}"))
            .unwrap()
    };
    let _ = (p(1, 5), p(2, 0), p(3, 5), p(4, -3), p(5, 0));
    let mut w = s.register_worker("w".into(), linux(), 1);
    let mut order = Vec::new();
    while let Some((op, job, _)) = next_run(&mut w) {
        order.push(job);
        s.complete("w", &op, Ok(String::new()));
    }
    assert_eq!(order, vec!["p-3-4", "p0-2", "p0-5", "p5-1", "p5-3"]);
}

#[test]
fn capacity_limits_concurrent_actions_per_worker() {
    let s = S::new(SchedulerConfig::default());
    let mut w = s.register_worker("w".into(), linux(), 2);
    for i in 0..5 {
        s.submit(key(i), linux(), 0, format!("{i}")).unwrap();
    }
    let first: Vec<_> = std::iter::from_fn(|| next_run(&mut w)).collect();
    assert_eq!(first.len(), 2);
    s.complete("w", &first[0].0, Ok(String::new()));
    let more: Vec<_> = std::iter::from_fn(|| next_run(&mut w)).collect();
    assert_eq!(more.len(), 1, "one slot freed, one more action");
}

#[test]
fn identical_actions_in_flight_run_once_and_all_waiters_get_the_result() {
    let s = S::new(SchedulerConfig::default());
    let mut w = s.register_worker("w".into(), linux(), 4);
    let a = s.submit(key(7), linux(), 0, "first".into()).unwrap();
    let b = s.submit(key(7), linux(), 0, "second".into()).unwrap();
    let c = s.submit(key(7), linux(), 0, "third".into()).unwrap();
    assert!(b.deduplicated && c.deduplicated);
    assert_eq!(a.operation, b.operation);
    let runs: Vec<_> = std::iter::from_fn(|| next_run(&mut w)).collect();
    assert_eq!(runs.len(), 1);
    s.complete("w", &runs[0].0, Ok("shared".into()));
    for sub in [&a, &b, &c] {
        assert_eq!(completed(&sub.stage), Some(Ok("shared".into())));
    }
    // Once finished, the same action runs again rather than joining a finished operation.
    let d = s.submit(key(7), linux(), 0, "again".into()).unwrap();
    assert!(!d.deduplicated);
    assert_eq!(next_run(&mut w).unwrap().1, "again");
}

#[test]
fn a_lost_worker_s_actions_are_requeued_on_another() {
    let s = S::new(SchedulerConfig::default());
    let mut w1 = s.register_worker("w1".into(), linux(), 1);
    let sub = s.submit(key(1), linux(), 0, "j".into()).unwrap();
    let (op, _, attempt) = next_run(&mut w1).unwrap();
    assert_eq!(attempt, 1);
    let mut w2 = s.register_worker("w2".into(), linux(), 1);
    assert!(
        next_run(&mut w2).is_none(),
        "w2 idle while w1 holds the action"
    );
    s.worker_lost("w1");
    let (op2, job, attempt) = next_run(&mut w2).expect("requeued onto w2");
    assert_eq!((op2.as_str(), job.as_str(), attempt), (op.as_str(), "j", 2));
    // A late report from the lost worker is ignored.
    s.complete("w1", &op, Ok("stale".into()));
    assert!(completed(&sub.stage).is_none());
    s.complete("w2", &op, Ok("good".into()));
    assert_eq!(completed(&sub.stage), Some(Ok("good".into())));
}

#[test]
fn retries_are_bounded() {
    let s = S::new(SchedulerConfig {
        max_attempts: 2,
        known_platforms: vec![linux()],
        ..Default::default()
    });
    let sub = s.submit(key(1), linux(), 0, "j".into()).unwrap();
    for i in 0..2 {
        let mut w = s.register_worker(format!("w{i}"), linux(), 1);
        assert!(next_run(&mut w).is_some());
        s.worker_lost(&format!("w{i}"));
    }
    let err = completed(&sub.stage).expect("finished").unwrap_err();
    assert_eq!(err.code, tonic::Code::Unavailable);
    assert!(err.message.contains("lost 2 times"), "{}", err.message);
}

#[test]
fn losing_the_only_capable_worker_fails_queued_actions_instead_of_hanging() {
    let s = started_long_ago(SchedulerConfig::default());
    let mut w = s.register_worker("w".into(), props(&[("pool", "x")]), 1);
    let running = s
        .submit(key(1), props(&[("pool", "x")]), 0, "a".into())
        .unwrap();
    let queued = s
        .submit(key(2), props(&[("pool", "x")]), 0, "b".into())
        .unwrap();
    assert!(next_run(&mut w).is_some());
    s.worker_lost("w");
    // It may be restarting: both wait for it, and run if it is back in time.
    for sub in [&running, &queued] {
        assert_eq!(*sub.stage.borrow(), Stage::Queued);
    }
    let other = s
        .submit(key(3), props(&[("pool", "x")]), 0, "c".into())
        .expect("its platform is still servable during the grace");
    s.expire_graces(after_grace());
    for sub in [&running, &queued, &other] {
        let err = completed(&sub.stage).expect("must not hang").unwrap_err();
        assert_eq!(err.code, tonic::Code::FailedPrecondition);
        assert!(err.message.contains("pool=x"), "{}", err.message);
    }
}

#[test]
fn cancel_stops_queued_and_executing_operations() {
    let s = S::new(SchedulerConfig::default());
    let mut w = s.register_worker("w".into(), linux(), 1);
    let executing = s.submit(key(1), linux(), 0, "a".into()).unwrap();
    let queued = s.submit(key(2), linux(), 0, "b".into()).unwrap();
    let (op, _, _) = next_run(&mut w).unwrap();
    assert!(s.cancel(&queued.operation));
    assert_eq!(
        completed(&queued.stage).unwrap().unwrap_err().code,
        tonic::Code::Cancelled
    );
    assert!(s.cancel(&op));
    assert!(matches!(w.try_recv(), Ok(WorkerCommand::Cancel { operation }) if operation == op));
    assert_eq!(
        completed(&executing.stage).unwrap().unwrap_err().code,
        tonic::Code::Cancelled
    );
    assert!(!s.cancel(&op), "already finished");
    assert!(!s.cancel("no-such-operation"));
}

#[test]
fn a_dropped_worker_channel_counts_as_loss() {
    let s = S::new(SchedulerConfig {
        known_platforms: vec![linux()],
        ..Default::default()
    });
    drop(s.register_worker("gone".into(), linux(), 1));
    let sub = s.submit(key(1), linux(), 0, "j".into()).unwrap();
    assert_eq!(
        *sub.stage.borrow(),
        Stage::Queued,
        "requeued after the failed send"
    );
    let mut w = s.register_worker("alive".into(), linux(), 1);
    assert_eq!(next_run(&mut w).unwrap().2, 2, "second attempt");
}

fn key_in(instance: &str, n: u8) -> ActionKey {
    ActionKey {
        instance: instance.into(),
        action: Digest::of(&[n]),
    }
}

fn connect(
    s: &S,
    id: &str,
    instances: Option<&[&str]>,
) -> mpsc::UnboundedReceiver<WorkerCommand<String>> {
    let spec = WorkerSpec {
        properties: linux(),
        capacity: 4,
        instances: instances.map(|l| l.iter().map(|i| i.to_string()).collect()),
    };
    s.connect_worker(id.into(), spec).unwrap().1
}

#[test]
fn a_worker_limited_to_an_instance_never_receives_another_instances_jobs() {
    let s = started_long_ago(SchedulerConfig::default());
    let mut x = connect(&s, "x", Some(&["x"]));
    // Only the "x" worker is connected: a "y" action has nowhere to go and says why.
    let err = s
        .submit(key_in("y", 1), linux(), 0, "y-1".into())
        .err()
        .expect("refused");
    assert_eq!(err.code, tonic::Code::FailedPrecondition);
    assert!(err.message.contains("instance \"y\""), "{}", err.message);
    assert!(next_run(&mut x).is_none());

    let mut y = connect(&s, "y", Some(&["y"]));
    let sub_y = s.submit(key_in("y", 2), linux(), 0, "y-2".into()).unwrap();
    let sub_x = s.submit(key_in("x", 3), linux(), 0, "x-3".into()).unwrap();
    assert_eq!(next_run(&mut x).map(|r| r.1), Some("x-3".to_string()));
    assert!(next_run(&mut x).is_none(), "the x worker got a y job");
    assert_eq!(next_run(&mut y).map(|r| r.1), Some("y-2".to_string()));
    assert!(next_run(&mut y).is_none());

    // When the only "y" worker goes, a queued "y" action fails instead of moving to "x".
    let (op_y, _) = (sub_y.operation.clone(), ());
    let sub_y2 = s.submit(key_in("y", 4), linux(), 0, "y-4".into()).unwrap();
    assert_eq!(next_run(&mut y).map(|r| r.1), Some("y-4".to_string()));
    drop(y);
    s.worker_lost("y");
    // Requeued (attempt 1 of 3), but no worker serves "y" any more: they wait for it to
    // come back, and once its grace is over, both fail.
    assert!(next_run(&mut x).is_none(), "a y job moved to the x worker");
    for sub in [&sub_y, &sub_y2] {
        assert_eq!(
            *sub.stage.borrow(),
            Stage::Queued,
            "failed within the grace"
        );
    }
    s.expire_graces(after_grace());
    for sub in [&sub_y, &sub_y2] {
        match completed(&sub.stage) {
            Some(Err(f)) => assert_eq!(
                f.code,
                tonic::Code::FailedPrecondition,
                "{op_y}: {}",
                f.message
            ),
            other => panic!("y action not failed: {other:?}"),
        }
    }
    assert!(next_run(&mut x).is_none(), "a y job moved to the x worker");
    assert!(completed(&sub_x.stage).is_none());
}

#[test]
fn a_connected_worker_id_cannot_be_taken_over() {
    let s = S::new(SchedulerConfig::default());
    let mut first = connect(&s, "w", None);
    let spec = WorkerSpec {
        properties: linux(),
        capacity: 1,
        instances: None,
    };
    let err = s
        .connect_worker("w".into(), spec.clone())
        .expect_err("refused");
    assert_eq!(err.code, tonic::Code::AlreadyExists);
    // The first worker still gets work.
    s.submit(key(9), linux(), 0, "j".into()).unwrap();
    assert!(next_run(&mut first).is_some());
    // Once it is gone, the id is free again.
    s.worker_lost("w");
    assert!(s.connect_worker("w".into(), spec).is_ok());
}

#[test]
fn work_spreads_over_workers_by_free_slots() {
    let s = S::new(SchedulerConfig::default());
    let mut a = s.register_worker("a".into(), linux(), 2);
    let mut b = s.register_worker("b".into(), linux(), 2);
    for i in 0..4 {
        s.submit(key(40 + i), linux(), 0, format!("j{i}")).unwrap();
    }
    let count = |rx: &mut mpsc::UnboundedReceiver<WorkerCommand<String>>| {
        std::iter::from_fn(|| next_run(rx)).count()
    };
    assert_eq!(
        (count(&mut a), count(&mut b)),
        (2, 2),
        "both workers get half"
    );
}

#[test]
fn a_worker_whose_channel_died_unnoticed_does_not_strand_its_actions() {
    let s = started_long_ago(SchedulerConfig::default());
    // The connection's receiver is gone before the scheduler hears of it.
    drop(s.register_worker("gone".into(), props(&[("pool", "only")]), 1));
    let sub = s
        .submit(key(77), props(&[("pool", "only")]), 0, "j".into())
        .unwrap();
    // Dispatching found the channel closed, dropped the worker, and with no other worker
    // for that platform the action fails (once the worker's grace is over) instead of
    // waiting forever.
    assert_eq!(*sub.stage.borrow(), Stage::Queued);
    s.expire_graces(after_grace());
    match completed(&sub.stage) {
        Some(Err(f)) => assert_eq!(f.code, tonic::Code::FailedPrecondition, "{}", f.message),
        other => panic!("stranded: {other:?}"),
    }
    assert_eq!(s.worker_count(), 0);
}

#[test]
fn a_worker_holding_an_action_past_its_deadline_is_dropped_and_the_action_requeued() {
    let s = S::new(SchedulerConfig {
        max_attempts: 2,
        deadline_grace: Duration::from_secs(5),
        ..SchedulerConfig::default()
    });
    let mut silent = s.register_worker("silent".into(), linux(), 1);
    let sub = s
        .submit_with_timeout(
            key(1),
            linux(),
            0,
            "job".into(),
            Some(Duration::from_secs(10)),
        )
        .unwrap();
    let (op, _, _) = next_run(&mut silent).expect("dispatched");
    // Within timeout + grace nothing happens, however long the keepalives go on.
    assert!(s
        .enforce_deadlines(Instant::now() + Duration::from_secs(14))
        .is_empty());
    let mut other = s.register_worker("other".into(), linux(), 1);
    let dropped = s.enforce_deadlines(Instant::now() + Duration::from_secs(16));
    assert_eq!(dropped, ["silent"]);
    assert_eq!(s.worker_count(), 1);
    let (again, _, attempt) = next_run(&mut other).expect("requeued onto the other worker");
    assert_eq!((again.as_str(), attempt), (op.as_str(), 2));
    // A late report from the dropped worker is ignored.
    s.complete("silent", &op, Ok("stale".into()));
    assert_eq!(completed(&sub.stage), None);
    // Out of attempts: the action fails with DEADLINE_EXCEEDED.
    s.enforce_deadlines(Instant::now() + Duration::from_secs(16));
    match completed(&sub.stage) {
        Some(Err(f)) => {
            assert_eq!(f.code, tonic::Code::DeadlineExceeded);
            assert!(f.message.contains("past its timeout"), "{}", f.message);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn actions_without_a_timeout_are_never_dropped() {
    let s = S::new(SchedulerConfig::default());
    let mut w = s.register_worker("w".into(), linux(), 1);
    s.submit(key(1), linux(), 0, "job".into()).unwrap();
    next_run(&mut w).expect("dispatched");
    assert!(s
        .enforce_deadlines(Instant::now() + Duration::from_secs(1 << 30))
        .is_empty());
}

/// Issue 10: the queue and the operations map were unbounded. Past `max_queued`, Execute
/// gets RESOURCE_EXHAUSTED; finished operations make room before anyone is refused.
#[test]
fn the_queue_and_the_operations_are_bounded() {
    let s = S::new(SchedulerConfig {
        known_platforms: vec![linux()],
        max_queued: 3,
        max_operations: 4,
        ..SchedulerConfig::default()
    });
    for n in 0..3 {
        s.submit(key(n), linux(), 0, format!("job-{n}")).unwrap();
    }
    let err = s.submit(key(3), linux(), 0, "job-3".into()).err().unwrap();
    assert_eq!(err.code, tonic::Code::ResourceExhausted);
    assert!(
        err.message.contains("max_queued_actions"),
        "{}",
        err.message
    );
    // A duplicate of a queued action still joins it: it costs nothing.
    assert!(
        s.submit(key(0), linux(), 0, "again".into())
            .unwrap()
            .deduplicated
    );

    // A worker takes and finishes two: their operations are kept, and the fourth operation
    // fits; the fifth makes the scheduler forget the oldest finished one.
    let mut w = s.register_worker("w".into(), linux(), 2);
    let (a, ..) = next_run(&mut w).unwrap();
    let (b, ..) = next_run(&mut w).unwrap();
    s.complete("w", &a, Ok("a".into()));
    s.complete("w", &b, Ok("b".into()));
    s.submit(key(3), linux(), 0, "job-3".into()).unwrap();
    assert!(s.watch(&a).is_some() && s.watch(&b).is_some());
    s.submit(key(4), linux(), 0, "job-4".into()).unwrap();
    assert!(
        s.watch(&a).is_none(),
        "the oldest finished operation made room"
    );
    assert!(s.watch(&b).is_some());
    // Running and queued operations are never forgotten: with none finished left, refuse.
    let (c, ..) = next_run(&mut w).unwrap();
    let (d, ..) = next_run(&mut w).unwrap();
    assert!(s.watch(&c).is_some() && s.watch(&d).is_some());
    s.submit(key(5), linux(), 0, "job-5".into()).unwrap(); // forgets b
    assert!(s.watch(&b).is_none());
    let err = s.submit(key(6), linux(), 0, "job-6".into()).err().unwrap();
    assert_eq!(err.code, tonic::Code::ResourceExhausted);
    assert!(err.message.contains("max_operations"), "{}", err.message);
}
