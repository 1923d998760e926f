//! `lre`: the user-facing command.

use lre_cli::{bazel, doctor, explain, generate, toolchain, up};

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "lre", version, about = "Local Remote Execution for Bazel, driven by Nix")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run cache, scheduler and local workers; print the Bazel flags to use.
    Up(up::UpArgs),
    /// Write .bazelrc.lre and the @local-remote-execution toolchain repository.
    Generate(GenerateArgs),
    /// Check that the workspace, the store, the server and its workers fit together.
    Doctor(doctor::DoctorArgs),
    /// Say why two builds' actions got different cache keys, from their execution logs.
    Explain(explain::ExplainArgs),
}

#[derive(clap::Args)]
pub struct ToolchainArgs {
    /// A toolchain environment entry NAME=VALUE (CC, PATH, JAVA_HOME, …); repeatable.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// The C/C++ toolchain: a flake installable (.#lre-cc), a .nix file or a store path.
    #[arg(long)]
    cc: Option<String>,
    /// The Java runtime: a flake installable, a .nix file or a store path.
    #[arg(long)]
    java: Option<String>,
    /// Accept tools, include directories and Env entries outside /nix/store.
    #[arg(long)]
    allow_host_path: bool,
}

impl ToolchainArgs {
    fn sources(&self) -> toolchain::Sources {
        toolchain::Sources { env: self.env.clone(), cc: self.cc.clone(), java: self.java.clone() }
    }
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[command(flatten)]
    toolchain: ToolchainArgs,
    /// The Bazel workspace (default: the current directory).
    #[arg(long, default_value = ".")]
    workspace: PathBuf,
    /// Write `build:PREFIX` lines, used with --config=PREFIX.
    #[arg(long)]
    prefix: Option<String>,
    /// The REAPI endpoint, e.g. grpc://127.0.0.1:8980 or grpcs://cache.example.com.
    #[arg(long)]
    endpoint: Option<String>,
    #[arg(long)]
    instance_name: Option<String>,
    /// The user may read the cache but not write it.
    #[arg(long)]
    read_only: bool,
    /// The endpoint is a cache without execution.
    #[arg(long)]
    cache_only: bool,
    /// Bazel version the files are for (default: .bazelversion, else `bazel --version`).
    #[arg(long)]
    bazel_version: Option<String>,
    /// The worker image, REGISTRY/NAME@sha256:DIGEST, pinned in the platform.
    #[arg(long)]
    image: Option<String>,
    /// The repository directory, relative to the workspace.
    #[arg(long, default_value = generate::DEFAULT_REPO_DIR)]
    repo_dir: String,
    /// Overwrite files that were edited by hand.
    #[arg(long)]
    force: bool,
    /// Write nothing; exit 1 if any file would change.
    #[arg(long)]
    check: bool,
}

fn generate(args: GenerateArgs) -> anyhow::Result<std::process::ExitCode> {
    let bazel = match &args.bazel_version {
        Some(v) => v.parse()?,
        None => bazel::detect(&args.workspace)?,
    };
    if args.repo_dir.starts_with('/') || args.repo_dir.split('/').any(|c| c == "..") {
        anyhow::bail!("--repo-dir must be a relative path inside the workspace, got {}", args.repo_dir);
    }
    let image = args.image.as_deref().map(image_property).transpose()?;
    let endpoint = args.endpoint.map(|url| generate::Endpoint {
        url,
        instance_name: args.instance_name.clone(),
        read_only: args.read_only,
        cache_only: args.cache_only,
    });
    let toolchain = toolchain::Toolchain::resolve(&args.toolchain.sources(), args.toolchain.allow_host_path)?;
    let settings = generate::Settings { bazel, prefix: args.prefix, endpoint, image, repo_dir: args.repo_dir.clone(), allow_host_path: args.toolchain.allow_host_path };
    let files = generate::plan(&toolchain, &settings)?;
    let outcome = generate::write(&args.workspace, &args.repo_dir, &files, args.force, args.check)?;
    let verb = if args.check { "would write" } else { "wrote" };
    for p in &outcome.written {
        eprintln!("lre generate: {verb} {}", p.display());
    }
    for p in &outcome.removed {
        eprintln!("lre generate: {} {}", if args.check { "would remove" } else { "removed" }, p.display());
    }
    eprintln!(
        "lre generate: {} file(s) unchanged; toolchain {} ({} store paths)",
        outcome.unchanged.len(),
        settings.container_image(&toolchain),
        toolchain.closure.len()
    );
    let changed = !outcome.written.is_empty() || !outcome.removed.is_empty();
    Ok(if args.check && changed { std::process::ExitCode::from(1) } else { std::process::ExitCode::SUCCESS })
}

/// `REGISTRY/NAME@sha256:HEX` (or with `docker://` already) → the platform property value.
fn image_property(image: &str) -> anyhow::Result<String> {
    let bare = image.strip_prefix("docker://").unwrap_or(image);
    let digest = bare.rsplit_once('@').map(|(_, d)| d);
    match digest.and_then(|d| d.strip_prefix("sha256:")) {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(format!("docker://{bare}")),
        _ => anyhow::bail!("--image must be pinned by digest, REGISTRY/NAME@sha256:<64 hex digits>; got {image}"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("LRE_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Up(args) => up::up(args).await.map(|()| std::process::ExitCode::SUCCESS),
        Command::Generate(args) => tokio::task::block_in_place(|| generate(args)),
        Command::Doctor(args) => doctor::doctor(args).await,
        Command::Explain(args) => explain::explain(args),
    }
}
