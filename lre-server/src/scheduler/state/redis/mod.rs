//! Operations in Redis, shared by every lre-server replica that names the same Redis
//! (`execution.redis`): any replica accepts Execute, a worker attached to any replica runs
//! it, WaitExecution and GetOperation answer anywhere, identical actions run once across
//! replicas, and a replica's restart (or `kill -9`) loses no queued action: an executing
//! one's lease runs out and the scheduler of another replica takes it back.
//!
//! Each change is one script (`scripts`); what is stored is `records`; watchers are fed by
//! the channel `P events` and, in case a message was lost, re-read every `POLL`
//! (`events`).

mod events;
pub mod records;
pub mod scripts;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bazel_remote_apis::build::bazel::remote::execution::v2::ExecuteResponse;
use lre_store::store::RedisConnection;
use lre_store::StoreError;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::{Bounds, OperationState, MAX_QUEUES};
use crate::error::{Error, Result};
use crate::scheduler::model::{
    ActionKey, Claimed, Claims, Lease, NewOperation, OperationId, Outcome, Queue, QueueHead,
    RegisteredWorker, Snapshot, Stage, Submission,
};
use records::{action_name, decode_job, encode_outcome, from_wall_ms, wall_ms};
use scripts::Scripts;

/// A replica's worker registrations outlive it by this much.
const REGISTRATION_TTL_SECONDS: u64 = 10;
/// Replicas whose registrations are read in one round trip, at most.
const MAX_REPLICAS: usize = 1024;

pub struct RedisState {
    redis: RedisConnection,
    /// Prefix of every key and of the channel.
    prefix: String,
    /// How long a claim on an executing operation lasts without renewal.
    lease: Duration,
    bounds: Bounds,
    scripts: Scripts,
    events: events::Events,
}

/// A queue member's place, (priority, arrival), from its member (16 hex digits of arrival,
/// then the id) and score.
fn head_rank(member: &str, score: &str) -> Option<(i32, u64)> {
    let seq = u64::from_str_radix(member.get(..16)?, 16).ok()?;
    Some((score.parse::<f64>().ok()? as i32, seq))
}

/// Operation names are UUIDs; anything else is not one of ours (and never reaches a key).
fn valid_name(name: &str) -> bool {
    name.len() == 36 && name.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

impl RedisState {
    /// Connects to the shared state under `prefix`, refusing a Redis that may evict it.
    pub async fn open(
        redis: RedisConnection,
        prefix: String,
        lease: Duration,
        bounds: Bounds,
    ) -> Result<RedisState> {
        let s = RedisState {
            redis,
            prefix,
            lease,
            bounds,
            scripts: Scripts::new(),
            events: events::Events::new(),
        };
        s.check_eviction().await?;
        Ok(s)
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn keep_seconds(&self) -> u64 {
        self.bounds.keep_finished.as_secs().max(1)
    }

    /// The scheduler's unfinished state has no TTL and must not be evicted: a Redis that
    /// evicts any key at `maxmemory` (`allkeys-*`) could drop a queue or a lease and lose
    /// actions. Refused at start; `noeviction` or `volatile-*` are fine. A Redis that does
    /// not let us ask (CONFIG denied, as on some managed services) is warned of.
    async fn check_eviction(&self) -> Result<()> {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        match self
            .redis
            .run::<Vec<String>>("asking for maxmemory-policy", &cmd)
            .await
        {
            Ok(v) => match v.get(1) {
                Some(policy) if policy.starts_with("allkeys") => Err(Error::FailedPrecondition(format!(
                    "{}: maxmemory-policy is {policy}, which may evict the scheduler's queue and leases; use noeviction or volatile-lru (or a Redis of its own)",
                    self.redis.name()
                ))),
                _ => Ok(()),
            },
            // At start, for the operator: the address is what they need.
            Err(e @ StoreError::Unavailable(_)) => Err(Error::Unavailable(e.to_string())),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read Redis's maxmemory-policy; it must not be allkeys-*");
                Ok(())
            }
        }
    }

    async fn read_snapshot(&self, id: &str) -> Result<Option<Snapshot>> {
        if !valid_name(id) {
            return Ok(None);
        }
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.key(&format!("op:{id}")))
            .arg(&records::SNAPSHOT_FIELDS[..]);
        let f: Vec<Option<Vec<u8>>> = self.redis.run("reading an operation", &cmd).await?;
        records::parse_snapshot(id, &f).map_err(Error::Internal)
    }
}

#[async_trait]
impl OperationState for RedisState {
    async fn submit(&self, new: NewOperation) -> Result<Submission> {
        let key = &new.job.key;
        let queue_meta = serde_json::to_string(&new.queue)
            .map_err(|e| Error::Internal(format!("encoding a queue: {e}")))?;
        let qid = new.queue.id();
        let action = action_name(&key.action);
        let mut inv = self.scripts.submit.prepare_invoke();
        inv.arg(&self.prefix)
            .arg(&new.id)
            .arg(records::encode_job(&new.job))
            .arg(&key.instance)
            .arg(&action)
            .arg(new.priority)
            .arg(self.key(&format!("queue:{qid}")))
            .arg(&qid)
            .arg(&queue_meta)
            .arg(self.bounds.max_queued)
            .arg(MAX_QUEUES)
            .arg(self.key(&format!("inflight:{action}:{}", key.instance)))
            .arg(wall_ms(new.queued_at));
        // Watched before it exists, so no message about it comes too early, and `watch`
        // needs no read; dropped if it was not queued after all.
        let _watching = self.events.watch(&new.id, Stage::Queued);
        let submitted: Result<(String, i64)> = self
            .redis
            .run_script("queueing an action", &inv)
            .await
            .map_err(Error::from);
        if !matches!(submitted, Ok((_, 1))) {
            self.events.unwatch(&new.id);
        }
        let (id, status) = submitted?;
        match status {
            2 => Err(Error::ResourceExhausted(format!(
                "the cluster's execution queue is full ({} actions, execution.max_queued_actions); retry later",
                self.bounds.max_queued
            ))),
            3 => Err(Error::ResourceExhausted(format!(
                "the cluster has {MAX_QUEUES} distinct (instance, platform) queues already; retry later"
            ))),
            s => Ok(Submission { id, joined: s == 0 }),
        }
    }

    async fn record_answered(
        &self,
        id: &OperationId,
        key: &ActionKey,
        response: ExecuteResponse,
    ) -> Result<()> {
        if !valid_name(id) {
            return Err(Error::Internal(format!("{id:?} is not an operation name")));
        }
        let mut inv = self.scripts.answered.prepare_invoke();
        inv.arg(&self.prefix)
            .arg(id)
            .arg(&key.instance)
            .arg(action_name(&key.action))
            .arg(encode_outcome(&Ok(response)))
            .arg(self.keep_seconds())
            .arg(wall_ms(std::time::SystemTime::now()))
            .arg(self.bounds.max_operations);
        let _: i64 = self
            .redis
            .run_script("recording an answered operation", &inv)
            .await?;
        Ok(())
    }

    async fn claim(
        &self,
        queue: &Queue,
        holder: &str,
        max: usize,
        before: Option<(i32, u64)>,
    ) -> Result<Claims> {
        let mut inv = self.scripts.claim.prepare_invoke();
        inv.arg(&self.prefix)
            .arg(self.key(&format!("queue:{}", queue.id())))
            .arg(holder)
            .arg(self.lease.as_millis() as u64)
            .arg(max);
        match before {
            Some((priority, seq)) => inv.arg(priority).arg(format!("{seq:016x}")),
            None => inv.arg("").arg(""),
        };
        type Got = (Vec<(String, Vec<u8>, u32, String)>, String, String);
        let (got, next_member, next_priority): Got =
            self.redis.run_script("claiming actions", &inv).await?;
        let mut claimed = Vec::with_capacity(got.len());
        for (id, raw, attempt, queued_at) in got {
            let lease = Lease {
                holder: holder.to_string(),
                attempt,
            };
            match decode_job(&raw) {
                Ok(job) => claimed.push(Claimed {
                    id,
                    job: Arc::new(job),
                    queue: queue.clone(),
                    lease,
                    queued_at: from_wall_ms(queued_at.parse().unwrap_or(0)),
                }),
                Err(why) => {
                    tracing::error!(operation = %id, %why, "undecodable job in the cluster's queue");
                    let outcome = crate::scheduler::model::failed(
                        tonic::Code::Internal,
                        format!("the cluster's record of the job is undecodable: {why}"),
                    );
                    // The rest of the batch is claimed already: it goes on. Failing to
                    // record this one leaves its lease to run out, and a reap retries it.
                    if let Err(e) = self.finish(&id, Some(&lease), outcome).await {
                        tracing::warn!(operation = %id, error = %e, "failing an undecodable job");
                    }
                }
            }
        }
        Ok(Claims {
            claimed,
            next: head_rank(&next_member, &next_priority),
        })
    }

    async fn finish(
        &self,
        id: &OperationId,
        lease: Option<&Lease>,
        outcome: Outcome,
    ) -> Result<bool> {
        if !valid_name(id) {
            return Ok(false);
        }
        let mut inv = self.scripts.finish.prepare_invoke();
        inv.arg(&self.prefix)
            .arg(id)
            .arg(lease.map(Lease::name).unwrap_or_default())
            .arg(encode_outcome(&outcome))
            .arg(self.keep_seconds())
            .arg(self.bounds.max_operations);
        let done: i64 = self
            .redis
            .run_script("completing an operation", &inv)
            .await?;
        Ok(done == 1)
    }

    async fn requeue(&self, id: &OperationId, lease: &Lease, counted: bool) -> Result<bool> {
        let mut inv = self.scripts.requeue.prepare_invoke();
        inv.arg(&self.prefix)
            .arg(id)
            .arg(lease.name())
            .arg(if counted { "1" } else { "0" });
        let done: i64 = self.redis.run_script("giving an action back", &inv).await?;
        Ok(done == 1)
    }

    async fn renew(&self, held: &[(OperationId, Lease)]) -> Result<Vec<OperationId>> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.scripts.renew.prepare_invoke();
        inv.arg(&self.prefix).arg(self.lease.as_millis() as u64);
        for (id, lease) in held {
            inv.arg(id).arg(lease.name());
        }
        Ok(self.redis.run_script("renewing leases", &inv).await?)
    }

    async fn expired(&self, max: usize) -> Result<Vec<(OperationId, Lease)>> {
        let mut inv = self.scripts.expired.prepare_invoke();
        inv.arg(&self.prefix).arg(max);
        let flat: Vec<String> = self
            .redis
            .run_script("reading expired leases", &inv)
            .await?;
        Ok(flat
            .chunks(2)
            .filter_map(|c| Some((c[0].clone(), Lease::parse(c.get(1)?)?)))
            .collect())
    }

    async fn fail_queued(&self, queue: &Queue, outcome: Outcome, max: usize) -> Result<usize> {
        let mut inv = self.scripts.fail_queued.prepare_invoke();
        inv.arg(&self.prefix)
            .arg(self.key(&format!("queue:{}", queue.id())))
            .arg(encode_outcome(&outcome))
            .arg(self.keep_seconds())
            .arg(max)
            .arg(self.bounds.max_operations);
        let n: i64 = self
            .redis
            .run_script("failing actions no worker can run", &inv)
            .await?;
        Ok(n as usize)
    }

    async fn snapshot(&self, id: &OperationId) -> Result<Option<Snapshot>> {
        self.read_snapshot(id).await
    }

    async fn watch(&self, id: &OperationId) -> Result<Option<watch::Receiver<Stage>>> {
        if let Some(rx) = self.events.subscribe(id) {
            return Ok(Some(rx));
        }
        let Some(s) = self.read_snapshot(id).await? else {
            return Ok(None);
        };
        Ok(Some(self.events.watch(id, s.stage)))
    }

    async fn queues(&self) -> Result<Vec<QueueHead>> {
        let mut inv = self.scripts.queues.prepare_invoke();
        inv.arg(&self.prefix);
        let flat: Vec<String> = self.redis.run_script("listing queues", &inv).await?;
        Ok(flat
            .chunks(6)
            .filter_map(|c| {
                let queue: Queue = serde_json::from_str(c.get(1)?).ok()?;
                Some(QueueHead {
                    queue,
                    queued: c.get(2)?.parse().ok()?,
                    head: head_rank(c.get(4)?, c.get(3)?)?,
                    oldest: Some(from_wall_ms(c.get(5)?.parse().ok()?)),
                })
            })
            .collect())
    }

    async fn executing(&self) -> Result<usize> {
        let mut cmd = redis::cmd("ZCARD");
        cmd.arg(self.key("leases"));
        Ok(self.redis.run("counting executing actions", &cmd).await?)
    }

    async fn publish_workers(
        &self,
        replica: &str,
        workers: Vec<RegisteredWorker>,
    ) -> Result<Vec<RegisteredWorker>> {
        let mine: Vec<(String, String)> = workers
            .iter()
            .filter_map(|w| Some((w.id.clone(), serde_json::to_string(w).ok()?)))
            .collect();
        let hash = self.key(&format!("workers:{replica}"));
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
        p.cmd("SADD").arg(&replicas).arg(replica).ignore();
        p.cmd("SMEMBERS").arg(&replicas);
        let (members,): (Vec<String>,) = self.redis.run_pipe("registering workers", &p).await?;
        let members: Vec<&String> = members.iter().take(MAX_REPLICAS).collect();
        let mut p = redis::pipe();
        for r in &members {
            p.cmd("HVALS").arg(self.key(&format!("workers:{r}")));
        }
        let each: Vec<Vec<String>> = match members.is_empty() {
            true => Vec::new(),
            false => {
                self.redis
                    .run_pipe("reading worker registrations", &p)
                    .await?
            }
        };
        let mut all = Vec::new();
        let mut gone = Vec::new();
        for (r, vals) in members.iter().zip(&each) {
            if vals.is_empty() && r.as_str() != replica {
                gone.push((*r).clone());
            }
            all.extend(vals.iter().filter_map(|v| serde_json::from_str(v).ok()));
        }
        if !gone.is_empty() {
            let mut cmd = redis::cmd("SREM");
            cmd.arg(&replicas).arg(&gone);
            let _: i64 = self.redis.run("forgetting replicas", &cmd).await?;
        }
        Ok(all)
    }

    fn work(&self) -> Arc<Notify> {
        self.events.work()
    }

    fn ended_elsewhere(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<OperationId>> {
        self.events.take_ended()
    }

    fn shared(&self) -> bool {
        true
    }

    fn start(self: Arc<Self>, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        vec![
            tokio::spawn(events::listen(self.clone(), stop.clone())),
            tokio::spawn(events::read_completed(self.clone(), stop.clone())),
            tokio::spawn(events::poll(self, stop)),
        ]
    }
}
