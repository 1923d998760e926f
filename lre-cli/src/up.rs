//! `lre up`: the whole local remote-execution stack in one process: the cache on its
//! default store, the scheduler, and one worker with a slot per CPU and one CAS cache.
//! The worker authenticates like any other, with a worker token made for this run.

use std::path::PathBuf;

use anyhow::Context;
use lre_server::auth::{Scope, TokenConfig};
use lre_server::config::{ByteSize, Config, StoreConfig, TlsConfig};
use lre_worker::{ClientTls, Credential, WorkerOptions};

#[derive(clap::Args)]
pub struct UpArgs {
    /// lre-server config file (execution is switched on regardless).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    grpc_listen: Option<std::net::SocketAddr>,
    #[arg(long)]
    http_listen: Option<std::net::SocketAddr>,
    /// Filesystem store directory (default: ~/.cache/lre/cas).
    #[arg(long)]
    store_dir: Option<PathBuf>,
    /// Store size limit, e.g. 10GiB.
    #[arg(long)]
    max_size: Option<ByteSize>,
    /// Actions the local worker runs at once (default: the number of CPUs).
    #[arg(long)]
    capacity: Option<u32>,
    /// Where the worker keeps exec roots and its CAS cache (default: ~/.cache/lre/worker).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The worker's CAS cache limit in MiB.
    #[arg(long, default_value_t = 10 * 1024)]
    cache_mib: u64,
    /// A host path visible read-only inside the sandbox; repeatable (default: the Nix store,
    /// the system's program and library directories, and what their links reach in /etc).
    #[arg(long = "ro-path")]
    ro_paths: Vec<PathBuf>,
    /// Serve TLS with this certificate (PEM) on both ports; needs --tls-key and --tls-ca.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA that signed --tls-cert, which the worker (and Bazel, --tls_certificate)
    /// verify the server against. A self-signed certificate cannot serve as its own CA
    /// (rustls refuses a CA certificate as a server's), so make a CA and a leaf (mkcert,
    /// or openssl as in the README).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// The name in --tls-cert that clients dial (default: localhost).
    #[arg(long, default_value = "localhost")]
    tls_server_name: String,
    /// A platform property the local workers offer, NAME=VALUE; repeatable.
    #[arg(long = "property", value_parser = lre_worker::parse_property, default_value = "OSFamily=Linux")]
    properties: Vec<(String, String)>,
    /// The lre.json that `lre generate` wrote (or the workspace holding it): the workers
    /// offer that toolchain's platform properties, after checking that every store path of
    /// its closure is present here.
    #[arg(long)]
    toolchain: Option<PathBuf>,
}

async fn terminate() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A secret for this run's worker: 256 bits from the OS's generator (uuid v4 draws its
/// 122 random bits from getrandom), never written anywhere.
fn worker_secret() -> String {
    (0..3)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect()
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    config.execution.enabled = true;
    if let Some(a) = args.grpc_listen {
        config.grpc_listen = a;
    }
    if let Some(a) = args.http_listen {
        config.http_listen = Some(a);
    }
    if let Some(d) = args.store_dir {
        config.store = StoreConfig::filesystem(Some(d), config.store.local_max_size().0);
    }
    if let Some(s) = args.max_size {
        match config.store.local_max_size_mut() {
            Some(m) => *m = s,
            None => anyhow::bail!("--max-size: the configured [store] has no local tier to size"),
        }
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        // Replace the certificate, keep the rest of a configured [tls] (its client CA).
        let old = config.tls.take();
        config.tls = Some(TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: old.as_ref().and_then(|t| t.client_ca.clone()),
            require_client_cert: old.is_some_and(|t| t.require_client_cert),
        });
    }
    if let Some(tls) = &config.tls {
        if tls.require_client_cert {
            anyhow::bail!("tls.require_client_cert: lre up's own worker has no client certificate to present; turn it off for lre up");
        }
        if args.tls_ca.is_none() {
            anyhow::bail!("the config serves TLS: pass --tls-ca (the CA that signed tls.cert) so that lre up's worker can verify it");
        }
    }
    let secret = worker_secret();
    let worker_token = "lre-up-worker";
    if config.auth.tokens.iter().any(|t| t.name == worker_token) {
        anyhow::bail!("the config already has a token named {worker_token:?}, which lre up makes for its worker");
    }
    config.auth.tokens.push(TokenConfig::for_secret(
        worker_token,
        &secret,
        Scope::Worker,
    ));
    config.validate()?;
    let mut properties = args.properties.clone();
    if let Some(t) = &args.toolchain {
        for (name, value) in crate::doctor::toolchain_properties(t)? {
            properties.retain(|(n, _)| *n != name);
            properties.push((name, value));
        }
    }
    let ro_paths = if args.ro_paths.is_empty() {
        tokio::task::spawn_blocking(lre_worker::default_ro_paths).await?
    } else {
        args.ro_paths
    };
    let server = lre_server::start(config)
        .await
        .context("starting the cache and scheduler")?;
    let capacity = args
        .capacity
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
        })
        .max(1);
    let work_dir = args.work_dir.unwrap_or_else(lre_worker::default_work_dir);
    let port = server.grpc_addr.port();
    let (worker_url, bazel_url, tls) = match server.tls {
        true => {
            let tls = ClientTls {
                ca: args.tls_ca.clone(),
                server_name: Some(args.tls_server_name.clone()),
                ..ClientTls::default()
            };
            (
                format!("https://{}", server.grpc_addr),
                format!("grpcs://{}:{port}", args.tls_server_name),
                tls,
            )
        }
        false => (
            format!("http://{}", server.grpc_addr),
            format!("grpc://{}", server.grpc_addr),
            ClientTls::default(),
        ),
    };
    let mut opts = WorkerOptions::local(
        worker_url,
        "local".into(),
        work_dir,
        properties.clone(),
        ro_paths.clone(),
    );
    opts.credential = Credential::bearer(&secret)?;
    opts.tls = tls;
    opts.connection.capacity = capacity;
    opts.cache_bytes = args.cache_mib << 20;
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let mut worker = tokio::spawn(lre_worker::run(opts, shutdown));
    let mut banner = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(
        banner,
        "lre up: cache, scheduler and a local worker with {capacity} slot(s) running"
    );
    let _ = writeln!(banner, "  grpc: {bazel_url}");
    if let Some(h) = server.http_addr {
        let scheme = if server.tls { "https" } else { "http" };
        let _ = writeln!(
            banner,
            "  status page: {scheme}://{h}/  (also /api/status, /metrics, /healthz)"
        );
    }
    let mut flags = vec![format!("--remote_executor={bazel_url}")];
    if let Some(ca) = &args.tls_ca {
        flags.push(format!("--tls_certificate={}", ca.display()));
    }
    let _ = writeln!(banner, "  bazel flags: {}", flags.join(" "));
    let offered: Vec<String> = properties.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(banner, "  workers offer: {}", offered.join(" "));
    // The single files under /etc that tools link to are many and dull: count them.
    let (etc_files, shown): (Vec<_>, Vec<_>) = ro_paths
        .iter()
        .partition(|p| p.starts_with("/etc") && p.is_file() && !p.starts_with("/etc/ld.so.cache"));
    let mut shown: Vec<String> = shown.iter().map(|p| p.display().to_string()).collect();
    if !etc_files.is_empty() {
        shown.push(format!(
            "and {} linked file(s) inside /etc/",
            etc_files.len()
        ));
    }
    tracing::debug!(files = ?etc_files, "single /etc files the sandbox shows");
    let _ = writeln!(banner, "  sandbox shows (read-only): {}", shown.join(" "));
    // Whoever reads the banner may stop reading (a script that takes the first lines):
    // a closed stdout must not take the server down with it, as println! would.
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(banner.as_bytes()).and_then(|()| out.flush());
    }
    // The worker only returns on shutdown or when it cannot start (a bad TLS file, say):
    // then there is nothing to serve executions with, so stop too.
    let early = tokio::select! {
        _ = terminate() => None,
        r = &mut worker => Some(r),
    };
    tracing::info!("shutting down");
    let _ = stop.send(true);
    let outcome = match early {
        Some(r) => r,
        None => worker.await,
    };
    server.shutdown().await;
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("the local worker failed")),
        Err(e) => Err(anyhow::anyhow!("the local worker panicked: {e}")),
    }
}
