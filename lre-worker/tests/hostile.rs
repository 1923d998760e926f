//! Hostile actions, run as real actions through the runner (real server as CAS, real
//! bubblewrap): none may crash or hang the worker, or make it touch the host outside the
//! exec root. Each test failed on the code before its fix.

mod common;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use common::proxy::FreezingProxy;
use common::runner_env::{assert_refused, env, result, run_bounded, Env};
use tonic::Code;

fn actions_left(e: &Env) -> usize {
    std::fs::read_dir(e.work.path().join("actions"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_directory_chain_30000_deep_is_cleaned_up_without_crashing() {
    let e = env().await;
    // std's remove_dir_all recurses once per level: at 100,000 levels (30,000 overflow a
    // 2 MiB stack already) this aborted the worker with a stack
    // overflow, and the requeued action then took down the next worker.
    let script =
        "python3 -c 'import os\nfor _ in range(30000):\n os.mkdir(\"d\"); os.chdir(\"d\")'";
    let f = run_bounded(&e, &re::Directory::default(), script, &[]).await;
    assert_eq!(result(&f).exit_code, 0, "{}", f.status_message);
    assert_eq!(actions_left(&e), 0, "the action directory was removed");
    // The same depth declared as an output is refused, not walked.
    let f = run_bounded(
        &e,
        &re::Directory::default(),
        &format!("mkdir out && cd out && {script}"),
        &["out"],
    )
    .await;
    assert_eq!(f.status_code, Code::InvalidArgument as i32);
    assert!(
        f.status_message.contains("levels deep"),
        "{}",
        f.status_message
    );
    assert_eq!(actions_left(&e), 0);
}

#[tokio::test]
async fn special_files_as_outputs_are_refused_at_once() {
    let e = env().await;
    // Opening a FIFO to hash it blocked the worker forever (no keepalives, no SIGTERM).
    for (script, outputs) in [
        ("mkfifo out", vec!["out"]),
        ("mkdir d && mkfifo d/p", vec!["d"]),
        (
            "python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"sock\")'",
            vec!["sock"],
        ),
    ] {
        let f = run_bounded(&e, &re::Directory::default(), script, &outputs).await;
        assert_eq!(
            f.status_code,
            Code::InvalidArgument as i32,
            "{script}: {}",
            f.status_message
        );
        assert!(
            f.status_message.contains("is a FIFO") || f.status_message.contains("is a socket"),
            "{script}: {}",
            f.status_message
        );
    }
    let f = run_bounded(&e, &re::Directory::default(), "echo ok > out", &["out"]).await;
    assert_eq!(result(&f).exit_code, 0, "the worker carries on");
}

#[tokio::test]
async fn an_input_symlink_cannot_make_the_worker_create_host_directories() {
    let e = env().await;
    let target = std::env::temp_dir().join(format!("lre-hostile-target-{}", std::process::id()));
    std::fs::create_dir_all(&target).unwrap();
    let root = re::Directory {
        symlinks: vec![re::SymlinkNode {
            name: "o".into(),
            target: target.display().to_string(),
            ..Default::default()
        }],
        ..Default::default()
    };
    // Before: the worker, as root and outside the sandbox, made `target/x` for the output.
    let f = run_bounded(&e, &root, "true", &["o/x/y"]).await;
    assert_ne!(f.status_code, 0);
    assert!(
        f.status_message.contains("o is a symlink"),
        "{}",
        f.status_message
    );
    assert!(
        !target.join("x").exists(),
        "the worker created a directory on the host"
    );
    // The working directory is held to the same rule.
    let f = e
        .run_command(&root, vec!["/bin/true".into()], &["y"], "o/w", 60_000)
        .await;
    assert_ne!(f.status_code, 0);
    assert!(
        !target.join("w").exists(),
        "the worker created a directory on the host"
    );
    std::fs::remove_dir_all(&target).unwrap();
}

#[tokio::test]
async fn output_symlinks_that_escape_through_other_symlinks_are_refused() {
    let e = env().await;
    // On paper `esc` ends inside (a/b/h/up/../../../etc/passwd is a/etc/passwd), but `up`
    // leads three levels up and out, so the reader would follow it to the host's file.
    let script =
        "mkdir -p a/b/h && ln -s ../../.. a/b/h/up && ln -s a/b/h/up/../../../etc/passwd esc";
    let f = run_bounded(&e, &re::Directory::default(), script, &["esc"]).await;
    assert_refused(&f, Code::InvalidArgument, "escapes the exec root");
    // A link that stays inside through another link is fine.
    let script = "mkdir -p a/b && ln -s b a/l && echo hi > a/b/f && ln -s a/l/f ok";
    let f = run_bounded(&e, &re::Directory::default(), script, &["ok"]).await;
    let r = result(&f);
    assert_eq!(r.output_symlinks.len(), 1);
    assert_eq!(r.output_symlinks[0].target, "a/l/f");
}

#[tokio::test]
async fn an_input_gone_from_the_cas_is_reported_by_digest() {
    let e = env().await;
    // Execute checks inputs first, but one can be evicted before the worker fetches it:
    // then the worker must say which, so the server answers with PreconditionFailure
    // MISSING and Bazel uploads it again instead of failing the build.
    let gone = b"never uploaded";
    let root = re::Directory {
        files: vec![common::runner_env::file("in.txt", gone, false)],
        ..Default::default()
    };
    let f = run_bounded(&e, &root, "cat in.txt", &[]).await;
    assert_eq!(
        f.status_code,
        Code::FailedPrecondition as i32,
        "{}",
        f.status_message
    );
    let d = lre_worker::cas::digest_of(gone);
    assert_eq!(f.missing_blobs, [format!("{}/{}", d.hash, d.size_bytes)]);
}

#[tokio::test]
async fn a_directory_bomb_is_refused_before_anything_is_written() {
    let e = env().await;
    // 21 small blobs; each level names the one below twice: 2^20 files once expanded.
    // Expanding it took minutes and ended in EMLINK (65,000 hard links to one file).
    let leaf = b"x".to_vec();
    let mut dir = re::Directory {
        files: vec![common::runner_env::file("f", &leaf, false)],
        ..Default::default()
    };
    let mut blobs = vec![leaf];
    for _ in 0..20 {
        let raw = prost::Message::encode_to_vec(&dir);
        let d = lre_worker::cas::digest_of(&raw);
        blobs.push(raw);
        dir = re::Directory {
            directories: ["a", "b"]
                .map(|n| re::DirectoryNode {
                    name: n.into(),
                    digest: Some(d.clone()),
                })
                .to_vec(),
            ..Default::default()
        };
    }
    e.put(&blobs).await;
    let f = run_bounded(&e, &dir, "true", &[]).await;
    assert_eq!(
        f.status_code,
        Code::InvalidArgument as i32,
        "{}",
        f.status_message
    );
    assert!(
        f.status_message
            .contains("expands to more than 500000 entries"),
        "{}",
        f.status_message
    );
    assert_eq!(actions_left(&e), 0);

    // A chain of 300 distinct directories is refused by depth.
    let mut dir = re::Directory::default();
    let mut blobs = vec![];
    for i in 0..300 {
        let raw = prost::Message::encode_to_vec(&dir);
        let d = lre_worker::cas::digest_of(&raw);
        blobs.push(raw);
        dir = re::Directory {
            directories: vec![re::DirectoryNode {
                name: format!("d{i}"),
                digest: Some(d),
            }],
            ..Default::default()
        };
    }
    e.put(&blobs).await;
    let f = run_bounded(&e, &dir, "true", &[]).await;
    assert_refused(&f, Code::InvalidArgument, "levels deep");
}

/// The action's timeout covers uploading its outputs too: outputs that cannot reach the
/// server before the deadline (here a proxy stops passing the upload on after 1 MiB) make
/// the action DEADLINE_EXCEEDED, reported by the worker before the scheduler would drop
/// it, and nothing partial is stored.
#[tokio::test]
async fn outputs_that_cannot_be_uploaded_before_the_timeout_are_deadline_exceeded() {
    let mut e = env().await;
    let proxy = FreezingProxy::start(e.server.grpc_addr, 1 << 20).await;
    let channel = lre_worker::client::connect(
        &format!("http://{}", proxy.addr),
        lre_worker::Credential::none(),
        &lre_worker::ClientTls::default(),
    )
    .unwrap();
    e.runner.cas = std::sync::Arc::new(
        lre_worker::cas::LocalCas::open(
            e.work.path().join("cas-via-proxy"),
            lre_worker::server_cas::ServerCas::new(channel.clone()),
            1 << 30,
        )
        .await
        .unwrap(),
    );
    e.runner.channel = channel;
    // No grace after the process ends, so the upload alone decides (OUTPUT_GRACE is 10 s).
    e.runner.output_grace = std::time::Duration::ZERO;
    let f = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        e.run(
            &re::Directory::default(),
            "head -c 20000000 /dev/zero > big",
            &["big"],
            3_000,
        ),
    )
    .await
    .expect("the worker came back from the action");
    assert_refused(
        &f,
        Code::DeadlineExceeded,
        "uploading the outputs went past the action's timeout",
    );
    proxy.thaw();
    let zeros = vec![0u8; 20_000_000];
    let missing = re::content_addressable_storage_client::ContentAddressableStorageClient::new(
        e.channel.clone(),
    )
    .find_missing_blobs(re::FindMissingBlobsRequest {
        blob_digests: vec![lre_worker::cas::digest_of(&zeros)],
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .missing_blob_digests;
    assert_eq!(missing.len(), 1, "a cut-off upload left the blob stored");
    assert_eq!(actions_left(&e), 0);
    // The worker goes on running actions, through the same (thawed) connection path.
    let f = run_bounded(&e, &re::Directory::default(), "echo ok > small", &["small"]).await;
    assert_eq!(result(&f).exit_code, 0);
}
