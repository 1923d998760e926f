//! What one action cannot do to another, and inputs the runner must fetch in pieces: real
//! actions through the runner, a real server as its CAS and real bubblewrap.

mod common;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use common::runner_env::{assert_refused, env, env_with, file, result, run_bounded, Env};
use lre_worker::cas::digest_of;
use lre_worker::sandbox::DEFAULT_UID_BASE;
use lre_worker::ActionUids;
use prost::Message;
use tonic::Code;

async fn output(e: &Env, r: &re::ActionResult, path: &str) -> String {
    let f = r
        .output_files
        .iter()
        .find(|f| f.path == path)
        .unwrap_or_else(|| panic!("no output {path}: {r:?}"));
    String::from_utf8(e.get(f.digest.as_ref().unwrap()).await).unwrap()
}

fn must_be_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "action uids need a root worker: run this test as root (CI does)"
    );
}

/// Defect 4: on a worker with capacity 2, action A overwrote its hard-linked input, slept
/// and restored it; B, started meanwhile with the same input, saw A's bytes and its result
/// was cached. Now each action runs as a uid that does not own the cache's files.
#[tokio::test]
async fn a_concurrent_action_cannot_change_the_inputs_another_sees() {
    must_be_root();
    let e = env().await;
    let data = b"original\n".to_vec();
    e.put(std::slice::from_ref(&data)).await;
    let root = re::Directory {
        files: vec![file("in.txt", &data, false)],
        ..Default::default()
    };
    let attacker = "id -u > uid; \
        if chmod u+w in.txt 2>/dev/null || printf EVIL > in.txt 2>/dev/null; \
        then echo wrote; else echo denied; fi > verdict; \
        printf EVIL > in.txt 2>/dev/null; sleep 3";
    let victim = "sleep 1; id -u > uid; cat in.txt > seen";
    let (a, b) = tokio::join!(
        run_bounded(&e, &root, attacker, &["uid", "verdict"]),
        run_bounded(&e, &root, victim, &["uid", "seen"]),
    );
    let (a, b) = (result(&a), result(&b));
    assert_eq!(output(&e, &a, "verdict").await, "denied\n");
    assert_eq!(output(&e, &b, "seen").await, "original\n");
    let (ua, ub) = (output(&e, &a, "uid").await, output(&e, &b, "uid").await);
    let (ua, ub): (u32, u32) = (ua.trim().parse().unwrap(), ub.trim().parse().unwrap());
    assert!(
        ua >= DEFAULT_UID_BASE && ub >= DEFAULT_UID_BASE,
        "{ua} {ub}"
    );
    assert_ne!(ua, ub, "concurrent actions run as different uids");
    // Outputs can still be written anywhere in the exec root, input directories included.
    let sub = re::Directory {
        files: vec![file("src.c", &data, false)],
        ..Default::default()
    };
    let sub_raw = sub.encode_to_vec();
    e.put(std::slice::from_ref(&sub_raw)).await;
    let nested = re::Directory {
        directories: vec![re::DirectoryNode {
            name: "pkg".into(),
            digest: Some(digest_of(&sub_raw)),
        }],
        ..Default::default()
    };
    let r = result(&run_bounded(&e, &nested, "cat pkg/src.c > pkg/out.o", &["pkg/out.o"]).await);
    assert_eq!(r.exit_code, 0);
    assert_eq!(output(&e, &r, "pkg/out.o").await, "original\n");
    e.server.shutdown().await;
}

/// Without uids of their own (a worker that is not root), the check after the run still
/// catches an action that changed its input, fails it, and drops the cached copy.
#[tokio::test]
async fn without_action_uids_the_tamper_check_still_fails_the_writer() {
    let e = env_with(ActionUids::Off).await;
    let data = b"pristine\n".to_vec();
    e.put(std::slice::from_ref(&data)).await;
    let root = re::Directory {
        files: vec![file("in.txt", &data, false)],
        ..Default::default()
    };
    let f = run_bounded(
        &e,
        &root,
        "chmod u+w in.txt && echo tampered >> in.txt",
        &[],
    )
    .await;
    assert_refused(&f, Code::InvalidArgument, "modified its input file");
    let r = result(&run_bounded(&e, &root, "cat in.txt > out", &["out"]).await);
    assert_eq!(output(&e, &r, "out").await, "pristine\n");
    e.server.shutdown().await;
}

/// Issue 21, defect 11: on a worker without uids of its own per action, A made its
/// hard-linked input writable, overwrote it, and restored it seconds later; B, running
/// meanwhile with the same input, read A's bytes, succeeded, and its result was cached.
/// Now a cached file is linked into one running action at a time; B gets a copy.
#[tokio::test]
async fn without_action_uids_a_concurrent_action_never_reads_anothers_writes() {
    let e = env_with(ActionUids::Off).await;
    let data = b"original\n".to_vec();
    e.put(std::slice::from_ref(&data)).await;
    let root = re::Directory {
        files: vec![file("in.txt", &data, false)],
        ..Default::default()
    };
    // Both tamper-and-restore, so whichever starts first is the writer the other meets.
    let attacker = "chmod u+w in.txt && printf EVIL > in.txt && sleep 3 && \
        printf 'original\\n' > in.txt && chmod a-w in.txt && echo done > out";
    // The victim reads while the attacker's bytes are there, and ends after they are
    // restored: the check after its run finds its input intact.
    let victim = "sleep 1; cat in.txt > seen; sleep 4";
    let (a, b) = tokio::join!(
        run_bounded(&e, &root, attacker, &["out"]),
        run_bounded(&e, &root, victim, &["seen"]),
    );
    let (a, b) = (result(&a), result(&b));
    assert_eq!(a.exit_code, 0, "the attacker restored what it wrote: {a:?}");
    assert_eq!(
        output(&e, &b, "seen").await,
        "original\n",
        "the victim read the attacker's bytes through a shared file"
    );
    // The cached copy is still the original, for every later action.
    let r = result(&run_bounded(&e, &root, "cat in.txt > out", &["out"]).await);
    assert_eq!(output(&e, &r, "out").await, "original\n");
    e.server.shutdown().await;
}

/// The same attack against the real `lre-worker` binary running as an unprivileged user
/// (`nobody`, which cannot have uids of its own per action), through a real server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_root_worker_keeps_a_concurrent_actions_writes_from_another() {
    use std::os::unix::fs::PermissionsExt;
    must_be_root(); // to become nobody
    const CI: &str = "ci-secret-nonroot-0000000000000001";
    const W: &str = "worker-secret-nonroot-00000000002";
    let mut c = lre_server::Config::ephemeral();
    c.execution.enabled = true;
    c.execution.keepalive_seconds = 1;
    c.shutdown_grace_seconds = 1;
    c.auth.tokens = vec![
        lre_server::auth::TokenConfig::for_secret("ci", CI, lre_server::auth::Scope::ReadWrite),
        lre_server::auth::TokenConfig::for_secret("w", W, lre_server::auth::Scope::Worker),
    ];
    let s = lre_server::start(c).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (work, token) = (dir.path().join("work"), dir.path().join("token"));
    std::fs::create_dir(&work).unwrap();
    std::fs::write(&token, W).unwrap();
    for p in [dir.path(), &work, &token] {
        std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut worker = tokio::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_lre-worker"))
        .args([
            "--server",
            &format!("http://{}", s.grpc_addr),
            "--id",
            "nonroot",
        ])
        .args(["--capacity", "2"])
        .arg("--work-dir")
        .arg(&work)
        .arg("--token-file")
        .arg(&token)
        .kill_on_drop(true)
        .spawn()
        .expect("setpriv (util-linux) runs the worker");
    assert!(
        common::wait_workers(&s, 1).await,
        "the non-root worker attached"
    );
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", s.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let exec = |argv: &'static [&'static str]| {
        let ch = ch.clone();
        async move {
            common::execute(
                &ch,
                common::Exec {
                    instance: "",
                    argv,
                    input: b"original\n",
                    secret: Some(CI),
                    invocation: None,
                },
            )
            .await
            .unwrap()
        }
    };
    let (a, b) = tokio::join!(
        exec(&[
            "/bin/sh",
            "-c",
            "id -u; chmod u+w in.txt && printf EVIL > in.txt && sleep 3 && \
             printf 'original\\n' > in.txt && chmod a-w in.txt"
        ]),
        exec(&["/bin/sh", "-c", "sleep 1; cat in.txt; sleep 4"]),
    );
    let uid = common::stdout_of(&ch, "", Some(CI), &a).await;
    assert_eq!(
        uid.trim(),
        "65534",
        "the action ran as the worker's own uid"
    );
    assert_eq!(
        common::stdout_of(&ch, "", Some(CI), &b).await,
        "original\n",
        "the victim read the attacker's bytes"
    );
    worker.kill().await.unwrap();
    s.shutdown().await;
}

/// An input bigger than a batch comes over ByteStream into a file, hashed on the way.
#[tokio::test]
async fn a_large_input_is_streamed_to_disk_and_verified() {
    let e = env().await;
    let big: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    e.put(std::slice::from_ref(&big)).await;
    let root = re::Directory {
        files: vec![file("big.bin", &big, false), file("big.sh", &big, true)],
        ..Default::default()
    };
    let r = result(&run_bounded(&e, &root, "sha256sum big.bin big.sh > sums", &["sums"]).await);
    let want = digest_of(&big).hash;
    let sums = output(&e, &r, "sums").await;
    assert_eq!(sums.matches(&want).count(), 2, "{sums}");
    e.server.shutdown().await;
}

/// A symlink with a long target: a cheap way to make big Directory messages.
fn link(name: String) -> re::SymlinkNode {
    re::SymlinkNode {
        name,
        target: "t".repeat(4000),
        ..Default::default()
    }
}

/// One level of an input tree used to go in one BatchReadBlobs: a level over 4 MiB failed.
/// Now a level is fetched in batches, and a Directory over a batch comes over ByteStream.
#[tokio::test]
async fn a_tree_level_over_4_mib_and_a_3_mib_directory_are_fetched() {
    let e = env().await;
    let mut subs = Vec::new();
    for d in 0..300 {
        let dir = re::Directory {
            symlinks: (0..4).map(|i| link(format!("l{d}-{i}"))).collect(),
            ..Default::default()
        };
        subs.push((format!("d{d:03}"), dir.encode_to_vec()));
    }
    let huge = re::Directory {
        symlinks: (0..800).map(|i| link(format!("h{i:04}"))).collect(),
        ..Default::default()
    }
    .encode_to_vec();
    assert!(huge.len() > 3 << 20);
    subs.push(("huge".into(), huge));
    let level: usize = subs.iter().map(|(_, b)| b.len()).sum();
    assert!(level > 4 << 20, "the level is {level} bytes");
    for chunk in subs.chunks(150) {
        e.put(&chunk.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>())
            .await;
    }
    let root = re::Directory {
        directories: subs
            .iter()
            .map(|(name, b)| re::DirectoryNode {
                name: name.clone(),
                digest: Some(digest_of(b)),
            })
            .collect(),
        ..Default::default()
    };
    let r = result(
        &run_bounded(
            &e,
            &root,
            "ls d299 | wc -l > n; ls huge | wc -l >> n",
            &["n"],
        )
        .await,
    );
    assert_eq!(output(&e, &r, "n").await, "4\n800\n");
    e.server.shutdown().await;
}
