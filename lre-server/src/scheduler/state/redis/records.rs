//! What the Redis state stores, and how it is read back: a job (`StoredJob`, protobuf in
//! the operation's hash), an outcome (`StoredOutcome`), a queue's identity (JSON in
//! `P queues`), a worker's registration (JSON), and an operation's snapshot from its hash
//! fields. Pure functions, tested here without Redis.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    Digest as ProtoDigest, ExecuteResponse,
};
use bazel_remote_apis::google::rpc;
use bytes::Bytes;
use prost::Message;

use crate::digest::{Digest, DigestFunction};
use crate::request_meta::RequestMeta;
use crate::scheduler::job::Job;
use crate::scheduler::model::{ActionKey, Outcome, Snapshot, Stage};

/// What a worker needs, as stored in the operation's hash.
#[derive(Clone, PartialEq, Message)]
pub struct StoredJob {
    #[prost(string, tag = "1")]
    pub instance: String,
    #[prost(message, optional, tag = "2")]
    pub action_digest: Option<ProtoDigest>,
    #[prost(bytes = "bytes", tag = "3")]
    pub action: Bytes,
    #[prost(bytes = "bytes", tag = "4")]
    pub command: Bytes,
    #[prost(uint64, tag = "5")]
    pub timeout_ms: u64,
    #[prost(bool, tag = "6")]
    pub do_not_cache: bool,
    #[prost(string, tag = "7")]
    pub first_output: String,
    /// The client's RequestMetadata for the status page: invocation, correlated
    /// invocations, mnemonic, target, tool, and the caller's token name (empty when it
    /// sent none).
    #[prost(string, repeated, tag = "9")]
    pub meta: Vec<String>,
}

pub fn encode_job(job: &Job) -> Vec<u8> {
    let meta = job.meta.as_ref().map_or_else(Vec::new, |m| {
        vec![
            m.invocation.clone(),
            m.correlated.clone(),
            m.mnemonic.clone(),
            m.target.clone(),
            m.tool.clone(),
            m.caller.clone(),
        ]
    });
    StoredJob {
        instance: job.key.instance.clone(),
        action_digest: Some(job.key.action.to_proto()),
        action: job.action.clone(),
        command: job.command.clone(),
        timeout_ms: job.timeout.as_millis() as u64,
        do_not_cache: job.do_not_cache,
        first_output: job.first_output.clone(),
        meta,
    }
    .encode_to_vec()
}

pub fn decode_job(raw: &[u8]) -> Result<Job, String> {
    let j = StoredJob::decode(raw).map_err(|e| e.to_string())?;
    let action = Digest::from_opt_proto(DigestFunction::Sha256, &j.action_digest)
        .map_err(|e| e.to_string())?
        .ok_or("no action digest")?;
    // Five fields from replicas of before the caller was kept, six since.
    let meta = (j.meta.len() == 5 || j.meta.len() == 6).then(|| RequestMeta {
        invocation: j.meta[0].clone(),
        correlated: j.meta[1].clone(),
        mnemonic: j.meta[2].clone(),
        target: j.meta[3].clone(),
        tool: j.meta[4].clone(),
        caller: j.meta.get(5).cloned().unwrap_or_default(),
    });
    Ok(Job {
        key: ActionKey {
            instance: j.instance,
            action,
        },
        action: j.action,
        command: j.command,
        timeout: Duration::from_millis(j.timeout_ms),
        do_not_cache: j.do_not_cache,
        meta,
        first_output: j.first_output,
    })
}

/// How an operation ended.
#[derive(Clone, PartialEq, Message)]
pub struct StoredOutcome {
    #[prost(message, optional, tag = "1")]
    pub response: Option<ExecuteResponse>,
    #[prost(int32, tag = "2")]
    pub code: i32,
    #[prost(string, tag = "3")]
    pub message: String,
}

pub fn encode_outcome(outcome: &Outcome) -> Vec<u8> {
    match outcome {
        Ok(resp) => StoredOutcome {
            response: Some(resp.clone()),
            code: 0,
            message: String::new(),
        },
        Err(s) => StoredOutcome {
            response: None,
            code: s.code,
            message: s.message.clone(),
        },
    }
    .encode_to_vec()
}

pub fn decode_outcome(raw: &[u8]) -> Outcome {
    match StoredOutcome::decode(raw) {
        Ok(StoredOutcome {
            response: Some(r), ..
        }) => Ok(r),
        Ok(o) => Err(rpc::Status {
            code: o.code,
            message: o.message,
            details: vec![],
        }),
        Err(e) => Err(rpc::Status {
            code: tonic::Code::Internal as i32,
            message: format!("the cluster's record of the outcome is undecodable: {e}"),
            details: vec![],
        }),
    }
}

/// Milliseconds since the epoch, as stored.
pub fn wall_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn from_wall_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The hash fields `parse_snapshot` reads, in its order.
pub const SNAPSHOT_FIELDS: [&str; 6] = [
    "instance",
    "action",
    "stage",
    "attempts",
    "result",
    "queued_at",
];

/// An operation's snapshot from its hash's `SNAPSHOT_FIELDS`; `None` if it is gone.
pub fn parse_snapshot(name: &str, f: &[Option<Vec<u8>>]) -> Result<Option<Snapshot>, String> {
    let text = |i: usize| {
        f.get(i)
            .and_then(|v| v.as_deref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let (Some(instance), Some(action), Some(stage)) = (text(0), text(1), text(2)) else {
        return Ok(None);
    };
    let action = action
        .split_once('/')
        .and_then(|(h, s)| Digest::parse(DigestFunction::Sha256, h, s).ok())
        .ok_or_else(|| format!("the cluster's record of operation {name} names no valid action"))?;
    let stage = match stage.as_str() {
        "queued" => Stage::Queued,
        "executing" => Stage::Executing {
            attempt: text(3).and_then(|a| a.parse().ok()).unwrap_or(1),
        },
        _ => Stage::Completed(decode_outcome(
            f.get(4).and_then(|v| v.as_deref()).unwrap_or_default(),
        )),
    };
    let queued_at = text(5)
        .and_then(|t| t.parse().ok())
        .map_or(UNIX_EPOCH, from_wall_ms);
    Ok(Some(Snapshot {
        key: ActionKey { instance, action },
        stage,
        queued_at,
    }))
}

/// The action as keys and fields name it: "HASH/SIZE".
pub fn action_name(d: &Digest) -> String {
    format!("{}/{}", d.hex(), d.size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job {
            key: ActionKey {
                instance: "main".into(),
                action: Digest::of(b"action"),
            },
            action: Bytes::from_static(b"action"),
            command: Bytes::from_static(b"command"),
            timeout: Duration::from_millis(1500),
            do_not_cache: true,
            meta: Some(RequestMeta {
                invocation: "inv".into(),
                caller: "ci".into(),
                ..Default::default()
            }),
            first_output: "out/a".into(),
        }
    }

    #[test]
    fn a_job_round_trips() {
        let j = decode_job(&encode_job(&job())).unwrap();
        let want = job();
        assert_eq!(j.key, want.key);
        assert_eq!((j.action, j.command), (want.action, want.command));
        assert_eq!((j.timeout, j.do_not_cache), (want.timeout, true));
        assert_eq!(j.meta, want.meta);
        assert_eq!(j.first_output, "out/a");
        assert!(decode_job(b"\xff\xff").is_err());
        let mut old = StoredJob::decode(&encode_job(&job())[..]).unwrap();
        old.meta.pop();
        let j = decode_job(&old.encode_to_vec()).unwrap();
        assert_eq!(
            j.meta.unwrap().caller,
            "",
            "five fields: an older replica's"
        );
    }

    #[test]
    fn outcomes_round_trip_and_garbage_is_an_internal_error() {
        let ok: Outcome = Ok(ExecuteResponse {
            cached_result: true,
            ..Default::default()
        });
        assert_eq!(decode_outcome(&encode_outcome(&ok)), ok);
        let err = crate::scheduler::model::failed(tonic::Code::Cancelled, "stop");
        assert_eq!(decode_outcome(&encode_outcome(&err)), err);
        let bad = decode_outcome(b"\xff\xff\xff").unwrap_err();
        assert_eq!(bad.code, tonic::Code::Internal as i32);
    }

    #[test]
    fn snapshots_are_read_from_hash_fields() {
        let d = Digest::of(b"x");
        let f = |v: &[Option<&str>]| -> Vec<Option<Vec<u8>>> {
            v.iter().map(|x| x.map(|s| s.as_bytes().to_vec())).collect()
        };
        let s = parse_snapshot(
            "op",
            &f(&[
                Some("i"),
                Some(&action_name(&d)),
                Some("executing"),
                Some("2"),
                None,
                Some("1000"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.stage, Stage::Executing { attempt: 2 });
        assert_eq!(s.key.action, d);
        assert_eq!(s.queued_at, from_wall_ms(1000));
        assert!(
            parse_snapshot("op", &f(&[None, None, None, None, None, None]))
                .unwrap()
                .is_none()
        );
        assert!(parse_snapshot(
            "op",
            &f(&[Some("i"), Some("bad"), Some("queued"), None, None, None])
        )
        .is_err());
        let done = parse_snapshot(
            "op",
            &[
                Some(b"i".to_vec()),
                Some(action_name(&d).into_bytes()),
                Some(b"completed".to_vec()),
                None,
                Some(encode_outcome(&crate::scheduler::model::failed(
                    tonic::Code::Unavailable,
                    "lost",
                ))),
                None,
            ],
        )
        .unwrap()
        .unwrap();
        assert!(matches!(done.stage, Stage::Completed(Err(ref s)) if s.message == "lost"));
    }
}
