//! TLS for STARTTLS: a rustls server configuration (ring provider) from PEM files, or a
//! self-signed certificate generated at start with rcgen.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::ServerConfig;

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

/// The shared rustls set-up (ring), with this server's error type.
fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, ServerError> {
    spine_tls::server_config(certs, key)
        .map(Arc::new)
        .map_err(|e| ServerError::Tls(format!("tls.key: {e}")))
}

/// Loads the configured certificate and key, or generates a self-signed certificate valid for
/// `domain`, `localhost`, 127.0.0.1 and ::1.
pub fn setup(cfg: &TlsConfig, domain: &str) -> Result<TlsSetup, ServerError> {
    match (&cfg.cert, &cfg.key) {
        (Some(cert), Some(key)) => {
            let (cert_pem, certs) = spine_tls::read_cert_chain(cert)
                .map_err(|e| ServerError::Tls(format!("tls.cert {e}")))?;
            let key =
                spine_tls::read_key(key).map_err(|e| ServerError::Tls(format!("tls.key {e}")))?;
            Ok(TlsSetup {
                config: server_config(certs, key)?,
                cert_pem,
            })
        }
        _ => match &cfg.self_signed_dir {
            Some(dir) => {
                let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
                if !(cert.exists() && key.exists()) {
                    let (cert_pem, key_pem) = generate(domain)?;
                    write_new(dir, &cert, cert_pem.as_bytes(), 0o644)?;
                    write_new(dir, &key, key_pem.as_bytes(), 0o600)?;
                }
                let files = TlsConfig {
                    cert: Some(cert),
                    key: Some(key),
                    self_signed_dir: None,
                };
                setup(&files, domain)
            }
            None => {
                let (cert_pem, key_pem) = generate(domain)?;
                let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
                    .map_err(|e| ServerError::Tls(e.to_string()))?;
                let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                    .map_err(|e| ServerError::Tls(e.to_string()))?;
                Ok(TlsSetup {
                    config: server_config(vec![der], key)?,
                    cert_pem,
                })
            }
        },
    }
}

/// A self-signed certificate (PEM) and its key (PKCS#8 PEM) valid for `domain`, `localhost`,
/// 127.0.0.1 and ::1.
pub fn generate(domain: &str) -> Result<(String, String), ServerError> {
    let mut names = vec![domain.to_owned()];
    for n in ["localhost", "127.0.0.1", "::1"] {
        if !names.iter().any(|x| x == n) {
            names.push(n.to_owned());
        }
    }
    let ck = rcgen::generate_simple_self_signed(names)
        .map_err(|e| ServerError::Tls(format!("generating a self-signed certificate: {e}")))?;
    Ok((ck.cert.pem(), ck.key_pair.serialize_pem()))
}

fn write_new(
    dir: &std::path::Path,
    path: &std::path::Path,
    data: &[u8],
    mode: u32,
) -> Result<(), ServerError> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    // It holds the private key: a new directory is private to the server's user.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| ServerError::Tls(format!("tls.self_signed_dir {}: {e}", dir.display())))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| ServerError::Tls(format!("{}: {e}", path.display())))?;
    f.write_all(data)
        .map_err(|e| ServerError::Tls(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_dir_keeps_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TlsConfig {
            cert: None,
            key: None,
            self_signed_dir: Some(dir.path().join("tls")),
        };
        let first = setup(&cfg, "example.test").unwrap();
        let second = setup(&cfg, "example.test").unwrap();
        assert_eq!(first.cert_pem, second.cert_pem);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("tls/key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(dir.path().join("tls"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700, "the key's directory is private");
        let plain = TlsConfig::default();
        assert_ne!(
            setup(&plain, "example.test").unwrap().cert_pem,
            first.cert_pem
        );
    }
}
