//! Access control and transport security: scoped tokens over gRPC and HTTP, anonymous
//! policies, instance-limited tokens, TLS and mTLS on both ports, and config validation.

mod common;

use std::path::{Path, PathBuf};

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use common::*;
use lre_server::auth::Scope;
use lre_server::config::{Config, TlsConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use reqwest::StatusCode;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

const RW: &str = "rw-secret-0123456789";
const RO: &str = "ro-secret-9876543210";

fn tokens_config(anonymous: Scope) -> Config {
    let mut c = memory_config();
    c.auth.anonymous = anonymous;
    c.auth.tokens = vec![
        token("ci", RW, Scope::ReadWrite, None),
        token("dev", RO, Scope::Read, None),
    ];
    c
}

async fn caps(ch: Channel, bearer: Option<&str>) -> Result<bool, tonic::Status> {
    let r = CapabilitiesClient::new(ch)
        .get_capabilities(authed(re::GetCapabilitiesRequest::default(), bearer))
        .await?;
    Ok(r.into_inner()
        .cache_capabilities
        .unwrap()
        .action_cache_update_capabilities
        .unwrap()
        .update_enabled)
}

#[tokio::test]
async fn tokens_are_scoped_over_grpc() {
    let s = start(tokens_config(Scope::None)).await;
    let ch = channel(&s).await;
    let data = b"written by a reader?".to_vec();
    let find = |bearer| {
        let ch = ch.clone();
        async move {
            CasClient::new(ch)
                .find_missing_blobs(authed(re::FindMissingBlobsRequest::default(), bearer))
                .await
                .map(|_| ())
        }
    };
    assert_eq!(find(None).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(
        find(Some("not-a-token")).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    find(Some(RO)).await.unwrap();
    assert!(!caps(ch.clone(), Some(RO)).await.unwrap());
    assert!(caps(ch.clone(), Some(RW)).await.unwrap());

    // Every write path refuses the read token, and nothing lands.
    let err = batch_put(ch.clone(), "", &[&data], Some(RO))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("token \"dev\""), "{}", err.message());
    let err = bs_write(
        ch.clone(),
        write_requests(&upload_name("", "u", &data), &data, 8, 0, true),
        Some(RO),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let action = digest(b"action");
    let err = update_ac(ch.clone(), "", &action, action_result(b"", b""), Some(RO))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let missing = CasClient::new(ch.clone())
        .find_missing_blobs(authed(
            re::FindMissingBlobsRequest {
                blob_digests: vec![digest(&data)],
                ..Default::default()
            },
            Some(RW),
        ))
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing.len(), 1, "a refused write stored the blob");
    assert_eq!(
        get_ac(ch.clone(), "", &action, Some(RW))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // The read-write token writes, and the reader then reads.
    batch_put(ch.clone(), "", &[&data], Some(RW)).await.unwrap();
    assert_eq!(
        bs_read(ch.clone(), &read_name("", &data), 0, 0, Some(RO))
            .await
            .unwrap(),
        data
    );
    s.shutdown().await;
}

#[tokio::test]
async fn anonymous_read_only() {
    let s = start(tokens_config(Scope::Read)).await;
    let ch = channel(&s).await;
    assert!(!caps(ch.clone(), None).await.unwrap());
    let data = b"anon".to_vec();
    assert_eq!(
        batch_put(ch.clone(), "", &[&data], None)
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    batch_put(ch.clone(), "", &[&data], Some(RW)).await.unwrap();
    assert_eq!(
        bs_read(ch.clone(), &read_name("", &data), 0, 0, None)
            .await
            .unwrap(),
        data
    );
    s.shutdown().await;
}

#[tokio::test]
async fn tokens_limited_to_instances() {
    let mut c = memory_config();
    c.auth.anonymous = Scope::None;
    c.auth.tokens = vec![token("main-ci", RW, Scope::ReadWrite, Some(vec!["main"]))];
    let s = start(c).await;
    let ch = channel(&s).await;
    let data = b"main only".to_vec();
    batch_put(ch.clone(), "main", &[&data], Some(RW))
        .await
        .unwrap();
    let err = batch_put(ch.clone(), "other", &[&data], Some(RW))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("instance \"other\""),
        "{}",
        err.message()
    );
    s.shutdown().await;
}

#[tokio::test]
async fn http_accepts_bearer_and_basic_and_enforces_scope() {
    let s = start(tokens_config(Scope::None)).await;
    let base = http_url(&s);
    let http = reqwest::Client::new();
    let data = b"http auth".to_vec();
    let url = format!("{base}/cas/{}", hash_hex(&data));

    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().contains_key(reqwest::header::WWW_AUTHENTICATE));
    assert_eq!(
        http.put(&url)
            .bearer_auth(RO)
            .body(data.clone())
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        http.get(&url)
            .bearer_auth(RW)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND,
        "the refused PUT stored it"
    );
    assert_eq!(
        http.put(&url)
            .basic_auth("ci", Some(RW))
            .body(data.clone())
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let r = http.get(&url).bearer_auth(RO).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);
    // Basic auth binds the user name to the token.
    assert_eq!(
        http.get(&url)
            .basic_auth("dev", Some(RW))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        http.get(&url)
            .basic_auth("dev", Some(RO))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    // Credentials in the URL, as Bazel's --remote_cache=http://user:pass@host/ sends them.
    let with_creds = url.replace("http://", &format!("http://ci:{RW}@"));
    assert_eq!(
        http.get(&with_creds).send().await.unwrap().status(),
        StatusCode::OK
    );
    s.shutdown().await;
}

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    client_pem: String,
    client_key: String,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca.distinguished_name
            .push(DnType::CommonName, "lre test CA");
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca, ca_key);

        let leaf = |names: Vec<String>, eku: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(names).unwrap();
            p.extended_key_usages = vec![eku];
            (
                p.signed_by(&key, &issuer).unwrap().pem(),
                key.serialize_pem(),
            )
        };
        let (server_pem, server_key) = leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_pem, client_key) = leaf(
            vec!["client.lre.test".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        std::fs::write(dir.path().join("ca.crt"), &ca_pem).unwrap();
        std::fs::write(dir.path().join("server.crt"), &server_pem).unwrap();
        std::fs::write(dir.path().join("server.key"), &server_key).unwrap();
        Pki {
            dir,
            ca_pem,
            client_pem,
            client_key,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn tls(&self, client_ca: bool) -> TlsConfig {
        TlsConfig {
            cert: self.path("server.crt"),
            key: self.path("server.key"),
            client_ca: client_ca.then(|| self.path("ca.crt")),
            require_client_cert: client_ca,
        }
    }

    async fn grpc(&self, port: u16, client_cert: bool) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("localhost");
        if client_cert {
            tls = tls.identity(Identity::from_pem(&self.client_pem, &self.client_key));
        }
        Channel::from_shared(format!("https://127.0.0.1:{port}"))
            .unwrap()
            .tls_config(tls)?
            .connect()
            .await
    }

    fn https(&self, client_cert: bool) -> reqwest::Client {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap());
        if client_cert {
            let pem = format!("{}{}", self.client_pem, self.client_key);
            b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
        }
        b.build().unwrap()
    }
}

#[tokio::test]
async fn tls_on_both_ports() {
    let pki = Pki::new();
    let mut c = memory_config();
    c.tls = Some(pki.tls(false));
    let s = start(c).await;
    let port = s.grpc_addr.port();
    let ch = pki.grpc(port, false).await.unwrap();
    assert!(caps(ch.clone(), None).await.unwrap());
    let data = blob(100_000, 4);
    batch_put(ch.clone(), "", &[&data], None).await.unwrap();
    assert_eq!(
        bs_read(ch.clone(), &read_name("", &data), 0, 0, None)
            .await
            .unwrap(),
        data
    );

    // A plaintext client gets nowhere.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await;
    match plain {
        Err(_) => {}
        Ok(ch) => assert!(
            caps(ch, None).await.is_err(),
            "plaintext gRPC worked against a TLS port"
        ),
    }

    let https = pki.https(false);
    let url = format!(
        "https://localhost:{}/cas/{}",
        s.http_addr.unwrap().port(),
        hash_hex(&data)
    );
    let r = https.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().len(), data.len());
    let plain_http = reqwest::Client::new()
        .get(url.replace("https://", "http://"))
        .send()
        .await;
    assert!(plain_http.is_err() || !plain_http.unwrap().status().is_success());
    s.shutdown().await;
}

#[tokio::test]
async fn mtls_requires_a_client_certificate() {
    let pki = Pki::new();
    let mut c = memory_config();
    c.tls = Some(pki.tls(true));
    let s = start(c).await;
    let port = s.grpc_addr.port();

    let without = match pki.grpc(port, false).await {
        Err(_) => true,
        Ok(ch) => caps(ch, None).await.is_err(),
    };
    assert!(without, "a client without a certificate completed a call");
    let ch = pki.grpc(port, true).await.unwrap();
    assert!(caps(ch, None).await.unwrap());

    let url = format!("https://localhost:{}/healthz", s.http_addr.unwrap().port());
    assert!(
        pki.https(false).get(&url).send().await.is_err(),
        "HTTPS without a client certificate succeeded"
    );
    assert_eq!(
        pki.https(true).get(&url).send().await.unwrap().status(),
        StatusCode::OK
    );
    s.shutdown().await;
}

async fn start_err(c: Config) -> String {
    lre_server::start(c)
        .await
        .err()
        .expect("config must be refused")
        .to_string()
}

#[tokio::test]
async fn bad_security_config_is_refused_at_start_naming_the_key() {
    let pki = Pki::new();
    let mut c = memory_config();
    let mut tls = pki.tls(false);
    tls.require_client_cert = true;
    c.tls = Some(tls);
    let e = start_err(c).await;
    assert!(e.contains("tls.require_client_cert"), "{e}");

    let mut c = memory_config();
    c.tls = Some(TlsConfig {
        cert: Path::new("/nonexistent.crt").into(),
        ..pki.tls(false)
    });
    let e = start_err(c).await;
    assert!(
        e.contains("tls.cert") && e.contains("/nonexistent.crt"),
        "{e}"
    );

    let mut c = memory_config();
    let mut t = token("ci", RW, Scope::ReadWrite, None);
    t.sha256 = "0123456789".into();
    c.auth.tokens = vec![t];
    let e = start_err(c).await;
    assert!(e.contains("auth.tokens[0].sha256"), "{e}");

    let mut c = memory_config();
    c.auth.tokens = vec![
        token("ci", RW, Scope::ReadWrite, None),
        token("ci", RO, Scope::Read, None),
    ];
    let e = start_err(c).await;
    assert!(
        e.contains("auth.tokens[1].name") && e.contains("duplicate"),
        "{e}"
    );
}
