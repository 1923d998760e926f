//! Execution state shared by every lre-server replica, in Redis, so that any replica
//! accepts Execute, a worker attached to any replica runs it, WaitExecution and
//! GetOperation answer anywhere, identical actions run once across replicas, and a
//! replica's restart (or `kill -9`) loses no queued action.
//!
//! What Redis holds, under the configured prefix (`P`):
//! - `P op:ID`, a hash per operation: its instance and action, the job a worker needs
//!   (`StoredJob`), its priority and queue position, its stage, its attempts, the replica
//!   holding its lease and, once done, its outcome (`StoredOutcome`). A finished one expires
//!   after `keep_finished`.
//! - `P inflight:ACTION:INSTANCE` → the operation running it, for deduplication.
//! - `P queue:QID`, a sorted set per (instance, platform): score = priority, member =
//!   sequence number + id, so equal priorities run first come, first served, and a requeued
//!   action keeps its place. `P queues` maps each QID to its (instance, platform).
//! - `P leases`, a sorted set of the operations being executed, scored by when their
//!   lease runs out. The replica whose worker runs one renews it; a replica that dies stops
//!   renewing, and any replica's reaper puts the action back in its queue.
//! - `P live`, the unfinished operations (bounds the queue: `max_queued`).
//! - `P replicas` and `P workers:REPLICA`: each replica's connected workers, rewritten
//!   every few seconds with a TTL, so Execute on a replica without workers knows whether
//!   some replica has one that can run the action.
//! - The channel `P events`: "work" when something was queued, "stage ID" when an
//!   operation changed. Waiters re-read the hash, so a lost message costs only latency:
//!   every watched operation is also re-read every `POLL`.
//!
//! Every change of state is one Lua script, so it is atomic however many keys it touches
//! (standalone Redis or a primary with replicas; Redis Cluster is not supported). Times
//! come from Redis's clock (`TIME`), so replicas' clocks need not agree.
//!
//! A replica runs claimed operations on its own in-memory `Scheduler` (`run_claimed`),
//! which tells this module how each ends (`LeaseEvent`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    platform::Property, Digest as ProtoDigest, ExecuteResponse, Platform,
};
use bytes::Bytes;
use lre_store::store::RedisConnection;
use lre_store::StoreError;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify};

use super::{
    platform, ActionKey, Claim, Failure, LeaseEvent, OperationId, Properties, Stage, Submitted,
};
use crate::digest::Digest;
use crate::execution::{ExecScheduler, Job};
use crate::status::RequestMeta;

/// Watched operations are re-read this often, in case a stage message was lost.
const POLL: Duration = Duration::from_secs(2);
/// Leases renewed, registrations rewritten and expired leases reaped this often.
const TICK: Duration = Duration::from_secs(2);
/// A replica's worker registrations outlive it by this much.
const REGISTRATION_TTL_SECONDS: u64 = 10;
/// Distinct (instance, platform) queues; past this, an Execute for a new one is refused,
/// so a client cannot grow the registry without bound.
pub const MAX_QUEUES: usize = 1024;
/// Expired leases handled by one reaper run.
const REAP_BATCH: usize = 64;
/// A queue no registered worker (nor `known_platforms`) can serve for the local scheduler's
/// `worker_grace` has its actions failed, as one process fails them when its last able
/// worker goes. Never sooner than this: registrations are rewritten every TICK.
const STRANDED_AT_LEAST: Duration = Duration::from_secs(2 * TICK.as_secs());
/// Watched operations re-read per Redis round trip.
const REFRESH_BATCH: usize = 512;
/// Stranded operations failed per queue and run.
const STRAND_BATCH: usize = 256;

#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Prefix of every key and of the channel.
    pub prefix: String,
    pub max_attempts: u32,
    pub max_queued: usize,
    pub keep_finished: Duration,
    /// How long a replica's claim on an executing action lasts without renewal.
    pub lease: Duration,
    pub known_platforms: Vec<Properties>,
}

/// What a worker needs, as stored in the operation's hash.
#[derive(Clone, PartialEq, Message)]
struct StoredJob {
    #[prost(string, tag = "1")]
    instance: String,
    #[prost(message, optional, tag = "2")]
    action_digest: Option<ProtoDigest>,
    #[prost(bytes = "bytes", tag = "3")]
    action: Bytes,
    #[prost(bytes = "bytes", tag = "4")]
    command: Bytes,
    #[prost(uint64, tag = "5")]
    timeout_ms: u64,
    #[prost(bool, tag = "6")]
    do_not_cache: bool,
    #[prost(string, tag = "7")]
    first_output: String,
    #[prost(message, optional, tag = "8")]
    platform: Option<Platform>,
    /// The client's RequestMetadata for the status page: invocation, correlated
    /// invocations, mnemonic, target, tool, and the caller's token name (empty when it
    /// sent none).
    #[prost(string, repeated, tag = "9")]
    meta: Vec<String>,
}

/// How an operation ended.
#[derive(Clone, PartialEq, Message)]
struct StoredOutcome {
    #[prost(message, optional, tag = "1")]
    response: Option<ExecuteResponse>,
    #[prost(int32, tag = "2")]
    code: i32,
    #[prost(string, tag = "3")]
    message: String,
}

#[derive(Serialize, Deserialize)]
struct QueueMeta {
    instance: String,
    platform: Properties,
}

/// A worker connected to some replica, as that replica registered it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Registration {
    properties: Properties,
    instances: Option<Vec<String>>,
    capacity: usize,
}

impl Registration {
    fn can_run(&self, instance: &str, platform: &Properties) -> bool {
        self.instances
            .as_ref()
            .is_none_or(|l| l.iter().any(|i| i == instance))
            && platform::satisfies(&self.properties, platform)
    }
}

/// Completes an operation: shared by the scripts that can end one.
const FINISH: &str = r#"
local function finish(p, id, outcome, keep)
  local op = p .. 'op:' .. id
  local f = redis.call('HMGET', op, 'queue', 'member', 'action', 'instance')
  if f[1] and f[2] then redis.call('ZREM', f[1], f[2]) end
  redis.call('ZREM', p .. 'leases', id)
  redis.call('SREM', p .. 'live', id)
  if f[3] and f[4] then
    local inflight = p .. 'inflight:' .. f[3] .. ':' .. f[4]
    if redis.call('GET', inflight) == id then redis.call('DEL', inflight) end
  end
  redis.call('HSET', op, 'stage', 'completed', 'result', outcome)
  redis.call('HDEL', op, 'lease', 'job')
  redis.call('EXPIRE', op, keep)
  redis.call('PUBLISH', p .. 'events', 'stage ' .. id)
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Back to its queue, or failed once its attempts are used up.
local function release(p, id, max_attempts, failed, keep)
  local op = p .. 'op:' .. id
  local f = redis.call('HMGET', op, 'stage', 'attempts', 'queue', 'member', 'priority', 'qid', 'qmeta')
  redis.call('ZREM', p .. 'leases', id)
  if f[1] ~= 'executing' then return 0 end
  if tonumber(f[2]) >= tonumber(max_attempts) then
    finish(p, id, failed, keep)
    return 2
  end
  redis.call('HSET', op, 'stage', 'queued')
  redis.call('HDEL', op, 'lease')
  redis.call('ZADD', f[3], f[5], f[4])
  -- The reaper forgets queues that were empty meanwhile: name this one again.
  redis.call('HSET', p .. 'queues', f[6], f[7])
  redis.call('PUBLISH', p .. 'events', 'stage ' .. id)
  redis.call('PUBLISH', p .. 'events', 'work')
  return 1
end
"#;

/// ARGV: prefix, id, job, instance, action, priority, queue key, qid, queue meta,
/// max_queued, max_queues, inflight key. Returns {id, 1} (queued), {id, 0} (joined the
/// identical operation in flight), {'', 2} (queue full) or {'', 3} (too many queues).
const SUBMIT: &str = r#"
local p = ARGV[1]
local existing = redis.call('GET', ARGV[12])
if existing then
  local st = redis.call('HGET', p .. 'op:' .. existing, 'stage')
  if st and st ~= 'completed' then return {existing, 0} end
end
if redis.call('SCARD', p .. 'live') >= tonumber(ARGV[10]) then return {'', 2} end
if redis.call('HEXISTS', p .. 'queues', ARGV[8]) == 0
   and redis.call('HLEN', p .. 'queues') >= tonumber(ARGV[11]) then return {'', 3} end
local seq = redis.call('INCR', p .. 'seq')
local member = string.format('%016x', seq) .. ARGV[2]
local op = p .. 'op:' .. ARGV[2]
redis.call('HSET', op, 'job', ARGV[3], 'instance', ARGV[4], 'action', ARGV[5],
  'priority', ARGV[6], 'queue', ARGV[7], 'member', member, 'stage', 'queued', 'attempts', 0,
  'qid', ARGV[8], 'qmeta', ARGV[9])
redis.call('SET', ARGV[12], ARGV[2])
redis.call('SADD', p .. 'live', ARGV[2])
redis.call('ZADD', ARGV[7], ARGV[6], member)
redis.call('HSET', p .. 'queues', ARGV[8], ARGV[9])
redis.call('PUBLISH', p .. 'events', 'work')
return {ARGV[2], 1}
"#;

/// ARGV: prefix, queue key, replica, lease ms. Returns {id, job, attempt} or nil. The
/// lease names the replica and the attempt ("REPLICA/ATTEMPT"): the claim, not just the
/// replica, so a late report from an earlier claim of the same replica is not taken for
/// this one's.
const CLAIM: &str = r#"
local p = ARGV[1]
for _ = 1, 16 do
  local m = redis.call('ZPOPMIN', ARGV[2])
  if #m == 0 then return false end
  local id = string.sub(m[1], 17)
  local op = p .. 'op:' .. id
  if redis.call('HGET', op, 'stage') == 'queued' then
    local attempt = redis.call('HINCRBY', op, 'attempts', 1)
    redis.call('HSET', op, 'stage', 'executing', 'lease', ARGV[3] .. '/' .. attempt)
    redis.call('ZADD', p .. 'leases', now_ms() + tonumber(ARGV[4]), id)
    redis.call('PUBLISH', p .. 'events', 'stage ' .. id)
    return {id, redis.call('HGET', op, 'job'), attempt}
  end
end
return false
"#;

/// ARGV: prefix, lease ms, then pairs of id and lease. Returns the ids whose lease is
/// no longer the one given.
const RENEW: &str = r#"
local p = ARGV[1]
local lost = {}
local until_ms = now_ms() + tonumber(ARGV[2])
for i = 3, #ARGV - 1, 2 do
  local f = redis.call('HMGET', p .. 'op:' .. ARGV[i], 'stage', 'lease')
  if f[1] == 'executing' and f[2] == ARGV[i + 1] then
    redis.call('ZADD', p .. 'leases', 'XX', until_ms, ARGV[i])
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"#;

/// ARGV: prefix, id, lease ('' for any), outcome, keep seconds. 1 if it ended it.
const COMPLETE: &str = r#"
local f = redis.call('HMGET', ARGV[1] .. 'op:' .. ARGV[2], 'stage', 'lease')
if not f[1] or f[1] == 'completed' then return 0 end
if ARGV[3] ~= '' and f[2] ~= ARGV[3] then return 0 end
finish(ARGV[1], ARGV[2], ARGV[4], ARGV[5])
return 1
"#;

/// ARGV: prefix, id, lease, max attempts, failed outcome, keep seconds, uncount ('1':
/// the claim never ran, so it is not counted as an attempt).
const RELEASE: &str = r#"
local op = ARGV[1] .. 'op:' .. ARGV[2]
if redis.call('HGET', op, 'lease') ~= ARGV[3] then return 0 end
if ARGV[7] == '1' then redis.call('HINCRBY', op, 'attempts', -1) end
return release(ARGV[1], ARGV[2], ARGV[4], ARGV[5], ARGV[6])
"#;

/// ARGV: prefix, max attempts, failed outcome, keep seconds, batch. Requeues operations
/// whose lease ran out, and forgets empty queues. Returns how many it requeued or failed.
const REAP: &str = r#"
local p = ARGV[1]
local due = redis.call('ZRANGEBYSCORE', p .. 'leases', '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[5]))
for _, id in ipairs(due) do release(p, id, ARGV[2], ARGV[3], ARGV[4]) end
local queues = redis.call('HKEYS', p .. 'queues')
for _, q in ipairs(queues) do
  if redis.call('EXISTS', p .. 'queue:' .. q) == 0 then redis.call('HDEL', p .. 'queues', q) end
end
-- Unfinished operations whose record is gone (a Redis that evicted it) no longer count.
for _, id in ipairs(redis.call('SRANDMEMBER', p .. 'live', 64)) do
  if redis.call('EXISTS', p .. 'op:' .. id) == 0 then redis.call('SREM', p .. 'live', id) end
end
return #due
"#;

/// ARGV: prefix, queue key, outcome, keep seconds, batch. Fails the queued operations at
/// the head of a queue nobody can serve; returns how many.
const STRAND: &str = r#"
local p = ARGV[1]
local n = 0
for _, m in ipairs(redis.call('ZRANGE', ARGV[2], 0, tonumber(ARGV[5]) - 1)) do
  local id = string.sub(m, 17)
  if redis.call('HGET', p .. 'op:' .. id, 'stage') == 'queued' then
    finish(p, id, ARGV[3], ARGV[4])
    n = n + 1
  else
    redis.call('ZREM', ARGV[2], m)
  end
end
return n
"#;

struct Scripts {
    submit: redis::Script,
    strand: redis::Script,
    claim: redis::Script,
    renew: redis::Script,
    complete: redis::Script,
    release: redis::Script,
    reap: redis::Script,
}

impl Scripts {
    fn new() -> Scripts {
        let with_helpers = |body: &str| redis::Script::new(&format!("{FINISH}\n{body}"));
        Scripts {
            submit: redis::Script::new(SUBMIT),
            claim: with_helpers(CLAIM),
            renew: with_helpers(RENEW),
            complete: with_helpers(COMPLETE),
            release: with_helpers(RELEASE),
            reap: with_helpers(REAP),
            strand: with_helpers(STRAND),
        }
    }
}

pub struct Cluster {
    redis: RedisConnection,
    config: ClusterConfig,
    /// This process, as leases name it.
    replica: String,
    local: Arc<ExecScheduler>,
    scripts: Scripts,
    watchers: Mutex<HashMap<OperationId, watch::Sender<Stage<ExecuteResponse>>>>,
    /// Every replica's workers, as last read.
    registered: Mutex<Vec<Registration>>,
    /// When `registered` was last read whole: actions are failed as stranded only on a
    /// fresh read (a stale one may lack a worker that registered since).
    registered_at: Mutex<Option<std::time::Instant>>,
    /// Every (platform, instances) registered lately, and when last: for the worker grace, a
    /// worker of another replica that just went (its replica restarting) still counts.
    seen: Mutex<HashMap<String, (Registration, std::time::Instant)>>,
    /// Claimed operations that ended here and whose report is not through yet: their
    /// leases are still renewed.
    pending: Mutex<HashMap<OperationId, u32>>,
    /// Something was queued somewhere: claim.
    work: Notify,
    /// Queues (by id) that no worker could serve at the last looks, and since when.
    unservable: Mutex<HashMap<String, std::time::Instant>>,
    /// Since when the sweep has been skipped for want of fresh registrations: that gap
    /// does not count towards `unservable`'s timers.
    stale_since: Mutex<Option<std::time::Instant>>,
}

/// A Redis failure as clients see it: its kind only (the message names the Redis, which
/// goes to the log).
fn failure(e: StoreError) -> Failure {
    if e.is_internal_detail() {
        tracing::warn!(error = %e, "the cluster's Redis failed");
    }
    Failure::new(e.grpc_code(), e.public_message())
}

/// Operation names are UUIDs; anything else is not one of ours (and never reaches a key).
fn valid_name(name: &str) -> bool {
    name.len() == 36 && name.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

fn encode_outcome(result: &Result<ExecuteResponse, Failure>) -> Vec<u8> {
    match result {
        Ok(resp) => StoredOutcome {
            response: Some(resp.clone()),
            code: 0,
            message: String::new(),
        },
        Err(f) => StoredOutcome {
            response: None,
            code: f.code as i32,
            message: f.message.clone(),
        },
    }
    .encode_to_vec()
}

fn decode_outcome(raw: &[u8]) -> Result<ExecuteResponse, Failure> {
    match StoredOutcome::decode(raw) {
        Ok(StoredOutcome {
            response: Some(r), ..
        }) => Ok(r),
        Ok(o) => Err(Failure::new(tonic::Code::from(o.code), o.message)),
        Err(e) => Err(Failure::new(
            tonic::Code::Internal,
            format!("the cluster's record of the outcome is undecodable: {e}"),
        )),
    }
}

impl Cluster {
    pub fn new(redis: RedisConnection, config: ClusterConfig, local: Arc<ExecScheduler>) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let replica = format!(
            "{}-{}-{}",
            host.trim(),
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let config = ClusterConfig {
            known_platforms: config
                .known_platforms
                .into_iter()
                .map(platform::normalize)
                .collect(),
            ..config
        };
        Cluster {
            redis,
            config,
            replica,
            local,
            scripts: Scripts::new(),
            watchers: Mutex::new(HashMap::new()),
            registered: Mutex::new(Vec::new()),
            registered_at: Mutex::new(None),
            seen: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            work: Notify::new(),
            unservable: Mutex::new(HashMap::new()),
            stale_since: Mutex::new(None),
        }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.config.prefix)
    }

    fn watchers(
        &self,
    ) -> MutexGuard<'_, HashMap<OperationId, watch::Sender<Stage<ExecuteResponse>>>> {
        self.watchers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn keep_seconds(&self) -> u64 {
        self.config.keep_finished.as_secs().max(1)
    }

    fn lost_outcome(&self) -> Vec<u8> {
        encode_outcome(&Err(Failure::new(
            tonic::Code::Unavailable,
            format!(
                "the action's worker (or its replica) was lost {} times; giving up",
                self.config.max_attempts
            ),
        )))
    }

    /// How long a queue no worker can serve waits before its actions fail: the worker grace,
    /// and never less than STRANDED_AT_LEAST.
    fn stranded_after(&self) -> Duration {
        self.local.worker_grace().max(STRANDED_AT_LEAST)
    }

    /// Whether a worker connected to any replica, or a configured platform, can run it, or
    /// (with `grace`) a local worker that could may be about to come back.
    fn matchable(&self, instance: &str, platform: &Properties, grace: bool) -> bool {
        if !grace {
            return self.local.can_run_now(instance, platform)
                || self
                    .registered
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .any(|r| r.can_run(instance, platform));
        }
        let within = self.local.worker_grace();
        self.matchable(instance, platform, false)
            || self.local.could_run(instance, platform)
            || self
                .seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .any(|(r, at)| at.elapsed() < within && r.can_run(instance, platform))
    }

    /// Queues an action for whichever replica's worker is free, or joins the identical
    /// one in flight on any replica.
    pub async fn submit(
        &self,
        job: Arc<Job>,
        platform: Properties,
        priority: i32,
    ) -> Result<Submitted<ExecuteResponse>, Failure> {
        let platform = platform::normalize(platform);
        let key = &job.key;
        if !self.matchable(&key.instance, &platform, true) {
            return Err(Failure::new(
                tonic::Code::FailedPrecondition,
                format!(
                    "no worker on any replica can run it: {}",
                    self.local.explain(&key.instance, &platform)
                ),
            ));
        }
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
        let stored = StoredJob {
            instance: key.instance.clone(),
            action_digest: Some(key.action.to_proto()),
            action: job.action.clone(),
            command: job.command.clone(),
            timeout_ms: job.timeout.as_millis() as u64,
            do_not_cache: job.do_not_cache,
            first_output: job.first_output.clone(),
            platform: Some(Platform {
                properties: platform
                    .iter()
                    .map(|(name, value)| Property {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect(),
            }),
            meta,
        };
        let queue_meta = serde_json::to_string(&QueueMeta {
            instance: key.instance.clone(),
            platform: platform.clone(),
        })
        .map_err(|e| Failure::new(tonic::Code::Internal, e.to_string()))?;
        let qid = Digest::of(queue_meta.as_bytes()).hex()[..32].to_string();
        let action = format!("{}/{}", key.action.hex(), key.action.size);
        let id = uuid::Uuid::new_v4().to_string();
        let mut inv = self.scripts.submit.prepare_invoke();
        inv.arg(&self.config.prefix)
            .arg(&id)
            .arg(stored.encode_to_vec())
            .arg(&key.instance)
            .arg(&action)
            .arg(priority)
            .arg(self.key(&format!("queue:{qid}")))
            .arg(&qid)
            .arg(&queue_meta)
            .arg(self.config.max_queued)
            .arg(MAX_QUEUES)
            .arg(self.key(&format!("inflight:{action}:{}", key.instance)));
        let (operation, status): (String, i64) = self
            .redis
            .run_script("queueing an action", &inv)
            .await
            .map_err(failure)?;
        match status {
            2 => {
                return Err(Failure::new(
                    tonic::Code::ResourceExhausted,
                    format!(
                        "the cluster's execution queue is full ({} actions, execution.max_queued_actions); retry later",
                        self.config.max_queued
                    ),
                ))
            }
            3 => {
                return Err(Failure::new(
                    tonic::Code::ResourceExhausted,
                    format!("the cluster has {MAX_QUEUES} distinct (instance, platform) queues already"),
                ))
            }
            _ => {}
        }
        let stage = self.watch(&operation).await?.ok_or_else(|| {
            Failure::new(
                tonic::Code::Unavailable,
                format!("operation {operation} vanished from the cluster's state"),
            )
        })?;
        Ok(Submitted {
            operation,
            stage,
            deduplicated: status == 0,
        })
    }

    /// An operation's action and stage, from any replica.
    pub async fn snapshot(
        &self,
        name: &str,
    ) -> Result<Option<(ActionKey, Stage<ExecuteResponse>)>, Failure> {
        if !valid_name(name) {
            return Ok(None);
        }
        let mut cmd = redis::cmd("HMGET");
        self.snapshot_args(&mut cmd, name);
        let f: Vec<Option<Vec<u8>>> = self
            .redis
            .run("reading an operation", &cmd)
            .await
            .map_err(failure)?;
        Self::parse_snapshot(name, &f)
    }

    /// The HMGET of an operation's fields that `parse_snapshot` reads.
    fn snapshot_args(&self, cmd: &mut redis::Cmd, name: &str) {
        cmd.arg(self.key(&format!("op:{name}")))
            .arg(&["instance", "action", "stage", "attempts", "result"]);
    }

    fn parse_snapshot(
        name: &str,
        f: &[Option<Vec<u8>>],
    ) -> Result<Option<(ActionKey, Stage<ExecuteResponse>)>, Failure> {
        let text = |i: usize| {
            f.get(i)
                .and_then(|v| v.as_deref())
                .map(|b| String::from_utf8_lossy(b).into_owned())
        };
        let (Some(instance), Some(action), Some(stage)) = (text(0), text(1), text(2)) else {
            return Ok(None);
        };
        let Some(action) = action
            .split_once('/')
            .and_then(|(h, s)| Digest::parse(h, s).ok())
        else {
            return Err(Failure::new(
                tonic::Code::Internal,
                format!("the cluster's record of operation {name} names no valid action"),
            ));
        };
        let stage = match stage.as_str() {
            "queued" => Stage::Queued,
            "executing" => Stage::Executing {
                worker: String::new(),
                attempt: text(3).and_then(|a| a.parse().ok()).unwrap_or(1),
            },
            _ => Stage::Completed(decode_outcome(
                f.get(4).and_then(|v| v.as_deref()).unwrap_or_default(),
            )),
        };
        Ok(Some((ActionKey { instance, action }, stage)))
    }

    /// Stage changes of an operation, fed by the cluster's messages.
    pub async fn watch(
        &self,
        name: &str,
    ) -> Result<Option<watch::Receiver<Stage<ExecuteResponse>>>, Failure> {
        if let Some(tx) = self.watchers().get(name) {
            return Ok(Some(tx.subscribe()));
        }
        let Some((_, stage)) = self.snapshot(name).await? else {
            return Ok(None);
        };
        let mut w = self.watchers();
        let tx = w
            .entry(name.to_string())
            .or_insert_with(|| watch::channel(stage).0);
        Ok(Some(tx.subscribe()))
    }

    /// Cancels an operation wherever it runs (its replica sees it end and tells its
    /// worker). False if it is unknown or done.
    pub async fn cancel(&self, name: &str) -> Result<bool, Failure> {
        if !valid_name(name) {
            return Ok(false);
        }
        let outcome = encode_outcome(&Err(Failure::new(
            tonic::Code::Cancelled,
            "cancelled by CancelOperation",
        )));
        let mut inv = self.scripts.complete.prepare_invoke();
        inv.arg(&self.config.prefix)
            .arg(name)
            .arg("")
            .arg(outcome)
            .arg(self.keep_seconds());
        let done: i64 = self
            .redis
            .run_script("cancelling an operation", &inv)
            .await
            .map_err(failure)?;
        Ok(done == 1)
    }

    /// Reads every replica's worker registrations once, so a replica that just started
    /// does not refuse, for want of a worker it has not heard of, an action another
    /// replica's worker can run.
    pub async fn prime(&self) -> Result<(), Failure> {
        self.register().await
    }

    /// The scheduler's unfinished state has no TTL and must not be evicted: a Redis that
    /// evicts any key at `maxmemory` (`allkeys-*`) could drop a queue or a lease and lose
    /// actions. Refused at start; `noeviction` or `volatile-*` (which evict only keys with
    /// a TTL: finished operations, action results with `expire_seconds`) are fine. A Redis
    /// that does not let us ask (CONFIG denied, as on some managed services) is warned of.
    pub async fn check_eviction(&self) -> Result<(), Failure> {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        match self
            .redis
            .run::<Vec<String>>("asking for maxmemory-policy", &cmd)
            .await
        {
            Ok(v) => match v.get(1) {
                Some(policy) if policy.starts_with("allkeys") => Err(Failure::new(
                    tonic::Code::FailedPrecondition,
                    format!(
                        "{}: maxmemory-policy is {policy}, which may evict the scheduler's queue and leases; use noeviction or volatile-lru (or a Redis of its own)",
                        self.redis.name()
                    ),
                )),
                _ => Ok(()),
            },
            Err(e @ StoreError::Unavailable(_)) => {
                // At start, for the operator: the address is what they need.
                Err(Failure::new(tonic::Code::Unavailable, e.to_string()))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read Redis's maxmemory-policy; it must not be allkeys-*");
                Ok(())
            }
        }
    }

    /// Starts the replica's part: claiming for its idle workers, reporting how claimed
    /// operations end, renewing leases, reaping dead replicas' ones, registering workers
    /// and feeding watchers. Runs until `stop` turns true.
    pub fn start(
        self: &Arc<Self>,
        leases: mpsc::UnboundedReceiver<LeaseEvent<ExecuteResponse>>,
        stop: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        vec![
            tokio::spawn(self.clone().report(leases, stop.clone())),
            tokio::spawn(self.clone().pull(stop.clone())),
            tokio::spawn(self.clone().keep_leases(stop.clone())),
            tokio::spawn(self.clone().keep_registered(stop.clone())),
            tokio::spawn(self.clone().maintain(stop.clone())),
            tokio::spawn(self.clone().listen(stop)),
        ]
    }

    /// Sends how each claimed operation ended to Redis; retried while Redis is away (a
    /// lost report only costs a rerun: the lease runs out and the action is queued again).
    /// Until a report is through, its lease is still renewed (`pending`), so a backlog of
    /// reports does not make other replicas rerun what already finished here.
    async fn report(
        self: Arc<Self>,
        mut leases: mpsc::UnboundedReceiver<LeaseEvent<ExecuteResponse>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backlog = std::collections::VecDeque::new();
        loop {
            if backlog.is_empty() {
                let event = tokio::select! {
                    e = leases.recv() => e,
                    // What is reported already still goes (workers' streams ending at
                    // shutdown give their actions back); then stop: the scheduler outlives
                    // this task.
                    _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        leases.try_recv().ok()
                    }
                };
                let Some(event) = event else { return };
                backlog.push_back(event);
            }
            while let Ok(e) = leases.try_recv() {
                backlog.push_back(e);
            }
            {
                let mut pending = self.pending();
                for e in &backlog {
                    let (LeaseEvent::Finished(id, a, _) | LeaseEvent::Released(id, a)) = e;
                    pending.insert(id.clone(), *a);
                }
            }
            let Some(event) = backlog.pop_front() else {
                continue;
            };
            let stopping = *stop.borrow();
            let (what, id, inv) = match &event {
                LeaseEvent::Finished(id, attempt, result) => {
                    let mut inv = self.scripts.complete.prepare_invoke();
                    inv.arg(&self.config.prefix)
                        .arg(id)
                        .arg(self.lease_name(*attempt))
                        .arg(encode_outcome(result))
                        .arg(self.keep_seconds());
                    ("reporting an outcome", id, inv)
                }
                LeaseEvent::Released(id, attempt) => (
                    "giving an action back",
                    id,
                    self.release_invocation(id, *attempt, false),
                ),
            };
            let mut delay = Duration::from_millis(100);
            let give_up = tokio::time::Instant::now() + self.config.lease;
            loop {
                match self.redis.run_script::<i64>(what, &inv).await {
                    Ok(_) => break,
                    // Only an outage is worth waiting out; a refusal would be refused again.
                    Err(e @ StoreError::Unavailable(_))
                        if tokio::time::Instant::now() < give_up && !stopping =>
                    {
                        tracing::warn!(operation = %id, error = %e, "{what}; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                    Err(e) => {
                        tracing::error!(operation = %id, error = %e, "{what}: giving up; its lease will run out and it will run again");
                        break;
                    }
                }
            }
            self.pending().remove(id);
        }
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<OperationId, u32>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What this replica's claim on attempt `attempt` is called in the lease.
    fn lease_name(&self, attempt: u32) -> String {
        format!("{}/{attempt}", self.replica)
    }

    fn release_invocation(
        &self,
        id: &str,
        attempt: u32,
        uncount: bool,
    ) -> redis::ScriptInvocation<'_> {
        let mut inv = self.scripts.release.prepare_invoke();
        inv.arg(&self.config.prefix)
            .arg(id)
            .arg(self.lease_name(attempt))
            .arg(self.config.max_attempts)
            .arg(self.lost_outcome())
            .arg(self.keep_seconds())
            .arg(if uncount { "1" } else { "0" });
        inv
    }

    /// Claims queued operations while a local worker has a free slot.
    async fn pull(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut turn = 0usize;
        loop {
            tokio::select! {
                _ = self.local.freed().notified() => {}
                _ = self.work.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            turn = turn.wrapping_add(1);
            if let Err(e) = self.claim_while_idle(turn).await {
                tracing::warn!(error = %e.message, "claiming queued actions");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    async fn claim_while_idle(&self, turn: usize) -> Result<(), Failure> {
        loop {
            let idle = self.local.idle_workers();
            if idle.is_empty() {
                return Ok(());
            }
            let mut cmd = redis::cmd("HGETALL");
            cmd.arg(self.key("queues"));
            let mut queues: Vec<(String, String)> = self
                .redis
                .run("listing queues", &cmd)
                .await
                .map_err(failure)?;
            queues.sort();
            // Each round starts at another queue, so none starves the others.
            let n = queues.len().max(1);
            queues.rotate_left(turn % n);
            let mut claimed = false;
            for (qid, meta) in &queues {
                let Ok(meta) = serde_json::from_str::<QueueMeta>(meta) else {
                    continue;
                };
                let fits = idle.iter().any(|(props, instances, _)| {
                    Registration {
                        properties: props.clone(),
                        instances: instances.clone(),
                        capacity: 1,
                    }
                    .can_run(&meta.instance, &meta.platform)
                });
                if !fits {
                    continue;
                }
                if self.claim(qid, meta.platform).await? {
                    claimed = true;
                    break;
                }
            }
            if !claimed {
                return Ok(());
            }
        }
    }

    /// Claims the head of one queue and runs it here. False if the queue was empty.
    async fn claim(&self, qid: &str, platform: Properties) -> Result<bool, Failure> {
        let mut inv = self.scripts.claim.prepare_invoke();
        inv.arg(&self.config.prefix)
            .arg(self.key(&format!("queue:{qid}")))
            .arg(&self.replica)
            .arg(self.config.lease.as_millis() as u64);
        let got: Option<(String, Vec<u8>, u32)> = self
            .redis
            .run_script("claiming an action", &inv)
            .await
            .map_err(failure)?;
        let Some((id, raw, attempt)) = got else {
            return Ok(false);
        };
        let job = match decode_job(&raw) {
            Ok(job) => job,
            Err(why) => {
                tracing::error!(operation = %id, %why, "undecodable job in the cluster's queue");
                let _ = self
                    .report_now(&id, attempt, &Err(Failure::new(tonic::Code::Internal, why)))
                    .await;
                return Ok(true);
            }
        };
        let key = job.key.clone();
        let timeout = Some(job.timeout);
        match self
            .local
            .run_claimed(id.clone(), key, platform, Arc::new(job), timeout, attempt)
        {
            Claim::Started | Claim::AlreadyHere => Ok(true),
            Claim::NoWorker => {
                // The worker went between looking and claiming: back to the queue, not
                // counted as an attempt (it never ran), and no more claims this round.
                let inv = self.release_invocation(&id, attempt, true);
                let _: i64 = self
                    .redis
                    .run_script("giving an action back", &inv)
                    .await
                    .map_err(failure)?;
                Ok(false)
            }
        }
    }

    async fn report_now(
        &self,
        id: &str,
        attempt: u32,
        result: &Result<ExecuteResponse, Failure>,
    ) -> Result<(), Failure> {
        let mut inv = self.scripts.complete.prepare_invoke();
        inv.arg(&self.config.prefix)
            .arg(id)
            .arg(self.lease_name(attempt))
            .arg(encode_outcome(result))
            .arg(self.keep_seconds());
        let _: i64 = self
            .redis
            .run_script("reporting an outcome", &inv)
            .await
            .map_err(failure)?;
        Ok(())
    }

    /// Every TICK: renew this replica's leases, and cancel here what it no longer holds.
    /// A task of its own, so nothing slow (many watchers) can delay it past the lease.
    async fn keep_leases(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if let Err(e) = self.renew().await {
                tracing::warn!(error = %e.message, "renewing leases");
            }
        }
    }

    /// Rewrites this replica's worker registrations (they expire after
    /// REGISTRATION_TTL_SECONDS) and reads everyone's, every TICK, on a task of its own: a
    /// slow reaper or watcher refresh must never let them lapse, or the other replicas
    /// would take this replica's workers for gone.
    async fn keep_registered(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if let Err(e) = self.register().await {
                tracing::warn!(error = %e.message, "registering workers");
            }
        }
    }

    /// Every TICK: reap expired leases and fail what no worker can run any more; every
    /// POLL, re-read watched operations.
    async fn maintain(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(TICK);
        let mut last_poll = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            // Only with registrations read just now: stale ones could strand anything.
            let fresh = self
                .registered_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| t.elapsed() <= 2 * TICK);
            let stranded = match fresh {
                true => {
                    // A gap without fresh registrations (Redis slow or away) is not time a
                    // queue was seen unservable: its timers move on by the gap, rather than
                    // restart (a Redis failing now and then would then keep them from ever
                    // running out).
                    let gap = self
                        .stale_since
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take()
                        .map(|t| t.elapsed());
                    if let Some(gap) = gap {
                        for since in self
                            .unservable
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .values_mut()
                        {
                            *since = since.checked_add(gap).unwrap_or(*since);
                        }
                    }
                    self.fail_stranded().await
                }
                false => {
                    self.stale_since
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert_with(std::time::Instant::now);
                    Ok(())
                }
            };
            for (what, r) in [
                ("reaping expired leases", self.reap().await),
                ("failing actions no worker can run", stranded),
            ] {
                if let Err(e) = r {
                    tracing::warn!(error = %e.message, "{what}");
                }
            }
            if last_poll.elapsed() >= POLL {
                last_poll = tokio::time::Instant::now();
                self.refresh_watchers().await;
            }
        }
    }

    async fn renew(&self) -> Result<(), Failure> {
        let mut held = self.local.claimed_operations();
        held.extend(self.pending().iter().map(|(id, a)| (id.clone(), *a)));
        if held.is_empty() {
            return Ok(());
        }
        let mut inv = self.scripts.renew.prepare_invoke();
        inv.arg(&self.config.prefix)
            .arg(self.config.lease.as_millis() as u64);
        for (id, attempt) in &held {
            inv.arg(id).arg(self.lease_name(*attempt));
        }
        let lost: Vec<String> = self
            .redis
            .run_script("renewing leases", &inv)
            .await
            .map_err(failure)?;
        for id in lost {
            if self.pending().contains_key(&id) {
                continue; // finished here; its report is on the way
            }
            // Cancelled, or reaped while this replica could not reach Redis: another
            // worker may have it now. Stop running it here.
            tracing::warn!(operation = %id, "this replica no longer holds the action's lease; cancelling it here");
            self.local.cancel(&id);
        }
        Ok(())
    }

    async fn register(&self) -> Result<(), Failure> {
        let mine: Vec<(String, String)> = self
            .local
            .overview()
            .workers
            .into_iter()
            .filter_map(|w| {
                let r = Registration {
                    properties: w.properties,
                    instances: w.instances,
                    capacity: w.capacity,
                };
                Some((w.id, serde_json::to_string(&r).ok()?))
            })
            .collect();
        let hash = self.key(&format!("workers:{}", self.replica));
        let replicas = self.key("replicas");
        let mut p = redis::pipe();
        p.atomic().cmd("DEL").arg(&hash).ignore();
        if !mine.is_empty() {
            p.cmd("HSET").arg(&hash).arg(&mine).ignore();
            p.cmd("EXPIRE")
                .arg(&hash)
                .arg(REGISTRATION_TTL_SECONDS)
                .ignore();
        }
        p.cmd("SADD").arg(&replicas).arg(&self.replica).ignore();
        p.cmd("SMEMBERS").arg(&replicas);
        let (members,): (Vec<String>,) = self
            .redis
            .run_pipe("registering workers", &p)
            .await
            .map_err(failure)?;
        // Every replica's registrations in one round trip.
        let members: Vec<&String> = members.iter().take(MAX_QUEUES).collect();
        let mut p = redis::pipe();
        for replica in &members {
            p.cmd("HVALS").arg(self.key(&format!("workers:{replica}")));
        }
        let each: Vec<Vec<String>> = match members.is_empty() {
            true => Vec::new(),
            false => self
                .redis
                .run_pipe("reading worker registrations", &p)
                .await
                .map_err(failure)?,
        };
        let mut all: Vec<Registration> = Vec::new();
        let mut gone = Vec::new();
        for (replica, vals) in members.iter().zip(&each) {
            if vals.is_empty() && *replica != &self.replica {
                gone.push((*replica).clone());
            }
            all.extend(vals.iter().filter_map(|v| serde_json::from_str(v).ok()));
        }
        if !gone.is_empty() {
            let mut cmd = redis::cmd("SREM");
            cmd.arg(&replicas).arg(&gone);
            let _: i64 = self
                .redis
                .run("forgetting replicas", &cmd)
                .await
                .map_err(failure)?;
        }
        let now = std::time::Instant::now();
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            let grace = self.stranded_after();
            seen.retain(|_, (_, at)| now.duration_since(*at) < grace);
            for r in &all {
                let Ok(id) = serde_json::to_string(&(&r.properties, &r.instances)) else {
                    continue;
                };
                // Bounded like the queues: a flood of distinct platforms is not remembered.
                if seen.len() < MAX_QUEUES || seen.contains_key(&id) {
                    seen.insert(id, (r.clone(), now));
                }
            }
        }
        *self.registered.lock().unwrap_or_else(|p| p.into_inner()) = all;
        *self.registered_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
        Ok(())
    }

    /// Fails the queued actions of every queue that no worker on any replica (nor a
    /// configured platform) has been able to serve for the worker grace: they would wait
    /// forever, and a client is better told why.
    async fn fail_stranded(&self) -> Result<(), Failure> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.key("queues"));
        let queues: HashMap<String, String> = self
            .redis
            .run("reading the queues", &cmd)
            .await
            .map_err(failure)?;
        let now = std::time::Instant::now();
        let mut due = Vec::new();
        {
            let mut since = self.unservable.lock().unwrap_or_else(|p| p.into_inner());
            since.retain(|qid, _| queues.contains_key(qid));
            for (qid, meta) in queues.iter().take(MAX_QUEUES) {
                let Ok(m) = serde_json::from_str::<QueueMeta>(meta) else {
                    continue;
                };
                if self.matchable(&m.instance, &m.platform, false) {
                    since.remove(qid);
                    continue;
                }
                let first = *since.entry(qid.clone()).or_insert(now);
                if now.duration_since(first) >= self.stranded_after() {
                    due.push((qid.clone(), m));
                }
            }
        }
        for (qid, m) in due {
            let why = Failure::new(
                tonic::Code::FailedPrecondition,
                format!(
                    "no worker on any replica can run it any more: {}",
                    self.local.explain(&m.instance, &m.platform)
                ),
            );
            let mut inv = self.scripts.strand.prepare_invoke();
            inv.arg(&self.config.prefix)
                .arg(self.key(&format!("queue:{qid}")))
                .arg(encode_outcome(&Err(why)))
                .arg(self.keep_seconds())
                .arg(STRAND_BATCH);
            let n: i64 = self
                .redis
                .run_script("failing actions no worker can run", &inv)
                .await
                .map_err(failure)?;
            if n > 0 {
                tracing::warn!(
                    actions = n,
                    instance = %m.instance,
                    platform = ?m.platform,
                    "failed queued actions that no worker on any replica can run any more"
                );
            }
        }
        Ok(())
    }

    async fn reap(&self) -> Result<(), Failure> {
        let mut inv = self.scripts.reap.prepare_invoke();
        inv.arg(&self.config.prefix)
            .arg(self.config.max_attempts)
            .arg(self.lost_outcome())
            .arg(self.keep_seconds())
            .arg(REAP_BATCH);
        let n: i64 = self
            .redis
            .run_script("reaping expired leases", &inv)
            .await
            .map_err(failure)?;
        if n > 0 {
            tracing::warn!(
                actions = n,
                "requeued actions whose replica stopped renewing their lease"
            );
        }
        Ok(())
    }

    /// Re-reads every watched operation (a stage message may have been lost), REFRESH_BATCH
    /// to a round trip, and forgets the ones nobody watches any more.
    async fn refresh_watchers(&self) {
        let names: Vec<String> = {
            let mut w = self.watchers();
            w.retain(|_, tx| tx.receiver_count() > 0);
            w.keys().cloned().collect()
        };
        for chunk in names.chunks(REFRESH_BATCH) {
            let mut p = redis::pipe();
            for name in chunk {
                let mut cmd = redis::cmd("HMGET");
                self.snapshot_args(&mut cmd, name);
                p.add_command(cmd);
            }
            let each: Vec<Vec<Option<Vec<u8>>>> =
                match self.redis.run_pipe("reading watched operations", &p).await {
                    Ok(each) => each,
                    Err(e) => {
                        tracing::debug!(error = %e, "reading watched operations");
                        return;
                    }
                };
            for (name, fields) in chunk.iter().zip(&each) {
                self.apply(name, Self::parse_snapshot(name, fields));
            }
        }
    }

    /// Reads an operation and tells its watchers, if it changed.
    async fn update(&self, name: &str) {
        if !self.watchers().contains_key(name) {
            return;
        }
        let read = self.snapshot(name).await;
        self.apply(name, read);
    }

    /// Tells an operation's watchers what was just read of it.
    fn apply(
        &self,
        name: &str,
        read: Result<Option<(ActionKey, Stage<ExecuteResponse>)>, Failure>,
    ) {
        match read {
            Ok(Some((_, stage))) => {
                let done = matches!(stage, Stage::Completed(_));
                let mut w = self.watchers();
                if let Some(tx) = w.get(name) {
                    tx.send_if_modified(|s| {
                        let changed = *s != stage;
                        *s = stage;
                        changed
                    });
                }
                if done {
                    w.remove(name);
                }
            }
            // Expired: its watchers see the channel close (UNAVAILABLE), as locally.
            Ok(None) => {
                self.watchers().remove(name);
            }
            Err(e) => {
                tracing::debug!(operation = name, error = %e.message, "reading a watched operation")
            }
        }
    }

    /// The cluster's messages: wake the puller on new work; on a stage change, tell
    /// watchers, and cancel here an operation that ended elsewhere (CancelOperation).
    async fn listen(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        use futures::StreamExt;
        let channel = self.key("events");
        loop {
            let connected = async {
                let mut pubsub = self.redis.client().get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let pubsub = tokio::select! {
                r = tokio::time::timeout(self.redis.timeout(), connected) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            let mut stream = match pubsub {
                Ok(Ok(p)) => p.into_on_message(),
                Ok(Err(e)) => {
                    tracing::warn!(server = self.redis.name(), error = %e, "subscribing to the cluster's events");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(_) => {
                    tracing::warn!(
                        server = self.redis.name(),
                        "subscribing to the cluster's events: no answer"
                    );
                    continue;
                }
            };
            // Whatever happened while unsubscribed.
            self.work.notify_one();
            self.refresh_watchers().await;
            loop {
                let msg = tokio::select! {
                    m = stream.next() => m,
                    _ = stop.wait_for(|s| *s) => return,
                };
                let Some(msg) = msg else {
                    tracing::warn!(
                        server = self.redis.name(),
                        "the cluster's event subscription ended; resubscribing"
                    );
                    break;
                };
                let payload = msg.get_payload_bytes();
                if payload == b"work" {
                    self.work.notify_one();
                } else if let Some(id) = payload.strip_prefix(b"stage ") {
                    let id = String::from_utf8_lossy(id).into_owned();
                    self.update(&id).await;
                    self.cancel_if_ended_elsewhere(&id).await;
                }
            }
        }
    }

    async fn cancel_if_ended_elsewhere(&self, id: &str) {
        if self.local.snapshot(id).is_none() {
            return;
        }
        if let Ok(Some((_, Stage::Completed(_)))) = self.snapshot(id).await {
            tracing::info!(
                operation = id,
                "the action ended elsewhere (cancelled); cancelling it here"
            );
            self.local.cancel(id);
        }
    }
}

fn decode_job(raw: &[u8]) -> Result<Job, String> {
    let j = StoredJob::decode(raw).map_err(|e| e.to_string())?;
    let action = Digest::from_opt_proto(&j.action_digest)
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
