//! Workers authenticate as workers: every call they make carries their credential (over
//! TLS and mTLS too), only a worker token may attach, a worker runs only its token's
//! instances, a connected worker's id cannot be taken over, and an action cannot read the
//! worker's secret.

mod common;

use std::path::Path;
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use common::{authed, execute, stdout_of, wait_workers, Exec};
use lre_server::auth::{Scope, TokenConfig};
use lre_server::config::TlsConfig;
use lre_worker::{ClientTls, Credential};
use lre_worker_protocol::v1::{
    worker_message, worker_service_client::WorkerServiceClient, Register, WorkerMessage,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const CI: &str = "ci-secret-read-write-000000000001";
const WX: &str = "worker-x-secret-000000000000000002";
const WY: &str = "worker-y-secret-000000000000000003";
const OLD: &str = "worker-expired-secret-00000000004";

fn token(name: &str, secret: &str, scope: Scope, instances: Option<&[&str]>) -> TokenConfig {
    TokenConfig {
        instances: instances.map(|l| l.iter().map(|i| i.to_string()).collect()),
        ..TokenConfig::for_secret(name, secret, scope)
    }
}

fn exec_config() -> lre_server::Config {
    let mut c = lre_server::Config::ephemeral();
    c.execution.enabled = true;
    c.execution.keepalive_seconds = 1;
    c.shutdown_grace_seconds = 1;
    c
}

/// Runs `argv` on `instance` as CI (read-write), uncached.
async fn run(ch: &Channel, instance: &str, argv: &[&str], input: &[u8]) -> re::ExecuteResponse {
    let e = Exec {
        instance,
        argv,
        input,
        secret: Some(CI),
        invocation: None,
    };
    execute(ch, e).await.unwrap()
}

async fn stdout(ch: &Channel, instance: &str, r: &re::ExecuteResponse) -> String {
    stdout_of(ch, instance, Some(CI), r).await
}

fn worker(
    url: &str,
    id: &str,
    dir: &Path,
    secret: &str,
    tls: ClientTls,
) -> lre_worker::WorkerOptions {
    let mut o = lre_worker::WorkerOptions::local(
        url.into(),
        id.into(),
        dir.into(),
        vec![],
        lre_worker::default_ro_paths(),
    );
    o.credential = Credential::bearer(secret).unwrap();
    o.tls = tls;
    o.connection.capacity = 2;
    o
}

/// Attaches by hand with `secret` (or anonymously) and returns the status the server ends with.
async fn attach_status(ch: &Channel, secret: Option<&str>, id: &str) -> tonic::Code {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WorkerMessage {
        message: Some(worker_message::Message::Register(Register {
            worker_id: id.into(),
            properties: vec![],
            capacity: 1,
        })),
    })
    .await
    .unwrap();
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let req = authed(stream, secret);
    let code = match WorkerServiceClient::new(ch.clone()).attach(req).await {
        Ok(_) => tonic::Code::Ok,
        Err(e) => e.code(),
    };
    drop(tx);
    code
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca.distinguished_name
            .push(DnType::CommonName, "lre worker test CA");
        std::fs::write(
            dir.path().join("ca.crt"),
            ca.self_signed(&ca_key).unwrap().pem(),
        )
        .unwrap();
        let issuer = Issuer::new(ca, ca_key);
        for (name, san, eku) in [
            ("server", "localhost", ExtendedKeyUsagePurpose::ServerAuth),
            (
                "client",
                "worker.lre.test",
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        ] {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(vec![san.to_string()]).unwrap();
            p.extended_key_usages = vec![eku];
            let cert = p.signed_by(&key, &issuer).unwrap().pem();
            std::fs::write(dir.path().join(format!("{name}.crt")), cert).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        Pki { dir }
    }

    fn path(&self, f: &str) -> std::path::PathBuf {
        self.dir.path().join(f)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_fetches_inputs_and_uploads_outputs_with_its_token_over_mtls() {
    let pki = Pki::new();
    let mut c = exec_config();
    c.auth.anonymous = Scope::None;
    c.instances = Some(vec!["main".into()]);
    c.auth.tokens = vec![
        token("ci", CI, Scope::ReadWrite, None),
        token("wx", WX, Scope::Worker, Some(&["main"])),
    ];
    c.tls = Some(TlsConfig {
        cert: pki.path("server.crt"),
        key: pki.path("server.key"),
        client_ca: Some(pki.path("ca.crt")),
        require_client_cert: true,
    });
    let s = lre_server::start(c).await.unwrap();
    let url = format!("https://localhost:{}", s.grpc_addr.port());
    let work = tempfile::tempdir().unwrap();
    let tls = ClientTls {
        ca: Some(pki.path("ca.crt")),
        cert: Some(pki.path("client.crt")),
        key: Some(pki.path("client.key")),
        server_name: None,
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let w = tokio::spawn(lre_worker::run(
        worker(&url, "w", work.path(), WX, tls),
        shutdown,
    ));
    assert!(
        wait_workers(&s, 1).await,
        "the worker did not attach over mTLS with its token"
    );

    let client_tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(pki.path("ca.crt")).unwrap(),
        ))
        .identity(Identity::from_pem(
            std::fs::read(pki.path("client.crt")).unwrap(),
            std::fs::read(pki.path("client.key")).unwrap(),
        ));
    let ch = Channel::from_shared(url.clone())
        .unwrap()
        .tls_config(client_tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    // The input must be fetched (anonymous reads are off) and stdout uploaded.
    let r = run(
        &ch,
        "main",
        &["cat", "in.txt"],
        b"fetched with the worker's token\n",
    )
    .await;
    assert_eq!(
        stdout(&ch, "main", &r).await,
        "fetched with the worker's token\n"
    );
    let _ = stop.send(true);
    w.await.unwrap().unwrap();
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_worker_tokens_attach_and_each_runs_only_its_instances() {
    let mut c = exec_config();
    // Even anonymous read-write may not attach, nor may a read-write token.
    c.auth.anonymous = Scope::ReadWrite;
    let mut old = token("old", OLD, Scope::Worker, None);
    old.expires = Some("2021-06-01T00:00:00Z".into());
    c.auth.tokens = vec![
        token("ci", CI, Scope::ReadWrite, None),
        token("wx", WX, Scope::Worker, Some(&["x"])),
        token("wy", WY, Scope::Worker, Some(&["y"])),
        old,
    ];
    // Every worker this test has is connected before it asks for instance z: no grace for
    // one that may be reconnecting, so z is refused at once.
    c.execution.worker_grace_seconds = 0;
    let s = lre_server::start(c).await.unwrap();
    let url = format!("http://{}", s.grpc_addr);
    let ch = Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(
        attach_status(&ch, None, "anon").await,
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        attach_status(&ch, Some(CI), "ci").await,
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        attach_status(&ch, Some(OLD), "old").await,
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        attach_status(&ch, Some("no-such-token"), "x").await,
        tonic::Code::Unauthenticated
    );
    assert!(wait_workers(&s, 0).await);

    // Two workers with the same id but different credentials: neither displaces the other.
    let (dx, dy) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let wx = tokio::spawn(lre_worker::run(
        worker(&url, "w", dx.path(), WX, ClientTls::default()),
        shutdown.clone(),
    ));
    let wy = tokio::spawn(lre_worker::run(
        worker(&url, "w", dy.path(), WY, ClientTls::default()),
        shutdown,
    ));
    assert!(wait_workers(&s, 2).await, "both workers attach");
    // The same credential and id again is refused while the first is connected.
    assert_eq!(
        attach_status(&ch, Some(WX), "w").await,
        tonic::Code::AlreadyExists
    );
    assert!(wait_workers(&s, 2).await);

    for i in 0..4 {
        for (instance, dir) in [("x", dx.path()), ("y", dy.path())] {
            let input = format!("{instance}{i}\n");
            let r = run(
                &ch,
                instance,
                &["/bin/sh", "-c", "pwd; cat in.txt"],
                input.as_bytes(),
            )
            .await;
            let out = stdout(&ch, instance, &r).await;
            let canonical = dir.canonicalize().unwrap();
            assert!(
                out.starts_with(&*canonical.to_string_lossy()) && out.ends_with(&input),
                "an action of instance {instance} ran outside its worker: {out:?}"
            );
        }
    }
    // An instance no worker may serve fails at once, naming it.
    let e = Exec {
        instance: "z",
        argv: &["true"],
        input: b"",
        secret: Some(CI),
        invocation: None,
    };
    let status = tokio::time::timeout(Duration::from_secs(30), execute(&ch, e))
        .await
        .expect("Execute answered")
        .expect_err("no worker serves instance z");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("instance \"z\""), "{status:?}");

    let _ = stop.send(true);
    wx.await.unwrap().unwrap();
    wy.await.unwrap().unwrap();
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_dropped_when_its_token_expires() {
    let mut c = exec_config();
    let mut t = token("soon", WX, Scope::Worker, None);
    let at = std::time::SystemTime::now() + Duration::from_secs(3);
    t.expires = Some(chrono::DateTime::<chrono::Utc>::from(at).to_rfc3339());
    c.auth.tokens = vec![t];
    let s = lre_server::start(c).await.unwrap();
    let url = format!("http://{}", s.grpc_addr);
    let dir = tempfile::tempdir().unwrap();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let w = tokio::spawn(lre_worker::run(
        worker(&url, "w", dir.path(), WX, ClientTls::default()),
        shutdown,
    ));
    assert!(
        wait_workers(&s, 1).await,
        "attached while the token is valid"
    );
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_secs(4)).await;
    assert!(
        wait_workers(&s, 0).await,
        "still attached after its token expired"
    );
    // And it stays out: its retries are refused.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.scheduler.clone().unwrap().worker_count(), 0);
    let _ = stop.send(true);
    w.await.unwrap().unwrap();
    s.shutdown().await;
}

/// The real binary, with its token in a file or in the environment and the host's /proc
/// bound into the sandbox (as in a container): an action searching every process's command
/// line, environment and root directory finds no trace of the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_cannot_read_the_workers_token_even_with_the_host_proc() {
    for via_env in [false, true] {
        let secret = format!(
            "worker-secret-never-visible-{}",
            if via_env { "env" } else { "file" }
        );
        let mut c = exec_config();
        c.auth.tokens = vec![
            token("ci", CI, Scope::ReadWrite, None),
            token("w", &secret, Scope::Worker, None),
        ];
        let s = lre_server::start(c).await.unwrap();
        let url = format!("http://{}", s.grpc_addr);
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_lre-worker"));
        cmd.args([
            "--server",
            &url,
            "--id",
            "leak-test",
            "--capacity",
            "1",
            "--host-proc",
        ])
        .arg("--work-dir")
        .arg(dir.path().join("work"))
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        if via_env {
            cmd.env("LRE_WORKER_TOKEN", &secret);
        } else {
            std::fs::write(&token_file, format!("{secret}\n")).unwrap();
            cmd.arg("--token-file").arg(&token_file);
        }
        let mut child = cmd.spawn().unwrap();
        assert!(
            wait_workers(&s, 1).await,
            "the worker binary did not attach"
        );
        let ch = Channel::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        // The needle travels in an input file, so the probe's own command line lacks it.
        let probe = format!(
            "for p in /proc/[0-9]*; do cat $p/cmdline $p/environ $p/root{f} $p/cwd{f} 2>/dev/null; done | tr '\\0' '\\n' | grep -c -F -f in.txt; true",
            f = token_file.display(),
        );
        let r = run(&ch, "", &["/bin/sh", "-c", &probe], secret.as_bytes()).await;
        let out = stdout(&ch, "", &r).await;
        assert_eq!(
            out.trim(),
            "0",
            "the secret is visible to actions (via env: {via_env})"
        );
        // And the probe really could read other processes: its own command line shows up.
        let r = run(&ch, "", &["/bin/sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' '\\n' | grep -c -- --host-proc; true"], b"").await;
        let seen: u32 = stdout(&ch, "", &r).await.trim().parse().unwrap();
        assert!(
            seen >= 1,
            "the probe did not see the worker's process at all"
        );
        child.kill().await.unwrap();
        s.shutdown().await;
    }
}
