//! A Runner (the worker's action runner) against a real lre-server as its CAS and real
//! bubblewrap, for the runner's integration tests.

use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use lre_worker::cas::{digest_of, LocalCas};
use lre_worker::runner::Runner;
use lre_worker::SandboxConfig;
use lre_worker_protocol::v1::{ActionFinished, RunAction};
use prost::Message;
use re::content_addressable_storage_client::ContentAddressableStorageClient as CasClient;
use tonic::transport::Channel;

pub struct Env {
    pub server: lre_server::RunningServer,
    pub channel: Channel,
    pub runner: Runner,
    pub work: tempfile::TempDir,
}

/// A runner whose actions get their own uids where the test runs as root (as in CI).
pub async fn env() -> Env {
    env_with(lre_worker::ActionUids::Auto).await
}

pub async fn env_with(uids: lre_worker::ActionUids) -> Env {
    let server = lre_server::start(lre_server::Config::ephemeral())
        .await
        .unwrap();
    let channel = Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let worker_channel = lre_worker::client::connect(
        &format!("http://{}", server.grpc_addr),
        lre_worker::Credential::none(),
        &lre_worker::ClientTls::default(),
    )
    .unwrap();
    let cas = Arc::new(
        LocalCas::open(
            work.path().join("cas"),
            lre_worker::server_cas::ServerCas::new(worker_channel.clone()),
            1 << 30,
        )
        .await
        .unwrap(),
    );
    let sandbox = SandboxConfig {
        bwrap: "bwrap".into(),
        ro_paths: lre_worker::default_ro_paths(),
        network: false,
        host_proc: false,
        action_uids: uids,
    };
    let runner = Runner {
        worker_id: "test-worker".into(),
        cas,
        channel: worker_channel,
        work_dir: work.path().to_path_buf(),
        uids: lre_worker::sandbox::UidPool::resolve(&sandbox, 2, work.path())
            .await
            .unwrap(),
        sandbox,
        output_grace: lre_worker::runner::OUTPUT_GRACE,
    };
    Env {
        server,
        channel,
        runner,
        work,
    }
}

/// Uploads `blobs` to the server behind `channel` in one batch.
pub async fn put_blobs(channel: &Channel, blobs: &[Vec<u8>]) {
    let requests = blobs
        .iter()
        .map(|b| re::batch_update_blobs_request::Request {
            digest: Some(digest_of(b)),
            data: b.clone(),
            compressor: 0,
        })
        .collect();
    CasClient::new(channel.clone())
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests,
            ..Default::default()
        })
        .await
        .unwrap();
}

impl Env {
    pub async fn put(&self, blobs: &[Vec<u8>]) {
        put_blobs(&self.channel, blobs).await
    }

    pub async fn get(&self, d: &re::Digest) -> Vec<u8> {
        let r = CasClient::new(self.channel.clone())
            .batch_read_blobs(re::BatchReadBlobsRequest {
                digests: vec![d.clone()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        r.responses[0].data.clone()
    }

    /// Uploads `root` (already uploaded: its subtrees and files) and runs `script` with sh.
    pub async fn run(
        &self,
        root: &re::Directory,
        script: &str,
        outputs: &[&str],
        timeout_ms: u64,
    ) -> ActionFinished {
        self.run_command(
            root,
            vec!["/bin/sh".into(), "-c".into(), script.into()],
            outputs,
            "",
            timeout_ms,
        )
        .await
    }

    pub async fn run_command(
        &self,
        root: &re::Directory,
        arguments: Vec<String>,
        outputs: &[&str],
        wd: &str,
        timeout_ms: u64,
    ) -> ActionFinished {
        let root_raw = root.encode_to_vec();
        let command = re::Command {
            arguments,
            environment_variables: vec![re::command::EnvironmentVariable {
                name: "PATH".into(),
                value: "/usr/bin:/bin".into(),
            }],
            output_paths: outputs.iter().map(|s| s.to_string()).collect(),
            working_directory: wd.into(),
            ..Default::default()
        }
        .encode_to_vec();
        let action = re::Action {
            command_digest: Some(digest_of(&command)),
            input_root_digest: Some(digest_of(&root_raw)),
            ..Default::default()
        }
        .encode_to_vec();
        self.put(&[root_raw, command.clone(), action.clone()]).await;
        let run = RunAction {
            operation: "op".into(),
            instance_name: String::new(),
            action_digest: digest_of(&action).encode_to_vec(),
            action,
            command,
            timeout_ms,
            attempt: 1,
        };
        self.runner
            .run(&run, tokio::sync::watch::channel(false).1)
            .await
    }
}

pub fn result(f: &ActionFinished) -> re::ActionResult {
    assert_eq!(f.status_code, 0, "{}", f.status_message);
    re::ActionResult::decode(&f.result[..]).unwrap()
}

pub fn file(name: &str, data: &[u8], exec: bool) -> re::FileNode {
    re::FileNode {
        name: name.into(),
        digest: Some(digest_of(data)),
        is_executable: exec,
        ..Default::default()
    }
}

/// Runs `script` with a bound, so that a regression fails the test instead of hanging it.
pub async fn run_bounded(
    e: &Env,
    root: &re::Directory,
    script: &str,
    outputs: &[&str],
) -> ActionFinished {
    tokio::time::timeout(
        std::time::Duration::from_secs(120),
        e.run(root, script, outputs, 60_000),
    )
    .await
    .expect("the worker came back from the action")
}

/// The action was refused with `code`, and its message says `text`.
pub fn assert_refused(f: &ActionFinished, code: tonic::Code, text: &str) {
    assert_eq!(f.status_code, code as i32, "{}", f.status_message);
    assert!(f.status_message.contains(text), "{}", f.status_message);
}
