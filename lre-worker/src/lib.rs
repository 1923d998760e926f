//! lre-worker: runs Bazel remote-execution actions for lre-server's scheduler, each in a
//! fresh exec root hard-linked from a local CAS cache, inside a bubblewrap sandbox.

pub mod cas;
pub mod client;
pub mod confined;
pub mod connection;
pub mod error;
pub mod host_view;
pub mod materialize;
pub mod nar_unpack;
pub mod outputs;
pub mod runner;
pub mod sandbox;
pub mod server_cas;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

pub use client::{ClientTls, Credential};
pub use connection::ConnectionConfig;
pub use sandbox::{ActionUids, SandboxConfig};

/// Everything one worker needs; `lre-worker`'s flags and `lre up` both fill it in.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The scheduler's gRPC address, e.g. http://127.0.0.1:8980 or https://lre:8980.
    pub server: String,
    /// Sent with every call to the server; a token of scope "worker".
    pub credential: Credential,
    pub tls: ClientTls,
    pub connection: ConnectionConfig,
    pub work_dir: PathBuf,
    pub cache_bytes: u64,
    pub sandbox: SandboxConfig,
}

impl WorkerOptions {
    /// An anonymous worker on this host with one slot and a 2 GiB cache, whose sandbox
    /// shows `ro_paths` (the caller computes [`default_ro_paths`] once: it scans the host).
    pub fn local(
        server: String,
        worker_id: String,
        work_dir: PathBuf,
        properties: Vec<(String, String)>,
        ro_paths: Vec<PathBuf>,
    ) -> Self {
        WorkerOptions {
            server,
            credential: Credential::none(),
            tls: ClientTls::default(),
            connection: ConnectionConfig {
                worker_id,
                capacity: 1,
                properties,
            },
            work_dir,
            cache_bytes: 2 << 30,
            sandbox: SandboxConfig {
                bwrap: "bwrap".into(),
                ro_paths,
                network: false,
                host_proc: false,
                action_uids: sandbox::ActionUids::Auto,
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

pub use host_view::default_ro_paths;

/// `/var/cache/lre/worker` for root (a system daemon's cache, and a path the action uids
/// can reach: /root is closed to them), else the user's cache directory.
pub fn default_work_dir() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/cache/lre/worker");
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("lre")
        .join("worker")
}

/// Runs a worker until `shutdown` turns true, reconnecting as needed.
pub async fn run(opts: WorkerOptions, shutdown: watch::Receiver<bool>) -> error::Result<()> {
    let channel = client::connect(&opts.server, opts.credential.clone(), &opts.tls)?;
    // The cache first: its lock refuses a second worker on this work dir before anything
    // of the first one's (its running actions' exec roots) is touched.
    let cas = Arc::new(
        cas::LocalCas::open(
            opts.work_dir.join("cas"),
            server_cas::ServerCas::new(channel.clone()),
            opts.cache_bytes,
        )
        .await?,
    );
    let actions = opts.work_dir.join("actions");
    // Exec roots of a previous run that was killed mid-action, or of actions aborted when
    // it stopped (they are not cleaned up then: the process is on its way out).
    let clear = actions.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        if clear.exists() {
            confined::remove_tree(&clear)?;
        }
        std::fs::create_dir_all(&clear)
    })
    .await
    .map_err(|e| error::WorkerError::Internal(format!("clearing {}: {e}", actions.display())))??;
    let uids = sandbox::UidPool::resolve(&opts.sandbox, opts.connection.capacity, &actions).await?;
    let runner = Arc::new(runner::Runner {
        worker_id: opts.connection.worker_id.clone(),
        cas,
        channel: channel.clone(),
        work_dir: opts.work_dir.clone(),
        sandbox: opts.sandbox.clone(),
        uids,
        output_grace: runner::OUTPUT_GRACE,
    });
    connection::serve(channel, opts.connection, runner, shutdown).await;
    Ok(())
}

/// Where a worker image lists the store paths of its toolchain closure, one a line.
pub const IMAGE_CLOSURE_FILE: &str = "/etc/lre/closure";

/// The `container-image` property for a worker running in `image` (pinned by digest),
/// after checking that every path `closure_file` lists exists here.
pub fn image_property(image: &str, closure_file: &Path) -> Result<(String, String), String> {
    let value = pinned_image(image)?;
    let list = std::fs::read_to_string(closure_file).map_err(|e| {
        format!(
            "--image {image}: cannot read the image's closure list {}: {e}",
            closure_file.display()
        )
    })?;
    let missing: Vec<&str> = list
        .lines()
        .filter(|l| !l.is_empty() && !Path::new(l).exists())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "--image {image}: {} store path(s) of the image's toolchain are missing here, e.g. {}; this is not that image",
            missing.len(),
            missing[0]
        ));
    }
    Ok(("container-image".to_owned(), value))
}

/// `REGISTRY/NAME@sha256:<64 hex>` (with or without `docker://`) as the `container-image`
/// value `docker://REGISTRY/NAME@sha256:…`; anything not pinned by digest is refused.
pub fn pinned_image(image: &str) -> Result<String, String> {
    let bare = image.strip_prefix("docker://").unwrap_or(image);
    let pinned = bare.rsplit_once("@sha256:").is_some_and(|(name, hex)| {
        !name.is_empty() && hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())
    });
    if !pinned {
        return Err(format!(
            "--image {image}: must be pinned by digest, REGISTRY/NAME@sha256:<64 hex digits>"
        ));
    }
    Ok(format!("docker://{bare}"))
}

/// `bwrap` from PATH, else the one beside this executable (a worker image carries its own).
pub fn find_bwrap(configured: PathBuf) -> PathBuf {
    let on_path = configured.components().count() > 1
        || std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(&configured).is_file()));
    if on_path {
        return configured;
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("bwrap")))
        .filter(|p| p.is_file())
        .unwrap_or(configured)
}

#[cfg(test)]
mod image_tests {
    use super::*;

    #[test]
    fn the_image_property_needs_a_digest_and_the_whole_closure() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("closure");
        let present = dir.path().join("present");
        std::fs::create_dir(&present).unwrap();
        std::fs::write(&list, format!("{}\n", present.display())).unwrap();
        let digest = "a".repeat(64);
        assert_eq!(
            image_property(&format!("reg:5000/lre/worker@sha256:{digest}"), &list).unwrap(),
            (
                "container-image".to_string(),
                format!("docker://reg:5000/lre/worker@sha256:{digest}")
            )
        );
        assert!(image_property("reg:5000/lre/worker:latest", &list)
            .unwrap_err()
            .contains("pinned by digest"));
        std::fs::write(
            &list,
            format!("{}\n/nix/store/absent-x\n", present.display()),
        )
        .unwrap();
        let err = image_property(&format!("r/w@sha256:{digest}"), &list).unwrap_err();
        assert!(
            err.contains("1 store path(s)") && err.contains("/nix/store/absent-x"),
            "{err}"
        );
    }
}
