//! The fragment list of map/reduce jobs (PROTOCOL.md §11.7): the input of a map/reduce job
//! without a split step, the output of a split step, and the input of every reduce step.
//!
//! It is JSON, so that an agent in any language reads it with its standard library: an array
//! of objects `{"data": "<base64>", "type": "<MIME type>", "name": "<label>"}`, where only
//! `data` is required. Order matters: a reduce step receives its inputs in fragment order.
//!
//! A fragment may name its bytes instead of carrying them (protocol 1.1, §11.7.1):
//! `{"sha256": "<64 hex digits>", "size": n}`, a blob of the dispatcher's store. A submitter
//! names blobs it uploaded (`PUT /v1/blobs`), so a corpus is stored once and each map step
//! fetches its own piece; the dispatcher names the map outputs a reduce step takes. Sent to
//! an agent that fetches over HTTP, each reference carries a signed `url` the agent GETs (and
//! checks against the hash) before its handler sees the list, with the bytes inline: handlers
//! only ever read `data`. Any other agent gets the bytes inline.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The MIME type of a fragment list.
pub const FRAGMENTS_MIME: &str = "application/vnd.spine.fragments+json";

/// One fragment: bytes with an optional type and label.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "WireFragment", into = "WireFragment")]
pub struct Fragment {
    /// A label (a file name, say), carried from a map input to the reduce that uses its output.
    pub name: Option<String>,
    /// MIME type of the bytes.
    pub mime: Option<String>,
    /// The bytes (base64 in JSON). Empty when the fragment is a reference ([`Fragment::source`]).
    pub data: Vec<u8>,
    /// Where the bytes are, when the fragment names them instead of carrying them.
    pub source: Option<FragmentRef>,
}

/// The bytes of a fragment by reference: a blob of the dispatcher's store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FragmentRef {
    /// SHA-256 of the bytes (the blob's name).
    pub sha256: [u8; 32],
    /// Their length.
    pub size: u64,
    /// A signed URL to GET them from: set by the dispatcher for the agent it sends the list to,
    /// never by a submitter.
    pub url: Option<String>,
}

/// The JSON form: exactly one of `data` and `sha256` (with `size`).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireFragment {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    mime: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url: Option<String>,
}

impl TryFrom<WireFragment> for Fragment {
    type Error = String;

    fn try_from(w: WireFragment) -> Result<Self, String> {
        use crate::xml::FromAttr as _;
        let source = match (&w.data, w.sha256, w.size) {
            (Some(_), Some(_), _) => {
                return Err("a fragment has data or a sha256, not both".to_owned())
            }
            (None, None, _) => return Err("missing field `data` (or `sha256` and `size`)".into()),
            (None, Some(_), None) => {
                return Err("a fragment with a sha256 needs its size in bytes".to_owned())
            }
            (None, Some(hex), Some(size)) => Some(FragmentRef {
                sha256: crate::data::Sha256Hex::from_attr(&hex)
                    .map_err(|e| format!("sha256 '{hex}': {e}"))?
                    .0,
                size,
                url: w.url,
            }),
            (Some(_), None, _) if w.size.is_some() || w.url.is_some() => {
                return Err("size and url belong to a fragment with a sha256".to_owned())
            }
            (Some(_), None, _) => None,
        };
        let data = match w.data {
            Some(text) => base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| format!("data is not base64: {e}"))?,
            None => Vec::new(),
        };
        Ok(Fragment {
            name: w.name,
            mime: w.mime,
            data,
            source,
        })
    }
}

impl From<Fragment> for WireFragment {
    fn from(f: Fragment) -> Self {
        let (data, sha256, size, url) = match f.source {
            Some(r) => (None, Some(crate::data::hex(&r.sha256)), Some(r.size), r.url),
            None => (Some(base64(&f.data)), None, None, None),
        };
        WireFragment {
            name: f.name,
            mime: f.mime,
            data,
            sha256,
            size,
            url,
        }
    }
}

impl Fragment {
    /// A fragment of these bytes, with no type or label.
    pub fn new(data: impl Into<Vec<u8>>) -> Self {
        Fragment {
            data: data.into(),
            ..Default::default()
        }
    }

    /// A fragment naming the blob `sha256` of `size` bytes instead of carrying it.
    pub fn reference(sha256: [u8; 32], size: u64) -> Self {
        Fragment {
            source: Some(FragmentRef {
                sha256,
                size,
                url: None,
            }),
            ..Default::default()
        }
    }

    /// With a label.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// With a MIME type.
    pub fn with_mime(mut self, mime: impl Into<String>) -> Self {
        self.mime = Some(mime.into());
        self
    }

    /// Its size in bytes, carried or named.
    pub fn size(&self) -> u64 {
        self.source
            .as_ref()
            .map_or(self.data.len() as u64, |r| r.size)
    }
}

/// Whether a list has any fragment by reference.
pub fn has_refs(fragments: &[Fragment]) -> bool {
    fragments.iter().any(|f| f.source.is_some())
}

/// Writes a fragment list.
pub fn encode(fragments: &[Fragment]) -> Vec<u8> {
    // Serialising plain strings and byte vectors cannot fail.
    serde_json::to_vec(fragments).unwrap_or_else(|_| b"[]".to_vec())
}

/// Reads a fragment list; the error says what is wrong and where.
pub fn decode(bytes: &[u8]) -> Result<Vec<Fragment>, String> {
    serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "not a fragment list (a JSON array of {{\"data\": base64, \"type\", \"name\"}}): {e}"
        )
    })
}

/// The base64 text of bytes, as a fragment's `data` holds it (for hand-built lists).
pub fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wire_form() {
        let list = vec![
            Fragment::new(b"hello".to_vec())
                .with_name("a.txt")
                .with_mime("text/plain"),
            Fragment::new(Vec::new()),
        ];
        let text = String::from_utf8(encode(&list)).unwrap();
        assert_eq!(
            text,
            r#"[{"name":"a.txt","type":"text/plain","data":"aGVsbG8="},{"data":""}]"#
        );
        assert_eq!(decode(text.as_bytes()).unwrap(), list);
    }

    #[test]
    fn errors_name_the_problem() {
        let e = decode(br#"[{"data":"@@"}]"#).unwrap_err();
        assert!(e.contains("data is not base64"), "{e}");
        let e = decode(br#"[{"name":"x"}]"#).unwrap_err();
        assert!(e.contains("missing field `data`"), "{e}");
        let e = decode(br#"[{"data":"","colour":"red"}]"#).unwrap_err();
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = decode(br#"{"data":""}"#).unwrap_err();
        assert!(e.contains("not a fragment list"), "{e}");
        let sha = "ab".repeat(32);
        let e =
            decode(format!(r#"[{{"data":"","sha256":"{sha}","size":1}}]"#).as_bytes()).unwrap_err();
        assert!(e.contains("not both"), "{e}");
        let e = decode(format!(r#"[{{"sha256":"{sha}"}}]"#).as_bytes()).unwrap_err();
        assert!(e.contains("needs its size"), "{e}");
        let e = decode(br#"[{"sha256":"abc","size":3}]"#).unwrap_err();
        assert!(e.contains("sha256 'abc'"), "{e}");
        let e = decode(br#"[{"data":"","url":"http://x/"}]"#).unwrap_err();
        assert!(e.contains("belong to a fragment with a sha256"), "{e}");
    }

    #[test]
    fn references() {
        let sha = [0xab; 32];
        let mut r = Fragment::reference(sha, 7).with_name("m0");
        let text = String::from_utf8(encode(std::slice::from_ref(&r))).unwrap();
        assert_eq!(
            text,
            format!(
                r#"[{{"name":"m0","sha256":"{}","size":7}}]"#,
                "ab".repeat(32)
            )
        );
        assert_eq!(decode(text.as_bytes()).unwrap(), vec![r.clone()]);
        assert_eq!(r.size(), 7);
        assert!(has_refs(std::slice::from_ref(&r)));
        assert!(!has_refs(&[Fragment::new(b"x".to_vec())]));
        if let Some(s) = &mut r.source {
            s.url = Some("https://d.example/v1/blobs/ab?sig=1".into());
        }
        let again = decode(&encode(std::slice::from_ref(&r))).unwrap();
        assert_eq!(again, vec![r]);
    }

    proptest! {
        #[test]
        fn roundtrip(items in proptest::collection::vec(
            (proptest::option::of("[a-z.]{0,8}"), proptest::option::of("[a-z/]{1,12}"),
             proptest::collection::vec(any::<u8>(), 0..64)), 0..8)) {
            let list: Vec<Fragment> = items
                .into_iter()
                .map(|(name, mime, data)| Fragment { name, mime, data, source: None })
                .collect();
            prop_assert_eq!(decode(&encode(&list)).unwrap(), list);
        }
    }
}
