//! Signed, expiring URLs for the data plane: the dispatcher puts a [`BlobGrant`] URL in a
//! job's `<input>` (the agent GETs the input from the blob store) and answers
//! `<request-slot>` with an [`UploadGrant`] URL (the agent PUTs its output); the HTTP
//! handlers parse the URL back ([`BlobGrant::parse`], [`UploadGrant::parse`]) and check it
//! ([`SignedUrl::verify`]) before touching the store. The URL itself is the credential, so
//! agents need no HTTP token: it names the agent, the job and (for uploads) the attempt, size
//! and hash, and only the dispatcher's key ([`UrlKey`], kept in `<data_dir>/url.key` so that
//! URLs survive a restart) can produce its `sig`.
//!
//! An agent that keeps its outputs and serves them itself (`data_listen`, PROTOCOL.md §13.5)
//! checks [`BlobGrant`] URLs to its blobs the same way, with the key derived for it
//! ([`UrlKey::for_holder`]).
//!
//! The signature is HMAC-SHA256 over a canonical encoding of the signed parts and the expiry
//! ([`UrlKey::sign`]), in unpadded base64url; times are UNIX seconds given by the caller (no
//! clock is read here).

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use jid::BareJid;
use sha2::Sha256;

use crate::data::{hex, parse_sha256};
use crate::JobId;

fn sha256_hex(sha256: &[u8; 32]) -> String {
    hex(sha256)
}

/// Domain separation: a MAC made here means nothing to any other use of the same key.
const DOMAIN: &[u8] = b"spine signed URL v1\0";

/// The dispatcher's URL signing key: 32 random bytes.
#[derive(Clone)]
pub struct UrlKey([u8; 32]);

impl fmt::Debug for UrlKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UrlKey(…)")
    }
}

/// Why a signed URL was refused. The HTTP API answers 403 to all three (so a forger learns
/// nothing from the kind); the kind is for the dispatcher's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SigError {
    /// The signature is valid but its time is past.
    #[error(
        "the URL has expired; the dispatcher hands out a new one with the next dispatch of \
         the job or the next upload slot"
    )]
    Expired,
    /// The signature does not match: the URL was altered, or made for another agent, job,
    /// attempt or key (a dispatcher whose `url.key` was replaced).
    #[error(
        "the URL's signature does not match it (altered, or signed for another agent, job or \
         key)"
    )]
    Bad,
    /// `sig` is not 43 characters of unpadded base64url.
    #[error("the URL's `sig` is not an HMAC-SHA256 in unpadded base64url (43 characters)")]
    Malformed,
}

impl UrlKey {
    /// A key from its bytes (tests, or a key kept elsewhere).
    pub fn from_bytes(key: [u8; 32]) -> UrlKey {
        UrlKey(key)
    }

    /// The key's bytes (to keep it in a file, or to send a derived key to the agent that
    /// uses it).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// The key an agent that keeps its outputs (`data_listen`) checks the URLs of its own
    /// blobs with: HMAC-SHA256 under this key of a domain tag and the agent's bare JID. The
    /// dispatcher signs URLs to that agent's blobs with it and gives it to that agent only
    /// (in the `<keep/>` of a job sent to it), so an agent can verify URLs to its own blobs
    /// and sign none for another agent's, and the dispatcher's own key never leaves it.
    pub fn for_holder(&self, agent: &BareJid) -> UrlKey {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(b"spine holder key v1\0");
        mac.update(agent.as_str().as_bytes());
        UrlKey(mac.finalize().into_bytes().into())
    }

    /// The MAC of `parts` and `exp_unix_s`. The input is encoded as a domain tag, the number
    /// of parts, each part as its byte length (u64, big-endian) then its bytes, and the
    /// expiry (u64, big-endian). Length prefixes make the encoding injective for any
    /// strings: no choice of parts (separators, empty parts, a part that looks like two)
    /// encodes like another list, so a signature for one URL fits no other. (Joining with a
    /// separator would need every part checked for it.)
    fn mac(&self, parts: &[&str], exp_unix_s: u64) -> Hmac<Sha256> {
        // HMAC takes keys of any length: 32 bytes cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(DOMAIN);
        mac.update(&(parts.len() as u64).to_be_bytes());
        for p in parts {
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p.as_bytes());
        }
        mac.update(&exp_unix_s.to_be_bytes());
        mac
    }

    /// The signature of `parts` valid until `exp_unix_s`: HMAC-SHA256, unpadded base64url
    /// (43 characters).
    pub fn sign(&self, parts: &[&str], exp_unix_s: u64) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(parts, exp_unix_s).finalize().into_bytes())
    }

    /// Checks `sig` against `parts` and `exp_unix_s` in constant time, then the expiry: valid
    /// while `now_unix_s < exp_unix_s`. The expiry is checked after the MAC, so a forged URL
    /// is `Bad` whatever its `exp`.
    pub fn verify(
        &self,
        parts: &[&str],
        exp_unix_s: u64,
        sig: &str,
        now_unix_s: u64,
    ) -> Result<(), SigError> {
        if sig.len() != 43 {
            return Err(SigError::Malformed);
        }
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| SigError::Malformed)?;
        self.mac(parts, exp_unix_s)
            .verify_slice(&sig)
            .map_err(|_| SigError::Bad)?;
        if now_unix_s >= exp_unix_s {
            return Err(SigError::Expired);
        }
        Ok(())
    }
}

/// Why a signed URL's query could not be read. The HTTP API answers 403 (the URL is not one
/// the dispatcher made); the message is for the log and the agent's error report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// The decoder refused the query (it decodes bytes that are not UTF-8 lossily, so the
    /// field's own check refuses those).
    #[error("the URL's query cannot be decoded: {0}")]
    Encoding(String),
    /// A parameter the URL must carry is absent.
    #[error("the URL lacks `{0}`; use the URL exactly as the dispatcher gave it")]
    Missing(&'static str),
    /// A parameter appears twice.
    #[error("the URL has `{0}` twice")]
    Duplicate(&'static str),
    /// A parameter this URL does not take.
    #[error("the URL has an unknown parameter `{name}` (it takes {expected})")]
    Unknown {
        /// The parameter's name.
        name: String,
        /// The parameters it takes.
        expected: &'static str,
    },
    /// A parameter (or the path's job id or hash) is not of its type.
    #[error("the URL's `{field}` is invalid: {reason}")]
    Invalid {
        /// The parameter.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// A parsed signed URL, not yet verified: the grant it claims, its expiry and signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedUrl<G> {
    /// What the URL claims to allow.
    pub grant: G,
    /// Valid before this time, UNIX seconds.
    pub exp_unix_s: u64,
    /// The signature as found in the URL.
    pub sig: String,
}

/// What a signed URL allows; the list of strings it signs.
pub trait Grant {
    /// The parts signed, method and path first.
    fn signed_parts(&self) -> Vec<String>;
}

impl<G: Grant> SignedUrl<G> {
    /// Checks the signature (constant time), then the expiry; on success the grant can be
    /// trusted.
    pub fn verify(&self, key: &UrlKey, now_unix_s: u64) -> Result<&G, SigError> {
        let parts = self.grant.signed_parts();
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        key.verify(&parts, self.exp_unix_s, &self.sig, now_unix_s)?;
        Ok(&self.grant)
    }
}

/// Permission for `agent` to GET the blob `sha256` as the input of `job`:
/// `GET /v1/blobs/{sha256hex}?job=&agent=&exp=&sig=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobGrant {
    /// The blob.
    pub sha256: [u8; 32],
    /// The job whose input it is.
    pub job: JobId,
    /// The agent the job was sent to.
    pub agent: BareJid,
}

impl Grant for BlobGrant {
    fn signed_parts(&self) -> Vec<String> {
        vec![
            "GET".to_owned(),
            self.path(),
            self.agent.to_string(),
            self.job.to_string(),
        ]
    }
}

const BLOB_PARAMS: &str = "job, agent, exp and sig";
const UPLOAD_PARAMS: &str = "attempt, agent, size, sha256, exp and sig";

impl BlobGrant {
    /// `/v1/blobs/{sha256hex}`.
    pub fn path(&self) -> String {
        format!("/v1/blobs/{}", sha256_hex(&self.sha256))
    }

    /// The signed URL under `base` (scheme, host and port, e.g.
    /// `https://dispatcher.example.com:8443`; a trailing `/` is ignored), valid before
    /// `exp_unix_s`.
    pub fn url(&self, base: &str, exp_unix_s: u64, key: &UrlKey) -> String {
        let params = [
            ("job", self.job.to_string()),
            ("agent", self.agent.to_string()),
        ];
        signed_url(self, &self.path(), &params, base, exp_unix_s, key)
    }

    /// Reads a request for `/v1/blobs/{sha256_hex}?{query}` (the path segment and the raw
    /// query string, as the router gives them).
    pub fn parse(sha256_hex: &str, query: &str) -> Result<SignedUrl<BlobGrant>, QueryError> {
        let sha256 = parse_sha256(sha256_hex).map_err(|x| invalid("sha256", x))?;
        let [job, agent, exp, sig] = fields(query, ["job", "agent", "exp", "sig"], BLOB_PARAMS)?;
        Ok(SignedUrl {
            grant: BlobGrant {
                sha256,
                job: job_id(&job)?,
                agent: bare_jid(&agent)?,
            },
            exp_unix_s: number("exp", &exp)?,
            sig,
        })
    }
}

/// Permission for `agent` to PUT exactly `size` bytes hashing to `sha256` as the output of
/// `job`, attempt `attempt`: `PUT /v1/uploads/{job}?attempt=&agent=&size=&sha256=&exp=&sig=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadGrant {
    /// The job.
    pub job: JobId,
    /// The agent running it.
    pub agent: BareJid,
    /// The attempt the agent runs.
    pub attempt: u64,
    /// The output's length in bytes.
    pub size: u64,
    /// The output's SHA-256.
    pub sha256: [u8; 32],
}

impl Grant for UploadGrant {
    fn signed_parts(&self) -> Vec<String> {
        vec![
            "PUT".to_owned(),
            self.path(),
            self.agent.to_string(),
            self.attempt.to_string(),
            self.size.to_string(),
            sha256_hex(&self.sha256),
        ]
    }
}

impl UploadGrant {
    /// `/v1/uploads/{job}`.
    pub fn path(&self) -> String {
        format!("/v1/uploads/{}", self.job)
    }

    /// The signed URL under `base` (as for [`BlobGrant::url`]), valid before `exp_unix_s`.
    pub fn url(&self, base: &str, exp_unix_s: u64, key: &UrlKey) -> String {
        let params = [
            ("attempt", self.attempt.to_string()),
            ("agent", self.agent.to_string()),
            ("size", self.size.to_string()),
            ("sha256", sha256_hex(&self.sha256)),
        ];
        signed_url(self, &self.path(), &params, base, exp_unix_s, key)
    }

    /// Reads a request for `/v1/uploads/{job}?{query}` (the path segment and the raw query
    /// string, as the router gives them).
    pub fn parse(job: &str, query: &str) -> Result<SignedUrl<UploadGrant>, QueryError> {
        let job = job_id(job)?;
        let [attempt, agent, size, sha256, exp, sig] = fields(
            query,
            ["attempt", "agent", "size", "sha256", "exp", "sig"],
            UPLOAD_PARAMS,
        )?;
        Ok(SignedUrl {
            grant: UploadGrant {
                job,
                agent: bare_jid(&agent)?,
                attempt: number("attempt", &attempt)?,
                size: number("size", &size)?,
                sha256: parse_sha256(&sha256).map_err(|x| invalid("sha256", x))?,
            },
            exp_unix_s: number("exp", &exp)?,
            sig,
        })
    }
}

/// `base` + `path` + `?` + the grant's `params`, `exp` and `sig`, form-encoded (`@` becomes
/// `%40`).
fn signed_url(
    grant: &impl Grant,
    path: &str,
    params: &[(&str, String)],
    base: &str,
    exp_unix_s: u64,
    key: &UrlKey,
) -> String {
    let parts = grant.signed_parts();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let mut pairs: Vec<(&str, String)> = params.to_vec();
    pairs.push(("exp", exp_unix_s.to_string()));
    pairs.push(("sig", key.sign(&parts, exp_unix_s)));
    // Serialising string pairs cannot fail.
    let query = serde_urlencoded::to_string(&pairs)
        .unwrap_or_else(|x| unreachable!("form-encoding string pairs failed: {x}"));
    format!("{}{path}?{query}", base.trim_end_matches('/'))
}

fn invalid(field: &'static str, reason: impl fmt::Display) -> QueryError {
    QueryError::Invalid {
        field,
        reason: reason.to_string(),
    }
}

/// The values of exactly the parameters `names`, in that order.
fn fields<const N: usize>(
    query: &str,
    names: [&'static str; N],
    expected: &'static str,
) -> Result<[String; N], QueryError> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query).map_err(|x| QueryError::Encoding(x.to_string()))?;
    let mut out: [Option<String>; N] = std::array::from_fn(|_| None);
    for (name, value) in pairs {
        let Some(i) = names.iter().position(|n| *n == name) else {
            return Err(QueryError::Unknown { name, expected });
        };
        if out[i].replace(value).is_some() {
            return Err(QueryError::Duplicate(names[i]));
        }
    }
    if let Some(i) = out.iter().position(Option::is_none) {
        return Err(QueryError::Missing(names[i]));
    }
    Ok(out.map(Option::unwrap_or_default))
}

fn number(field: &'static str, s: &str) -> Result<u64, QueryError> {
    s.parse()
        .map_err(|_| invalid(field, format!("expected a non-negative integer, got {s:?}")))
}

fn job_id(s: &str) -> Result<JobId, QueryError> {
    s.parse().map_err(|x| invalid("job", x))
}

fn bare_jid(s: &str) -> Result<BareJid, QueryError> {
    BareJid::new(s).map_err(|x| {
        invalid(
            "agent",
            format!("{x} (expected a bare JID such as agent1@example.com)"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_000_000;

    fn key() -> UrlKey {
        UrlKey::from_bytes([7; 32])
    }

    fn blob() -> BlobGrant {
        BlobGrant {
            sha256: [0xcd; 32],
            job: "0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44".parse().expect("job"),
            agent: BareJid::new("agent1@example.com").expect("jid"),
        }
    }

    fn upload() -> UploadGrant {
        UploadGrant {
            job: "0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44".parse().expect("job"),
            agent: BareJid::new("agent1@example.com").expect("jid"),
            attempt: 1,
            size: 1_048_576,
            sha256: [0x30; 32],
        }
    }

    /// Splits a URL made by `url()` into the router's view: path segment and query.
    fn split<'a>(url: &'a str, prefix: &str) -> (&'a str, &'a str) {
        let rest = url.strip_prefix(prefix).expect("prefix");
        rest.split_once('?').expect("query")
    }

    #[test]
    fn sign_and_verify() {
        let k = key();
        let parts = ["GET", "/v1/blobs/ab", "a@b", "j1"];
        let sig = k.sign(&parts, NOW + 60);
        assert_eq!(sig.len(), 43);
        assert!(!sig.contains(['+', '/', '=']), "{sig}");
        assert_eq!(k.verify(&parts, NOW + 60, &sig, NOW), Ok(()));
        // Another key, or any other part, fails.
        let other = UrlKey::from_bytes([8; 32]);
        assert_eq!(
            other.verify(&parts, NOW + 60, &sig, NOW),
            Err(SigError::Bad)
        );
        for i in 0..parts.len() {
            let mut p = parts;
            p[i] = "x";
            assert_eq!(
                k.verify(&p, NOW + 60, &sig, NOW),
                Err(SigError::Bad),
                "part {i}"
            );
        }
        // The encoding is unambiguous: moving a boundary or dropping an empty part changes
        // the MAC.
        let a = k.sign(&["ab", "c"], 1);
        assert_eq!(k.verify(&["a", "bc"], 1, &a, 0), Err(SigError::Bad));
        assert_eq!(k.verify(&["ab", "c", ""], 1, &a, 0), Err(SigError::Bad));
        assert_eq!(k.verify(&["ab\nc"], 1, &a, 0), Err(SigError::Bad));
        // Expired only once the MAC matched; a forged expired URL is Bad.
        assert_eq!(
            k.verify(&parts, NOW + 60, &sig, NOW + 60),
            Err(SigError::Expired)
        );
        assert_eq!(k.verify(&parts, NOW - 1, &sig, NOW), Err(SigError::Bad));
        // Garbage signatures.
        for bad in [
            "",
            "abc",
            &format!("{sig}A"),
            &"*".repeat(43),
            &sig.replace(|_| true, "="),
        ] {
            assert_eq!(
                k.verify(&parts, NOW + 60, bad, NOW),
                Err(SigError::Malformed),
                "{bad:?}"
            );
        }
        let mut flipped = sig.clone().into_bytes();
        flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).expect("ascii");
        assert_eq!(
            k.verify(&parts, NOW + 60, &flipped, NOW),
            Err(SigError::Bad)
        );
    }

    #[test]
    fn blob_url_round_trip_and_tampering() {
        let k = key();
        let g = blob();
        let url = g.url("https://dispatcher.example.com:8443/", NOW + 300, &k);
        let hex = "cd".repeat(32);
        assert!(
            url.starts_with(&format!(
                "https://dispatcher.example.com:8443/v1/blobs/{hex}?job=0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44&agent=agent1%40example.com&exp={}&sig=",
                NOW + 300
            )),
            "{url}"
        );
        let (seg, query) = split(&url, "https://dispatcher.example.com:8443/v1/blobs/");
        let signed = BlobGrant::parse(seg, query).expect("parse");
        assert_eq!(signed.grant, g);
        assert_eq!(signed.exp_unix_s, NOW + 300);
        assert_eq!(signed.verify(&k, NOW), Ok(&g));
        assert_eq!(signed.verify(&k, NOW + 300), Err(SigError::Expired));

        // Each signed field altered in the URL: Bad.
        let other_hex = "ce".repeat(32);
        let other_exp = format!("exp={}", NOW + 301);
        let tampered = [
            (other_hex.as_str(), query.to_owned()),
            (seg, query.replace("agent=agent1%40", "agent=agent2%40")),
            (seg, query.replace("job=0190f5e2", "job=0190f5e3")),
            (
                seg,
                query.replace(&format!("exp={}", NOW + 300), &other_exp),
            ),
        ];
        for (seg, q) in &tampered {
            let s = BlobGrant::parse(seg, q).expect("still parses");
            assert_eq!(s.verify(&k, NOW), Err(SigError::Bad), "{seg} {q}");
        }
        let sig_at = query.find("sig=").expect("sig") + 4;
        let mut q = query.to_owned().into_bytes();
        q[sig_at + 5] = if q[sig_at + 5] == b'x' { b'y' } else { b'x' };
        let q = String::from_utf8(q).expect("ascii");
        let s = BlobGrant::parse(seg, &q).expect("parses");
        assert_eq!(s.verify(&k, NOW), Err(SigError::Bad));
    }

    #[test]
    fn upload_url_round_trip_and_tampering() {
        let k = key();
        let g = upload();
        let url = g.url("http://127.0.0.1:8080", NOW + 300, &k);
        let prefix = "http://127.0.0.1:8080/v1/uploads/";
        assert!(
            url.starts_with(&format!(
                "{prefix}0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44?attempt=1&agent=agent1%40example.com&size=1048576&sha256={}&exp=",
                "30".repeat(32)
            )),
            "{url}"
        );
        let (seg, query) = split(&url, prefix);
        let signed = UploadGrant::parse(seg, query).expect("parse");
        assert_eq!(signed.grant, g);
        assert_eq!(signed.verify(&k, NOW), Ok(&g));
        assert_eq!(signed.verify(&k, NOW + 1000), Err(SigError::Expired));
        let tampered = [
            ("0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e45", query.to_owned()),
            (seg, query.replace("attempt=1", "attempt=2")),
            (seg, query.replace("size=1048576", "size=1048577")),
            (seg, query.replace(&"30".repeat(32), &"31".repeat(32))),
            (seg, query.replace("agent1%40", "agent9%40")),
        ];
        for (seg, q) in &tampered {
            let s = UploadGrant::parse(seg, q).expect("still parses");
            assert_eq!(s.verify(&k, NOW), Err(SigError::Bad), "{seg} {q}");
        }
        // A GET grant's signature does not make a PUT valid, nor the reverse.
        let b = BlobGrant {
            sha256: g.sha256,
            job: g.job.clone(),
            agent: g.agent.clone(),
        };
        let get_sig = BlobGrant::parse(
            &sha256_hex(&b.sha256),
            split(&b.url("http://h", NOW + 300, &k), "http://h/v1/blobs/").1,
        )
        .expect("parse")
        .sig;
        let forged = SignedUrl {
            grant: g.clone(),
            exp_unix_s: NOW + 300,
            sig: get_sig,
        };
        assert_eq!(forged.verify(&k, NOW), Err(SigError::Bad));
    }

    #[test]
    fn query_errors_name_the_field() {
        let hex = "cd".repeat(32);
        let cases = [
            ("agent=a%40b&exp=1&sig=x", QueryError::Missing("job")),
            ("job=j&exp=1&sig=x", QueryError::Missing("agent")),
            ("job=j&agent=a%40b&sig=x", QueryError::Missing("exp")),
            ("job=j&agent=a%40b&exp=1", QueryError::Missing("sig")),
            (
                "job=j&job=k&agent=a%40b&exp=1&sig=x",
                QueryError::Duplicate("job"),
            ),
        ];
        for (q, want) in cases {
            assert_eq!(BlobGrant::parse(&hex, q).expect_err(q), want, "{q}");
        }
        let e =
            BlobGrant::parse(&hex, "job=j&agent=a%40b&exp=1&sig=x&range=2").expect_err("unknown");
        assert!(
            matches!(&e, QueryError::Unknown { name, .. } if name == "range"),
            "{e}"
        );
        assert!(e.to_string().contains("job, agent, exp and sig"), "{e}");
        let e = BlobGrant::parse(&hex, "job=j&agent=a%40b&exp=soon&sig=x").expect_err("exp");
        assert_eq!(
            e.to_string(),
            "the URL's `exp` is invalid: expected a non-negative integer, got \"soon\""
        );
        let e = BlobGrant::parse(&hex, "job=a%20b&agent=a%40b&exp=1&sig=x").expect_err("job");
        assert!(matches!(e, QueryError::Invalid { field: "job", .. }), "{e}");
        let e = BlobGrant::parse(&hex, "job=j&agent=a%40b%2Fres&exp=1&sig=x").expect_err("full");
        assert!(
            matches!(e, QueryError::Invalid { field: "agent", .. }),
            "{e}"
        );
        let e = BlobGrant::parse("CD", "job=j&agent=a%40b&exp=1&sig=x").expect_err("hex");
        assert!(
            matches!(
                e,
                QueryError::Invalid {
                    field: "sha256",
                    ..
                }
            ),
            "{e}"
        );
        let e = UploadGrant::parse("j", "attempt=1&agent=a%40b&size=-1&sha256=x&exp=1&sig=x")
            .expect_err("size");
        assert!(
            matches!(e, QueryError::Invalid { field: "size", .. }),
            "{e}"
        );
        let e = UploadGrant::parse("j", "attempt=1&agent=a%40b&exp=1&sig=x").expect_err("missing");
        assert_eq!(e, QueryError::Missing("size"));
        assert!(e.to_string().contains("lacks `size`"), "{e}");
        // Bytes that are not UTF-8 are decoded lossily, then refused by the field's type.
        let e = BlobGrant::parse(&hex, "job=%FF&agent=a%40b&exp=1&sig=x").expect_err("utf-8");
        assert!(matches!(e, QueryError::Invalid { field: "job", .. }), "{e}");
    }
}
