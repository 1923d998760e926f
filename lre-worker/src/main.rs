use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use lre_worker::{ConnectionConfig, SandboxConfig, WorkerOptions};

/// Runs Bazel remote-execution actions for lre-server.
#[derive(Parser)]
#[command(name = "lre-worker", version)]
struct Cli {
    /// The scheduler's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:8980")]
    server: String,
    /// This worker's id (default: host name and process id).
    #[arg(long)]
    id: Option<String>,
    /// Actions to run at once (default: the number of CPUs).
    #[arg(long)]
    capacity: Option<u32>,
    /// A platform property this worker offers, NAME=VALUE; repeatable.
    #[arg(long = "property", value_parser = lre_worker::parse_property, default_value = "OSFamily=Linux")]
    properties: Vec<(String, String)>,
    /// A host path visible read-only inside the sandbox; repeatable (default: /nix/store,
    /// /usr, /bin, /lib, /lib64).
    #[arg(long = "ro-path")]
    ro_paths: Vec<PathBuf>,
    /// Bind this worker's /proc into the sandbox instead of a fresh procfs: needed when the
    /// worker itself runs in a container (its image under Kubernetes, or bubblewrap).
    #[arg(long)]
    host_proc: bool,
    /// Let actions use the network.
    #[arg(long)]
    network: bool,
    /// Where exec roots and the local CAS cache live.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Local CAS cache limit in MiB.
    #[arg(long, default_value_t = 10 * 1024)]
    cache_mib: u64,
    /// The bubblewrap binary.
    #[arg(long, default_value = "bwrap")]
    bwrap: PathBuf,
    /// The worker image this worker runs in, pinned by digest (REGISTRY/NAME@sha256:…): the
    /// worker checks the image's toolchain closure (/etc/lre/closure) is all present and
    /// offers `container-image=docker://REGISTRY/NAME@sha256:…`. An image cannot hold its
    /// own digest, so the deployment passes the same reference it runs.
    #[arg(long, env = "LRE_IMAGE")]
    image: Option<String>,
    /// Bearer token with write access, if the server requires one.
    #[arg(long, env = "LRE_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("LRE_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let id = cli.id.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "worker".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let capacity = cli.capacity.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    });
    let mut properties = cli.properties;
    if let Some(image) = &cli.image {
        let (name, value) =
            lre_worker::image_property(image, std::path::Path::new(lre_worker::IMAGE_CLOSURE_FILE))
                .map_err(anyhow::Error::msg)?;
        properties.retain(|(n, _)| *n != name);
        properties.push((name, value));
    }
    let opts = WorkerOptions {
        server: cli.server,
        connection: ConnectionConfig {
            worker_id: id,
            capacity,
            properties,
            token: cli.token,
        },
        work_dir: cli.work_dir.unwrap_or_else(lre_worker::default_work_dir),
        cache_bytes: cli.cache_mib << 20,
        sandbox: SandboxConfig {
            bwrap: lre_worker::find_bwrap(cli.bwrap),
            ro_paths: if cli.ro_paths.is_empty() {
                lre_worker::default_ro_paths()
            } else {
                cli.ro_paths
            },
            network: cli.network,
            host_proc: cli.host_proc,
        },
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = stop.send(true);
    });
    lre_worker::run(opts, shutdown)
        .await
        .context("worker failed")
}
