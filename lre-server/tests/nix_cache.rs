//! lre-server as a Nix binary cache, driven by the real Nix 2.8 CLI (`nix copy --to`,
//! `nix-store --realise` from it as a substituter, netrc Basic auth with lre tokens).
//! Needs Nix installed (`nix-bin`) and a writable `/nix/store`: each run builds two tiny
//! derivations of its own (names carry a nonce), and deletes them again.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use lre_server::auth::Scope;
use lre_server::config::InstanceSettings;
use tokio::process::Command;

const NIX_CONFIG: &str = "experimental-features = nix-command\nsandbox = false\n\
flake-registry =\nnarinfo-cache-negative-ttl = 0\nnarinfo-cache-positive-ttl = 0\n\
build-users-group =\nsubstituters =\n";

struct Nix {
    dir: tempfile::TempDir,
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Nix {
    fn new() -> Nix {
        Nix {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs a Nix command with its own cache directory and `netrc` (if written).
    async fn run(&self, program: &str, args: &[&str]) -> Out {
        let mut config = NIX_CONFIG.to_string();
        let netrc = self.path("netrc");
        if netrc.exists() {
            config.push_str(&format!("netrc-file = {}\n", netrc.display()));
        }
        let out = Command::new(program)
            .args(args)
            .env("NIX_CONFIG", config)
            .env("XDG_CACHE_HOME", self.path("cache"))
            .output()
            .await
            .unwrap_or_else(|e| panic!("running {program} (is nix-bin installed?): {e}"));
        Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        }
    }

    async fn ok(&self, program: &str, args: &[&str]) -> String {
        let o = self.run(program, args).await;
        assert!(o.ok, "{program} {args:?} failed:\n{}", o.stderr);
        o.stdout
    }

    fn netrc(&self, host: &str, login: &str, password: &str) {
        std::fs::write(
            self.path("netrc"),
            format!("machine {host} login {login} password {password}\n"),
        )
        .unwrap();
    }
}

/// Two input-addressed paths, `top` referring to `dep`, built here (so unsigned).
async fn build_pair(nix: &Nix, nonce: &str) -> (String, String) {
    let expr = format!(
        r#"let dep = derivation {{ name = "lre-nixcache-dep-{nonce}"; system = builtins.currentSystem;
             builder = "/bin/sh"; args = [ "-c" "echo dependency > $out" ]; }};
         in derivation {{ name = "lre-nixcache-top-{nonce}"; system = builtins.currentSystem;
             builder = "/bin/sh"; args = [ "-c" "echo ${{dep}} > $out" ]; }}"#
    );
    let top = nix.ok("nix-build", &["--no-out-link", "-E", &expr]).await;
    let refs = nix
        .ok("nix-store", &["--query", "--references", &top])
        .await;
    let dep = refs.lines().next().expect("top refers to dep").to_string();
    (top, dep)
}

fn hash_part(path: &str) -> &str {
    &Path::new(path).file_name().unwrap().to_str().unwrap()[..32]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nix_copies_to_lre_and_substitutes_back_from_it() {
    let nix = Nix::new();
    let (sk, pk) = (nix.path("key.sec"), nix.path("key.pub"));
    let nonce = uuid_like();
    let key_name = format!("lre-test-{nonce}");
    nix.ok(
        "nix-store",
        &[
            "--generate-binary-cache-key",
            &key_name,
            sk.to_str().unwrap(),
            pk.to_str().unwrap(),
        ],
    )
    .await;
    let pk_text = std::fs::read_to_string(&pk).unwrap();

    let mut config = memory_config();
    config.auth.anonymous = Scope::None;
    config.auth.tokens = vec![
        token("ci", "ci-secret", Scope::ReadWrite, Some(vec!["", "main"])),
        token("reader", "reader-secret", Scope::Read, Some(vec!["main"])),
        token(
            "other",
            "other-secret",
            Scope::ReadWrite,
            Some(vec!["other"]),
        ),
    ];
    for instance in ["", "main"] {
        let mut s = InstanceSettings::default();
        s.nix.trusted_public_keys = vec![pk_text.trim().to_string()];
        config.instance_settings.insert(instance.into(), s);
    }
    let server = start(config).await;
    let addr = server.http_addr.unwrap();
    let host = addr.ip().to_string();
    let base = format!("http://{addr}");
    let (top, dep) = build_pair(&nix, &nonce).await;
    let narinfo_url =
        |prefix: &str, path: &str| format!("{base}{prefix}/nix/{}.narinfo", hash_part(path));
    let http = reqwest::Client::new();
    let status = |url: String, user: &'static str, pass: &'static str| {
        let http = http.clone();
        async move {
            http.get(url)
                .basic_auth(user, Some(pass))
                .send()
                .await
                .unwrap()
                .status()
        }
    };

    // Unsigned, Nix's defaults (xz): refused, with the way to sign in Nix's own output.
    nix.netrc(&host, "ci", "ci-secret");
    let copy = nix
        .run("nix", &["copy", "--to", &format!("{base}/nix"), &top])
        .await;
    assert!(!copy.ok, "an unsigned copy was accepted");
    assert!(
        copy.stderr.contains("secret-key"),
        "Nix did not show how to sign:\n{}",
        copy.stderr
    );
    assert_eq!(status(narinfo_url("", &dep), "ci", "ci-secret").await, 404);

    // Signed, default compression (xz).
    nix.ok(
        "nix",
        &[
            "copy",
            "--to",
            &format!("{base}/nix?secret-key={}", sk.display()),
            &top,
        ],
    )
    .await;
    for p in [&top, &dep] {
        assert_eq!(
            status(narinfo_url("", p), "ci", "ci-secret").await,
            200,
            "{p}"
        );
    }
    // Signed, zstd, to instance main.
    nix.ok(
        "nix",
        &[
            "copy",
            "--to",
            &format!(
                "{base}/main/nix?compression=zstd&secret-key={}",
                sk.display()
            ),
            &top,
        ],
    )
    .await;
    // A token of another instance gets nothing: no read, no copy.
    assert_eq!(
        status(narinfo_url("/main", &top), "other", "other-secret").await,
        403
    );
    nix.netrc(&host, "other", "other-secret");
    let copy = nix
        .run(
            "nix",
            &[
                "copy",
                "--to",
                &format!("{base}/main/nix?secret-key={}", sk.display()),
                &top,
            ],
        )
        .await;
    assert!(!copy.ok, "a token of another instance copied");
    assert!(
        copy.stderr.contains("403"),
        "refused for another reason:\n{}",
        copy.stderr
    );

    // Delete both paths, then substitute them back from instance main as a reader.
    nix.ok("nix-store", &["--delete", &top, &dep]).await;
    assert!(!Path::new(&top).exists());
    nix.netrc(&host, "reader", "reader-secret");
    let subst = format!("{base}/main/nix");
    let realise = [
        "--realise",
        &top,
        "--option",
        "substituters",
        &subst,
        "--option",
        "trusted-public-keys",
        pk_text.trim(),
    ];
    nix.ok("nix-store", &realise).await;
    assert_eq!(std::fs::read_to_string(&top).unwrap().trim(), dep);
    assert_eq!(std::fs::read_to_string(&dep).unwrap().trim(), "dependency");

    // Into an empty chroot store too (a client host with nothing in its store).
    let root = nix.path("root");
    let chroot = format!("local?root={}", root.display());
    let mut args = vec!["--store", chroot.as_str()];
    args.extend_from_slice(&realise);
    nix.ok("nix-store", &args).await;
    assert!(root.join(top.trim_start_matches('/')).is_file());

    // A client trusting another key refuses what lre serves.
    nix.ok("nix-store", &["--delete", &top, &dep]).await;
    let wrong = "someone-else:ZMgFPk3lPVzj+qoIrIS5OzcCDp9WLYhpa5O+a0R0wqM=";
    let o = nix
        .run(
            "nix-store",
            &[
                "--realise",
                &top,
                "--option",
                "substituters",
                &subst,
                "--option",
                "trusted-public-keys",
                wrong,
            ],
        )
        .await;
    assert!(!o.ok && !Path::new(&top).exists());
    server.shutdown().await;
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}{:x}", t, std::process::id())
}
