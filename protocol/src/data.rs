//! Pieces shared by several payloads: agent attributes, JSON arguments and binary data
//! (inline base64 or a reference to a blob sent in chunks).

use std::collections::BTreeMap;

use base64::Engine as _;
use minidom::Element;
use serde_json::{Map, Value};

use crate::error::ParseError;
use crate::names::{AttrName, BlobId, MAX_ATTR_VALUE_LEN};
use crate::xml::{Builder, Reader};

/// Most bytes an `<input>`, `<output>`, `<partial>` or `<chunk>` carries inline (decoded).
/// Larger payloads travel as a blob in chunks of at most this size.
pub const INLINE_LIMIT: usize = 65536;

/// Agent attributes (`gpu=true`, `zone=eu-1`), unique by name, kept sorted.
pub type Attributes = BTreeMap<AttrName, String>;

/// Reads an `<attr name='..' value='..'/>` child into `attrs`, rejecting a repeated name.
pub(crate) fn read_attr(
    el: &Element,
    parent: &'static str,
    attrs: &mut Attributes,
) -> Result<(), ParseError> {
    let mut r = Reader::unchecked(el, "attr");
    let name: AttrName = r.req("name")?;
    let value: String = r.req("value")?;
    if value.len() > MAX_ATTR_VALUE_LEN {
        return Err(r.invalid("value", format!("longer than {MAX_ATTR_VALUE_LEN} bytes")));
    }
    r.no_text()?;
    r.no_children()?;
    r.finish()?;
    if attrs.insert(name.clone(), value).is_some() {
        return Err(ParseError::Invalid {
            element: parent,
            reason: format!("attribute '{name}' is given twice"),
        });
    }
    Ok(())
}

/// `<attr/>` elements for `attrs`, in name order.
pub(crate) fn attr_elements(attrs: &Attributes) -> impl Iterator<Item = Element> + '_ {
    attrs.iter().map(|(k, v)| {
        Builder::new("attr")
            .attr("name", k.as_str())
            .attr("value", v.as_str())
            .build()
    })
}

/// A JSON object: job arguments (`<args>`) or result metadata (`<meta>`).
///
/// Numbers keep their full 64-bit integer value (serde_json reads integers as `i64`/`u64`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Args(pub Map<String, Value>);

impl Args {
    /// Whether there are no entries (the element is then omitted).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of one argument.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    pub(crate) fn parse(el: &Element, name: &'static str) -> Result<Self, ParseError> {
        let r = Reader::unchecked(el, name);
        r.no_children()?;
        r.finish()?;
        let text = el.text();
        let value: Value = serde_json::from_str(&text).map_err(|e| ParseError::InvalidJson {
            element: name,
            reason: e.to_string(),
        })?;
        match value {
            Value::Object(map) => Ok(Args(map)),
            other => Err(ParseError::InvalidJson {
                element: name,
                reason: format!("found {} instead of an object", json_kind(&other)),
            }),
        }
    }

    pub(crate) fn to_element(&self, name: &str) -> Element {
        Builder::new(name)
            .text(Value::Object(self.0.clone()).to_string())
            .build()
    }
}

impl From<Map<String, Value>> for Args {
    fn from(m: Map<String, Value>) -> Self {
        Args(m)
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A reference to a blob: bytes sent beforehand in `<chunk>` IQs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    /// The blob's id, as given in its chunks.
    pub blob: BlobId,
    /// Its length in bytes.
    pub size: u64,
    /// SHA-256 of its bytes; the receiver checks it.
    pub sha256: [u8; 32],
    /// MIME type, if known.
    pub mime: Option<String>,
}

/// Binary data carried by `<input>` or `<output>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// Up to [`INLINE_LIMIT`] bytes, base64 in the element.
    Inline {
        /// MIME type, if known.
        mime: Option<String>,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// A larger payload sent as a blob.
    Blob(BlobRef),
}

impl Data {
    /// Inline data without a MIME type.
    pub fn inline(bytes: impl Into<Vec<u8>>) -> Self {
        Data::Inline {
            mime: None,
            bytes: bytes.into(),
        }
    }

    /// The MIME type, if any.
    pub fn mime(&self) -> Option<&str> {
        match self {
            Data::Inline { mime, .. } => mime.as_deref(),
            Data::Blob(b) => b.mime.as_deref(),
        }
    }

    /// Length of the data in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Data::Inline { bytes, .. } => bytes.len() as u64,
            Data::Blob(b) => b.size,
        }
    }

    /// Whether the data is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn parse(el: &Element, name: &'static str) -> Result<Self, ParseError> {
        let mut r = Reader::unchecked(el, name);
        let mime = r.opt::<Mime>("type")?.map(|m| m.0);
        let size = r.opt::<u64>("size")?;
        let blob = r.opt::<BlobId>("blob")?;
        let sha = r.opt::<Sha256Hex>("sha256")?;
        r.no_children()?;
        let data = match blob {
            Some(blob) => {
                r.no_text()?;
                let size = size.ok_or(ParseError::MissingAttribute {
                    element: name,
                    attribute: "size",
                })?;
                let sha256 = sha
                    .ok_or(ParseError::MissingAttribute {
                        element: name,
                        attribute: "sha256",
                    })?
                    .0;
                Data::Blob(BlobRef {
                    blob,
                    size,
                    sha256,
                    mime,
                })
            }
            None => {
                if sha.is_some() {
                    return Err(r.invalid("sha256", "only a blob reference carries sha256"));
                }
                let bytes = decode_base64(&el.text(), name)?;
                if let Some(size) = size {
                    if size != bytes.len() as u64 {
                        return Err(r.invalid(
                            "size",
                            format!("declared {size} bytes but the content has {}", bytes.len()),
                        ));
                    }
                }
                Data::Inline { mime, bytes }
            }
        };
        r.finish()?;
        Ok(data)
    }

    pub(crate) fn to_element(&self, name: &str) -> Element {
        match self {
            Data::Inline { mime, bytes } => Builder::new(name)
                .opt("type", mime.as_deref())
                .attr("size", bytes.len() as u64)
                .text(encode_base64(bytes))
                .build(),
            Data::Blob(b) => Builder::new(name)
                .opt("type", b.mime.as_deref())
                .attr("blob", b.blob.as_str())
                .attr("size", b.size)
                .attr("sha256", hex(&b.sha256))
                .build(),
        }
    }
}

/// Decodes base64 (standard alphabet, padded), ignoring XML whitespace, and enforces
/// [`INLINE_LIMIT`].
pub(crate) fn decode_base64(text: &str, element: &'static str) -> Result<Vec<u8>, ParseError> {
    // XML whitespace may wrap base64 text; most senders send none, so copy only when needed
    // (a char-by-char copy of every chunk was a tenth of a large transfer's CPU time).
    let is_ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let compact: std::borrow::Cow<'_, [u8]> = if text.as_bytes().iter().any(is_ws) {
        text.bytes()
            .filter(|b| !is_ws(b))
            .collect::<Vec<u8>>()
            .into()
    } else {
        text.as_bytes().into()
    };
    // Cheap bound before decoding: 4 base64 characters carry 3 bytes.
    let upper = compact.len() / 4 * 3;
    if upper > INLINE_LIMIT + 2 {
        return Err(ParseError::TooLarge {
            element,
            limit: INLINE_LIMIT as u64,
            actual: upper as u64,
        });
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&compact)
        .map_err(|e| ParseError::InvalidBase64 {
            element,
            reason: e.to_string(),
        })?;
    if bytes.len() > INLINE_LIMIT {
        return Err(ParseError::TooLarge {
            element,
            limit: INLINE_LIMIT as u64,
            actual: bytes.len() as u64,
        });
    }
    Ok(bytes)
}

pub(crate) fn encode_base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A MIME type as carried in a `type` attribute: `major/minor`, optional parameters.
pub(crate) struct Mime(pub String);

impl crate::xml::FromAttr for Mime {
    fn from_attr(s: &str) -> Result<Self, String> {
        let essence = s.split(';').next().unwrap_or_default().trim();
        let valid_part = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
        };
        match essence.split_once('/') {
            Some((a, b)) if s.len() <= 255 && valid_part(a) && valid_part(b) => {
                Ok(Mime(s.to_owned()))
            }
            _ => Err("expected a MIME type such as 'image/png'".to_owned()),
        }
    }
}

/// A SHA-256 digest as 64 hex digits.
pub(crate) struct Sha256Hex(pub [u8; 32]);

impl crate::xml::FromAttr for Sha256Hex {
    fn from_attr(s: &str) -> Result<Self, String> {
        let err = || "expected 64 hexadecimal digits (SHA-256)".to_owned();
        if s.len() != 64 {
            return Err(err());
        }
        let mut out = [0u8; 32];
        for (i, pair) in s.as_bytes().chunks(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16).ok_or_else(err)?;
            let lo = (pair[1] as char).to_digit(16).ok_or_else(err)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Ok(Sha256Hex(out))
    }
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
