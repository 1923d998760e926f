//! Facts from Nix, asked through the `nix` CLI (there is no maintained Rust crate for the
//! store or the evaluator; `nix-compat` on crates.io is a placeholder).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::command::{display, run};
use crate::env::Env;
use crate::error::{Error, Result};

pub const STORE_DIR: &str = "/nix/store";

/// A toolchain package, realised: its output path and the Env it declares.
#[derive(Clone, Debug)]
pub struct Realised {
    pub out: PathBuf,
    pub env: Env,
}

fn nix() -> Command {
    let mut c = Command::new("nix");
    // Works whether or not the user's nix.conf enables the new CLI.
    c.args(["--extra-experimental-features", "nix-command flakes"]);
    c
}

/// What kind of thing the user named, which decides how Nix is asked about it.
#[derive(Debug, PartialEq)]
enum Installable<'a> {
    StorePath(&'a str),
    File(&'a str),
    Flake(&'a str),
}

fn classify(s: &str) -> Installable<'_> {
    if s.starts_with(STORE_DIR) && !s.contains('#') {
        Installable::StorePath(s)
    } else if !s.contains('#') && (s.ends_with(".nix") || Path::new(s).is_file()) {
        Installable::File(s)
    } else {
        Installable::Flake(s)
    }
}

/// The Nix function that pulls the Env out of a package: `passthru.Env`, else `meta.Env`.
/// A file holding a function is called with no arguments, as `nix build -f` does.
const ENV_OF: &str = "d: let v = if builtins.isFunction d then d {} else d; \
    in v.passthru.Env or v.meta.Env or v.Env or null";

/// Evaluates and builds `installable`; `role` ("cc" or "java") decides the default Env of a
/// bare store path, which carries no metadata.
pub fn realise(installable: &str, role: &str) -> Result<Realised> {
    let kind = classify(installable);
    let (out, env) = match kind {
        Installable::StorePath(p) => {
            run(Command::new("nix-store").args(["--realise", p]), b"")?;
            (PathBuf::from(p), None)
        }
        Installable::File(f) => {
            let out = build(&["-f", f])?;
            (out, eval_env(&["-f", f])?)
        }
        Installable::Flake(r) => {
            let out = build(&[r])?;
            (out, eval_env(&[r])?)
        }
    };
    let env = match env {
        Some(entries) => Env::from_entries(&entries)?,
        None => default_env(&out, role)?,
    };
    Ok(Realised { out, env })
}

fn build(args: &[&str]) -> Result<PathBuf> {
    let mut cmd = nix();
    cmd.args(["build", "--json", "--no-link"]).args(args);
    let (stdout, _) = run(&mut cmd, b"")?;
    #[derive(Deserialize)]
    struct Built {
        outputs: std::collections::BTreeMap<String, String>,
    }
    let built: Vec<Built> = serde_json::from_str(&stdout).map_err(|e| Error::Output {
        command: display(&cmd),
        reason: e.to_string(),
    })?;
    built
        .first()
        .and_then(|b| b.outputs.get("out").or_else(|| b.outputs.values().next()))
        .map(PathBuf::from)
        .ok_or_else(|| Error::Output {
            command: display(&cmd),
            reason: "no output path".into(),
        })
}

fn eval_env(args: &[&str]) -> Result<Option<Vec<String>>> {
    let mut cmd = nix();
    cmd.args(["eval", "--json"])
        .args(args)
        .args(["--apply", ENV_OF]);
    let (stdout, _) = run(&mut cmd, b"")?;
    serde_json::from_str(&stdout).map_err(|e| Error::Output {
        command: display(&cmd),
        reason: format!("Env must be a list of NAME=VALUE strings: {e}"),
    })
}

/// A bare store path: its bin/ is the PATH; the role's main variable points into it.
fn default_env(out: &Path, role: &str) -> Result<Env> {
    let bin = out.join("bin");
    let mut entries = vec![format!("PATH={}", bin.display())];
    match role {
        "java" => entries.push(format!("JAVA_HOME={}", out.display())),
        _ => {
            let cc = ["cc", "clang", "gcc"]
                .iter()
                .map(|n| bin.join(n))
                .find(|p| p.exists());
            let cc = cc.ok_or_else(|| {
                Error::Invalid(format!(
                    "{} has no Env in passthru/meta and no bin/cc, bin/clang or bin/gcc",
                    out.display()
                ))
            })?;
            entries.push(format!("CC={}", cc.display()));
        }
    }
    Env::from_entries(&entries)
}

/// One store path of a closure, as `nix path-info --json` describes it.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct PathInfo {
    #[serde(default)]
    pub path: String,
    #[serde(rename = "narHash")]
    pub nar_hash: Option<String>,
    #[serde(rename = "narSize")]
    pub nar_size: Option<u64>,
    #[serde(default)]
    pub references: Vec<String>,
    /// With `--sigs`: the path's signatures, `name:base64`.
    #[serde(default)]
    pub signatures: Vec<String>,
    /// A content-addressed path's address (`fixed:r:sha256:…`).
    #[serde(default)]
    pub ca: Option<String>,
    #[serde(default)]
    pub deriver: Option<String>,
}

/// The closure of `paths`, sorted by path.
pub fn closure(paths: &[&str]) -> Result<Vec<PathInfo>> {
    let mut cmd = nix();
    cmd.args(["path-info", "--json", "--recursive", "--sigs"])
        .args(paths);
    let (stdout, _) = run(&mut cmd, b"")?;
    parse_path_info(&stdout).map_err(|reason| Error::Output {
        command: display(&cmd),
        reason,
    })
}

/// `nix path-info --json` printed an array of objects with a `path` field up to Nix 2.18,
/// and an object keyed by path since; both are accepted.
pub fn parse_path_info(json: &str) -> std::result::Result<Vec<PathInfo>, String> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let mut infos = match value {
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(serde_json::from_value::<PathInfo>)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?,
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(path, v)| {
                // Newer Nix prints null for a path that is not valid.
                if v.is_null() {
                    return Err(format!("{path} is not a valid store path"));
                }
                let mut info: PathInfo = serde_json::from_value(v).map_err(|e| e.to_string())?;
                info.path = path;
                Ok(info)
            })
            .collect::<std::result::Result<Vec<_>, _>>()?,
        _ => return Err("expected a JSON array or object".into()),
    };
    if let Some(bad) = infos.iter().find(|i| !i.path.starts_with(STORE_DIR)) {
        return Err(format!("{:?} is not a store path", bad.path));
    }
    infos.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(infos)
}

/// The store path a path lies in: `/nix/store/<hash>-<name>` of `/nix/store/<hash>-<name>/x/y`.
pub fn store_path_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix(STORE_DIR)?.strip_prefix('/')?;
    let end = rest.find('/').unwrap_or(rest.len());
    (end > 0).then(|| &path[..STORE_DIR.len() + 1 + end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_path_info_shapes_parse_alike() {
        let old = r#"[{"path":"/nix/store/b-x","narHash":"sha256-B","narSize":2,"references":["/nix/store/a-y"]},
                      {"path":"/nix/store/a-y","narHash":"sha256-A","narSize":1,"references":[]}]"#;
        let new = r#"{"/nix/store/a-y":{"narHash":"sha256-A","narSize":1,"references":[]},
                      "/nix/store/b-x":{"narHash":"sha256-B","narSize":2,"references":["/nix/store/a-y"]}}"#;
        let a = parse_path_info(old).unwrap();
        assert_eq!(a, parse_path_info(new).unwrap());
        assert_eq!(a[0].path, "/nix/store/a-y");
        assert_eq!(a[1].references, vec!["/nix/store/a-y".to_string()]);
        assert!(parse_path_info(r#"{"/nix/store/a-y":null}"#)
            .unwrap_err()
            .contains("not a valid"));
        assert!(parse_path_info(r#"[{"path":"/usr/bin"}]"#).is_err());
    }

    #[test]
    fn installables_are_told_apart() {
        assert_eq!(
            classify("/nix/store/abc-cc"),
            Installable::StorePath("/nix/store/abc-cc")
        );
        assert_eq!(
            classify("./toolchain.nix"),
            Installable::File("./toolchain.nix")
        );
        assert_eq!(classify(".#lre-cc"), Installable::Flake(".#lre-cc"));
        assert_eq!(classify("github:o/r#x"), Installable::Flake("github:o/r#x"));
    }

    #[test]
    fn store_path_of_strips_the_inside() {
        assert_eq!(
            store_path_of("/nix/store/abc-zig/lib/include"),
            Some("/nix/store/abc-zig")
        );
        assert_eq!(
            store_path_of("/nix/store/abc-zig"),
            Some("/nix/store/abc-zig")
        );
        assert_eq!(store_path_of("/usr/include"), None);
        assert_eq!(store_path_of("/nix/store/"), None);
    }
}
