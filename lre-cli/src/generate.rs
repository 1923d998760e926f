//! `lre generate`: `.bazelrc.lre` and the `@local-remote-execution` repository, rendered
//! from a resolved toolchain. `plan` is pure (the golden tests call it); `write` compares
//! before writing and refuses to overwrite hand edits.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::json;

use crate::bazel::{BazelVersion, Form};
use crate::error::{io, Error, Result};
use crate::probe::{CcInfo, CompilerKind};
use crate::render::{checksum_intact, with_checksum, Renderer, STATIC_FILES};
use crate::toolchain::Toolchain;

pub const BAZELRC: &str = ".bazelrc.lre";
pub const DEFAULT_REPO_DIR: &str = ".lre/local-remote-execution";
pub const MANIFEST: &str = "lre.json";
const REPO: &str = "@local-remote-execution";

/// Where builds go, as `.bazelrc.lre` should say.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct Endpoint {
    pub url: String,
    pub instance_name: Option<String>,
    /// Contributors of an open project: read the cache, never write it.
    pub read_only: bool,
    /// A cache without execution: `--remote_cache` instead of `--remote_executor`.
    pub cache_only: bool,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub bazel: BazelVersion,
    /// `build:<prefix>` lines instead of `build`.
    pub prefix: Option<String>,
    pub endpoint: Option<Endpoint>,
    /// `docker://REGISTRY/NAME@sha256:…` of the worker image, once there is one.
    pub image: Option<String>,
    /// The repository directory, relative to the workspace.
    pub repo_dir: String,
    /// Recorded so `lre doctor` regenerates the same way.
    pub allow_host_path: bool,
}

/// One file to write, relative to the workspace.
#[derive(Debug, PartialEq)]
pub struct File {
    pub path: PathBuf,
    pub content: String,
}

/// The machine-readable record of what was generated, for `lre doctor` and `lre up`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Manifest {
    pub bazel_version: String,
    pub container_image: String,
    pub closure: Vec<String>,
    pub env: std::collections::BTreeMap<String, String>,
    pub exec_properties: std::collections::BTreeMap<String, String>,
    pub settings: SettingsRecord,
}

/// The settings of a run, as lre.json records them.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct SettingsRecord {
    pub bazel_version: String,
    pub prefix: Option<String>,
    pub endpoint: Option<Endpoint>,
    pub image: Option<String>,
    #[serde(default)]
    pub allow_host_path: bool,
}

impl SettingsRecord {
    pub fn to_settings(&self, repo_dir: &str) -> Result<Settings> {
        Ok(Settings {
            bazel: self.bazel_version.parse()?,
            prefix: self.prefix.clone(),
            endpoint: self.endpoint.clone(),
            image: self.image.clone(),
            repo_dir: repo_dir.to_owned(),
            allow_host_path: self.allow_host_path,
        })
    }
}

impl Settings {
    pub fn container_image(&self, t: &Toolchain) -> String {
        self.image
            .clone()
            .unwrap_or_else(|| Toolchain::closure_identity(&t.closure))
    }
}

fn cc_data(cc: &CcInfo) -> serde_json::Value {
    let clang = cc.kind == CompilerKind::Clang;
    let mut unfiltered = vec![
        // Absolute store paths stay as they are in outputs and .d files.
        "-no-canonical-prefixes".to_owned(),
        "-Wno-builtin-macro-redefined".into(),
        "-D__DATE__=\"redacted\"".into(),
        "-D__TIMESTAMP__=\"redacted\"".into(),
        "-D__TIME__=\"redacted\"".into(),
    ];
    if !clang {
        unfiltered.push("-fno-canonical-system-headers".into());
    }
    let mut compile = vec![
        "-U_FORTIFY_SOURCE",
        "-fstack-protector",
        "-Wall",
        "-fno-omit-frame-pointer",
    ];
    if clang {
        compile.push("-Wthread-safety");
        compile.push("-Wself-assign");
    } else {
        compile.push("-Wunused-but-set-parameter");
        compile.push("-Wno-free-nonheap-object");
    }
    let mut link = vec![
        "-no-canonical-prefixes".to_owned(),
        "-Wl,-z,relro,-z,now".into(),
    ];
    if !clang {
        link.push("-pass-exit-codes".into());
        if let Some(dir) = cc.tools.get("ld").and_then(|ld| Path::new(ld).parent()) {
            // gcc finds its linker through -B.
            link.push(format!("-B{}", dir.display()));
        }
    }
    let mut tools = cc.tools.clone();
    // Bazel's unix toolchain config wants these keys; a toolchain without them fails only
    // when an action really uses one.
    for missing in ["cpp", "gcov", "dwp", "llvm-cov"] {
        if !tools.contains_key(missing) {
            tools.insert(missing.to_owned(), cc.cc.clone());
        }
    }
    json!({
        "cc": cc.cc,
        "kind": cc.kind,
        "version": cc.version,
        "target": cc.target,
        "libc": cc.libc(),
        "cpu": cc.cpu(),
        "abi": format!("{}-{}", if clang { "clang" } else { "gcc" }, cc.version),
        "include_dirs": cc.include_dirs,
        "tools": tools,
        "compile_flags": compile,
        "unfiltered_compile_flags": unfiltered,
        "link_flags": link,
        "link_libs": ["-lstdc++", "-lm"],
    })
}

/// The flags of `.bazelrc.lre`, without the `build` in front.
pub fn flags(t: &Toolchain, s: &Settings, form: &Form) -> Vec<String> {
    let mut f = vec![format!(
        "--extra_execution_platforms={REPO}//generated/config:platform"
    )];
    if let Some(cc) = &t.cc {
        f.push(format!(
            "--extra_toolchains={REPO}//generated/cc:cc-toolchain"
        ));
        if form.needs_cc_toolchain_resolution_flag {
            f.push("--incompatible_enable_cc_toolchain_resolution".into());
        }
        f.push("--action_env=BAZEL_DO_NOT_DETECT_CPP_TOOLCHAIN=1".into());
        if cc.static_only() {
            // No shared libraries for a static-only (musl) toolchain: cc_library then
            // builds no .so, and tests link statically, as the toolchain can run them.
            f.push("--features=-supports_dynamic_linker".into());
        }
    }
    f.push("--define=EXECUTOR=remote".into());
    if let Some(sh) = &t.shell {
        f.push(format!("--shell_executable={sh}"));
    }
    if let Some(path) = t.env.get("PATH") {
        // Otherwise actions inherit the PATH of the user's shell, which differs between
        // machines and would split the cache.
        f.push(format!("--action_env=PATH={path}"));
        f.push(format!("--host_action_env=PATH={path}"));
    }
    if t.java.is_some() {
        if form.java_runtime_by_version {
            f.push(format!(
                "--extra_toolchains={REPO}//generated/java:runtime-toolchain"
            ));
            f.push("--java_runtime_version=lre_jdk".into());
            f.push("--tool_java_runtime_version=lre_jdk".into());
        } else {
            f.push(format!("--javabase={REPO}//generated/java:runtime"));
            f.push(format!("--host_javabase={REPO}//generated/java:runtime"));
        }
    }
    if let Some(e) = &s.endpoint {
        let http = e.url.starts_with("http://") || e.url.starts_with("https://");
        if e.cache_only || http {
            f.push(format!("--remote_cache={}", e.url));
        } else {
            f.push(format!("--remote_executor={}", e.url));
        }
        if let Some(name) = &e.instance_name {
            f.push(format!("--remote_instance_name={name}"));
        }
        if e.read_only {
            f.push("--noremote_upload_local_results".into());
        }
    }
    f
}

/// Every file `lre generate` writes for this toolchain and these settings.
pub fn plan(t: &Toolchain, s: &Settings) -> Result<Vec<File>> {
    let form = s.bazel.form();
    let renderer = Renderer::new()?;
    let image = s.container_image(t);
    let cpu = t.cc.as_ref().map(CcInfo::cpu).unwrap_or("k8");
    let (bazel_cpu, parent) = match cpu {
        "aarch64" => ("@platforms//cpu:aarch64", "//platforms:linux-aarch64"),
        _ => ("@platforms//cpu:x86_64", "//platforms:linux-x86_64"),
    };
    let exec_properties = json!({ "OSFamily": "Linux", "container-image": image });
    let data = json!({
        "env": t.env.entries().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>(),
        "closure_len": t.closure.len(),
        "container_image": image,
        "bazel_version": s.bazel.to_string(),
        "repo_dir": s.repo_dir,
        "form": form,
        "command": match &s.prefix { Some(p) => format!("build:{p}"), None => "build".into() },
        "flags": flags(t, s, &form),
        "cc": t.cc.as_ref().map(cc_data),
        "java": t.java,
        "exec_constraints": [bazel_cpu, "@platforms//os:linux", "//platforms:nix"],
        "target_constraints": [bazel_cpu, "@platforms//os:linux"],
        "exec_properties": exec_properties,
        "parent_platform": parent,
    });
    let repo = PathBuf::from(&s.repo_dir);
    let mut files = vec![File {
        path: BAZELRC.into(),
        content: renderer.render("bazelrc.lre", &data)?,
    }];
    let mut add = |rel: &str, content: String| {
        files.push(File {
            path: repo.join(rel),
            content,
        })
    };
    for (rel, content) in STATIC_FILES {
        add(rel, (*content).to_owned());
    }
    add("MODULE.bazel", renderer.render("MODULE.bazel", &data)?);
    add(
        "generated/config/BUILD.bazel",
        renderer.render("config.BUILD", &data)?,
    );
    if t.cc.is_some() {
        add(
            "generated/cc/BUILD.bazel",
            renderer.render("cc.BUILD", &data)?,
        );
    }
    if t.java.is_some() {
        add(
            "generated/java/BUILD.bazel",
            renderer.render("java.BUILD", &data)?,
        );
    }
    add(
        ".gitignore",
        "# Generated per machine by `lre generate`; not for version control.\n*\n".into(),
    );
    for f in files.iter_mut() {
        f.content = with_checksum(&f.content);
    }
    let manifest = Manifest {
        bazel_version: s.bazel.to_string(),
        container_image: image.clone(),
        closure: t.closure.clone(),
        env: t
            .env
            .entries()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        exec_properties: serde_json::from_value(exec_properties)
            .map_err(|e| Error::Invalid(e.to_string()))?,
        settings: SettingsRecord {
            bazel_version: s.bazel.to_string(),
            prefix: s.prefix.clone(),
            endpoint: s.endpoint.clone(),
            image: s.image.clone(),
            allow_host_path: s.allow_host_path,
        },
    };
    let mut json =
        serde_json::to_string_pretty(&manifest).map_err(|e| Error::Invalid(e.to_string()))?;
    json.push('\n');
    files.push(File {
        path: repo.join(MANIFEST),
        content: json,
    });
    Ok(files)
}

/// Optional files a previous run may have written that this plan no longer has.
const OPTIONAL: &[&str] = &["generated/cc/BUILD.bazel", "generated/java/BUILD.bazel"];

#[derive(Debug, Default)]
pub struct Outcome {
    pub written: Vec<PathBuf>,
    pub unchanged: Vec<PathBuf>,
    pub removed: Vec<PathBuf>,
}

/// Writes `files` under `workspace`. An identical file is left alone (not even touched);
/// a file whose checksum line is gone or wrong was edited by hand and is only overwritten
/// with `force`. With `dry_run`, reports what would change and writes nothing.
pub fn write(
    workspace: &Path,
    repo_dir: &str,
    files: &[File],
    force: bool,
    dry_run: bool,
) -> Result<Outcome> {
    let mut out = Outcome::default();
    // Check everything before writing anything, so a refusal leaves no half-written state.
    let mut todo = Vec::new();
    for f in files {
        let path = workspace.join(&f.path);
        match std::fs::read_to_string(&path) {
            Ok(old) if old == f.content => out.unchanged.push(f.path.clone()),
            Ok(old) => {
                let ours = checksum_intact(&old) == Some(true) || f.path.ends_with(MANIFEST);
                if !ours && !force {
                    return Err(Error::HandEdited { path });
                }
                todo.push((path, f));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => todo.push((path, f)),
            Err(e) => return Err(Error::Io { path, source: e }),
        }
    }
    let mut stale = Vec::new();
    for rel in OPTIONAL {
        let rel = Path::new(repo_dir).join(rel);
        if files.iter().all(|f| f.path != rel) {
            let path = workspace.join(&rel);
            if let Ok(old) = std::fs::read_to_string(&path) {
                if checksum_intact(&old) == Some(true) || force {
                    stale.push((path, rel));
                }
            }
        }
    }
    for (path, f) in todo {
        if !dry_run {
            write_atomic(&path, &f.content)?;
        }
        out.written.push(f.path.clone());
    }
    for (path, rel) in stale {
        if !dry_run {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
        out.removed.push(rel);
    }
    Ok(out)
}

fn write_atomic(path: &Path, content: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!(
        ".{}.lre-tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    std::fs::write(&tmp, content).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}
