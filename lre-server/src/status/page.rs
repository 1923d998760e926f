//! The status page and its JSON API on the HTTP port:
//!
//! | path | what |
//! |---|---|
//! | `/` | the page: store, last hour, workers, queue, recent actions, invocations |
//! | `/explain?instance=&base=&new=` | why `new`'s actions missed, against `base` |
//! | `/api/status` | the page's data as JSON |
//! | `/api/explain?instance=&base=&new=` | the explanation as JSON |
//! | `/api/actions/{id}/stderr` | a recent action's stderr |
//!
//! The page is rendered on the server (tera, auto-escaped): no script, nothing to build,
//! and a browser without JavaScript sees the same. The API takes the cache's tokens; the
//! `read` scope suffices, and each caller sees only the instances its token may read.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio_util::io::ReaderStream;

use crate::activity::{ActivitySnapshot, InvocationSummary};
use crate::auth::http_credential as credential;
use crate::auth::{Access, Principal};
use crate::context::ServerContext;
use crate::error::error_response;
use crate::error::{Error, Result};
use crate::scheduler::Overview;
use crate::scheduler::Scheduler;
use crate::status::explain::Explanation;

#[derive(Clone)]
pub struct StatusState {
    pub cache: Arc<ServerContext>,
    pub scheduler: Option<Arc<Scheduler>>,
    /// Explanations read many blobs: at most this many run at once, the rest wait.
    pub explain_slots: Arc<tokio::sync::Semaphore>,
}

/// Explanations running at once.
pub const EXPLAIN_SLOTS: usize = 2;

pub fn routes(state: StatusState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/explain", get(explain_page))
        .route("/api/status", get(api_status))
        .route("/api/explain", get(api_explain))
        .route("/api/actions/{id}/stderr", get(stderr))
        .with_state(state)
}

/// Everything `/api/status` returns.
#[derive(Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub store: StoreView,
    /// Last hour, over the instances the caller may see.
    pub hits: u64,
    pub misses: u64,
    pub executed: u64,
    pub hit_rate_percent: Option<f64>,
    pub execution: Option<Overview>,
    #[serde(flatten)]
    pub activity: ActivitySnapshot,
}

#[derive(Debug, Serialize)]
pub struct StoreView {
    pub size_bytes: u64,
    pub entries: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub evictions: u64,
}

/// Authenticates the caller for the status page: any scope that may read somewhere.
fn caller(cache: &ServerContext, headers: &HeaderMap) -> Result<Principal> {
    let p = cache.auth.authenticate(credential(headers)?)?;
    cache.auth.authorize_status(&p)?;
    Ok(p)
}

async fn status(state: &StatusState, p: &Principal) -> Status {
    let cache = &state.cache;
    let visible = |instance: &str| p.may(instance, Access::Read);
    let activity = cache.activity.snapshot(visible);
    let (mut hits, mut misses, mut executed) = (0, 0, 0);
    for m in &activity.minutes {
        for c in m.instances.values() {
            hits += c.hits;
            misses += c.misses;
            executed += c.executed;
        }
    }
    let m = &cache.metrics;
    let mut execution = match &state.scheduler {
        Some(s) => Some(s.overview().await),
        None => None,
    };
    if let Some(o) = &mut execution {
        // A worker limited to other instances is not this caller's business.
        o.workers.retain(|w| {
            w.instances
                .as_ref()
                .is_none_or(|list| list.iter().any(|i| visible(i)))
        });
    }
    Status {
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: cache
            .activity
            .started()
            .elapsed()
            .unwrap_or_default()
            .as_secs(),
        store: StoreView {
            size_bytes: m.store.size_bytes.get().max(0) as u64,
            entries: m.store.entries.get().max(0) as u64,
            bytes_in: m.bytes_received.get(),
            bytes_out: m.bytes_sent.get(),
            evictions: m.store.evictions.get(),
        },
        hits,
        misses,
        executed,
        hit_rate_percent: (hits + misses > 0)
            .then(|| (hits as f64 * 1000.0 / (hits + misses) as f64).round() / 10.0),
        execution,
        activity,
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct ExplainQuery {
    pub instance: Option<String>,
    pub base: Option<String>,
    pub new: Option<String>,
}

/// Picks the invocations to compare (listed newest first): the ones named, or else the
/// newest invocation with misses that has an earlier invocation of the same instance,
/// against the latest such earlier one.
pub fn choose(
    invocations: &[InvocationSummary],
    q: &ExplainQuery,
) -> Result<(String, String, String)> {
    let of_instance = |i: &&InvocationSummary| q.instance.as_ref().is_none_or(|n| n == &i.instance);
    let earlier = |new: &InvocationSummary| {
        invocations
            .iter()
            .find(|i| i.instance == new.instance && i.sequence < new.sequence)
    };
    let missed = |i: &InvocationSummary| i.misses + i.executed + i.failed > 0;
    let (new, base) = match (&q.new, &q.base) {
        (Some(n), b) => {
            let new = invocations
                .iter()
                .filter(of_instance)
                .find(|i| &i.id == n)
                .ok_or_else(|| Error::NotFound(format!("no invocation {n:?} in the history")))?;
            let base = match b {
                Some(b) => invocations
                    .iter()
                    .find(|i| &i.id == b && i.instance == new.instance),
                None => earlier(new),
            };
            (new, base)
        }
        (None, b) => {
            let new = invocations
                .iter()
                .filter(of_instance)
                .filter(|i| missed(i))
                .find(|i| earlier(i).is_some() || b.is_some())
                .ok_or_else(|| {
                    Error::NotFound(
                        "no invocation with cache misses and an earlier invocation to compare it with in the history".into(),
                    )
                })?;
            let base = match b {
                Some(b) => invocations
                    .iter()
                    .find(|i| &i.id == b && i.instance == new.instance),
                None => earlier(new),
            };
            (new, base)
        }
    };
    let base = base.ok_or_else(|| {
        Error::NotFound(match &q.base {
            Some(b) => format!("no invocation {b:?} of instance {:?} in the history", new.instance),
            None => format!(
                "invocation {} is the oldest of instance {:?} in the history: nothing to compare it with",
                new.id, new.instance
            ),
        })
    })?;
    Ok((new.instance.clone(), base.id.clone(), new.id.clone()))
}

async fn authorized_explanation(
    state: &StatusState,
    headers: &HeaderMap,
    q: &ExplainQuery,
) -> Result<Explanation> {
    let p = caller(&state.cache, headers)?;
    explanation(state, &p, q).await
}

async fn explanation(state: &StatusState, p: &Principal, q: &ExplainQuery) -> Result<Explanation> {
    let cache = &state.cache;
    let visible = |instance: &str| p.may(instance, Access::Read);
    let invocations = cache.activity.snapshot(visible).invocations;
    let (instance, base, new) = choose(&invocations, q)?;
    let _slot = state
        .explain_slots
        .acquire()
        .await
        .map_err(|_| Error::Internal("explanation slots closed".into()))?;
    let gone = || Error::NotFound("the invocation left the history meanwhile".into());
    let base = cache
        .activity
        .invocation(&instance, &base)
        .ok_or_else(gone)?;
    let new = cache
        .activity
        .invocation(&instance, &new)
        .ok_or_else(gone)?;
    Ok(crate::status::explain::explain(cache, &instance, base, new).await)
}

pub(crate) fn json(value: &impl Serialize) -> Response {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => error_response(Error::Internal(format!("encoding JSON: {e}"))),
    }
}

fn html(template: &str, context: &impl Serialize) -> Response {
    let rendered =
        tera::Context::from_serialize(context).and_then(|c| TEMPLATES.render(template, &c));
    match rendered {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                // The page shows other people's command lines: never cache it on the way.
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response(),
        Err(e) => error_response(Error::Internal(format!("rendering {template}: {e:?}"))),
    }
}

static TEMPLATES: std::sync::LazyLock<tera::Tera> = std::sync::LazyLock::new(|| {
    let mut t = tera::Tera::default();
    // Compiled into the binary: a missing or broken template is a test failure, not a
    // runtime surprise (the page test renders both).
    t.add_raw_templates([
        ("status.html", include_str!("templates/status.html")),
        ("explain.html", include_str!("templates/explain.html")),
    ])
    .expect("the status templates parse");
    t.autoescape_on(vec![".html"]);
    t.set_escape_fn(escape_html);
    t
});

/// Tera's default escaper also rewrites `/`, which is safe but turns every store path and
/// link into `&#x2F;` soup for anyone reading the HTML. These five suffice for text and
/// quoted attributes, which is all the templates use.
fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The page's rows, with every number already formatted: the template only lays out.
#[derive(Serialize)]
struct Page {
    version: &'static str,
    uptime: String,
    store: Vec<(&'static str, String)>,
    hit_rate: String,
    bars: Vec<Bar>,
    chart_height: u64,
    instances: Vec<(String, crate::activity::Counts)>,
    execution: bool,
    /// Replicas sharing the scheduler (1 when alone).
    replicas: usize,
    workers: Vec<WorkerRow>,
    queue: Vec<(&'static str, String)>,
    recent: Vec<RecentRow>,
    invocations: Vec<InvocationRow>,
}

#[derive(Serialize)]
struct Bar {
    x: u64,
    hits: u64,
    misses: u64,
    hit_height: u64,
    miss_height: u64,
}

#[derive(Serialize)]
struct WorkerRow {
    id: String,
    /// The replica it is connected to (with a shared scheduler; else this server).
    replica: String,
    properties: String,
    capacity: usize,
    running: usize,
    heard: String,
}

#[derive(Serialize)]
struct RecentRow {
    id: u64,
    ago: String,
    outcome: crate::activity::Outcome,
    what: String,
    instance: String,
    duration: String,
    worker: String,
    /// For a hit: who wrote the entry that answered it, and how long ago.
    written_by: String,
    exit_code: String,
    message: String,
    stderr_href: Option<String>,
}

#[derive(Serialize)]
struct InvocationRow {
    id: String,
    instance: String,
    tool: String,
    seen: String,
    hits: u64,
    misses: u64,
    executed: u64,
    failed: u64,
    explain_href: Option<String>,
}

const CHART_HEIGHT: u64 = 60;
const BAR_WIDTH: u64 = 8;

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn duration_text(s: u64) -> String {
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h", s / 3600),
    }
}

fn ago(ms: u64, now_ms: u64) -> String {
    format!("{} ago", duration_text(now_ms.saturating_sub(ms) / 1000))
}

fn page(s: &Status) -> Page {
    let now = crate::activity::unix_ms(std::time::SystemTime::now());
    let totals: Vec<(u64, u64)> = s
        .activity
        .minutes
        .iter()
        .map(|m| {
            m.instances
                .values()
                .fold((0, 0), |(h, x), c| (h + c.hits, x + c.misses))
        })
        .collect();
    let peak = totals.iter().map(|(h, x)| h + x).max().unwrap_or(0).max(1);
    let bars = totals
        .into_iter()
        .enumerate()
        .map(|(i, (hits, misses))| Bar {
            x: i as u64 * BAR_WIDTH,
            hits,
            misses,
            hit_height: hits * CHART_HEIGHT / peak,
            miss_height: misses * CHART_HEIGHT / peak,
        })
        .collect();
    let mut instances: std::collections::BTreeMap<String, crate::activity::Counts> =
        Default::default();
    for m in &s.activity.minutes {
        for (name, c) in &m.instances {
            let t = instances.entry(name.clone()).or_default();
            t.hits += c.hits;
            t.misses += c.misses;
            t.executed += c.executed;
        }
    }
    let evictions: u64 = s.activity.minutes.iter().map(|m| m.evictions).sum();
    let (workers, queue) = match &s.execution {
        Some(o) => (
            o.workers
                .iter()
                .map(|w| WorkerRow {
                    id: w.id.clone(),
                    properties: w
                        .properties
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                    capacity: w.capacity,
                    running: w.running,
                    replica: w.replica.clone(),
                    heard: w
                        .since_heard_ms
                        .map(|ms| format!("{:.1} s ago", ms as f64 / 1000.0))
                        .unwrap_or_else(|| "(another replica's)".into()),
                })
                .collect(),
            vec![
                ("queued", o.queued.to_string()),
                ("executing", o.executing.to_string()),
                (
                    "oldest waiting",
                    o.oldest_queued_ms
                        .map(|ms| format!("{:.1} s", ms as f64 / 1000.0))
                        .unwrap_or_else(|| "-".into()),
                ),
                ("no worker can run", o.unmatchable.to_string()),
            ],
        ),
        None => (vec![], vec![]),
    };
    let recent = s
        .activity
        .recent
        .iter()
        .map(|r| RecentRow {
            id: r.id,
            ago: ago(r.at_ms, now),
            outcome: r.outcome,
            what: match (r.mnemonic.is_empty(), r.first_output.is_empty()) {
                (false, _) => format!("{} {}", r.mnemonic, r.target),
                (true, false) => r.first_output.clone(),
                (true, true) => r.action.clone(),
            },
            instance: r.instance.clone(),
            duration: r
                .duration_ms
                .map(|ms| format!("{:.2} s", ms as f64 / 1000.0))
                .unwrap_or_default(),
            worker: r.worker.clone().unwrap_or_default(),
            written_by: r
                .written_by
                .as_ref()
                .map(|w| format!("{}, {}", w.who, ago(w.written_at_ms, now)))
                .unwrap_or_default(),
            exit_code: r.exit_code.map(|c| c.to_string()).unwrap_or_default(),
            message: r.message.clone(),
            stderr_href: r
                .has_stderr
                .then(|| format!("/api/actions/{}/stderr", r.id)),
        })
        .collect();
    let invocations = s
        .activity
        .invocations
        .iter()
        .map(|i| InvocationRow {
            id: i.id.clone(),
            instance: i.instance.clone(),
            tool: i.tool.clone(),
            seen: ago(i.last_seen_ms, now),
            hits: i.hits,
            misses: i.misses,
            executed: i.executed,
            failed: i.failed,
            explain_href: (i.misses + i.executed + i.failed > 0)
                .then(|| {
                    serde_urlencoded::to_string([("instance", &i.instance), ("new", &i.id)])
                        .ok()
                        .map(|q| format!("/explain?{q}"))
                })
                .flatten(),
        })
        .collect();
    Page {
        version: s.version,
        uptime: duration_text(s.uptime_seconds),
        store: vec![
            ("size", human_bytes(s.store.size_bytes)),
            ("entries", s.store.entries.to_string()),
            ("received", human_bytes(s.store.bytes_in)),
            ("sent", human_bytes(s.store.bytes_out)),
            ("evictions (last hour)", evictions.to_string()),
            ("evictions (since start)", s.store.evictions.to_string()),
        ],
        hit_rate: s
            .hit_rate_percent
            .map(|p| format!("{p:.1}%"))
            .unwrap_or_else(|| "-".into()),
        bars,
        chart_height: CHART_HEIGHT,
        instances: instances.into_iter().collect(),
        execution: s.execution.is_some(),
        replicas: s.execution.as_ref().map_or(1, |o| o.replicas),
        workers,
        queue,
        recent,
        invocations,
    }
}

async fn index(State(state): State<StatusState>, headers: HeaderMap) -> Response {
    match caller(&state.cache, &headers) {
        Ok(p) => html("status.html", &page(&status(&state, &p).await)),
        Err(e) => error_response(e),
    }
}

async fn api_status(State(state): State<StatusState>, headers: HeaderMap) -> Response {
    match caller(&state.cache, &headers) {
        Ok(p) => json(&status(&state, &p).await),
        Err(e) => error_response(e),
    }
}

async fn api_explain(
    State(state): State<StatusState>,
    headers: HeaderMap,
    Query(q): Query<ExplainQuery>,
) -> Response {
    match authorized_explanation(&state, &headers, &q).await {
        Ok(e) => json(&e),
        Err(e) => error_response(e),
    }
}

async fn explain_page(
    State(state): State<StatusState>,
    headers: HeaderMap,
    Query(q): Query<ExplainQuery>,
) -> Response {
    match authorized_explanation(&state, &headers, &q).await {
        Ok(e) => html("explain.html", &e),
        Err(e) => error_response(e),
    }
}

async fn stderr(
    State(state): State<StatusState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let r = async {
        let p = caller(&state.cache, &headers)?;
        let id: u64 = id
            .parse()
            .map_err(|_| Error::NotFound(format!("no recent action {id:?}")))?;
        // Unknown and invisible look the same: ids must not reveal other instances' work.
        let a = state
            .cache
            .activity
            .recent_action(id)
            .filter(|a| p.may(&a.instance, Access::Read))
            .ok_or_else(|| Error::NotFound(format!("no recent action {id}")))?;
        let d = a
            .stderr
            .ok_or_else(|| Error::NotFound(format!("action {id} has no stderr")))?;
        let reader = state.cache.open_blob(&d, 0, None).await?.ok_or_else(|| {
            Error::NotFound(format!("the stderr of action {id} ({d}) was evicted"))
        })?;
        Ok::<_, Error>((d.size, reader))
    };
    match r.await {
        Ok((len, reader)) => {
            state.cache.metrics.bytes_sent.inc_by(len);
            let mut resp =
                (StatusCode::OK, Body::from_stream(ReaderStream::new(reader))).into_response();
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            h.insert(header::CONTENT_LENGTH, len.into());
            h.insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-store"),
            );
            resp
        }
        Err(e) => error_response(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(instance: &str, id: &str, first: u64, misses: u64) -> InvocationSummary {
        InvocationSummary {
            instance: instance.into(),
            id: id.into(),
            caller: String::new(),
            correlated: String::new(),
            tool: String::new(),
            first_seen_ms: first,
            last_seen_ms: first,
            sequence: first,
            hits: 0,
            misses,
            executed: 0,
            failed: 0,
            dropped: 0,
        }
    }

    #[test]
    fn the_newest_invocation_with_misses_is_compared_with_the_one_before_it() {
        // Newest first, as the snapshot lists them. "x1" missed but is its instance's
        // only invocation, so it cannot be explained; "c" missed nothing.
        let list = [
            inv("", "c", 30, 0),
            inv("x", "x1", 25, 4),
            inv("", "b", 20, 3),
            inv("", "a", 10, 0),
        ];
        let pick = |q: ExplainQuery| choose(&list, &q).map_err(|e| e.to_string());
        assert_eq!(
            pick(ExplainQuery::default()),
            Ok(("".into(), "a".into(), "b".into()))
        );
        let named = |i: Option<&str>, b: Option<&str>, n: Option<&str>| ExplainQuery {
            instance: i.map(Into::into),
            base: b.map(Into::into),
            new: n.map(Into::into),
        };
        assert_eq!(
            pick(named(None, Some("a"), Some("c"))),
            Ok(("".into(), "a".into(), "c".into()))
        );
        assert_eq!(
            pick(named(None, None, Some("c"))),
            Ok(("".into(), "b".into(), "c".into()))
        );
        let e = pick(named(Some("x"), None, None)).unwrap_err();
        assert!(e.contains("no invocation with cache misses"), "{e}");
        let e = pick(named(None, None, Some("a"))).unwrap_err();
        assert!(e.contains("is the oldest"), "{e}");
        let e = pick(named(None, Some("x1"), Some("b"))).unwrap_err();
        assert!(e.contains("no invocation \"x1\" of instance \"\""), "{e}");
        let e = pick(named(None, None, Some("zz"))).unwrap_err();
        assert!(e.contains("no invocation \"zz\""), "{e}");
    }
}
