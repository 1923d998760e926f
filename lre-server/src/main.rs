use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use lre_server::auth::Scope;
use lre_server::config::{ByteSize, Config, StoreConfig};

/// Remote Execution API v2 cache and HTTP cache for Bazel.
///
/// With no arguments it serves a filesystem store under the user's cache directory on
/// 127.0.0.1:8980 (gRPC) and 127.0.0.1:8981 (HTTP, /metrics, /healthz).
#[derive(Parser)]
#[command(name = "lre-server", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file; flags below override it.
    #[arg(long, env = "LRE_SERVER_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long)]
    grpc_listen: Option<SocketAddr>,
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Disable the HTTP port.
    #[arg(long, conflicts_with = "http_listen")]
    no_http: bool,
    /// Filesystem store directory.
    #[arg(long)]
    store_dir: Option<PathBuf>,
    /// Keep blobs in memory only.
    #[arg(long, conflicts_with = "store_dir")]
    memory: bool,
    /// Store size limit, e.g. 10GiB.
    #[arg(long)]
    max_size: Option<ByteSize>,
    /// What callers without a token may do: none, read, read-write.
    #[arg(long)]
    anonymous: Option<Scope>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Read a token on stdin and print the SHA-256 to put in `[[auth.tokens]] sha256`.
    HashToken,
    /// Validate the configuration and exit.
    CheckConfig,
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut c = match &cli.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    if let Some(a) = cli.grpc_listen {
        c.grpc_listen = a;
    }
    if let Some(a) = cli.http_listen {
        c.http_listen = Some(a);
    }
    if cli.no_http {
        c.http_listen = None;
    }
    // --store-dir and --memory replace the whole [store] with one local store.
    if let Some(d) = &cli.store_dir {
        c.store = StoreConfig::filesystem(Some(d.clone()), c.store.local_max_size().0);
    }
    if cli.memory {
        c.store = StoreConfig::memory(c.store.local_max_size().0);
    }
    if let Some(s) = cli.max_size {
        match c.store.local_max_size_mut() {
            Some(m) => *m = s,
            None => anyhow::bail!("--max-size: the configured [store] has no local tier to size"),
        }
    }
    if let Some(a) = cli.anonymous {
        c.auth.anonymous = a;
    }
    c.validate()?;
    Ok(c)
}

async fn terminate() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn main() -> anyhow::Result<()> {
    lre_server::allocator::keep_large_buffers();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("LRE_LOG").unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if cli.log_json {
        fmt.json().init();
    } else {
        fmt.init();
    }

    match cli.command {
        Some(Command::HashToken) => {
            let mut token = String::new();
            std::io::stdin()
                .read_to_string(&mut token)
                .context("reading the token from stdin")?;
            let token = token.trim_end_matches(['\n', '\r']);
            anyhow::ensure!(!token.is_empty(), "no token on stdin");
            println!("{}", hex::encode(lre_server::auth::hash_token(token)));
            return Ok(());
        }
        Some(Command::CheckConfig) => {
            let config = load_config(&cli)?;
            for w in config.warnings() {
                println!("warning: {w}");
            }
            println!("config OK");
            return Ok(());
        }
        None => {}
    }

    let config = load_config(&cli)?;
    if config.auth.anonymous == Scope::ReadWrite && !config.grpc_listen.ip().is_loopback() {
        tracing::warn!("anonymous callers may write to this cache and it listens beyond loopback: anyone who can reach it can poison it");
    }
    let server = lre_server::start(config).await?;
    let mut ready = String::from("lre-server ready\n");
    ready += &format!(
        "  grpc: {}://{}\n",
        if server.tls { "grpcs" } else { "grpc" },
        server.grpc_addr
    );
    if let Some(h) = server.http_addr {
        ready += &format!(
            "  http: {}://{}\n",
            if server.tls { "https" } else { "http" },
            h
        );
    }
    ready += &format!("  bazel flags: {}\n", server.bazel_flags().join(" "));
    // Whoever started us may have stopped reading stdout; that must not stop the server.
    let mut out = std::io::stdout();
    let _ = out.write_all(ready.as_bytes()).and_then(|_| out.flush());
    let stop = server.shutdown_handle();
    tokio::spawn(async move {
        terminate().await;
        tracing::info!("shutting down");
        let _ = stop.send(true);
    });
    server.wait().await;
    Ok(())
}
