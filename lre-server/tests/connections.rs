//! Slowloris and connection floods against a real server: idle, half-sent and
//! never-handshaking connections are closed after the `[connections]` timeouts,
//! connections past `max_connections` are closed at once, and both ports stay usable.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use common::*;
use lre_server::config::{Config, TlsConfig};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// Far beyond any timeout the tests configure: only a connection the server never
/// closes takes this long.
const CLOSE_BOUND: Duration = Duration::from_secs(20);
/// Per port: more than `MAX` connections.
const CONNS: usize = 20;
const MAX: usize = 8;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn limited(timeout_seconds: u64) -> Config {
    let mut c = memory_config();
    c.connections.max_connections = MAX;
    c.connections.handshake_timeout_seconds = timeout_seconds;
    c.connections.header_read_timeout_seconds = timeout_seconds;
    c.connections.idle_timeout_seconds = timeout_seconds * 2;
    c.connections.keepalive_timeout_seconds = timeout_seconds;
    c
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// The server closed (EOF) or reset it.
    Closed,
    /// Still open after the wait (whatever the server sent meanwhile).
    Open,
}

/// Reads (and discards, e.g. the server's HTTP/2 SETTINGS) until the peer closes or
/// `wait` has passed.
async fn state<S: AsyncRead + Unpin>(s: &mut S, wait: Duration) -> State {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return State::Open,
            Ok(Ok(0)) | Ok(Err(_)) => return State::Closed,
            Ok(Ok(_)) => continue,
        }
    }
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("TCP connect")
}

async fn assert_all_closed(conns: &mut [TcpStream], what: &str) {
    let states = futures::future::join_all(conns.iter_mut().map(|c| state(c, CLOSE_BOUND))).await;
    let open = states.iter().filter(|s| **s == State::Open).count();
    assert_eq!(
        open,
        0,
        "{what}: {open} of {} connections still open after {CLOSE_BOUND:?}",
        conns.len()
    );
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn healthz(client: &reqwest::Client, url: &str) -> Result<(), String> {
    let r = client
        .get(format!("{url}/healthz"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("status {}", r.status()));
    }
    Ok(())
}

async fn capabilities(endpoint: Channel) -> Result<(), String> {
    CapabilitiesClient::new(endpoint)
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn grpc_channel(addr: SocketAddr) -> Result<Channel, String> {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| e.to_string())
}

/// Retries `f` until it succeeds or `CLOSE_BOUND` passes: the server notices closed
/// connections (and frees their slots) a moment after the client closes them.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + CLOSE_BOUND;
    loop {
        match f().await {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => panic!("{what} kept failing: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test]
async fn idle_and_half_sent_connections_are_closed_and_both_ports_stay_usable() {
    let s = start(limited(1)).await;
    let (grpc, http) = (s.grpc_addr, s.http_addr.expect("http port"));

    let mut conns = Vec::new();
    // The first connections on each port get slots: a half-sent request and a half-sent
    // upload on HTTP, a half-sent HTTP/2 preface on gRPC.
    let mut partial_header = connect(http).await;
    partial_header
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: lre\r\n")
        .await
        .unwrap();
    conns.push(partial_header);
    let mut stalled_body = connect(http).await;
    stalled_body
        .write_all(
            format!(
                "PUT /cas/{} HTTP/1.1\r\nHost: lre\r\nContent-Length: 1000\r\n\r\n0123456789",
                "0".repeat(64)
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    conns.push(stalled_body);
    let mut partial_preface = connect(grpc).await;
    partial_preface.write_all(&H2_PREFACE[..10]).await.unwrap();
    conns.push(partial_preface);
    // Then connections that send nothing at all, past the cap on both ports.
    for _ in 0..CONNS - 2 {
        conns.push(connect(http).await);
    }
    for _ in 0..CONNS - 1 {
        conns.push(connect(grpc).await);
    }
    assert_eq!(conns.len(), 2 * CONNS);
    assert_all_closed(&mut conns, "idle and half-sent connections").await;

    // With those gone, both ports answer fresh clients.
    let client = http_client();
    let url = http_url(&s);
    eventually("GET /healthz", || healthz(&client, &url)).await;
    eventually("GetCapabilities", || async move {
        capabilities(grpc_channel(grpc).await?).await
    })
    .await;
    drop(conns);
    s.shutdown().await;
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_at_once() {
    // Timeouts far longer than the test: whatever closes here is the cap's doing.
    let s = start(limited(60)).await;
    let (grpc, http) = (s.grpc_addr, s.http_addr.expect("http port"));
    let client = http_client();
    let url = http_url(&s);

    let mut held = Vec::new();
    for addr in [grpc, http] {
        // Connected one after another, so these are accepted first and hold the slots.
        let mut within: Vec<TcpStream> = Vec::new();
        for _ in 0..MAX {
            within.push(connect(addr).await);
        }
        let mut past: Vec<TcpStream> = Vec::new();
        for _ in MAX..CONNS {
            past.push(connect(addr).await);
        }
        assert_all_closed(&mut past, &format!("connections past the cap on {addr}")).await;
        for (i, c) in within.iter_mut().enumerate() {
            assert_eq!(
                state(c, Duration::from_millis(300)).await,
                State::Open,
                "connection {i} within the cap on {addr} was closed"
            );
        }
        held.push(within);
    }

    // While the slots are taken, new clients are turned away rather than left hanging.
    assert!(
        healthz(&client, &url).await.is_err(),
        "/healthz answered on a port at its connection cap"
    );
    let refused = match grpc_channel(grpc).await {
        Err(_) => true,
        Ok(ch) => capabilities(ch).await.is_err(),
    };
    assert!(
        refused,
        "a gRPC call succeeded on a port at its connection cap"
    );

    // Once the holders go, their slots are free again.
    drop(held);
    eventually("GET /healthz", || healthz(&client, &url)).await;
    eventually("GetCapabilities", || async move {
        capabilities(grpc_channel(grpc).await?).await
    })
    .await;
    s.shutdown().await;
}

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    ca_der: rustls::pki_types::CertificateDer<'static>,
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
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = leaf.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.path().join("server.crt"), server.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
        Pki {
            dir,
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
        }
    }

    fn tls(&self) -> TlsConfig {
        TlsConfig {
            cert: self.dir.path().join("server.crt"),
            key: self.dir.path().join("server.key"),
            client_ca: None,
            require_client_cert: false,
        }
    }

    /// A TLS client that finishes the handshake (offering `h2`) and then says nothing.
    async fn silent_tls(&self, addr: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, connect(addr).await)
            .await
            .expect("TLS handshake")
    }
}

#[tokio::test]
async fn tls_handshakes_and_the_http2_preface_are_timed() {
    let pki = Pki::new();
    let mut c = limited(1);
    c.tls = Some(pki.tls());
    let s = start(c).await;
    let (grpc, http) = (s.grpc_addr, s.http_addr.expect("http port"));

    // TCP connections that never start the TLS handshake, on both ports.
    let mut raw = Vec::new();
    for addr in [grpc, http] {
        for _ in 0..3 {
            raw.push(connect(addr).await);
        }
    }
    // A TLS client on the gRPC port that never sends the HTTP/2 preface.
    let mut silent = pki.silent_tls(grpc).await;
    assert_all_closed(&mut raw, "connections without a TLS handshake").await;
    assert_eq!(
        state(&mut silent, CLOSE_BOUND).await,
        State::Closed,
        "a TLS connection without an HTTP/2 preface was left open"
    );

    // Real TLS clients still get through on both ports.
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    let ch = Channel::from_shared(format!("https://127.0.0.1:{}", grpc.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("gRPC TLS connect");
    capabilities(ch).await.expect("GetCapabilities over TLS");
    let https = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    healthz(&https, &format!("https://localhost:{}", http.port()))
        .await
        .expect("/healthz over TLS");
    s.shutdown().await;
}
