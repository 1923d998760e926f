use super::*;
use crate::request_meta::MAX_TEXT;
use bazel_remote_apis::build::bazel::remote::execution::v2::RequestMetadata;
use prost::Message;

/// A hit whose writer is not known, and a miss.
const HIT: Option<Option<&lre_store::ac_entry::Provenance>> = Some(None);
const MISS: Option<Option<&lre_store::ac_entry::Provenance>> = None;

fn limits(max_invocations: usize, max_actions: usize, recent: usize) -> StatusConfig {
    StatusConfig {
        max_invocations,
        max_actions,
        recent_actions: recent,
        protect_metrics: false,
    }
}

fn meta(invocation: &str) -> RequestMeta {
    RequestMeta {
        invocation: invocation.into(),
        mnemonic: "CppCompile".into(),
        target: "//a:b".into(),
        ..RequestMeta::default()
    }
}

fn digest(i: u32) -> Digest {
    Digest::of(&i.to_le_bytes())
}

fn ran(failed: bool) -> Execution {
    Execution {
        first_output: "bazel-out/a.o".into(),
        worker: "w".into(),
        exit_code: Some(i32::from(failed)),
        duration: Some(Duration::from_millis(1500)),
        stderr: Some(digest(99)),
        failed,
        message: String::new(),
    }
}

#[test]
fn old_invocations_age_out_past_the_invocation_bound() {
    let a = Activity::new(limits(3, 1000, 10));
    for inv in ["i1", "i2", "i3", "i4", "i5"] {
        a.lookup("", Some(&meta(inv)), digest(1), MISS);
    }
    let ids: Vec<String> = a
        .snapshot(|_| true)
        .invocations
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(ids, ["i5", "i4", "i3"], "newest first, the two oldest gone");
    assert!(a.invocation("", "i1").is_none());
    assert_eq!(a.remembered_actions(), 3);
}

fn by(caller: &str, invocation: &str) -> RequestMeta {
    RequestMeta {
        caller: caller.into(),
        ..meta(invocation)
    }
}

/// Issue 21, defect 7: a read token added lookups to an invocation id it did not own, and
/// 64 fresh ids pushed a real invocation out of the history.
#[test]
fn one_caller_cannot_add_to_or_push_out_anothers_invocations() {
    let a = Activity::new(limits(8, 1000, 10));
    a.lookup("", Some(&by("ci", "build-1")), digest(1), MISS);
    // Lookups under CI's invocation id land in the caller's own entry, not in CI's.
    a.lookup("", Some(&by("dev", "build-1")), digest(2), MISS);
    let (summary, actions) = a.invocation("", "build-1").unwrap();
    assert_eq!((summary.caller.as_str(), summary.misses), ("ci", 1));
    assert_eq!(actions.len(), 1, "{actions:?}");
    // Sixty-four fresh ids push out only the caller's own.
    for i in 0..64 {
        a.lookup("", Some(&by("dev", &format!("junk{i}"))), digest(3), MISS);
    }
    let kept = a.snapshot(|_| true).invocations;
    assert!(
        kept.iter().any(|i| i.id == "build-1" && i.caller == "ci"),
        "CI's invocation was pushed out: {:?}",
        kept.iter().map(|i| (&i.caller, &i.id)).collect::<Vec<_>>()
    );
    assert_eq!(kept.len(), 8, "the bound holds");
}

/// The action bound too: one caller's huge invocation makes room from its own.
#[test]
fn the_action_bound_is_taken_from_the_caller_holding_most() {
    let a = Activity::new(limits(100, 10, 10));
    for i in 0..3 {
        a.lookup("", Some(&by("ci", "real")), digest(i), MISS);
    }
    for i in 0..30 {
        a.lookup("", Some(&by("dev", "flood")), digest(100 + i), MISS);
    }
    let (_, actions) = a.invocation("", "real").expect("CI's invocation kept");
    assert_eq!(actions.len(), 3);
    let (summary, actions) = a.invocation("", "flood").unwrap();
    assert_eq!(actions.len(), 7, "what is left of the bound");
    assert_eq!(summary.dropped, 23);
}

#[test]
fn the_action_bound_evicts_whole_invocations_and_then_counts_what_it_drops() {
    let a = Activity::new(limits(100, 10, 10));
    for i in 0..6 {
        a.lookup("", Some(&meta("old")), digest(i), HIT);
    }
    // "old" was active first; the new invocation pushes it out once the budget is spent.
    for i in 0..12 {
        a.lookup("", Some(&meta("new")), digest(100 + i), MISS);
    }
    assert!(a.invocation("", "old").is_none(), "old invocation aged out");
    let (summary, actions) = a.invocation("", "new").expect("new invocation kept");
    assert_eq!(actions.len(), 10, "never more than max_actions remembered");
    assert_eq!(summary.misses, 12, "every lookup is counted");
    assert_eq!(
        summary.dropped, 2,
        "the two keys past the bound are counted as dropped"
    );
    assert_eq!(a.remembered_actions(), 10);
}

#[test]
fn an_activity_touched_later_outlives_an_older_one() {
    let a = Activity::new(limits(2, 1000, 10));
    a.lookup("", Some(&meta("a")), digest(1), HIT);
    a.lookup("", Some(&meta("b")), digest(2), HIT);
    a.lookup("", Some(&meta("a")), digest(3), HIT); // "a" active again
    a.lookup("", Some(&meta("c")), digest(4), HIT); // evicts "b", the least recent
    assert!(a.invocation("", "a").is_some());
    assert!(a.invocation("", "b").is_none());
    assert!(a.invocation("", "c").is_some());
}

#[test]
fn a_miss_then_an_execution_is_one_missed_action() {
    let a = Activity::new(limits(10, 100, 10));
    let m = meta("x");
    a.lookup("", Some(&m), digest(7), MISS);
    a.executed("", Some(&m), digest(7), ran(false));
    a.lookup("", Some(&m), digest(8), HIT);
    let (s, actions) = a.invocation("", "x").unwrap();
    assert_eq!((s.hits, s.misses, s.executed, s.failed), (1, 1, 1, 0));
    let missed: Vec<_> = actions
        .iter()
        .filter(|r| r.missed)
        .map(|r| r.digest)
        .collect();
    assert_eq!(missed, [digest(7)]);
}

#[test]
fn the_recent_list_is_bounded_and_newest_first() {
    let a = Activity::new(limits(10, 100, 3));
    for i in 0..5 {
        a.lookup("", None, digest(i), (i % 2 == 0).then_some(None));
    }
    a.executed("", None, digest(9), ran(true));
    let r = a.snapshot(|_| true).recent;
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].outcome, Outcome::Failed);
    assert_eq!(r[0].exit_code, Some(1));
    assert_eq!(r[0].duration_ms, Some(1500));
    assert!(r[0].has_stderr);
    assert!(a.recent_action(r[0].id).is_some());
    assert!(
        a.recent_action(1).is_none(),
        "the first action left the list"
    );
}

#[test]
fn callers_see_only_the_instances_they_may_read() {
    let a = Activity::new(limits(10, 100, 10));
    a.lookup("team", Some(&meta("t1")), digest(1), HIT);
    a.lookup("secret", Some(&meta("s1")), digest(2), MISS);
    a.executed("secret", Some(&meta("s1")), digest(2), ran(true));
    let s = a.snapshot(|i| i == "team");
    assert!(s.recent.iter().all(|r| r.instance == "team"));
    assert_eq!(s.recent.len(), 1);
    assert_eq!(s.invocations.len(), 1);
    let now = s.minutes.last().expect("sixty minutes");
    assert!(now.instances.contains_key("team") && !now.instances.contains_key("secret"));
    assert_eq!(s.minutes.len(), 60);
}

#[test]
fn invented_instance_names_share_one_timeline_row() {
    let a = Activity::new(limits(10, 100, 10));
    for i in 0..100 {
        a.lookup(&format!("i{i}"), None, digest(i), HIT);
    }
    let s = a.snapshot(|_| true);
    let now = s.minutes.last().unwrap();
    assert_eq!(now.instances.len(), 33, "32 named rows and the shared one");
    assert_eq!(now.instances[timeline::OTHER_INSTANCES].hits, 68);
}

#[test]
fn client_text_is_clipped() {
    let long = "é".repeat(1000);
    let c = clip(long);
    assert!(c.len() <= MAX_TEXT && c.chars().all(|ch| ch == 'é'));
}

#[test]
fn request_metadata_is_read_from_the_binary_header() {
    let m = RequestMetadata {
        tool_invocation_id: "inv-1".into(),
        action_mnemonic: "Javac".into(),
        target_id: "//j:j".into(),
        tool_details: Some(
            bazel_remote_apis::build::bazel::remote::execution::v2::ToolDetails {
                tool_name: "bazel".into(),
                tool_version: "4.2.3".into(),
            },
        ),
        ..Default::default()
    };
    let mut req = tonic::Request::new(());
    req.metadata_mut().insert_bin(
        REQUEST_METADATA_HEADER,
        tonic::metadata::MetadataValue::from_bytes(&m.encode_to_vec()),
    );
    let got = RequestMeta::of(&req).expect("metadata read");
    assert_eq!(got.invocation, "inv-1");
    assert_eq!(got.tool, "bazel 4.2.3");
    assert_eq!(
        (got.mnemonic.as_str(), got.target.as_str()),
        ("Javac", "//j:j")
    );
    let mut bad = tonic::Request::new(());
    bad.metadata_mut().insert_bin(
        REQUEST_METADATA_HEADER,
        tonic::metadata::MetadataValue::from_bytes(b"\xff\xff\xff"),
    );
    assert_eq!(RequestMeta::of(&bad), None, "a malformed header is ignored");
    assert_eq!(RequestMeta::of(&tonic::Request::new(())), None);
}

#[test]
fn config_bounds_are_checked_by_key() {
    assert!(StatusConfig::default().validate().is_ok());
    let e = limits(0, 10, 10).validate().unwrap_err();
    assert!(e.to_string().contains("`status.max_invocations`"), "{e}");
    let e = limits(10, 10, 100_000).validate().unwrap_err();
    assert!(e.to_string().contains("`status.recent_actions`"), "{e}");
}
