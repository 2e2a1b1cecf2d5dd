//! Server side of SASL SCRAM (RFC 5802, RFC 7677) for SHA-1 and SHA-256, with and without
//! channel binding (`-PLUS`, `tls-exporter` per RFC 9266), plus salted-key derivation.
//!
//! Written here rather than taken from the `sasl` crate: its 0.5 server side accepts only the
//! `y` gs2 flag without channel binding and only `tls-unique` with it, so standard clients
//! (tokio-xmpp sends `n,,`; TLS 1.3 clients send `p=tls-exporter`) fail against it. The
//! exchange is small; it is tested against the RFC test vectors below.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Iterations used when deriving keys from a configured password (RFC 7677's minimum).
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// The hash of a SCRAM mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hash {
    /// SCRAM-SHA-1
    Sha1,
    /// SCRAM-SHA-256
    Sha256,
}

impl Hash {
    pub(crate) fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha1 => {
                let mut m =
                    <Hmac<Sha1> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
            Hash::Sha256 => {
                let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
                    .expect("HMAC accepts any key length");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
        }
    }

    fn digest(self, data: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        match self {
            Hash::Sha1 => Sha1::digest(data).to_vec(),
            Hash::Sha256 => Sha256::digest(data).to_vec(),
        }
    }

    fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        match self {
            Hash::Sha1 => {
                let mut out = vec![0u8; 20];
                pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iterations, &mut out);
                out
            }
            Hash::Sha256 => {
                let mut out = vec![0u8; 32];
                pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
                out
            }
        }
    }

    /// The RFC 5803 scheme name.
    pub fn scheme(self) -> &'static str {
        match self {
            Hash::Sha1 => "SCRAM-SHA-1",
            Hash::Sha256 => "SCRAM-SHA-256",
        }
    }
}

/// What the server stores for one account and one hash: never the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// Salt.
    pub salt: Vec<u8>,
    /// H(ClientKey).
    pub stored_key: Vec<u8>,
    /// HMAC(SaltedPassword, "Server Key").
    pub server_key: Vec<u8>,
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(..)")
    }
}

impl ScramKeys {
    /// Derives the stored keys for `password`.
    pub fn derive(hash: Hash, password: &str, salt: &[u8], iterations: u32) -> Self {
        let salted = hash.salted_password(password.as_bytes(), salt, iterations);
        let client_key = hash.hmac(&salted, b"Client Key");
        ScramKeys {
            iterations,
            salt: salt.to_vec(),
            stored_key: hash.digest(&client_key),
            server_key: hash.hmac(&salted, b"Server Key"),
        }
    }

    /// Whether `password` is the one these keys were derived from (for SASL PLAIN).
    pub fn verify_password(&self, hash: Hash, password: &str) -> bool {
        let other = ScramKeys::derive(hash, password, &self.salt, self.iterations);
        bool::from(other.stored_key.ct_eq(&self.stored_key))
    }

    /// RFC 5803 form: `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64).
    pub fn to_rfc5803(&self, hash: Hash) -> String {
        format!(
            "{}${}:{}${}:{}",
            hash.scheme(),
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(&self.stored_key),
            B64.encode(&self.server_key)
        )
    }

    /// Reads the RFC 5803 form.
    pub fn from_rfc5803(s: &str) -> Result<(Hash, Self), String> {
        let err = |m: &str| {
            format!("not an RFC 5803 SCRAM hash ({m}): expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>")
        };
        let mut parts = s.split('$');
        let hash = match parts.next() {
            Some("SCRAM-SHA-256") => Hash::Sha256,
            Some("SCRAM-SHA-1") => Hash::Sha1,
            _ => return Err(err("scheme")),
        };
        let (iter, salt) = parts
            .next()
            .and_then(|p| p.split_once(':'))
            .ok_or_else(|| err("iterations:salt"))?;
        let (stored, server) = parts
            .next()
            .and_then(|p| p.split_once(':'))
            .ok_or_else(|| err("keys"))?;
        if parts.next().is_some() {
            return Err(err("trailing data"));
        }
        let iterations: u32 = iter.parse().map_err(|_| err("iterations"))?;
        if iterations < DEFAULT_ITERATIONS {
            return Err(format!(
                "SCRAM iteration count {iterations} is below the minimum of {DEFAULT_ITERATIONS}"
            ));
        }
        let dec = |x: &str, what: &str| B64.decode(x).map_err(|_| err(what));
        let keys = ScramKeys {
            iterations,
            salt: dec(salt, "salt")?,
            stored_key: dec(stored, "StoredKey")?,
            server_key: dec(server, "ServerKey")?,
        };
        let len = match hash {
            Hash::Sha1 => 20,
            Hash::Sha256 => 32,
        };
        if keys.stored_key.len() != len || keys.server_key.len() != len {
            return Err(err("key length"));
        }
        Ok((hash, keys))
    }
}

/// Why a SCRAM exchange failed. Reported to the client only as `not-authorized`
/// (or `malformed-request`); the detail goes to the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The client's message does not follow RFC 5802.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// Channel-binding flag or data not acceptable.
    #[error("channel binding mismatch: {0}")]
    ChannelBinding(&'static str),
    /// Wrong nonce in client-final.
    #[error("nonce mismatch")]
    Nonce,
    /// Wrong password, or unknown user.
    #[error("invalid proof")]
    Proof,
}

/// Channel binding as the server sees it for this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// No TLS, or the server does not offer -PLUS mechanisms on this connection.
    NotOffered,
    /// The server offers -PLUS with `tls-exporter` and these are the exporter bytes.
    TlsExporter(Vec<u8>),
}

/// A SCRAM exchange in progress, after the client-first message.
pub struct ScramServer {
    hash: Hash,
    plus: bool,
    username: String,
    gs2_header: String,
    cb_data: Vec<u8>,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    keys: ScramKeys,
}

/// Reads `n=` username with RFC 5802 escapes.
fn unescape_username(s: &str) -> Result<String, ScramError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(ScramError::Malformed("bad escape in username")),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

impl ScramServer {
    /// The username from a client-first message, before the account is looked up.
    pub fn username_of(client_first: &[u8]) -> Result<String, ScramError> {
        let s =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut it = s.splitn(3, ',');
        let (_, _, bare) = (
            it.next(),
            it.next(),
            it.next().ok_or(ScramError::Malformed("no gs2 header"))?,
        );
        let user = bare
            .split(',')
            .next()
            .and_then(|p| p.strip_prefix("n="))
            .ok_or(ScramError::Malformed("no username"))?;
        unescape_username(user)
    }

    /// Starts an exchange: parses client-first, answers server-first.
    ///
    /// `keys` are the account's keys, or for an unknown user made-up keys (so that the
    /// exchange fails at the proof, not earlier, and does not reveal which users exist).
    pub fn start(
        hash: Hash,
        plus: bool,
        binding: &Binding,
        client_first: &[u8],
        keys: ScramKeys,
        server_nonce: &str,
    ) -> Result<(Self, Vec<u8>), ScramError> {
        let s =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut it = s.splitn(3, ',');
        let flag = it.next().ok_or(ScramError::Malformed("no gs2 flag"))?;
        let authzid = it
            .next()
            .ok_or(ScramError::Malformed("no gs2 authzid field"))?;
        let bare = it
            .next()
            .ok_or(ScramError::Malformed("no client-first-bare"))?;
        let cb_data = match (flag, plus, binding) {
            ("n", false, _) => Vec::new(),
            // The client could bind but believes we cannot: fine unless we offered -PLUS
            // (then someone stripped it: a downgrade, RFC 5802 §6).
            ("y", false, Binding::NotOffered) => Vec::new(),
            ("y", false, Binding::TlsExporter(_)) => {
                return Err(ScramError::ChannelBinding(
                    "client says 'y' but -PLUS was offered",
                ))
            }
            ("p=tls-exporter", true, Binding::TlsExporter(data)) => data.clone(),
            (f, true, _) if f.starts_with("p=") => {
                return Err(ScramError::ChannelBinding(
                    "only tls-exporter channel binding is supported",
                ))
            }
            (_, true, _) => return Err(ScramError::ChannelBinding("-PLUS needs a 'p=' gs2 flag")),
            _ => return Err(ScramError::ChannelBinding("unexpected gs2 flag")),
        };
        if !authzid.is_empty() && !authzid.starts_with("a=") {
            return Err(ScramError::Malformed("bad authzid field"));
        }
        let mut fields = bare.split(',');
        let user = fields
            .next()
            .and_then(|p| p.strip_prefix("n="))
            .ok_or(ScramError::Malformed("no username"))?;
        let username = unescape_username(user)?;
        let cnonce = fields
            .next()
            .and_then(|p| p.strip_prefix("r="))
            .ok_or(ScramError::Malformed("no nonce"))?;
        if cnonce.is_empty()
            || !cnonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(ScramError::Malformed("bad client nonce"));
        }
        if bare.starts_with("m=") {
            return Err(ScramError::Malformed("mandatory extension not supported"));
        }
        let nonce = format!("{cnonce}{server_nonce}");
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&keys.salt),
            keys.iterations
        );
        let gs2_header = format!("{flag},{authzid},");
        let out = server_first.clone().into_bytes();
        Ok((
            ScramServer {
                hash,
                plus,
                username,
                gs2_header,
                cb_data,
                client_first_bare: bare.to_owned(),
                server_first,
                nonce,
                keys,
            },
            out,
        ))
    }

    /// The username the client gave.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// Whether the exchange uses channel binding.
    pub fn is_plus(&self) -> bool {
        self.plus
    }

    /// Checks client-final; on success returns server-final (`v=...`) for `<success/>`.
    pub fn finish(self, client_final: &[u8]) -> Result<Vec<u8>, ScramError> {
        let s =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = s
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut fields = without_proof.split(',');
        let c = fields
            .next()
            .and_then(|p| p.strip_prefix("c="))
            .ok_or(ScramError::Malformed("no channel binding field"))?;
        let r = fields
            .next()
            .and_then(|p| p.strip_prefix("r="))
            .ok_or(ScramError::Malformed("no nonce"))?;
        let mut expected_c = self.gs2_header.clone().into_bytes();
        expected_c.extend_from_slice(&self.cb_data);
        let c = B64
            .decode(c)
            .map_err(|_| ScramError::Malformed("channel binding is not base64"))?;
        if !bool::from(c.ct_eq(&expected_c)) {
            return Err(ScramError::ChannelBinding(
                "c= does not match the gs2 header and binding data",
            ));
        }
        if r != self.nonce {
            return Err(ScramError::Nonce);
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = self
            .hash
            .hmac(&self.keys.stored_key, auth_message.as_bytes());
        if proof.len() != client_signature.len() {
            return Err(ScramError::Proof);
        }
        let client_key: Vec<u8> = proof
            .iter()
            .zip(&client_signature)
            .map(|(a, b)| a ^ b)
            .collect();
        if !bool::from(self.hash.digest(&client_key).ct_eq(&self.keys.stored_key)) {
            return Err(ScramError::Proof);
        }
        let server_signature = self
            .hash
            .hmac(&self.keys.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client side of the exchange, computed independently from the RFC formulas.
    fn client_proof(
        hash: Hash,
        password: &str,
        salt: &[u8],
        iters: u32,
        auth_message: &str,
    ) -> Vec<u8> {
        let salted = hash.salted_password(password.as_bytes(), salt, iters);
        let client_key = hash.hmac(&salted, b"Client Key");
        let stored = hash.digest(&client_key);
        let sig = hash.hmac(&stored, auth_message.as_bytes());
        client_key.iter().zip(sig).map(|(a, b)| a ^ b).collect()
    }

    /// RFC 7677 §3 test vector (SCRAM-SHA-256).
    #[test]
    fn rfc7677_vector() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let keys = ScramKeys::derive(Hash::Sha256, "pencil", &salt, 4096);
        let (srv, first) = ScramServer::start(
            Hash::Sha256,
            false,
            &Binding::NotOffered,
            b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
            keys,
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        )
        .unwrap();
        assert_eq!(
            first,
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let fin = srv
            .finish(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        assert_eq!(fin, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    /// RFC 5802 §5 test vector (SCRAM-SHA-1).
    #[test]
    fn rfc5802_vector() {
        let salt = B64.decode("QSXCR+Q6sek8bf92").unwrap();
        let keys = ScramKeys::derive(Hash::Sha1, "pencil", &salt, 4096);
        let (srv, first) = ScramServer::start(
            Hash::Sha1,
            false,
            &Binding::NotOffered,
            b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
            keys,
            "3rfcNHYJY1ZVvWVs7j",
        )
        .unwrap();
        assert_eq!(
            first,
            b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
        );
        let fin = srv
            .finish(b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=")
            .unwrap();
        assert_eq!(fin, b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=");
    }

    #[test]
    fn wrong_password_and_tampering_fail() {
        let salt = b"0123456789abcdef";
        let keys = ScramKeys::derive(Hash::Sha256, "right", salt, 4096);
        let first_bare = "n=bob,r=abc";
        let start = || {
            ScramServer::start(
                Hash::Sha256,
                false,
                &Binding::NotOffered,
                format!("n,,{first_bare}").as_bytes(),
                keys.clone(),
                "xyz",
            )
            .unwrap()
        };
        let (srv, sf) = start();
        let sf = String::from_utf8(sf).unwrap();
        let without = "c=biws,r=abcxyz";
        let am = format!("{first_bare},{sf},{without}");
        let bad = client_proof(Hash::Sha256, "wrong", salt, 4096, &am);
        assert_eq!(
            srv.finish(format!("{without},p={}", B64.encode(bad)).as_bytes()),
            Err(ScramError::Proof)
        );
        let (srv, _) = start();
        let good = client_proof(Hash::Sha256, "right", salt, 4096, &am);
        assert!(srv
            .finish(format!("{without},p={}", B64.encode(&good)).as_bytes())
            .is_ok());
        let (srv, _) = start();
        assert_eq!(
            srv.finish(format!("c=biws,r=abcXXX,p={}", B64.encode(&good)).as_bytes()),
            Err(ScramError::Nonce)
        );
        let (srv, _) = start();
        assert!(matches!(
            srv.finish(format!("c=eSws,r=abcxyz,p={}", B64.encode(&good)).as_bytes()),
            Err(ScramError::ChannelBinding(_))
        ));
    }

    #[test]
    fn channel_binding_rules() {
        let keys = ScramKeys::derive(Hash::Sha256, "pw", b"salt", 4096);
        let offered = Binding::TlsExporter(vec![1, 2, 3]);
        let try_start = |plus, binding: &Binding, msg: &str| {
            ScramServer::start(
                Hash::Sha256,
                plus,
                binding,
                msg.as_bytes(),
                keys.clone(),
                "s",
            )
            .map(|_| ())
        };
        assert!(try_start(false, &Binding::NotOffered, "n,,n=u,r=a").is_ok());
        assert!(try_start(false, &Binding::NotOffered, "y,,n=u,r=a").is_ok());
        assert!(
            try_start(false, &offered, "y,,n=u,r=a").is_err(),
            "downgrade must fail"
        );
        assert!(try_start(false, &offered, "n,,n=u,r=a").is_ok());
        assert!(try_start(true, &offered, "p=tls-exporter,,n=u,r=a").is_ok());
        assert!(try_start(true, &offered, "p=tls-unique,,n=u,r=a").is_err());
        assert!(try_start(true, &offered, "n,,n=u,r=a").is_err());
        assert!(try_start(false, &Binding::NotOffered, "p=tls-exporter,,n=u,r=a").is_err());
        assert!(try_start(false, &Binding::NotOffered, "n,,m=ext,n=u,r=a").is_err());
        assert!(try_start(false, &Binding::NotOffered, "garbage").is_err());
    }

    #[test]
    fn usernames_and_rfc5803() {
        assert_eq!(
            ScramServer::username_of(b"n,,n=a=2Cb=3Dc,r=x").unwrap(),
            "a,b=c"
        );
        assert!(ScramServer::username_of(b"n,,n=a=ZZ,r=x").is_err());
        let keys = ScramKeys::derive(Hash::Sha256, "pw", b"salty", 4096);
        let s = keys.to_rfc5803(Hash::Sha256);
        assert!(s.starts_with("SCRAM-SHA-256$4096:"));
        assert_eq!(
            ScramKeys::from_rfc5803(&s).unwrap(),
            (Hash::Sha256, keys.clone())
        );
        assert!(keys.verify_password(Hash::Sha256, "pw"));
        assert!(!keys.verify_password(Hash::Sha256, "pW"));
        assert!(ScramKeys::from_rfc5803("SCRAM-SHA-256$10:c2FsdA==$AAAA:AAAA").is_err());
        assert!(ScramKeys::from_rfc5803("PLAIN$x").is_err());
    }
}
