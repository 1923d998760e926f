//! lre-worker: runs Bazel remote-execution actions for lre-server's scheduler, each in a
//! fresh exec root hard-linked from a local CAS cache, inside a bubblewrap sandbox.

pub mod cas;
pub mod connection;
pub mod error;
pub mod materialize;
pub mod outputs;
pub mod runner;
pub mod sandbox;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tonic::transport::Endpoint;

pub use connection::ConnectionConfig;
pub use sandbox::SandboxConfig;

/// Everything one worker needs; `lre-worker`'s flags and `lre up` both fill it in.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The scheduler's gRPC address, e.g. http://127.0.0.1:8980.
    pub server: String,
    pub connection: ConnectionConfig,
    pub work_dir: PathBuf,
    pub cache_bytes: u64,
    pub sandbox: SandboxConfig,
}

impl WorkerOptions {
    /// A worker on this host with one slot, the default sandbox and a 2 GiB cache.
    pub fn local(
        server: String,
        worker_id: String,
        work_dir: PathBuf,
        properties: Vec<(String, String)>,
    ) -> Self {
        WorkerOptions {
            server,
            connection: ConnectionConfig {
                worker_id,
                capacity: 1,
                properties,
                token: None,
            },
            work_dir,
            cache_bytes: 2 << 30,
            sandbox: SandboxConfig {
                bwrap: "bwrap".into(),
                ro_paths: default_ro_paths(),
                network: false,
            },
        }
    }
}

/// Parses a `NAME=VALUE` platform property flag.
pub fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))
}

/// Host paths a local worker exposes read-only by default: the Nix store, plus the host
/// toolchain directories that Bazel's autodetected C++ toolchain (/usr/bin/gcc) needs.
pub fn default_ro_paths() -> Vec<PathBuf> {
    ["/nix/store", "/usr", "/bin", "/lib", "/lib64"]
        .iter()
        .map(PathBuf::from)
        .collect()
}

pub fn default_work_dir() -> PathBuf {
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("lre")
        .join("worker")
}

/// Runs a worker until `shutdown` turns true, reconnecting as needed.
pub async fn run(opts: WorkerOptions, shutdown: watch::Receiver<bool>) -> error::Result<()> {
    let channel = Endpoint::from_shared(opts.server.clone())
        .map_err(|e| {
            error::WorkerError::InvalidInput(format!("server address {:?}: {e}", opts.server))
        })?
        .connect_lazy();
    let actions = opts.work_dir.join("actions");
    if actions.exists() {
        // Exec roots of a previous run that was killed mid-action.
        std::fs::remove_dir_all(&actions)?;
    }
    std::fs::create_dir_all(&actions)?;
    let cas = Arc::new(cas::LocalCas::open(
        opts.work_dir.join("cas"),
        channel.clone(),
        opts.cache_bytes,
    )?);
    let runner = Arc::new(runner::Runner {
        worker_id: opts.connection.worker_id.clone(),
        cas,
        channel: channel.clone(),
        work_dir: opts.work_dir.clone(),
        sandbox: opts.sandbox.clone(),
    });
    connection::serve(channel, opts.connection, runner, shutdown).await;
    Ok(())
}
