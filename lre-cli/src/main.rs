//! `lre`: the user-facing command.

use lre_cli::{
    bazel, doctor, explain, generate, image, nix, provenance, registry, status, toolchain, up,
};

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lre",
    version,
    about = "Local Remote Execution for Bazel, driven by Nix"
)]
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
    /// What a server is doing: store, workers, queue, recent actions, and why the newest
    /// invocation missed (from the server's history; no execution log needed).
    Status(status::StatusArgs),
    /// Worker images of the toolchain closure.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Who wrote which action results on a server (an `admin` token).
    #[command(subcommand)]
    Provenance(ProvenanceCommand),
    /// Upload the toolchain's closure to the server's Nix binary cache and register it.
    Publish(PublishArgs),
}

#[derive(clap::Args)]
struct PublishArgs {
    #[command(flatten)]
    toolchain: ToolchainArgs,
    /// Publish the closure of these store paths instead of a toolchain's; repeatable.
    #[arg(long = "store-path", value_name = "PATH")]
    store_paths: Vec<String>,
    /// The REAPI endpoint NARs go to over ByteStream: grpc://HOST:PORT or grpcs://HOST.
    #[arg(long, default_value = "grpc://127.0.0.1:8980")]
    endpoint: String,
    #[command(flatten)]
    api: status::ServerArgs,
    #[arg(long, default_value = "")]
    instance_name: String,
    /// Sign each path with this key (`nix-store --generate-binary-cache-key`); without
    /// it, the paths' own signatures go, and the server takes only signed or
    /// content-addressed paths.
    #[arg(long)]
    secret_key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ProvenanceCommand {
    /// List the action results one token or one worker wrote.
    List(provenance::ProvenanceArgs),
    /// Remove every action result one token or one worker wrote (a leaked token's).
    Purge(provenance::ProvenanceArgs),
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Write the toolchain closure and lre-worker as a reproducible OCI image layout.
    Build(ImageBuildArgs),
    /// Push an OCI image layout to a registry; print REGISTRY/NAME@sha256:DIGEST.
    Push(ImagePushArgs),
}

#[derive(clap::Args)]
struct ImagePushArgs {
    /// REGISTRY/NAME[:TAG] to push to.
    reference: String,
    /// The OCI image layout `lre image build` wrote.
    #[arg(long)]
    layout: PathBuf,
    #[arg(long, env = "LRE_REGISTRY_USERNAME")]
    username: Option<String>,
    #[arg(long, env = "LRE_REGISTRY_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Plain HTTP instead of HTTPS (a local registry without TLS).
    #[arg(long)]
    plain_http: bool,
    /// Attempts per blob on transient errors.
    #[arg(long, default_value_t = 4)]
    attempts: u32,
}

async fn image_push(args: ImagePushArgs) -> anyhow::Result<std::process::ExitCode> {
    let registry_host = args
        .reference
        .parse::<oci_client::Reference>()
        .map(|r| r.resolve_registry().to_owned())
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: not an image reference REGISTRY/NAME[:TAG]: {e}",
                args.reference
            )
        })?;
    let auth = registry::credentials(&registry_host, args.username.clone(), args.password.clone())?;
    let opts = registry::PushOptions {
        reference: args.reference.clone(),
        auth,
        plain_http: args.plain_http,
        attempts: args.attempts.max(1),
    };
    let bars = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template("{prefix:.bold} {wide_msg}")?;
    let active =
        std::sync::Mutex::new(std::collections::HashMap::<String, indicatif::ProgressBar>::new());
    let report = registry::push(&args.layout, &opts, &|event| {
        let short = |d: &str| {
            d.trim_start_matches("sha256:")
                .chars()
                .take(12)
                .collect::<String>()
        };
        let Ok(mut active) = active.lock() else {
            return;
        };
        let mut bar_for = |d: &str| {
            active
                .entry(d.to_owned())
                .or_insert_with(|| {
                    let b = bars.add(indicatif::ProgressBar::new_spinner());
                    b.set_style(style.clone());
                    b.set_prefix(short(d));
                    b
                })
                .clone()
        };
        match event {
            registry::Event::Skipped(d, n) => {
                bar_for(d).finish_with_message(format!("{n} bytes: already in the registry"))
            }
            registry::Event::Uploading(d, n) => {
                bar_for(d).set_message(format!("{n} bytes: uploading"))
            }
            registry::Event::Uploaded(d, n) => {
                bar_for(d).finish_with_message(format!("{n} bytes: uploaded"))
            }
            registry::Event::Retrying(d, k, e) => {
                bar_for(d).set_message(format!("attempt {k} failed ({e}); retrying"))
            }
        }
    })
    .await?;
    bars.clear().ok();
    eprintln!(
        "lre image push: {} blob(s) uploaded ({} bytes), {} already there ({} bytes)",
        report.uploaded.len(),
        report.bytes_sent(),
        report.skipped.len(),
        report.skipped.iter().map(|(_, n)| n).sum::<u64>()
    );
    println!("{}", report.pinned);
    Ok(std::process::ExitCode::SUCCESS)
}

#[derive(clap::Args)]
struct ImageBuildArgs {
    #[command(flatten)]
    toolchain: ToolchainArgs,
    /// The lre-worker executable the image runs: a path inside /nix/store.
    #[arg(long)]
    worker: String,
    /// The OCI image layout directory to write.
    #[arg(long)]
    out: PathBuf,
    /// The tag recorded in index.json.
    #[arg(long, default_value = "latest")]
    tag: String,
    /// At most this many layers (each popular store path gets its own).
    #[arg(long, default_value_t = image::DEFAULT_MAX_LAYERS)]
    max_layers: usize,
}

async fn publish(args: PublishArgs) -> anyhow::Result<std::process::ExitCode> {
    let key = args
        .secret_key
        .as_deref()
        .map(lre_cli::publish::read_secret_key)
        .transpose()?;
    let store_paths = args.store_paths.clone();
    let infos = tokio::task::block_in_place(|| -> anyhow::Result<Vec<nix::PathInfo>> {
        let roots: Vec<String> = if store_paths.is_empty() {
            toolchain::Toolchain::resolve(
                &args.toolchain.sources(),
                args.toolchain.allow_host_path,
            )?
            .closure
        } else {
            store_paths
        };
        let roots: Vec<&str> = roots.iter().map(String::as_str).collect();
        Ok(nix::closure(&roots)?)
    })?;
    let closure = infos
        .iter()
        .map(lre_cli::publish::narinfo_of)
        .collect::<Result<Vec<_>, _>>()?;
    let paths: Vec<String> = infos.iter().map(|i| i.path.clone()).collect();
    let id = toolchain::Toolchain::closure_identity(&paths);
    let token = status::read_token(args.api.token_file.as_deref())?;
    let endpoint = match args.endpoint.split_once("://") {
        Some(("grpc", rest)) => format!("http://{rest}"),
        Some(("grpcs", rest)) => format!("https://{rest}"),
        _ => args.endpoint.clone(),
    };
    let credential = match &token {
        Some(t) => lre_worker::client::Credential::bearer(t)?,
        None => lre_worker::client::Credential::none(),
    };
    // The CA is the HTTP server's; the gRPC endpoint uses it only if it speaks TLS too.
    let tls = lre_worker::client::ClientTls {
        ca: args
            .api
            .tls_ca
            .clone()
            .filter(|_| endpoint.starts_with("https://")),
        ..Default::default()
    };
    let channel = lre_worker::client::connect(&endpoint, credential, &tls)?;
    let base = args.api.server.trim_end_matches('/');
    let cache_url = if args.instance_name.is_empty() {
        format!("{base}/nix")
    } else {
        format!("{base}/{}/nix", args.instance_name)
    };
    let server = lre_cli::publish::Server {
        http: status::api_client(args.api.tls_ca.as_deref())?,
        cache_url: cache_url.clone(),
        token,
        channel,
        instance: args.instance_name.clone(),
    };
    let r = lre_cli::publish::publish(&server, &closure, key.as_ref(), &id).await?;
    println!("{id}");
    eprintln!(
        "published {} paths to {cache_url}: {} already there, {} NARs uploaded ({} bytes), {} narinfos written",
        r.paths, r.already_there, r.nars_uploaded, r.bytes_uploaded, r.narinfos_written
    );
    Ok(std::process::ExitCode::SUCCESS)
}

fn image_build(args: ImageBuildArgs) -> anyhow::Result<std::process::ExitCode> {
    if args.max_layers < 2 {
        anyhow::bail!(
            "--max-layers must be at least 2 (the store, and the worker's runtime files)"
        );
    }
    let t =
        toolchain::Toolchain::resolve(&args.toolchain.sources(), args.toolchain.allow_host_path)?;
    let mut roots: Vec<&str> = t.closure.iter().map(String::as_str).collect();
    if let Some(w) = nix::store_path_of(&args.worker) {
        roots.push(w);
    }
    let closure = nix::closure(&roots)?;
    let identity = toolchain::Toolchain::closure_identity(&t.closure);
    let spec = image::ImageSpec {
        env: t.env.entries().map(|(k, v)| format!("{k}={v}")).collect(),
        closure,
        worker: args.worker.clone(),
        identity: identity.clone(),
        max_layers: args.max_layers,
        tag: args.tag.clone(),
    };
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(indicatif::ProgressStyle::with_template(
        "{spinner} {pos} layers written {wide_msg}",
    )?);
    let built = image::build(&spec, &args.out, &|what, size| {
        bar.inc(1);
        bar.set_message(format!("{size} bytes: {what}"));
    })?;
    bar.finish_and_clear();
    eprintln!(
        "lre image build: {} layers, {} bytes compressed, {} store paths; toolchain {identity}",
        built.layers.len(),
        built.total_bytes,
        spec.closure.len()
    );
    println!("{}", built.manifest_digest);
    Ok(std::process::ExitCode::SUCCESS)
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
        toolchain::Sources {
            env: self.env.clone(),
            cc: self.cc.clone(),
            java: self.java.clone(),
        }
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
    /// This client never uploads results itself (--noremote_upload_local_results): a read
    /// token, or CI of an executed-only instance, whose results come from remote execution.
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
        anyhow::bail!(
            "--repo-dir must be a relative path inside the workspace, got {}",
            args.repo_dir
        );
    }
    let image = args
        .image
        .as_deref()
        .map(lre_worker::pinned_image)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let endpoint = args.endpoint.map(|url| generate::Endpoint {
        url,
        instance_name: args.instance_name.clone(),
        read_only: args.read_only,
        cache_only: args.cache_only,
    });
    let toolchain =
        toolchain::Toolchain::resolve(&args.toolchain.sources(), args.toolchain.allow_host_path)?;
    let settings = generate::Settings {
        bazel,
        prefix: args.prefix,
        endpoint,
        image,
        repo_dir: args.repo_dir.clone(),
        allow_host_path: args.toolchain.allow_host_path,
    };
    let files = generate::plan(&toolchain, &settings)?;
    let outcome = generate::write(
        &args.workspace,
        &args.repo_dir,
        &files,
        args.force,
        args.check,
    )?;
    let verb = if args.check { "would write" } else { "wrote" };
    for p in &outcome.written {
        eprintln!("lre generate: {verb} {}", p.display());
    }
    for p in &outcome.removed {
        eprintln!(
            "lre generate: {} {}",
            if args.check {
                "would remove"
            } else {
                "removed"
            },
            p.display()
        );
    }
    eprintln!(
        "lre generate: {} file(s) unchanged; toolchain {} ({} store paths)",
        outcome.unchanged.len(),
        settings.container_image(&toolchain),
        toolchain.closure.len()
    );
    let changed = !outcome.written.is_empty() || !outcome.removed.is_empty();
    Ok(if args.check && changed {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    })
}

fn main() -> std::process::ExitCode {
    // `lre up` runs the server in this process.
    lre_server::allocator::keep_large_buffers();
    let ran = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run()));
    match ran {
        Ok(code) => code,
        Err(e) => {
            // Not anyhow's Debug form: that appends a stack trace whenever RUST_BACKTRACE
            // is set, as many Rust users keep it. A user error is its message, its causes
            // (which carry the fix), and nothing else.
            eprintln!("{}", report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// How `lre` prints an error that ends a command: `error: <message>`, then each cause on a
/// line of its own. Never a stack trace, whatever `RUST_BACKTRACE` says.
fn report(e: &anyhow::Error) -> String {
    let mut out = format!("error: {e}");
    for cause in e.chain().skip(1) {
        out.push_str(&format!("\n  caused by: {cause}"));
    }
    out
}

async fn run() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("LRE_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Up(args) => up::up(args).await.map(|()| std::process::ExitCode::SUCCESS),
        Command::Generate(args) => tokio::task::block_in_place(|| generate(args)),
        Command::Doctor(args) => doctor::doctor(args).await,
        Command::Explain(args) => explain::explain(args).await,
        Command::Status(args) => status::status(args).await,
        Command::Image(ImageCommand::Build(args)) => {
            tokio::task::block_in_place(|| image_build(args))
        }
        Command::Image(ImageCommand::Push(args)) => image_push(args).await,
        Command::Publish(args) => publish(args).await,
        Command::Provenance(ProvenanceCommand::List(args)) => {
            provenance::provenance(args, false).await
        }
        Command::Provenance(ProvenanceCommand::Purge(args)) => {
            provenance::provenance(args, true).await
        }
    }
}
