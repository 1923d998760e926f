//! `cargo bench -p lre-cli --bench publish`: publishing the e2e C/C++ toolchain's closure
//! (zig, busybox and the wrapper: about 330 MB of NAR, built by `e2e/toolchains/prepare.sh`)
//! to a fresh lre-server with `lre publish`, against Nix's own `nix copy --to` to the same
//! server's binary cache (its default xz, zstd, and uncompressed), all signed, each run on
//! a fresh server in the same sitting. Prints seconds per round and the ratio to `lre
//! publish`; asserts nothing. LRE_BENCH_ROUNDS (default 3) sets the rounds; xz runs in the
//! first only (it takes minutes).
//!
//! Needs Nix, pip (for the ziglang wheel) and a JDK's jlink, as the e2e tests do.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use lre_server::config::{Config, InstanceSettings, StoreConfig};

const NIX_CONFIG: &str = "experimental-features = nix-command flakes\nsandbox = false\n\
build-users-group =\nsubstituters =\n";

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn fresh_server(dir: &Path, pk: &str) -> lre_server::RunningServer {
    let mut c = Config {
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Config::default()
    };
    // In memory: this VM's disk throttles writes after a few hundred MB, which would time
    // the disk, and differently for whichever method comes later.
    let _ = dir;
    c.store = StoreConfig::memory(2 << 30);
    let mut s = InstanceSettings::default();
    s.nix.trusted_public_keys = vec![pk.to_string()];
    c.instance_settings.insert("".into(), s);
    lre_server::start(c).await.unwrap()
}

fn main() {
    let rounds: usize = std::env::var("LRE_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tc = root.join("target/bench-toolchains");
    run(
        "bash",
        &[
            root.join("e2e/toolchains/prepare.sh").to_str().unwrap(),
            tc.to_str().unwrap(),
        ],
    );
    let cc = run(
        "nix-build",
        &["--no-out-link", tc.join("cc.nix").to_str().unwrap()],
    );
    let closure = run("nix-store", &["--query", "--requisites", &cc]);
    let nar_bytes: u64 = closure
        .lines()
        .map(|p| {
            run("nix-store", &["--query", "--size", p])
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    // Every method reads the store from the page cache, the first one too.
    for p in closure.lines() {
        let out = Command::new("nix-store")
            .args(["--dump", p])
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let work = tempfile::tempdir().unwrap();
    let (sk, pk) = (work.path().join("sk"), work.path().join("pk"));
    run(
        "nix-store",
        &[
            "--generate-binary-cache-key",
            "bench-1",
            sk.to_str().unwrap(),
            pk.to_str().unwrap(),
        ],
    );
    let pk = std::fs::read_to_string(&pk).unwrap().trim().to_string();
    let lre = root.join("target/release/lre");
    assert!(
        lre.exists(),
        "build it first: cargo build --release -p lre-cli (the bench times the binary)"
    );
    println!(
        "closure of {cc}: {} paths, {:.0} MB of NAR; {rounds} rounds, each on a fresh server",
        closure.lines().count(),
        nar_bytes as f64 / 1e6
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let methods = [
        "lre publish",
        "nix copy (xz, Nix's default)",
        "nix copy ?compression=zstd",
        "nix copy ?compression=none",
    ];
    let mut times = vec![Vec::new(); methods.len()];
    for round in 0..rounds {
        for (i, method) in methods.iter().enumerate() {
            // xz takes minutes at Nix's level 6: once is enough to know it.
            if i == 1 && round > 0 {
                continue;
            }
            let server = rt.block_on(fresh_server(work.path(), &pk));
            let http = format!("http://{}", server.http_addr.unwrap());
            let grpc = format!("grpc://{}", server.grpc_addr);
            let sk = sk.to_str().unwrap();
            let t = Instant::now();
            let _guard = rt.enter();
            match i {
                0 => run(
                    lre.to_str().unwrap(),
                    &[
                        "publish",
                        "--store-path",
                        &cc,
                        "--endpoint",
                        &grpc,
                        "--server",
                        &http,
                        "--secret-key",
                        sk,
                    ],
                ),
                _ => {
                    let opts = ["", "&compression=zstd", "&compression=none"][i - 1];
                    run(
                        "nix",
                        &[
                            "copy",
                            "--to",
                            &format!("{http}/nix?secret-key={sk}{opts}"),
                            &cc,
                        ],
                    )
                }
            };
            let secs = t.elapsed().as_secs_f64();
            println!("  {method:<30} {secs:7.2} s");
            times[i].push(secs);
            rt.block_on(server.shutdown());
        }
    }
    let median = |v: &Vec<f64>| {
        let mut v = v.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = v.len();
        (v[(n - 1) / 2] + v[n / 2]) / 2.0
    };
    let base = median(&times[0]);
    println!("\nmedian (baseline: lre publish, same sitting)");
    for (m, t) in methods.iter().zip(&times) {
        let s = median(t);
        println!(
            "  {m:<30} {s:7.2} s  {:6.0} MB/s of NAR  {:5.2}x lre publish's time",
            nar_bytes as f64 / 1e6 / s,
            s / base
        );
    }
}
