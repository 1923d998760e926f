//! `lre publish` against a real lre-server and the real Nix 2.8 CLI: a closure of three
//! paths (one of 4 MiB) goes up over ByteStream and HTTP, through a proxy that cuts the
//! first connection half way through the big NAR (the upload resumes where the server got
//! to), the manifest is registered under the id `lre generate` pins, Nix substitutes the
//! closure back from lre into an empty store, and a second publish uploads nothing.
//! Needs Nix (`nix-bin`) and a writable `/nix/store`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use lre_server::auth::{Scope, TokenConfig};
use lre_server::config::{Config, InstanceSettings, StoreConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

const NIX_CONFIG: &str = "experimental-features = nix-command\nsandbox = false\n\
flake-registry =\nbuild-users-group =\nsubstituters =\nnarinfo-cache-negative-ttl = 0\n";

async fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(program)
        .args(args)
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("RUST_BACKTRACE", "1")
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

async fn ok(program: &str, args: &[&str]) -> String {
    let (ok, out, err) = run(program, args, &[]).await;
    assert!(ok, "{program} {args:?}:\n{err}");
    out
}

/// Forwards to `upstream`; the first connection is cut after `cut` bytes from the client.
async fn cutting_proxy(
    upstream: std::net::SocketAddr,
    cut: usize,
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cuts = Arc::new(AtomicUsize::new(0));
    let counter = cuts.clone();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
            let limit = if first { Some(cut) } else { None };
            first = false;
            let counter = counter.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let down = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
                let mut sent = 0;
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if limit.is_some_and(|l| sent + n > l) {
                        counter.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    sent += n;
                }
                down.abort();
            });
        }
    });
    (addr, cuts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_uploads_a_closure_resumes_a_cut_upload_and_nix_substitutes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (sk, pk) = (dir.path().join("key.sec"), dir.path().join("key.pub"));
    ok(
        "nix-store",
        &[
            "--generate-binary-cache-key",
            "publish-test-1",
            sk.to_str().unwrap(),
            pk.to_str().unwrap(),
        ],
    )
    .await;
    let pk_text = std::fs::read_to_string(&pk).unwrap().trim().to_string();
    std::fs::write(dir.path().join("token"), "publish-secret\n").unwrap();

    let mut config = Config {
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Config::default()
    };
    config.store = StoreConfig::memory(1 << 30);
    config.auth.anonymous = Scope::None;
    config.auth.tokens = vec![TokenConfig::for_secret(
        "ci",
        "publish-secret",
        Scope::ReadWrite,
    )];
    let mut settings = InstanceSettings::default();
    settings.nix.trusted_public_keys = vec![pk_text.clone()];
    config.instance_settings.insert("".into(), settings);
    let server = lre_server::start(config).await.unwrap();
    let http = format!("http://{}", server.http_addr.unwrap());
    let (proxy, cuts) = cutting_proxy(server.grpc_addr, 2 << 20).await;

    let nonce = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let expr = format!(
        r#"let mk = name: script: derivation {{ inherit name; system = builtins.currentSystem;
             builder = "/bin/sh"; args = [ "-c" script ]; }};
           dep = mk "lre-publish-dep-{nonce}" "echo dependency > $out";
           big = mk "lre-publish-big-{nonce}" "/bin/dd if=/dev/urandom of=$out bs=1048576 count=4 2>/dev/null";
         in mk "lre-publish-top-{nonce}" "echo ${{dep}} ${{big}} > $out""#
    );
    let top = ok("nix-build", &["--no-out-link", "-E", &expr]).await;

    let lre = env!("CARGO_BIN_EXE_lre");
    let token_file = dir.path().join("token");
    let args = [
        "publish",
        "--store-path",
        &top,
        "--endpoint",
        &format!("grpc://{proxy}"),
        "--server",
        &http,
        "--token-file",
        token_file.to_str().unwrap(),
        "--secret-key",
        sk.to_str().unwrap(),
    ];
    let (ok1, id, stderr) = run(lre, &args, &[]).await;
    assert!(ok1, "lre publish failed:\n{stderr}");
    assert!(
        stderr.contains("published 3 paths") && stderr.contains("0 already there, 3 NARs uploaded"),
        "{stderr}"
    );
    assert_eq!(
        cuts.load(Ordering::SeqCst),
        1,
        "the proxy never cut the upload"
    );
    // Resumed where the server got to, not started again.
    let offset: u64 = stderr
        .split("offset=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resume logged:\n{stderr}"));
    assert!(offset > 0, "the upload started again at 0:\n{stderr}");

    // The id is the one `lre generate` pins for this closure, and the server has the manifest.
    let mut closure: Vec<String> = ok("nix-store", &["--query", "--requisites", &top])
        .await
        .lines()
        .map(String::from)
        .collect();
    closure.sort();
    let manifest: String = closure.iter().map(|p| format!("{p}\n")).collect();
    assert_eq!(
        id,
        lre_cli::toolchain::Toolchain::closure_identity(&closure)
    );
    let hex = id.strip_prefix("lre-closure:sha256:").unwrap();
    let got = reqwest::Client::new()
        .get(format!("{http}/nix/closure/{hex}"))
        .bearer_auth("publish-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.text().await.unwrap(), manifest);

    // Nix substitutes the whole closure from lre into an empty store.
    let netrc = dir.path().join("netrc");
    let host = server.http_addr.unwrap().ip().to_string();
    std::fs::write(
        &netrc,
        format!("machine {host} login ci password publish-secret\n"),
    )
    .unwrap();
    let root = dir.path().join("root");
    let chroot = format!("local?root={}", root.display());
    let subst = format!("{http}/nix");
    let (ok2, _, err) = run(
        "nix-store",
        &[
            "--store",
            &chroot,
            "--realise",
            &top,
            "--option",
            "substituters",
            &subst,
            "--option",
            "trusted-public-keys",
            &pk_text,
            "--option",
            "netrc-file",
            netrc.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert!(ok2, "substituting from lre failed:\n{err}");
    for p in &closure {
        assert!(
            root.join(p.trim_start_matches('/')).exists(),
            "{p} was not substituted"
        );
    }

    // A second publish finds everything there.
    let (ok3, _, stderr) = run(lre, &args, &[]).await;
    assert!(ok3, "{stderr}");
    assert!(
        stderr.contains("3 already there, 0 NARs uploaded"),
        "{stderr}"
    );

    // Without a key, a path Nix holds no signature for is refused, and the error says how
    // to sign (as a message, not a backtrace, though RUST_BACKTRACE=1).
    let lone = ok("nix-build", &["--no-out-link", "-E", &format!(
        r#"derivation {{ name = "lre-publish-unsigned-{nonce}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo x > $out" ]; }}"#
    )]).await;
    let (ok4, _, stderr) = run(
        lre,
        &[
            "publish",
            "--store-path",
            &lone,
            "--endpoint",
            &format!("grpc://{}", server.grpc_addr),
            "--server",
            &http,
            "--token-file",
            token_file.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert!(!ok4);
    assert!(
        stderr.contains("not signed by a trusted key") && stderr.contains("secret-key"),
        "{stderr}"
    );
    assert!(!stderr.contains("Stack backtrace"), "{stderr}");
    server.shutdown().await;

    // The test's own paths leave the store again (4 MiB each run otherwise).
    let mut mine: Vec<&str> = closure.iter().map(String::as_str).collect();
    mine.push(&lone);
    ok("nix-store", &[&["--delete"][..], &mine].concat()).await;
}
