//! The worker's action runner against a real lre-server (the CAS) and real bubblewrap:
//! materialization, isolation, escape attempts, timeouts and output collection.

mod common;

use std::path::Path;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use common::runner_env::{env, file, result};
use lre_worker::cas::digest_of;
use prost::Message;
use tonic::Code;

#[tokio::test]
async fn materializes_inputs_and_collects_every_kind_of_output() {
    let e = env().await;
    let (a, tool) = (
        b"contents of a\n".to_vec(),
        b"#!/bin/sh\necho from-tool\n".to_vec(),
    );
    let empty = re::Directory::default();
    let sub = re::Directory {
        directories: vec![re::DirectoryNode {
            name: "empty".into(),
            digest: Some(digest_of(&empty.encode_to_vec())),
        }],
        ..Default::default()
    };
    e.put(&[
        a.clone(),
        tool.clone(),
        empty.encode_to_vec(),
        sub.encode_to_vec(),
    ])
    .await;
    let root = re::Directory {
        files: vec![file("a.txt", &a, false), file("tool.sh", &tool, true)],
        directories: vec![re::DirectoryNode {
            name: "sub".into(),
            digest: Some(digest_of(&sub.encode_to_vec())),
        }],
        symlinks: vec![re::SymlinkNode {
            name: "link".into(),
            target: "a.txt".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let script = "test -x tool.sh && test ! -x a.txt && test -d sub/empty && \
                  ./tool.sh > out/file.txt && cat link >> out/file.txt && \
                  mkdir -p out/dir/nested && echo x > out/dir/nested/f && ln -s f out/dir/nested/l && \
                  ln -s file.txt out/lnk";
    let f = e
        .run(
            &root,
            script,
            &["out/file.txt", "out/dir", "out/lnk", "out/never"],
            60_000,
        )
        .await;
    let r = result(&f);
    assert_eq!(
        r.exit_code,
        0,
        "stderr: {}",
        String::from_utf8_lossy(&e.get(r.stderr_digest.as_ref().unwrap()).await)
    );
    assert_eq!(r.output_files.len(), 1);
    assert_eq!(
        e.get(r.output_files[0].digest.as_ref().unwrap()).await,
        b"from-tool\ncontents of a\n"
    );
    let tree = re::Tree::decode(
        &e.get(r.output_directories[0].tree_digest.as_ref().unwrap())
            .await[..],
    )
    .unwrap();
    let nested = &tree
        .children
        .iter()
        .find(|d| !d.files.is_empty())
        .expect("nested dir")
        .clone();
    assert_eq!(nested.files[0].name, "f");
    assert_eq!(
        e.get(nested.files[0].digest.as_ref().unwrap()).await,
        b"x\n"
    );
    assert_eq!(nested.symlinks[0].target, "f");
    assert_eq!(r.output_symlinks[0].target, "file.txt");
    assert_eq!(r.execution_metadata.unwrap().worker, "test-worker");
    e.server.shutdown().await;
}

#[tokio::test]
async fn the_sandbox_hides_the_host_and_the_network() {
    let e = env().await;
    let port = e.server.grpc_addr.port();
    // A secret in the worker's own environment must not reach the action.
    std::env::set_var("LRE_TEST_SECRET", "leaked");
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let script = format!(
        "exec > out/report; \
         test -e /etc/passwd && echo etc-visible || echo etc-hidden; \
         test -e '{home}' && echo home-visible || echo home-hidden; \
         test -e '{work}' && echo workdir-visible || echo workdir-hidden; \
         touch /usr/lre-evil 2>/dev/null && echo usr-writable || echo usr-readonly; \
         python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 2)\" 2>/dev/null && echo net || echo nonet; \
         echo secret=$LRE_TEST_SECRET",
        work = e.work.path().join("cas").display()
    );
    let r = result(
        &e.run(&re::Directory::default(), &script, &["out/report"], 60_000)
            .await,
    );
    let report =
        String::from_utf8(e.get(r.output_files[0].digest.as_ref().unwrap()).await).unwrap();
    assert_eq!(
        report,
        "etc-hidden\nhome-hidden\nworkdir-hidden\nusr-readonly\nnonet\nsecret=\n"
    );
    assert!(!Path::new("/usr/lre-evil").exists());
    e.server.shutdown().await;
}

#[tokio::test]
async fn escape_attempts_are_clear_errors_and_the_worker_carries_on() {
    let e = env().await;
    let empty = re::Directory::default();
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("echo x > ../outside", vec!["../outside"], "climbs out"),
        (
            "ln -s /etc/passwd out/l",
            vec!["out/l"],
            "outside the exec root",
        ),
        (
            "mkdir -p out/d && ln -s ../../../../../ out/d/up",
            vec!["out/d"],
            "escapes the exec root",
        ),
    ];
    // The sharpest one: replace an output's parent with a link to a host directory holding
    // a file, hoping the worker uploads the host file as the output.
    let bait = std::env::temp_dir().join(format!("lre-bait-{}", std::process::id()));
    std::fs::write(&bait, b"host secret").unwrap();
    let bait_name = bait.file_name().unwrap().to_str().unwrap().to_string();
    let tmp = std::env::temp_dir().display().to_string();
    let script = format!("rmdir out/via && ln -s {tmp} out/via");
    let out = format!("out/via/{bait_name}");
    let cases: Vec<(&str, Vec<&str>, &str)> = cases
        .into_iter()
        .chain([(
            script.as_str(),
            vec![out.as_str()],
            "resolves outside the exec root",
        )])
        .collect();
    for (script, outs, why) in cases {
        let f = e.run(&empty, script, &outs, 60_000).await;
        assert_eq!(
            f.status_code,
            Code::InvalidArgument as i32,
            "{script}: {}",
            f.status_message
        );
        assert!(
            f.status_message.contains(why),
            "{script}: {}",
            f.status_message
        );
    }
    assert!(!e.work.path().join("actions/outside").exists());
    std::fs::remove_file(&bait).unwrap();
    // An input tree naming "..": refused before anything is written.
    let evil = b"evil".to_vec();
    e.put(std::slice::from_ref(&evil)).await;
    let root = re::Directory {
        files: vec![file("../escaped", &evil, false)],
        ..Default::default()
    };
    let f = e.run(&root, "true", &[], 60_000).await;
    assert_eq!(
        f.status_code,
        Code::InvalidArgument as i32,
        "{}",
        f.status_message
    );
    assert!(!e.work.path().join("actions/escaped").exists());
    let f = e
        .run_command(&empty, vec!["/bin/true".into()], &[], "../..", 60_000)
        .await;
    assert_eq!(
        f.status_code,
        Code::InvalidArgument as i32,
        "{}",
        f.status_message
    );
    // Still healthy.
    let r = result(&e.run(&empty, "echo ok > out", &["out"], 60_000).await);
    assert_eq!(
        e.get(r.output_files[0].digest.as_ref().unwrap()).await,
        b"ok\n"
    );
    e.server.shutdown().await;
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_tree() {
    let e = env().await;
    // Durations no other process on the machine is likely to sleep for: pgrep looks at every
    // process, and a shell elsewhere running `sleep 300` once failed this test.
    let script = "sleep 7301 & sleep 7302 & echo started > out; sleep 7303";
    let f = e
        .run(&re::Directory::default(), script, &["out"], 1_000)
        .await;
    assert_eq!(
        f.status_code,
        Code::DeadlineExceeded as i32,
        "{}",
        f.status_message
    );
    let r = re::ActionResult::decode(&f.result[..]).unwrap();
    assert!(
        r.stdout_digest.is_some(),
        "a timed-out action still reports its logs"
    );
    let survivors = std::process::Command::new("pgrep")
        .args(["-f", "^sleep 730[123]$"])
        .output()
        .unwrap();
    assert!(
        survivors.stdout.is_empty(),
        "processes survived the timeout: {}",
        String::from_utf8_lossy(&survivors.stdout)
    );
    e.server.shutdown().await;
}

#[tokio::test]
async fn failures_are_statuses_not_crashes() {
    let e = env().await;
    let empty = re::Directory::default();
    // A non-zero exit is a normal result.
    let r = result(&e.run(&empty, "echo oops >&2; exit 3", &[], 60_000).await);
    assert_eq!(r.exit_code, 3);
    assert_eq!(e.get(r.stderr_digest.as_ref().unwrap()).await, b"oops\n");
    // A command that does not exist.
    for argv0 in ["/no/such/binary", "no-such-command"] {
        let f = e
            .run_command(&empty, vec![argv0.into()], &[], "", 60_000)
            .await;
        assert_eq!(
            f.status_code,
            Code::InvalidArgument as i32,
            "{argv0}: {}",
            f.status_message
        );
        assert!(
            f.status_message.contains("does not exist"),
            "{}",
            f.status_message
        );
    }
    // An input the CAS does not have.
    let root = re::Directory {
        files: vec![file("gone", b"never uploaded", false)],
        ..Default::default()
    };
    let f = e.run(&root, "true", &[], 60_000).await;
    assert_eq!(
        f.status_code,
        Code::FailedPrecondition as i32,
        "{}",
        f.status_message
    );
    e.server.shutdown().await;
}
