//! The fragment list of map/reduce jobs (PROTOCOL.md §11.7): the input of a map/reduce job
//! without a split step, the output of a split step, and the input of every reduce step.
//!
//! It is JSON, so that an agent in any language reads it with its standard library: an array
//! of objects `{"data": "<base64>", "type": "<MIME type>", "name": "<label>"}`, where only
//! `data` is required. Order matters: a reduce step receives its inputs in fragment order.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The MIME type of a fragment list.
pub const FRAGMENTS_MIME: &str = "application/vnd.spine.fragments+json";

/// One fragment: bytes with an optional type and label.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fragment {
    /// A label (a file name, say), carried from a map input to the reduce that uses its output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// MIME type of the bytes.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub mime: Option<String>,
    /// The bytes (base64 in JSON).
    #[serde(with = "crate::serde_base64")]
    pub data: Vec<u8>,
}

impl Fragment {
    /// A fragment of these bytes, with no type or label.
    pub fn new(data: impl Into<Vec<u8>>) -> Self {
        Fragment {
            data: data.into(),
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
    }

    proptest! {
        #[test]
        fn roundtrip(items in proptest::collection::vec(
            (proptest::option::of("[a-z.]{0,8}"), proptest::option::of("[a-z/]{1,12}"),
             proptest::collection::vec(any::<u8>(), 0..64)), 0..8)) {
            let list: Vec<Fragment> = items
                .into_iter()
                .map(|(name, mime, data)| Fragment { name, mime, data })
                .collect();
            prop_assert_eq!(decode(&encode(&list)).unwrap(), list);
        }
    }
}
