//! The kill-anything test of the scheduler's cluster. Three lre-server replicas share one
//! Redis (append-only, so a restart loses nothing) for the CAS, the action cache and the
//! scheduler; each has a worker (real bubblewrap) attached. Several clients send a stream
//! of a few hundred trivial Execute calls to random replicas, resuming a broken stream with
//! WaitExecution by the operation's name on another replica, as a REAPI client does. Meanwhile a
//! seeded random schedule `kill -9`s replicas, drops workers and restarts Redis. Then:
//!
//! - every Execute ended with exactly one result: success (with its own action's output),
//!   or a clear error for an action whose attempts ran out; and every replica answers the
//!   same result for its operation afterwards;
//! - no action ran more often than its attempts (each run reports to a Unix socket of the
//!   test's, bound read-only into the sandbox);
//! - nothing is left queued or executing, with workers connected.
//!
//! The seed is printed first and on failure; `LRE_KILL_SEED=SEED cargo test -p lre-worker
//! --test kill_anything` replays the schedule (the timing of real processes varies).
//!
//! Replicas are this test's own executable, started again with `LRE_KILL_REPLICA` set: it
//! then runs `lre_server::start` (what the `lre-server` binary runs) until it is killed or the
//! test ends (its stdin, the test's pipe, closes). That needs no second build of the
//! server binary from another crate, and a `kill -9` is a real process's death.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::longrunning::{
    operation, operations_client::OperationsClient, GetOperationRequest, Operation,
};
use bazel_remote_apis::google::rpc;
use common::{prepare_with, Exec};
use lre_test_support::redis::{dead_port, Redis};
use lre_worker::cas::digest_of;
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use re::execution_client::ExecutionClient;
use tokio::io::AsyncReadExt;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

const REPLICAS: usize = 3;
const CAPACITY: u32 = 2;
const CLIENTS: usize = 4;
const ACTIONS_PER_CLIENT: usize = 75;
const MAX_ATTEMPTS: u32 = 3;
/// How long the schedule of kills runs.
const CHAOS: Duration = Duration::from_secs(40);
/// How long, after it, every Execute has to end.
const DRAIN: Duration = Duration::from_secs(240);
const WORKER_SECRET: &str = "kill-anything-worker-secret";
/// Set in a replica's environment: "REDIS_URL GRPC_PORT HTTP_PORT".
const ENV_REPLICA: &str = "LRE_KILL_REPLICA";
const ENV_SEED: &str = "LRE_KILL_SEED";

fn replica_config(redis_url: &str, grpc: u16, http: u16) -> lre_server::Config {
    let mut c = lre_server::Config::ephemeral();
    c.grpc_listen = ([127, 0, 0, 1], grpc).into();
    c.http_listen = Some(([127, 0, 0, 1], http).into());
    let mut r = lre_store::config::RedisConfig::new(redis_url);
    r.request_timeout_seconds = 2;
    c.store = lre_server::config::StoreConfig::Redis(r.clone());
    c.execution.enabled = true;
    c.execution.redis = Some(r);
    c.execution.keepalive_seconds = 1;
    c.execution.lease_seconds = 3;
    c.execution.max_attempts = MAX_ATTEMPTS;
    // Operators list the platform their workers offer: actions wait through an outage.
    c.execution.known_platforms = vec![Default::default()];
    c.shutdown_grace_seconds = 1;
    c.auth
        .tokens
        .push(lre_server::auth::TokenConfig::for_secret(
            "workers",
            WORKER_SECRET,
            lre_server::auth::Scope::Worker,
        ));
    c
}

fn main() {
    if let Ok(spec) = std::env::var(ENV_REPLICA) {
        serve_replica(&spec);
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("kill_anything: test");
        return;
    }
    // A libtest-style name filter that does not match this test skips it.
    if args
        .iter()
        .any(|a| !a.starts_with('-') && !"kill_anything".contains(a.as_str()))
    {
        println!("kill_anything: filtered out");
        return;
    }
    // The workers (in this process) log only when asked, as the replicas do.
    if let Ok(filter) = std::env::var("LRE_KILL_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .try_init();
    }
    let seed = std::env::var(ENV_SEED)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    let replay = format!("{ENV_SEED}={seed} cargo test -p lre-worker --test kill_anything");
    println!("kill_anything: seed {seed} (replay: {replay})");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(run(seed))));
    match outcome {
        Ok(Ok(summary)) => println!("kill_anything: ok ({summary}); seed {seed}"),
        Ok(Err(failures)) => {
            eprintln!("kill_anything FAILED with seed {seed} (replay: {replay}):\n{failures}");
            std::process::exit(1);
        }
        Err(_) => {
            eprintln!("kill_anything PANICKED with seed {seed} (replay: {replay})");
            std::process::exit(1);
        }
    }
}

/// A replica process: serves until killed, or until the test's end closes its stdin.
fn serve_replica(spec: &str) {
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let parts: Vec<&str> = spec.split(' ').collect();
    let [url, grpc, http] = parts[..] else {
        eprintln!("{ENV_REPLICA} must be 'REDIS_URL GRPC_PORT HTTP_PORT', not {spec:?}");
        std::process::exit(2);
    };
    let (Ok(grpc), Ok(http)) = (grpc.parse(), http.parse()) else {
        eprintln!("{ENV_REPLICA}: bad ports in {spec:?}");
        std::process::exit(2);
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    rt.block_on(async {
        match lre_server::start(replica_config(url, grpc, http)).await {
            Ok(_server) => std::future::pending::<()>().await,
            Err(e) => {
                // Redis down as it started: the test starts it again.
                eprintln!("replica did not start: {e}");
                std::process::exit(3);
            }
        }
    })
}

/// A replica process of this test.
struct Replica {
    grpc: u16,
    http: u16,
    redis_url: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Replica {
    fn spawn(&mut self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("replica log");
        Command::new(std::env::current_exe().expect("this test's executable"))
            .env(
                ENV_REPLICA,
                format!("{} {} {}", self.redis_url, self.grpc, self.http),
            )
            .env(
                "RUST_LOG",
                std::env::var("LRE_KILL_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting a replica")
    }

    /// Starts it, again until it serves (it exits when Redis is away as it starts).
    async fn start(&mut self) {
        for _ in 0..600 {
            let mut child = self.spawn();
            loop {
                if tokio::net::TcpStream::connect(("127.0.0.1", self.grpc))
                    .await
                    .is_ok()
                {
                    self.child = Some(child);
                    return;
                }
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "replica on port {} never started; see {}",
            self.grpc,
            self.log.display()
        );
    }

    /// SIGKILL.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://127.0.0.1:{}", self.grpc))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill()
    }
}

/// A worker in this process, attached to one replica; dropped abruptly (its connection
/// and its sandboxes with it) and started again under a new id.
struct Worker {
    replica_port: u16,
    name: usize,
    incarnation: u32,
    ro_paths: Vec<PathBuf>,
    task: Option<tokio::task::JoinHandle<()>>,
    dir: Option<tempfile::TempDir>,
}

impl Worker {
    fn start(&mut self) {
        self.incarnation += 1;
        let dir = tempfile::tempdir().expect("worker dir");
        let mut opts = lre_worker::WorkerOptions::local(
            format!("http://127.0.0.1:{}", self.replica_port),
            format!("w{}-{}", self.name, self.incarnation),
            dir.path().to_path_buf(),
            vec![],
            self.ro_paths.clone(),
        );
        opts.connection.capacity = CAPACITY;
        opts.credential = lre_worker::Credential::bearer(WORKER_SECRET).expect("credential");
        self.task = Some(tokio::spawn(async move {
            let (_keep, shutdown) = tokio::sync::watch::channel(false);
            let _ = lre_worker::run(opts, shutdown).await;
        }));
        self.dir = Some(dir);
    }

    async fn drop_abruptly(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        self.dir = None;
    }
}

/// How one Execute ended, as its client saw it.
#[allow(clippy::large_enum_variant)] // 300 of them, once each
#[derive(Debug)]
enum End {
    Done(Result<re::ExecuteResponse, rpc::Status>),
    /// No result by the deadline: the last error seen.
    Stuck(String),
}

struct Ended {
    id: String,
    name: Option<String>,
    end: End,
    /// Names that differed within one stream (defect 4).
    renamed: Vec<String>,
}

fn result_of(op: &Operation) -> Result<re::ExecuteResponse, rpc::Status> {
    match &op.result {
        Some(operation::Result::Response(any)) => {
            let r = re::ExecuteResponse::decode(&any.value[..]).map_err(|e| rpc::Status {
                code: Code::Internal as i32,
                message: format!("undecodable ExecuteResponse: {e}"),
                details: vec![],
            })?;
            match &r.status {
                Some(s) if s.code != 0 => Err(s.clone()),
                _ => Ok(r),
            }
        }
        Some(operation::Result::Error(s)) => Err(s.clone()),
        None => Err(rpc::Status {
            code: Code::Internal as i32,
            message: "done without a result".into(),
            details: vec![],
        }),
    }
}

/// One Execute to its end: on a random replica; a broken stream is resumed with
/// WaitExecution (by the name its first message carried) on another; retried until
/// `deadline`.
async fn execute_to_the_end(
    channels: &[Channel],
    action: &re::Digest,
    rng: &mut StdRng,
    deadline: Instant,
) -> (Option<String>, End, Vec<String>) {
    let mut name: Option<String> = None;
    let mut renamed = Vec::new();
    let mut last_error = String::from("never answered");
    while Instant::now() < deadline {
        let ch = channels[rng.random_range(0..channels.len())].clone();
        let call = match &name {
            None => {
                ExecutionClient::new(ch)
                    .execute(re::ExecuteRequest {
                        action_digest: Some(action.clone()),
                        ..Default::default()
                    })
                    .await
            }
            Some(n) => {
                ExecutionClient::new(ch)
                    .wait_execution(re::WaitExecutionRequest { name: n.clone() })
                    .await
            }
        };
        match call {
            Ok(s) => {
                let mut stream = s.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(op)) => {
                            match &name {
                                None => name = Some(op.name.clone()),
                                Some(n) if *n != op.name => renamed.push(op.name.clone()),
                                Some(_) => {}
                            }
                            if op.done {
                                return (name, End::Done(result_of(&op)), renamed);
                            }
                        }
                        Ok(None) => {
                            last_error = "the stream ended without a result".into();
                            break;
                        }
                        Err(e) => {
                            last_error = format!("{:?}: {}", e.code(), e.message());
                            break;
                        }
                    }
                }
            }
            Err(e) if e.code() == Code::NotFound && name.is_some() => {
                return (
                    name,
                    End::Stuck(format!("the operation vanished: {}", e.message())),
                    renamed,
                );
            }
            Err(e) => last_error = format!("{:?}: {}", e.code(), e.message()),
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    (name, End::Stuck(last_error), renamed)
}

fn script(id: &str, sock: &Path) -> String {
    format!(
        "python3 -c \"import socket; s=socket.socket(socket.AF_UNIX); s.connect('{}'); s.sendall(b'{id}'); s.close()\" && sleep 0.2 && echo {id}",
        sock.display()
    )
}

async fn client(
    c: usize,
    seed: u64,
    channels: Arc<Vec<Channel>>,
    sock: PathBuf,
    deadline: Instant,
) -> Vec<Ended> {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(c as u64 + 1));
    let mut out = Vec::new();
    for n in 0..ACTIONS_PER_CLIENT {
        let id = format!("c{c}a{n}s{seed}");
        let body = script(&id, &sock);
        let argv = ["/bin/sh", "-c", body.as_str()];
        let exec = Exec {
            instance: "",
            argv: &argv,
            input: id.as_bytes(),
            secret: None,
            invocation: None,
        };
        // Uploads, retried: a replica or Redis may be away.
        let mut action = None;
        while action.is_none() && Instant::now() < deadline {
            let ch = &channels[rng.random_range(0..channels.len())];
            match prepare_with(ch, &exec, true).await {
                Ok(d) => action = Some(d),
                Err(_) => tokio::time::sleep(Duration::from_millis(150)).await,
            }
        }
        let Some(action) = action else {
            out.push(Ended {
                id,
                name: None,
                end: End::Stuck("never uploaded".into()),
                renamed: vec![],
            });
            continue;
        };
        let (name, end, renamed) = execute_to_the_end(&channels, &action, &mut rng, deadline).await;
        out.push(Ended {
            id,
            name,
            end,
            renamed,
        });
    }
    out
}

/// Counts runs per action id: each run connects and sends its id.
async fn count_runs(listener: tokio::net::UnixListener, runs: Arc<Mutex<HashMap<String, u32>>>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            return;
        };
        let runs = runs.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = (&mut conn).take(256).read_to_end(&mut buf).await;
            let id = String::from_utf8_lossy(&buf).trim().to_string();
            if !id.is_empty() {
                *runs.lock().unwrap().entry(id).or_default() += 1;
            }
        });
    }
}

fn block<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

async fn run(seed: u64) -> Result<String, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let redis = block(|| Redis::up(&["--appendonly", "yes", "--appendfsync", "always"]));
    let tmp = tempfile::tempdir().expect("tempdir");

    // The run counter, where sandboxed actions can reach it (read-only bind, 0755/0777:
    // actions may run as another uid).
    let count_dir = tmp.path().join("count");
    std::fs::create_dir(&count_dir).unwrap();
    let sock = count_dir.join("runs.sock");
    let listener = tokio::net::UnixListener::bind(&sock).expect("binding the run counter");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&count_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    let runs = Arc::new(Mutex::new(HashMap::new()));
    let counter = tokio::spawn(count_runs(listener, runs.clone()));

    let mut replicas: Vec<Replica> = (0..REPLICAS)
        .map(|i| Replica {
            grpc: dead_port(),
            http: dead_port(),
            redis_url: redis.url.clone(),
            log: tmp.path().join(format!("replica-{i}.log")),
            child: None,
        })
        .collect();
    for r in &mut replicas {
        r.start().await;
    }
    let mut ro_paths = lre_worker::default_ro_paths();
    ro_paths.push(count_dir.clone());
    let mut workers: Vec<Worker> = (0..REPLICAS)
        .map(|i| Worker {
            replica_port: replicas[i].grpc,
            name: i,
            incarnation: 0,
            ro_paths: ro_paths.clone(),
            task: None,
            dir: None,
        })
        .collect();
    for w in &mut workers {
        w.start();
    }

    let channels = Arc::new(replicas.iter().map(Replica::channel).collect::<Vec<_>>());
    let deadline = Instant::now() + CHAOS + DRAIN;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client(c, seed, channels.clone(), sock.clone(), deadline)))
        .collect();

    // The schedule.
    let mut schedule = Vec::new();
    let chaos_end = Instant::now() + CHAOS;
    while Instant::now() < chaos_end {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..3000))).await;
        let down = Duration::from_millis(rng.random_range(200..2000));
        match rng.random_range(0..10) {
            0..=4 => {
                let i = rng.random_range(0..REPLICAS);
                schedule.push(format!("kill -9 replica {i} for {down:?}"));
                replicas[i].kill();
                tokio::time::sleep(down).await;
                replicas[i].start().await;
            }
            5..=7 => {
                let i = rng.random_range(0..REPLICAS);
                schedule.push(format!("drop worker {i} for {down:?}"));
                workers[i].drop_abruptly().await;
                tokio::time::sleep(down).await;
                workers[i].start();
            }
            _ => {
                schedule.push(format!("kill -9 Redis for {down:?}"));
                block(|| redis.kill());
                tokio::time::sleep(down).await;
                block(|| redis.start());
            }
        }
    }

    let mut ended = Vec::new();
    for c in clients {
        ended.extend(c.await.expect("a client task"));
    }
    let mut failures = Vec::new();
    let runs = runs.lock().unwrap().clone();
    let named = |e: &Ended| format!("{} (operation {})", e.id, e.name.as_deref().unwrap_or("?"));

    let (mut ok, mut gave_up) = (0, 0);
    for e in &ended {
        let ran = runs.get(&e.id).copied().unwrap_or(0);
        if ran > MAX_ATTEMPTS {
            failures.push(format!(
                "{} ran {ran} times (max_attempts {MAX_ATTEMPTS})",
                e.id
            ));
        }
        if !e.renamed.is_empty() {
            failures.push(format!(
                "{}: the operation's name changed: {:?} then {:?}",
                e.id, e.name, e.renamed
            ));
        }
        match &e.end {
            End::Done(Ok(r)) => {
                ok += 1;
                let res = r.result.clone().unwrap_or_default();
                let want = format!("{}\n", e.id);
                let stdout_ok = match &res.stdout_digest {
                    Some(d) if res.stdout_raw.is_empty() => *d == digest_of(want.as_bytes()),
                    _ => res.stdout_raw == want.as_bytes(),
                };
                if res.exit_code != 0 || !stdout_ok {
                    failures.push(format!("{}: a wrong result: {res:?}", e.id));
                }
                if ran == 0 {
                    failures.push(format!("{}: succeeded, but no run was counted", e.id));
                }
            }
            End::Done(Err(s)) => {
                let code = Code::from_i32(s.code);
                if matches!(code, Code::Unavailable | Code::DeadlineExceeded)
                    && s.message.contains("giving up")
                {
                    gave_up += 1;
                } else {
                    failures.push(format!("{}: failed {code:?}: {}", named(e), s.message));
                }
            }
            End::Stuck(why) => failures.push(format!("{}: no result ({why})", named(e))),
        }
    }

    // Every replica answers the result its client saw.
    for e in &ended {
        let (Some(name), End::Done(seen)) = (&e.name, &e.end) else {
            continue;
        };
        for (i, ch) in channels.iter().enumerate() {
            match OperationsClient::new(ch.clone())
                .get_operation(GetOperationRequest { name: name.clone() })
                .await
            {
                Ok(op) => {
                    let op = op.into_inner();
                    if !op.done || result_of(&op) != *seen {
                        failures.push(format!(
                            "{}: replica {i} answers {op:?}, the client saw {seen:?}",
                            e.id
                        ));
                    }
                }
                Err(s) => failures.push(format!(
                    "{}: replica {i}: GetOperation {:?}: {}",
                    e.id,
                    s.code(),
                    s.message()
                )),
            }
        }
    }

    // Nothing is left queued or executing, and workers are connected.
    let mut status = serde_json::Value::Null;
    for _ in 0..100 {
        let text = reqwest::get(format!("http://127.0.0.1:{}/api/status", replicas[0].http))
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        status = serde_json::from_str(&text).map_err(|e| format!("/api/status: {e}: {text}"))?;
        let x = &status["execution"];
        if x["queued"] == 0
            && x["executing"] == 0
            && x["workers"].as_array().is_some_and(|w| w.len() == REPLICAS)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let x = &status["execution"];
    if x["queued"] != 0 || x["executing"] != 0 {
        failures.push(format!("left in the scheduler: {x}"));
    }
    if x["workers"].as_array().is_none_or(|w| w.len() != REPLICAS) {
        failures.push(format!("not every worker is back: {x}"));
    }

    counter.abort();
    for w in &mut workers {
        w.drop_abruptly().await;
    }
    let total_runs: u32 = runs.values().sum();
    let summary = format!(
        "{} Executes from {CLIENTS} clients: {ok} succeeded, {gave_up} gave up after {MAX_ATTEMPTS} attempts; {total_runs} runs; schedule: {}",
        ended.len(),
        schedule.join(", ")
    );
    if failures.is_empty() && ok == 0 {
        failures.push("nothing succeeded: the test proves nothing".into());
    }
    if failures.is_empty() {
        return Ok(summary);
    }
    // The replicas' logs stay for a look.
    let kept = tmp.keep();
    let mut report = format!(
        "{summary}\n{} failures (logs in {}):\n",
        failures.len(),
        kept.display()
    );
    for f in failures.iter().take(30) {
        report.push_str(&format!("  {f}\n"));
    }
    for r in &replicas {
        let log = std::fs::read_to_string(&r.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        report.push_str(&format!("--- {} (last lines)\n", r.log.display()));
        for l in tail.iter().rev() {
            report.push_str(&format!("  {l}\n"));
        }
    }
    Err(report)
}
