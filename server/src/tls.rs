//! TLS for STARTTLS: a rustls server configuration (ring provider) from PEM files, or a
//! self-signed certificate generated at start with rcgen.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

use crate::config::TlsConfig;
use crate::error::ServerError;

/// The TLS acceptor configuration and the certificate (PEM) clients should trust.
pub struct TlsSetup {
    /// rustls configuration for accepted connections.
    pub config: Arc<ServerConfig>,
    /// The server certificate chain in PEM: with a self-signed certificate, what a client
    /// puts in its CA file.
    pub cert_pem: String,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, ServerError> {
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(format!("certificate and key do not fit: {e}")))?;
    Ok(Arc::new(cfg))
}

/// Loads the configured certificate and key, or generates a self-signed certificate valid for
/// `domain`, `localhost`, 127.0.0.1 and ::1.
pub fn setup(cfg: &TlsConfig, domain: &str) -> Result<TlsSetup, ServerError> {
    match (&cfg.cert, &cfg.key) {
        (Some(cert), Some(key)) => {
            let cert_pem = std::fs::read_to_string(cert)
                .map_err(|e| ServerError::Tls(format!("tls.cert {}: {e}", cert.display())))?;
            let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ServerError::Tls(format!("tls.cert {}: {e}", cert.display())))?;
            if certs.is_empty() {
                return Err(ServerError::Tls(format!(
                    "tls.cert {}: no certificate in file",
                    cert.display()
                )));
            }
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| ServerError::Tls(format!("tls.key {}: {e}", key.display())))?;
            Ok(TlsSetup {
                config: server_config(certs, key)?,
                cert_pem,
            })
        }
        _ => {
            let mut names = vec![domain.to_owned()];
            for n in ["localhost", "127.0.0.1", "::1"] {
                if !names.iter().any(|x| x == n) {
                    names.push(n.to_owned());
                }
            }
            let ck = rcgen::generate_simple_self_signed(names).map_err(|e| {
                ServerError::Tls(format!("generating a self-signed certificate: {e}"))
            })?;
            let cert_pem = ck.cert.pem();
            let der: CertificateDer<'static> = ck.cert.der().clone();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
            Ok(TlsSetup {
                config: server_config(vec![der], key)?,
                cert_pem,
            })
        }
    }
}
