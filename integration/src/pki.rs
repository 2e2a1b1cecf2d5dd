//! A private CA made for a test, and a server certificate it signed: what the TLS tests of
//! the XMPP connection (`tests/tls_ca.rs`) and of the dispatcher's HTTPS API give the servers
//! (certificate and key files) and the clients (`ca_file`, `--ca-file`).

use std::path::{Path, PathBuf};

/// A CA and a server certificate it signed for `names` (DNS names, or IP addresses such as
/// `127.0.0.1`), written to `dir`: (CA PEM path, certificate path, key path). Panics on
/// failure (test support).
pub fn pki(dir: &Path, names: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("the PKI directory");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "Spine test CA");
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let leaf =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("server certificate parameters");
    let leaf_key = rcgen::KeyPair::generate().expect("server key");
    let leaf_cert = leaf
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .expect("server certificate");
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).expect("writing ca.pem");
    std::fs::write(&paths.1, leaf_cert.pem()).expect("writing cert.pem");
    std::fs::write(&paths.2, leaf_key.serialize_pem()).expect("writing key.pem");
    paths
}
