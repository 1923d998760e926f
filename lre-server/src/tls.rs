//! TLS for both ports, from one `[tls]` config section, with rustls (ring provider).

use std::io::BufReader;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

fn read(path: &std::path::Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError(format!("cannot read {}: {e}", path.display())))
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut BufReader::new(pem))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError(format!("{what}: no PEM certificates found")));
    }
    Ok(certs)
}

/// ALPN protocol names each port offers.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
pub const ALPN_H2: &[u8] = b"h2";

/// The server config of either port: the gRPC port offers `h2`, the HTTP port `http/1.1`.
/// Both ports do their own handshakes, so that each can bound its time.
pub fn rustls_config(c: &TlsConfig, alpn: &[u8]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(&read(&c.cert)?, "tls.cert")?;
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut BufReader::new(&read(&c.key)?[..]))
            .map_err(|e| TlsError(format!("tls.key: {e}")))?
            .ok_or_else(|| TlsError("tls.key: no PEM private key found".into()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?;
    let builder = match &c.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certs(&read(ca)?, "tls.client_ca")? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError(format!("tls.client_ca: {e}")))?;
            }
            let mut v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if !c.require_client_cert {
                v = v.allow_unauthenticated();
            }
            builder.with_client_cert_verifier(
                v.build()
                    .map_err(|e| TlsError(format!("tls.client_ca: {e}")))?,
            )
        }
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError(format!("tls.cert/tls.key: {e}")))?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(cfg))
}
