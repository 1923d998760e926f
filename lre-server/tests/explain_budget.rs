//! Issue 21, defect 1: one miss explanation over actions whose Commands hold millions of
//! arguments grew the server by about 100 MiB per missed action, past 2 GiB, and a server
//! under a memory limit aborted. A real `lre-server` runs here under an address-space
//! limit (`prlimit --as`): it must survive the request and say where the explanation
//! stopped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use prost::Message;
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;

/// The server's address space, all told: its runtime, the blobs this test uploads (held by
/// its memory store) and room to work, but not the gigabytes the unbounded explanation
/// took.
const AS_LIMIT: u64 = 1200 << 20;
/// Missed actions per invocation, each with a Command of about 4 MiB.
const ACTIONS: usize = 12;

fn digest(data: &[u8]) -> re::Digest {
    re::Digest {
        hash: hex::encode(Sha256::digest(data)),
        size_bytes: data.len() as i64,
    }
}

struct Server {
    child: Child,
    grpc: String,
    http: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_limited() -> Server {
    let mut child = Command::new("prlimit")
        .arg(format!("--as={AS_LIMIT}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_lre-server"))
        .args([
            "--memory",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        // One malloc arena per thread would reserve 64 MiB of address space each.
        .env("MALLOC_ARENA_MAX", "2")
        .env("LRE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("prlimit (util-linux) runs lre-server");
    let out = BufReader::new(child.stdout.take().unwrap());
    let (mut grpc, mut http) = (String::new(), String::new());
    for line in out.lines() {
        let line = line.unwrap();
        if let Some(a) = line.trim().strip_prefix("grpc: ") {
            grpc = a.to_string();
        }
        if let Some(a) = line.trim().strip_prefix("http: ") {
            http = a.to_string();
        }
        if line.starts_with("  bazel flags") {
            break;
        }
    }
    assert!(
        !grpc.is_empty() && !http.is_empty(),
        "the server said where it listens"
    );
    Server { child, grpc, http }
}

/// An Action and its Command of about 4 MiB: `args` arguments of two bytes each.
fn action(output: &str, variant: u8) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let args: Vec<String> = (0..1_300_000u32)
        .map(|i| format!("{}", (b'a' + ((i as u8) ^ variant) % 26) as char))
        .collect();
    let command = re::Command {
        arguments: args,
        output_paths: vec![output.into()],
        ..Default::default()
    }
    .encode_to_vec();
    let root = re::Directory::default().encode_to_vec();
    let action = re::Action {
        command_digest: Some(digest(&command)),
        input_root_digest: Some(digest(&root)),
        ..Default::default()
    }
    .encode_to_vec();
    (action, command, root)
}

async fn upload(ch: &Channel, blobs: &[&[u8]]) {
    use bazel_remote_apis::google::bytestream::{
        byte_stream_client::ByteStreamClient, WriteRequest,
    };
    // The empty blob (an empty input root) always exists.
    for b in blobs.iter().filter(|b| !b.is_empty()) {
        let d = digest(b);
        let name = format!(
            "uploads/{}/blobs/{}/{}",
            uuid::Uuid::new_v4(),
            d.hash,
            d.size_bytes
        );
        let chunks: Vec<WriteRequest> = b
            .chunks(1 << 20)
            .enumerate()
            .map(|(i, c)| WriteRequest {
                resource_name: if i == 0 { name.clone() } else { String::new() },
                write_offset: (i << 20) as i64,
                finish_write: (i + 1) << 20 >= b.len(),
                data: c.to_vec(),
            })
            .collect();
        ByteStreamClient::new(ch.clone())
            .max_encoding_message_size(8 << 20)
            .write(futures::stream::iter(chunks))
            .await
            .expect("upload");
    }
}

/// A cache lookup as Bazel makes it, naming its invocation: the server remembers it missed.
async fn look_up(ch: &Channel, invocation: &str, action: &[u8]) {
    let mut req = tonic::Request::new(re::GetActionResultRequest {
        action_digest: Some(digest(action)),
        ..Default::default()
    });
    let meta = re::RequestMetadata {
        tool_invocation_id: invocation.into(),
        action_mnemonic: "Genrule".into(),
        target_id: "//big:args".into(),
        ..Default::default()
    };
    req.metadata_mut().insert_bin(
        "build.bazel.remote.execution.v2.requestmetadata-bin",
        tonic::metadata::MetadataValue::from_bytes(&meta.encode_to_vec()),
    );
    let e = re::action_cache_client::ActionCacheClient::new(ch.clone())
        .get_action_result(req)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_explanation_has_a_memory_budget_and_says_where_it_stopped() {
    let mut server = start_limited();
    let ch = Channel::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    for (invocation, variant) in [("base-build", 0u8), ("new-build", 1u8)] {
        for i in 0..ACTIONS {
            let (a, c, r) = action(&format!("out/{i}"), variant);
            upload(&ch, &[&a, &c, &r]).await;
            look_up(&ch, invocation, &a).await;
        }
    }
    let url = format!("{}/api/explain?base=base-build&new=new-build", server.http);
    let resp = reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(300))
        .send()
        .await;
    let alive = server.child.try_wait().unwrap().is_none();
    assert!(
        alive,
        "the server died answering the explanation: {:?}",
        server.child.try_wait()
    );
    let body = resp.expect("an answer").text().await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let stopped = v["stopped"].as_str().unwrap_or("");
    assert!(
        stopped.contains("memory budget") && stopped.contains("of the 12 missed actions"),
        "{stopped:?}"
    );
    // And it still serves.
    let r = reqwest::get(format!("{}/healthz", server.http))
        .await
        .unwrap();
    assert!(r.status().is_success());
}
