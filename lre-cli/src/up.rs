//! `lre up`: the whole local remote-execution stack in one process: the cache on its
//! default store, the scheduler, and one worker per CPU.

use std::path::PathBuf;

use anyhow::Context;
use lre_server::config::{ByteSize, Config, StoreKind};
use lre_worker::WorkerOptions;

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
    /// Local workers (default: the number of CPUs).
    #[arg(long)]
    workers: Option<usize>,
    /// Where workers keep exec roots and their CAS caches (default: ~/.cache/lre/worker).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// A host path visible read-only inside the sandbox; repeatable (default: /nix/store,
    /// /usr, /bin, /lib, /lib64).
    #[arg(long = "ro-path")]
    ro_paths: Vec<PathBuf>,
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
        config.store.kind = StoreKind::Filesystem;
        config.store.path = Some(d);
    }
    if let Some(s) = args.max_size {
        config.store.max_size = s;
    }
    config.validate()?;
    let mut properties = args.properties.clone();
    if let Some(t) = &args.toolchain {
        for (name, value) in crate::doctor::toolchain_properties(t)? {
            properties.retain(|(n, _)| *n != name);
            properties.push((name, value));
        }
    }
    let server = lre_server::start(config)
        .await
        .context("starting the cache and scheduler")?;
    let n = args
        .workers
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    let work_dir = args.work_dir.unwrap_or_else(lre_worker::default_work_dir);
    let ro_paths = if args.ro_paths.is_empty() {
        lre_worker::default_ro_paths()
    } else {
        args.ro_paths
    };
    let scheme = if server.tls { "https" } else { "http" };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for i in 0..n {
        let mut opts = WorkerOptions::local(
            format!("{scheme}://{}", server.grpc_addr),
            format!("local-{i}"),
            work_dir.join(format!("local-{i}")),
            properties.clone(),
        );
        opts.sandbox.ro_paths = ro_paths.clone();
        workers.push(tokio::spawn(lre_worker::run(opts, shutdown.clone())));
    }
    println!("lre up: cache, scheduler and {n} local worker(s) running");
    println!("  grpc: grpc://{}", server.grpc_addr);
    if let Some(h) = server.http_addr {
        println!("  http: http://{h}  (/metrics, /healthz)");
    }
    println!("  bazel flags: {}", server.bazel_flags().join(" "));
    let offered: Vec<String> = properties.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("  workers offer: {}", offered.join(" "));
    terminate().await;
    tracing::info!("shutting down");
    let _ = stop.send(true);
    for w in workers {
        let _ = w.await;
    }
    server.shutdown().await;
    Ok(())
}
