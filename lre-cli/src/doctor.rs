//! `lre doctor`: checks that the generated files, the local store, the server and its
//! workers fit together, and says the fix for each problem. Also the toolchain check
//! `lre up --toolchain` runs before its workers offer a toolchain's platform.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::longrunning::operation;
use prost::Message;
use sha2::{Digest as _, Sha256};

use crate::error::{io, Error, Result};
use crate::generate::{self, Manifest, BAZELRC, DEFAULT_REPO_DIR, MANIFEST};
use crate::toolchain::Toolchain;

#[derive(clap::Args)]
pub struct DoctorArgs {
    #[arg(long, default_value = ".")]
    workspace: PathBuf,
    #[arg(long, default_value = DEFAULT_REPO_DIR)]
    repo_dir: String,
    /// The server to check (default: the endpoint .bazelrc.lre was generated with).
    #[arg(long)]
    endpoint: Option<String>,
    #[arg(long)]
    instance_name: Option<String>,
}

struct Checks {
    failed: usize,
}

impl Checks {
    fn ok(&mut self, what: &str) {
        println!("ok    {what}");
    }
    fn fail(&mut self, what: &str, fix: &str) {
        self.failed += 1;
        println!("FAIL  {what}\n      fix: {fix}");
    }
    fn skip(&mut self, what: &str) {
        println!("skip  {what}");
    }
}

pub fn read_manifest(path: &Path) -> Result<Manifest> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
}

/// The platform properties a worker may offer for the toolchain recorded in `path` (an
/// lre.json, or a workspace holding one): only when every store path of its closure is
/// present and valid here.
pub fn toolchain_properties(path: &Path) -> Result<Vec<(String, String)>> {
    let manifest_path = if path.is_dir() {
        path.join(DEFAULT_REPO_DIR).join(MANIFEST)
    } else {
        path.to_owned()
    };
    let m = read_manifest(&manifest_path)?;
    let missing = missing_store_paths(&m.closure);
    if !missing.is_empty() {
        return Err(Error::Invalid(format!(
            "{} store path(s) of the toolchain in {} are not in this machine's store, so its workers must not offer it:\n{}\n(realise the toolchain, e.g. `nix build` it, then retry)",
            missing.len(),
            manifest_path.display(),
            missing.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n")
        )));
    }
    if !m.container_image.starts_with("docker://")
        && m.container_image != Toolchain::closure_identity(&m.closure)
    {
        return Err(Error::Invalid(format!(
            "{}: container-image {} does not name the closure listed beside it; run `lre generate` again",
            manifest_path.display(),
            m.container_image
        )));
    }
    Ok(m.exec_properties.into_iter().collect())
}

fn missing_store_paths(closure: &[String]) -> Vec<String> {
    let mut missing: Vec<String> = closure
        .iter()
        .filter(|p| !Path::new(p).exists())
        .cloned()
        .collect();
    if missing.is_empty() && !closure.is_empty() {
        // Present is not enough: a path Nix does not know as valid may be half-copied.
        let ok = std::process::Command::new("nix-store")
            .arg("--check-validity")
            .args(closure)
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            missing.push(
                "(one or more paths exist but are not valid: `nix-store --check-validity` failed)"
                    .into(),
            );
        }
    }
    missing
}

pub async fn doctor(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let mut c = Checks { failed: 0 };
    let ws = &args.workspace;
    let rc = ws.join(BAZELRC);
    match std::fs::read_to_string(&rc) {
        Ok(text) if crate::render::checksum_intact(&text) == Some(true) => {
            c.ok(&format!("{BAZELRC} exists"))
        }
        Ok(_) => c.fail(
            &format!("{BAZELRC} was edited by hand"),
            "run `lre generate --force` (or `nix develop`) to restore it",
        ),
        Err(_) => c.fail(
            &format!("{BAZELRC} is missing"),
            "run `lre generate` (or enter `nix develop`, whose shellHook runs it)",
        ),
    }
    let imported = std::fs::read_to_string(ws.join(".bazelrc"))
        .map(|t| {
            t.lines().any(|l| {
                let l = l.trim();
                (l.starts_with("try-import") || l.starts_with("import"))
                    && l.ends_with("%workspace%/.bazelrc.lre")
            })
        })
        .unwrap_or(false);
    if imported {
        c.ok(".bazelrc imports .bazelrc.lre");
    } else {
        c.fail(
            ".bazelrc does not import .bazelrc.lre",
            "add the line `try-import %workspace%/.bazelrc.lre` to .bazelrc",
        );
    }
    let manifest_path = ws.join(&args.repo_dir).join(MANIFEST);
    let manifest = match read_manifest(&manifest_path) {
        Ok(m) => m,
        Err(e) => {
            c.fail(
                &format!("cannot read the toolchain record: {e}"),
                "run `lre generate`",
            );
            return Ok(finish(c));
        }
    };
    let missing = missing_store_paths(&manifest.closure);
    if missing.is_empty() {
        c.ok(&format!(
            "all {} pinned store paths are realised",
            manifest.closure.len()
        ));
    } else {
        c.fail(
            &format!(
                "{} pinned store path(s) are missing, e.g. {}",
                missing.len(),
                missing[0]
            ),
            "realise the toolchain (`nix build` its installable, or enter `nix develop`)",
        );
    }
    current(&mut c, ws, &args.repo_dir, &manifest);
    if manifest.container_image.starts_with("docker://") {
        c.skip("image pin: a registry image; compare its digest with `lre image build`");
    } else if manifest.container_image == Toolchain::closure_identity(&manifest.closure) {
        c.ok(&format!(
            "platform pin {} names this closure",
            manifest.container_image
        ));
    } else {
        c.fail(
            "the platform's container-image does not name the recorded closure",
            "run `lre generate`",
        );
    }
    let endpoint = args
        .endpoint
        .clone()
        .or_else(|| manifest.settings.endpoint.as_ref().map(|e| e.url.clone()));
    match endpoint {
        None => c.skip("server: no endpoint configured (pass --endpoint)"),
        Some(url) => {
            let instance = args
                .instance_name
                .clone()
                .or_else(|| {
                    manifest
                        .settings
                        .endpoint
                        .as_ref()
                        .and_then(|e| e.instance_name.clone())
                })
                .unwrap_or_default();
            server_checks(&mut c, &url, &instance, &manifest).await;
        }
    }
    Ok(finish(c))
}

fn finish(c: Checks) -> ExitCode {
    if c.failed == 0 {
        println!("lre doctor: all checks passed");
        ExitCode::SUCCESS
    } else {
        println!("lre doctor: {} problem(s)", c.failed);
        ExitCode::from(1)
    }
}

/// Regenerates in memory from the recorded Env and settings, and compares with the disk.
fn current(c: &mut Checks, ws: &Path, repo_dir: &str, m: &Manifest) {
    let sources = crate::toolchain::Sources {
        env: m.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        ..Default::default()
    };
    let result = m.settings.to_settings(repo_dir).and_then(|settings| {
        let t = Toolchain::resolve(&sources, m.settings.allow_host_path)?;
        let files = generate::plan(&t, &settings)?;
        generate::write(ws, repo_dir, &files, false, true)
    });
    match result {
        Ok(o) if o.written.is_empty() && o.removed.is_empty() => {
            c.ok("generated files are current")
        }
        Ok(o) => c.fail(
            &format!(
                "generated files are out of date: {}",
                o.written
                    .iter()
                    .chain(&o.removed)
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "run `lre generate` (or re-enter `nix develop`)",
        ),
        Err(e) => c.fail(
            &format!("cannot regenerate the files to compare: {e}"),
            "run `lre generate` and read its error",
        ),
    }
}

fn digest(b: &[u8]) -> re::Digest {
    re::Digest {
        hash: hex::encode(Sha256::digest(b)),
        size_bytes: b.len() as i64,
    }
}

async fn server_checks(c: &mut Checks, url: &str, instance: &str, m: &Manifest) {
    let uri = url
        .replacen("grpcs://", "https://", 1)
        .replacen("grpc://", "http://", 1);
    let channel = match tonic::transport::Endpoint::from_shared(uri.clone()) {
        Ok(e) => {
            e.connect_timeout(std::time::Duration::from_secs(5))
                .connect()
                .await
        }
        Err(e) => {
            c.fail(
                &format!("endpoint {url} is not a URL: {e}"),
                "use grpc://HOST:PORT or grpcs://HOST:PORT",
            );
            return;
        }
    };
    let channel = match channel {
        Ok(ch) => ch,
        Err(e) => {
            c.fail(
                &format!("server {url} is unreachable: {e}"),
                "start it (`lre up`) or check the address",
            );
            return;
        }
    };
    let caps = re::capabilities_client::CapabilitiesClient::new(channel.clone())
        .get_capabilities(re::GetCapabilitiesRequest {
            instance_name: instance.to_owned(),
        })
        .await;
    let caps = match caps {
        Ok(r) => r.into_inner(),
        Err(s) => {
            c.fail(
                &format!("GetCapabilities on {url} failed: {}", s.message()),
                "check the endpoint, instance name and credentials",
            );
            return;
        }
    };
    let cache = caps.cache_capabilities.unwrap_or_default();
    if cache
        .digest_functions
        .contains(&(re::digest_function::Value::Sha256 as i32))
    {
        c.ok(&format!("server {url} is reachable and speaks SHA-256"));
    } else {
        c.fail(
            &format!("server {url} does not offer SHA-256 digests"),
            "use an lre-server or another SHA-256 REAPI server",
        );
    }
    let read_only = m.settings.endpoint.as_ref().is_some_and(|e| e.read_only);
    let update = cache
        .action_cache_update_capabilities
        .map(|u| u.update_enabled)
        .unwrap_or(false);
    if !update && !read_only {
        c.fail(
            "the server does not let this client write the cache (a read token, or an executed-only instance)",
            "regenerate with --read-only (lre.readOnly = true): results then come only from \
             remote execution; or use a read-write token where the instance allows uploads",
        );
    }
    let exec = caps
        .execution_capabilities
        .map(|e| e.exec_enabled)
        .unwrap_or(false);
    let cache_only = m.settings.endpoint.as_ref().is_some_and(|e| e.cache_only);
    if !exec {
        if cache_only {
            c.skip("workers: the endpoint is a cache");
        } else {
            c.fail(
                "the server does not execute actions",
                "enable execution in the server config, or regenerate with --cache-only",
            );
        }
        return;
    }
    match run_compiler(channel, instance, m).await {
        Ok(line) => c.ok(&format!("a worker offers the platform and runs the pinned toolchain: {line}")),
        Err(e) => c.fail(
            &format!("no worker ran the toolchain: {e}"),
            "start a worker that offers these properties: `lre up --toolchain .lre/local-remote-execution/lre.json`, or lre-worker --property NAME=VALUE for each",
        ),
    }
}

/// Executes `CC --version` (or `java -version`) with the generated platform: the scheduler
/// refuses it when no connected worker offers the properties (at once, or after its worker
/// grace, 30 s, while a worker that could may be reconnecting).
async fn run_compiler(
    channel: tonic::transport::Channel,
    instance: &str,
    m: &Manifest,
) -> std::result::Result<String, String> {
    let argv = match (m.env.get("CC"), m.env.get("JAVA_HOME")) {
        (Some(cc), _) => vec![cc.clone(), "--version".into()],
        (None, Some(j)) => vec![format!("{j}/bin/java"), "-version".into()],
        _ => return Err("the toolchain record has neither CC nor JAVA_HOME".into()),
    };
    let platform = re::Platform {
        properties: m
            .exec_properties
            .iter()
            .map(|(k, v)| re::platform::Property {
                name: k.clone(),
                value: v.clone(),
            })
            .collect(),
    };
    let cmd = re::Command {
        arguments: argv,
        environment_variables: m
            .env
            .get("PATH")
            .map(|p| re::command::EnvironmentVariable {
                name: "PATH".into(),
                value: p.clone(),
            })
            .into_iter()
            .collect(),
        ..Default::default()
    }
    .encode_to_vec();
    let root = re::Directory::default().encode_to_vec();
    let action = re::Action {
        command_digest: Some(digest(&cmd)),
        input_root_digest: Some(digest(&root)),
        do_not_cache: true,
        platform: Some(platform),
        ..Default::default()
    }
    .encode_to_vec();
    let requests = [&cmd, &root, &action]
        .iter()
        .map(|b| re::batch_update_blobs_request::Request {
            digest: Some(digest(b)),
            data: b.to_vec(),
            compressor: 0,
        })
        .collect();
    re::content_addressable_storage_client::ContentAddressableStorageClient::new(channel.clone())
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            instance_name: instance.to_owned(),
            requests,
            ..Default::default()
        })
        .await
        .map_err(|s| format!("uploading the probe action: {}", s.message()))?;
    let mut stream = re::execution_client::ExecutionClient::new(channel)
        .execute(re::ExecuteRequest {
            instance_name: instance.to_owned(),
            action_digest: Some(digest(&action)),
            skip_cache_lookup: true,
            ..Default::default()
        })
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    let mut last = None;
    while let Some(op) = stream.message().await.map_err(|s| s.message().to_owned())? {
        last = Some(op);
    }
    let resp = match last.and_then(|o| o.result) {
        Some(operation::Result::Response(a)) => {
            re::ExecuteResponse::decode(&a.value[..]).map_err(|e| e.to_string())?
        }
        Some(operation::Result::Error(s)) => return Err(s.message),
        None => return Err("the operation ended without a result".into()),
    };
    if let Some(s) = resp.status.filter(|s| s.code != 0) {
        return Err(s.message);
    }
    let r = resp.result.ok_or("no action result")?;
    if r.exit_code != 0 {
        return Err(format!(
            "the toolchain exited with {} on the worker",
            r.exit_code
        ));
    }
    let out = if r.stdout_raw.is_empty() {
        r.stderr_raw
    } else {
        r.stdout_raw
    };
    let line = String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    // Servers may keep output out of line; the exit code is the answer either way.
    Ok(if line.is_empty() {
        "exit 0".into()
    } else {
        line
    })
}
