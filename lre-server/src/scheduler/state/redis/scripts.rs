//! The Lua scripts of the Redis state: each change of an operation is one script, atomic
//! however many keys it touches (standalone Redis, or a primary with replicas; not Redis
//! Cluster). They carry out, they do not decide: a script checks its guard (the lease, the
//! stage) and applies its change; how many attempts an action gets, and when it fails, is
//! the scheduler's. Times come from Redis's clock (`TIME`), so replicas need not agree.
//!
//! Keys, under the configured prefix `P`:
//! - `P op:ID`: a hash per operation: `job` (`StoredJob`), `instance`, `action`,
//!   `priority`, `queue` (its queue's key), `member` (its place in it), `qid`, `qmeta`,
//!   `stage` (queued | executing | completed), `attempts`, `lease` ("HOLDER/ATTEMPT"),
//!   `result` (`StoredOutcome`), `queued_at` (ms). A completed one expires.
//! - `P inflight:ACTION:INSTANCE` → the operation running that action, for deduplication.
//! - `P queue:QID`: a sorted set per (instance, platform): score = priority, member =
//!   sequence (16 hex digits) + id, so equal priorities run first come, first served.
//!   `P queues` maps each QID to its queue (JSON).
//! - `P leases`: executing operations, scored by when their lease runs out.
//! - `P finished`: completed operations, oldest first (`P fseq`), at most `max_operations`.
//! - `P live`: unfinished operations (less `P leases`: those waiting, the `max_queued`
//!   bound).
//! - The channel `P events`: "work" when something was queued, "stage ID STAGE" on a
//!   change (`queued`, `executing ATTEMPT`, or `completed`: its outcome is read).

/// Helpers every script that changes an operation shares.
const HELPERS: &str = r#"
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
  redis.call('PUBLISH', p .. 'events', 'stage ' .. id .. ' completed')
end
-- Completed operations are kept `keep` seconds, and at most `max` of them: past that the
-- oldest go early, so a stream of cache hits cannot fill Redis within `keep`.
local function remember(p, id, max)
  redis.call('ZADD', p .. 'finished', redis.call('INCR', p .. 'fseq'), id)
  local over = redis.call('ZCARD', p .. 'finished') - tonumber(max)
  if over > 0 then
    local old = redis.call('ZPOPMIN', p .. 'finished', over)
    for i = 1, #old, 2 do
      if redis.call('HGET', p .. 'op:' .. old[i], 'stage') == 'completed' then
        redis.call('DEL', p .. 'op:' .. old[i])
      end
    end
  end
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"#;

/// ARGV: prefix, id, job, instance, action, priority, queue key, qid, queue meta,
/// max_queued, max_queues, inflight key, queued_at ms. Returns {id, 1} (queued), {id, 0}
/// (joined the identical operation in flight), {'', 2} (queue full) or {'', 3} (too many
/// queues).
pub const SUBMIT: &str = r#"
local p = ARGV[1]
local existing = redis.call('GET', ARGV[12])
if existing then
  local st = redis.call('HGET', p .. 'op:' .. existing, 'stage')
  if st and st ~= 'completed' then return {existing, 0} end
end
-- Waiting = unfinished minus executing (every executing operation holds a lease).
if redis.call('SCARD', p .. 'live') - redis.call('ZCARD', p .. 'leases') >= tonumber(ARGV[10])
  then return {'', 2} end
if redis.call('HEXISTS', p .. 'queues', ARGV[8]) == 0
   and redis.call('HLEN', p .. 'queues') >= tonumber(ARGV[11]) then return {'', 3} end
local seq = redis.call('INCR', p .. 'seq')
local member = string.format('%016x', seq) .. ARGV[2]
local op = p .. 'op:' .. ARGV[2]
redis.call('HSET', op, 'job', ARGV[3], 'instance', ARGV[4], 'action', ARGV[5],
  'priority', ARGV[6], 'queue', ARGV[7], 'member', member, 'stage', 'queued', 'attempts', 0,
  'qid', ARGV[8], 'qmeta', ARGV[9], 'queued_at', ARGV[13])
redis.call('SET', ARGV[12], ARGV[2])
redis.call('SADD', p .. 'live', ARGV[2])
redis.call('ZADD', ARGV[7], ARGV[6], member)
redis.call('HSET', p .. 'queues', ARGV[8], ARGV[9])
redis.call('PUBLISH', p .. 'events', 'work')
return {ARGV[2], 1}
"#;

/// ARGV: prefix, id, instance, action, outcome, keep seconds, queued_at ms, max kept. An
/// operation answered without running (a cache hit): completed at once.
pub const ANSWERED: &str = r#"
local op = ARGV[1] .. 'op:' .. ARGV[2]
redis.call('HSET', op, 'instance', ARGV[3], 'action', ARGV[4], 'stage', 'completed',
  'result', ARGV[5], 'queued_at', ARGV[7], 'attempts', 0)
redis.call('EXPIRE', op, ARGV[6])
remember(ARGV[1], ARGV[2], ARGV[8])
return 1
"#;

/// ARGV: prefix, queue key, holder, lease ms, max, and the bound (priority, member's first
/// 16 characters; both '' for none). Takes up to max queued operations from the queue's
/// head, stopping at the first ranked at or after the bound. Returns {{id, job, attempt,
/// queued_at}..., the queue's next member, its priority} (the last two '' when it is
/// empty). Members whose operation is no longer queued (cancelled meanwhile) are dropped
/// on the way, at most 16 more than max. A lease names the holder and the attempt
/// ("HOLDER/ATTEMPT").
pub const CLAIM: &str = r#"
local p = ARGV[1]
local max = tonumber(ARGV[5])
local bp = tonumber(ARGV[6])
local bm = ARGV[7]
local until_ms = now_ms() + tonumber(ARGV[4])
local got = {}
local budget = max + 16
while #got < max and budget > 0 do
  budget = budget - 1
  local h = redis.call('ZRANGE', ARGV[2], 0, 0, 'WITHSCORES')
  if #h == 0 then break end
  local score = tonumber(h[2])
  if bp and (score > bp or (score == bp and string.sub(h[1], 1, 16) >= bm)) then break end
  redis.call('ZREM', ARGV[2], h[1])
  local id = string.sub(h[1], 17)
  local op = p .. 'op:' .. id
  if redis.call('HGET', op, 'stage') == 'queued' then
    local attempt = redis.call('HINCRBY', op, 'attempts', 1)
    redis.call('HSET', op, 'stage', 'executing', 'lease', ARGV[3] .. '/' .. attempt)
    redis.call('ZADD', p .. 'leases', until_ms, id)
    redis.call('PUBLISH', p .. 'events', 'stage ' .. id .. ' executing ' .. attempt)
    local f = redis.call('HMGET', op, 'job', 'queued_at')
    table.insert(got, {id, f[1], attempt, f[2] or '0'})
  end
end
local nxt = redis.call('ZRANGE', ARGV[2], 0, 0, 'WITHSCORES')
return {got, nxt[1] or '', nxt[2] or ''}
"#;

/// ARGV: prefix, lease ms, then pairs of id and lease. Returns the ids whose lease is no
/// longer the one given.
pub const RENEW: &str = r#"
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

/// ARGV: prefix, id, lease ('' for whoever holds it), outcome, keep seconds, max kept. 1
/// if this call completed it.
pub const FINISH: &str = r#"
local f = redis.call('HMGET', ARGV[1] .. 'op:' .. ARGV[2], 'stage', 'lease')
if not f[1] or f[1] == 'completed' then return 0 end
if ARGV[3] ~= '' and f[2] ~= ARGV[3] then return 0 end
finish(ARGV[1], ARGV[2], ARGV[4], ARGV[5])
remember(ARGV[1], ARGV[2], ARGV[6])
return 1
"#;

/// ARGV: prefix, id, lease, counted ('0': the claim never ran, so the attempt is given
/// back). Puts the operation back in its queue at its old place. 1 if it did.
pub const REQUEUE: &str = r#"
local p = ARGV[1]
local op = p .. 'op:' .. ARGV[2]
local f = redis.call('HMGET', op, 'stage', 'lease', 'queue', 'member', 'priority', 'qid', 'qmeta')
if f[1] ~= 'executing' or f[2] ~= ARGV[3] then return 0 end
redis.call('ZREM', p .. 'leases', ARGV[2])
if ARGV[4] == '0' then redis.call('HINCRBY', op, 'attempts', -1) end
redis.call('HSET', op, 'stage', 'queued')
redis.call('HDEL', op, 'lease')
redis.call('ZADD', f[3], f[5], f[4])
-- Housekeeping forgets queues that were empty meanwhile: name this one again.
redis.call('HSET', p .. 'queues', f[6], f[7])
redis.call('PUBLISH', p .. 'events', 'stage ' .. ARGV[2] .. ' queued')
redis.call('PUBLISH', p .. 'events', 'work')
return 1
"#;

/// ARGV: prefix, batch. Returns ids and leases (flat) of executing operations whose lease
/// ran out, for the scheduler to requeue or fail; forgets empty queues and unfinished
/// operations whose record is gone (a Redis that evicted it).
pub const EXPIRED: &str = r#"
local p = ARGV[1]
local out = {}
local due = redis.call('ZRANGEBYSCORE', p .. 'leases', '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do
  local f = redis.call('HMGET', p .. 'op:' .. id, 'stage', 'lease')
  if f[1] == 'executing' and f[2] then
    table.insert(out, id)
    table.insert(out, f[2])
  else
    redis.call('ZREM', p .. 'leases', id)
  end
end
for _, q in ipairs(redis.call('HKEYS', p .. 'queues')) do
  if redis.call('EXISTS', p .. 'queue:' .. q) == 0 then redis.call('HDEL', p .. 'queues', q) end
end
for _, id in ipairs(redis.call('SRANDMEMBER', p .. 'live', 64)) do
  if redis.call('EXISTS', p .. 'op:' .. id) == 0 then redis.call('SREM', p .. 'live', id) end
end
return out
"#;

/// ARGV: prefix, queue key, outcome, keep seconds, batch, max kept. Completes the queued
/// operations at the head of a queue with `outcome`; returns how many.
pub const FAIL_QUEUED: &str = r#"
local p = ARGV[1]
local n = 0
for _, m in ipairs(redis.call('ZRANGE', ARGV[2], 0, tonumber(ARGV[5]) - 1)) do
  local id = string.sub(m, 17)
  if redis.call('HGET', p .. 'op:' .. id, 'stage') == 'queued' then
    finish(p, id, ARGV[3], ARGV[4])
    remember(p, id, ARGV[6])
    n = n + 1
  else
    redis.call('ZREM', ARGV[2], m)
  end
end
return n
"#;

/// ARGV: prefix. Every queue that holds operations: {qid, meta, count, priority, member,
/// queued_at of its head} (flat), in one round trip.
pub const QUEUES: &str = r#"
local p = ARGV[1]
local out = {}
local all = redis.call('HGETALL', p .. 'queues')
for i = 1, #all - 1, 2 do
  local key = p .. 'queue:' .. all[i]
  local head = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #head == 2 then
    local at = redis.call('HGET', p .. 'op:' .. string.sub(head[1], 17), 'queued_at') or '0'
    table.insert(out, all[i])
    table.insert(out, all[i + 1])
    table.insert(out, redis.call('ZCARD', key))
    table.insert(out, head[2])
    table.insert(out, head[1])
    table.insert(out, at)
  end
end
return out
"#;

pub struct Scripts {
    pub submit: redis::Script,
    pub answered: redis::Script,
    pub claim: redis::Script,
    pub renew: redis::Script,
    pub finish: redis::Script,
    pub requeue: redis::Script,
    pub expired: redis::Script,
    pub fail_queued: redis::Script,
    pub queues: redis::Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        let with_helpers = |body: &str| redis::Script::new(&format!("{HELPERS}\n{body}"));
        Scripts {
            submit: redis::Script::new(SUBMIT),
            answered: with_helpers(ANSWERED),
            claim: with_helpers(CLAIM),
            renew: with_helpers(RENEW),
            finish: with_helpers(FINISH),
            requeue: redis::Script::new(REQUEUE),
            expired: with_helpers(EXPIRED),
            fail_queued: with_helpers(FAIL_QUEUED),
            queues: redis::Script::new(QUEUES),
        }
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts::new()
    }
}
