//! `spine-tls`: the rustls set-up every TLS endpoint of Spine shares, so that `ca_file` means
//! the same thing to the XMPP connection, the `spine` HTTP commands and the agent, and so that
//! the embedded XMPP server and the dispatcher's HTTPS listener read certificates alike.
//!
//! Data flow: a configuration names PEM files; this crate turns them into a rustls
//! [`ClientConfig`] (what a client trusts: [`Trust`], [`client_config`]) or [`ServerConfig`]
//! (what a server presents: [`read_cert_chain`], [`read_key`], [`server_config`]), which the
//! caller hands to tokio-rustls, reqwest or tokio-xmpp. Every configuration uses the ring
//! provider explicitly (the workspace keeps aws-lc-rs and OpenSSL out of the build), and every
//! error says which input is at fault so that callers can name their configuration key.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
pub use tokio_rustls::rustls;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Certificates a client trusts.
#[derive(Clone)]
pub enum Trust {
    /// Exactly the CA certificates in this PEM text (a private CA, or the embedded server's
    /// self-signed certificate).
    Pem(String),
    /// The operating system's certificate store (servers with publicly issued certificates).
    System,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trust::Pem(_) => f.write_str("Trust::Pem(..)"),
            Trust::System => f.write_str("Trust::System"),
        }
    }
}

impl Trust {
    /// What a `ca_file` option means everywhere in Spine: the CA certificates of that PEM
    /// file and nothing else, or, without one, the operating system's store.
    pub fn from_ca_file(ca_file: Option<&Path>) -> Result<Trust, TlsError> {
        match ca_file {
            Some(f) => std::fs::read_to_string(f)
                .map(Trust::Pem)
                .map_err(|e| TlsError::Ca {
                    path: Some(f.to_path_buf()),
                    reason: e.to_string(),
                }),
            None => Ok(Trust::System),
        }
    }
}

/// Why a TLS configuration could not be built; each variant names the input at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA file (or PEM text) to trust is unreadable or holds no usable certificate.
    #[error("{}{reason}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Ca {
        /// The file (none for PEM text given directly).
        path: Option<PathBuf>,
        /// What is wrong.
        reason: String,
    },
    /// The operating system's certificate store is empty or unreadable.
    #[error("the operating system's certificate store is empty or unreadable ({errors} errors): give a CA file")]
    SystemStore {
        /// Errors met while reading it.
        errors: usize,
    },
    /// A server's certificate chain file is unreadable or holds no PEM certificate.
    #[error("{}: {reason}", path.display())]
    Cert {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A server's private key file is unreadable or holds no PEM private key.
    #[error("{}: {reason}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The private key is not the key of the chain's first certificate, or rustls refuses
    /// the pair.
    #[error("the private key does not fit the certificate: {0}")]
    Mismatch(String),
    /// rustls refused the configuration for another reason.
    #[error("{0}")]
    Rustls(String),
}

/// The one crypto provider of the workspace, given explicitly so that no process-wide default
/// is needed and no other backend can be picked by accident.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The roots of `trust`: every certificate of the PEM text, or the system store's readable
/// entries. An empty store is an error, never a client that trusts nothing.
pub fn root_store(trust: &Trust) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match trust {
        Trust::Pem(pem) => {
            let ca = |reason: String| TlsError::Ca { path: None, reason };
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| ca(format!("CA certificate PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| ca(format!("CA certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(ca(
                    "no PEM CA certificate (expected -----BEGIN CERTIFICATE-----)".to_owned(),
                ));
            }
        }
        Trust::System => {
            // Unreadable entries are skipped; an empty store is refused below.
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(TlsError::SystemStore {
                    errors: found.errors.len(),
                });
            }
        }
    }
    Ok(roots)
}

/// A client configuration verifying servers against `trust` (ring, rustls's safe protocol
/// versions, no client certificate).
pub fn client_config(trust: &Trust) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_root_certificates(root_store(trust)?)
        .with_no_client_auth())
}

/// [`client_config`] of [`Trust::from_ca_file`]: what a client with a `ca_file` option uses.
/// Errors about the file's contents name the file.
pub fn client_config_for_ca_file(ca_file: Option<&Path>) -> Result<ClientConfig, TlsError> {
    client_config(&Trust::from_ca_file(ca_file)?).map_err(|e| match (e, ca_file) {
        (TlsError::Ca { path: None, reason }, Some(f)) => TlsError::Ca {
            path: Some(f.to_path_buf()),
            reason,
        },
        (e, _) => e,
    })
}

/// The certificate chain of a PEM file, server certificate first, and the file's text (what a
/// client of a self-signed server puts in its CA file).
pub fn read_cert_chain(path: &Path) -> Result<(String, Vec<CertificateDer<'static>>), TlsError> {
    let bad = |reason: String| TlsError::Cert {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(bad(
            "no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)".to_owned(),
        ));
    }
    Ok((pem, certs))
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.to_path_buf(),
        reason: match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                "no PEM private key in it (expected -----BEGIN PRIVATE KEY-----)".to_owned()
            }
            e => e.to_string(),
        },
    })
}

/// A server configuration presenting `certs` with `key` (ring, safe protocol versions, no
/// client certificates). A key that is not the first certificate's is refused here, at start,
/// rather than at every client's handshake.
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, TlsError> {
    ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) | rustls::Error::General(_) => {
                TlsError::Mismatch(e.to_string())
            }
            e => TlsError::Rustls(e.to_string()),
        })
}

/// [`server_config`] of the chain and key in two PEM files.
pub fn server_config_from_files(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let (_, certs) = read_cert_chain(cert)?;
    server_config(certs, read_key(key)?)
}

/// rustls refusing the server's certificate, if that is what `e` is or wraps (also inside an
/// `io::Error`, whose `source` skips the error it carries): what a client turns into "verify
/// the server with a CA file" advice rather than a transport error.
pub fn certificate_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return matches!(
                r,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
            .then_some(r);
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(r) = certificate_error(inner) {
                return Some(r);
            }
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn server_files_are_checked_and_errors_name_the_file_at_fault() {
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = write(dir.path(), "cert.pem", &a.cert.pem());
        let key = write(dir.path(), "key.pem", &a.key_pair.serialize_pem());
        let other_key = write(dir.path(), "other.pem", &b.key_pair.serialize_pem());
        let junk = write(dir.path(), "junk.pem", "not pem at all\n");

        server_config_from_files(&cert, &key).expect("a matching pair");
        let e = server_config_from_files(&cert, &other_key).unwrap_err();
        assert!(matches!(e, TlsError::Mismatch(_)), "{e}");
        let e = server_config_from_files(&junk, &key).unwrap_err();
        assert!(
            matches!(&e, TlsError::Cert { path, .. } if path == &junk),
            "{e}"
        );
        assert!(e.to_string().contains("BEGIN CERTIFICATE"), "{e}");
        // A key file given as the certificate: no certificate in it.
        assert!(matches!(
            server_config_from_files(&key, &key).unwrap_err(),
            TlsError::Cert { .. }
        ));
        let e = server_config_from_files(&cert, &junk).unwrap_err();
        assert!(
            matches!(&e, TlsError::Key { path, .. } if path == &junk),
            "{e}"
        );
        let missing = dir.path().join("missing.pem");
        let e = server_config_from_files(&missing, &key).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
    }

    #[test]
    fn a_ca_file_is_all_that_is_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let ca = write(dir.path(), "ca.pem", &a.cert.pem());
        let trust = Trust::from_ca_file(Some(&ca)).unwrap();
        assert_eq!(root_store(&trust).unwrap().len(), 1);
        let junk = write(dir.path(), "junk.pem", "nothing");
        let e = client_config_for_ca_file(Some(&junk)).unwrap_err();
        assert!(matches!(e, TlsError::Ca { .. }), "{e}");
        assert!(
            e.to_string().contains("junk.pem: no PEM CA certificate"),
            "{e}"
        );
        let e = Trust::from_ca_file(Some(&dir.path().join("missing.pem"))).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        assert!(matches!(Trust::from_ca_file(None).unwrap(), Trust::System));
    }

    #[test]
    fn a_certificate_error_is_found_inside_io_errors() {
        let inner = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        assert_eq!(
            certificate_error(&io).map(ToString::to_string).as_deref(),
            Some("invalid peer certificate: UnknownIssuer")
        );
        let other = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(certificate_error(&other).is_none());
    }
}
