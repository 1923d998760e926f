//! How the worker reaches the server: one channel, over TLS whenever the address is
//! `https://`, whose every call — Attach, CAS, ByteStream — carries the worker's credential.
//! (Sending it on Attach alone left input fetches anonymous, and every action failed on a
//! server without anonymous reads.)

use std::path::{Path, PathBuf};

use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::{Result, WorkerError};

/// TLS settings for reaching the server.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// CA bundle the server's certificate must chain to; without it, the system's roots.
    pub ca: Option<PathBuf>,
    /// A client certificate and its key, for servers that require mTLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name to verify the server's certificate against, when it differs from the
    /// address dialled (e.g. a certificate for `localhost` served on 127.0.0.1).
    pub server_name: Option<String>,
}

/// The worker's secret as it travels: only ever in a header marked sensitive, so neither
/// tonic's nor our own logging prints it.
#[derive(Clone, Default)]
pub struct Credential(Option<AsciiMetadataValue>);

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Credential(bearer token)"
        } else {
            "Credential(none)"
        })
    }
}

impl Credential {
    pub fn none() -> Credential {
        Credential(None)
    }

    pub fn bearer(token: &str) -> Result<Credential> {
        let token = token.trim();
        if token.is_empty() {
            return Err(WorkerError::InvalidInput(
                "the worker token is empty".into(),
            ));
        }
        let mut v: AsciiMetadataValue = format!("Bearer {token}").parse().map_err(|_| {
            WorkerError::InvalidInput("the worker token must be printable ASCII".into())
        })?;
        v.set_sensitive(true);
        Ok(Credential(Some(v)))
    }

    /// Reads a token from a file (a Kubernetes Secret mount, say): its first line.
    pub fn from_file(path: &Path) -> Result<Credential> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            WorkerError::InvalidInput(format!(
                "cannot read the token file {}: {e}",
                path.display()
            ))
        })?;
        Self::bearer(text.lines().next().unwrap_or(""))
    }

    pub fn is_some(&self) -> bool {
        self.0.is_some()
    }
}

impl tonic::service::Interceptor for Credential {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// What every gRPC client of the worker is built on.
pub type ServerChannel = InterceptedService<Channel, Credential>;

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        WorkerError::InvalidInput(format!("cannot read {what} {}: {e}", path.display()))
    })
}

/// A lazily connecting channel to `server` (http:// or https://).
pub fn connect(server: &str, credential: Credential, tls: &ClientTls) -> Result<ServerChannel> {
    let bad = |e: &dyn std::fmt::Display| {
        WorkerError::InvalidInput(format!("server address {server:?}: {e}"))
    };
    let mut endpoint = Endpoint::from_shared(server.to_string()).map_err(|e| bad(&e))?;
    let https = server.starts_with("https://");
    let tls_asked = tls.ca.is_some() || tls.cert.is_some() || tls.server_name.is_some();
    if tls_asked && !https {
        return Err(bad(&"TLS options need an https:// address"));
    }
    let loopback = endpoint.uri().host().is_some_and(|h| {
        h == "localhost"
            || h.trim_matches(|c| c == '[' || c == ']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    if credential.is_some() && !https && !loopback {
        tracing::warn!(
            server,
            "sending the worker token without TLS; use https:// between machines"
        );
    }
    if https {
        let mut c = ClientTlsConfig::new();
        c = match &tls.ca {
            Some(ca) => c.ca_certificate(Certificate::from_pem(read(ca, "the CA bundle")?)),
            None => c.with_native_roots(),
        };
        match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                c = c.identity(Identity::from_pem(
                    read(cert, "the client certificate")?,
                    read(key, "the client key")?,
                ))
            }
            (None, None) => {}
            _ => {
                return Err(bad(
                    &"a client certificate needs both --tls-cert and --tls-key",
                ))
            }
        }
        if let Some(name) = &tls.server_name {
            c = c.domain_name(name.clone());
        }
        endpoint = endpoint.tls_config(c).map_err(|e| bad(&e))?;
    }
    Ok(InterceptedService::new(endpoint.connect_lazy(), credential))
}
