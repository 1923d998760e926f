use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use lre_worker::{ClientTls, ConnectionConfig, SandboxConfig, WorkerOptions};

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
    /// Which uids actions run as: `auto` gives each running action a uid of its own from
    /// 1879048192 up when the worker is root (so no action can change the inputs another
    /// sees), else the worker's own; `off`; or the first uid of the range to use.
    #[arg(long, default_value = "auto")]
    action_uids: lre_worker::ActionUids,
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
    /// A file whose first line is this worker's token (scope "worker"), sent with every
    /// call. Or set LRE_WORKER_TOKEN. Never a flag: command lines are public in /proc.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// CA bundle for an https:// server (default: the system's roots).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a server that requires mTLS; needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Verify the server's certificate against this name instead of the address's host.
    #[arg(long)]
    tls_server_name: Option<String>,
}

const TOKEN_ENV: &str = "LRE_WORKER_TOKEN";

/// Reads the secret and hides it before any other thread exists: the environment entry
/// is removed (children never inherit it), and the process is made non-dumpable so that
/// actions — which may see this /proc with --host-proc — cannot read its environment,
/// memory or root directory through /proc/<pid>.
fn take_credential(cli: &Cli) -> anyhow::Result<lre_worker::Credential> {
    let from_env = std::env::var(TOKEN_ENV).ok();
    std::env::remove_var(TOKEN_ENV);
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .context("prctl(PR_SET_DUMPABLE, 0)")?;
    Ok(match (&cli.token_file, from_env) {
        (Some(_), Some(_)) => {
            anyhow::bail!("give the token in --token-file or {TOKEN_ENV}, not both")
        }
        (Some(f), None) => lre_worker::Credential::from_file(f)?,
        (None, Some(t)) => lre_worker::Credential::bearer(&t)?,
        (None, None) => lre_worker::Credential::none(),
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let credential = take_credential(&cli)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(serve(cli, credential))
}

async fn serve(cli: Cli, credential: lre_worker::Credential) -> anyhow::Result<()> {
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
        credential,
        tls: ClientTls {
            ca: cli.tls_ca,
            cert: cli.tls_cert,
            key: cli.tls_key,
            server_name: cli.tls_server_name,
        },
        connection: ConnectionConfig {
            worker_id: id,
            capacity,
            properties,
        },
        work_dir: cli.work_dir.unwrap_or_else(lre_worker::default_work_dir),
        cache_bytes: cli.cache_mib << 20,
        sandbox: SandboxConfig {
            bwrap: lre_worker::find_bwrap(cli.bwrap),
            ro_paths: if cli.ro_paths.is_empty() {
                tokio::task::spawn_blocking(lre_worker::default_ro_paths).await?
            } else {
                cli.ro_paths
            },
            network: cli.network,
            host_proc: cli.host_proc,
            action_uids: cli.action_uids,
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
