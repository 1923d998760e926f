//! `lre up --tls-cert/--tls-key` serves TLS, says grpcs:// in its banner, and its own worker
//! reaches the scheduler over TLS with its per-run worker token: an Execute really runs.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::longrunning::operation;
use prost::Message;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use sha2::{Digest as _, Sha256};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

fn digest(b: &[u8]) -> re::Digest {
    re::Digest {
        hash: hex::encode(Sha256::digest(b)),
        size_bytes: b.len() as i64,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes ca.crt, server.crt and server.key (for "localhost") into `dir`.
fn pki(dir: &std::path::Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.distinguished_name
        .push(DnType::CommonName, "lre up test CA");
    std::fs::write(dir.join("ca.crt"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("server.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}

struct Up(std::process::Child);
impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lre_up_with_tls_runs_actions_on_its_worker() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let (grpc, http) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_lre"))
        .arg("up")
        .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .arg("--store-dir")
        .arg(dir.path().join("store"))
        .arg("--work-dir")
        .arg(dir.path().join("work"))
        .arg("--tls-cert")
        .arg(dir.path().join("server.crt"))
        .arg("--tls-key")
        .arg(dir.path().join("server.key"))
        .arg("--tls-ca")
        .arg(dir.path().join("ca.crt"))
        .args(["--capacity", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _up = Up(child);
    let banner: Vec<String> = BufReader::new(stdout)
        .lines()
        .take(4)
        .map(|l| l.unwrap())
        .collect();
    let banner = banner.join("\n");
    assert!(
        banner.contains(&format!("grpc: grpcs://localhost:{grpc}")),
        "{banner}"
    );
    assert!(
        banner.contains(&format!("--remote_executor=grpcs://localhost:{grpc}")),
        "{banner}"
    );
    assert!(banner.contains("--tls_certificate="), "{banner}");

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(dir.path().join("ca.crt")).unwrap(),
        ))
        .domain_name("localhost");
    let ch = Channel::from_shared(format!("https://127.0.0.1:{grpc}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let cmd = re::Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), "echo over tls".into()],
        ..Default::default()
    }
    .encode_to_vec();
    let root = re::Directory::default().encode_to_vec();
    let act = re::Action {
        command_digest: Some(digest(&cmd)),
        input_root_digest: Some(digest(&root)),
        ..Default::default()
    }
    .encode_to_vec();
    let requests = [cmd, root, act.clone()]
        .into_iter()
        .map(|b| re::batch_update_blobs_request::Request {
            digest: Some(digest(&b)),
            data: b,
            compressor: 0,
        })
        .collect();
    re::content_addressable_storage_client::ContentAddressableStorageClient::new(ch.clone())
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests,
            ..Default::default()
        })
        .await
        .unwrap();
    // The worker may still be connecting: Execute waits for it (the platform is known
    // once it registers), so retry briefly on "no worker".
    let mut result = None;
    for _ in 0..100 {
        let mut ops = match re::execution_client::ExecutionClient::new(ch.clone())
            .execute(re::ExecuteRequest {
                action_digest: Some(digest(&act)),
                ..Default::default()
            })
            .await
        {
            Ok(s) => s.into_inner(),
            Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        let mut last = None;
        while let Some(op) = ops.message().await.unwrap() {
            last = Some(op);
        }
        if let Some(operation::Result::Response(a)) = last.and_then(|o| o.result) {
            result = re::ExecuteResponse::decode(&a.value[..]).unwrap().result;
        }
        break;
    }
    let r = result.expect("the action ran on lre up's worker");
    assert_eq!(r.exit_code, 0, "{r:?}");
}
