//! Pieces shared by several payloads: agent attributes, JSON arguments and binary data
//! (inline base64, a reference to a blob sent in chunks, or — protocol 1.1 — a reference to
//! bytes fetched over HTTP by URL and checked against their size and SHA-256).

use std::collections::BTreeMap;

use base64::Engine as _;
use minidom::Element;
use serde_json::{Map, Value};

use crate::error::ParseError;
use crate::names::{AttrName, BlobId, MAX_ATTR_VALUE_LEN};
use crate::xml::{set_once, unknown_child, Builder, Reader};

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

/// Namespace of the XEP-0300 `<hash/>` in the reference form of `<input>`/`<output>`.
pub const NS_HASHES: &str = "urn:xmpp:hashes:2";
/// Namespace of the XEP-0103 `<url-data/>` that names one source of a reference.
pub const NS_URL_DATA: &str = "http://jabber.org/protocol/url-data";
/// Most `<url-data/>` sources one reference may list.
pub const MAX_SOURCES: usize = 8;
/// Longest source URL, in characters.
pub const MAX_URL_LEN: usize = 4096;

/// Bytes fetched by URL (protocol 1.1, PROTOCOL.md §13.4): the reference form of `<input>`
/// and `<output>`, selected by its `<hash/>` child. The receiver fetches a source and checks
/// the size and SHA-256 itself, so a source needs no more trust than the XMPP channel that
/// named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataRef {
    /// Length in bytes.
    pub size: u64,
    /// SHA-256 of the bytes; the receiver checks it.
    pub sha256: [u8; 32],
    /// MIME type, if known.
    pub mime: Option<String>,
    /// `http://` or `https://` URLs to try in order (1 to [`MAX_SOURCES`] in a job's input);
    /// empty in a result's output, meaning "the bytes I PUT to this job attempt's upload
    /// slot".
    pub sources: Vec<String>,
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
    /// A payload fetched over HTTP (protocol 1.1).
    Ref(DataRef),
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
            Data::Ref(r) => r.mime.as_deref(),
        }
    }

    /// Length of the data in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Data::Inline { bytes, .. } => bytes.len() as u64,
            Data::Blob(b) => b.size,
            Data::Ref(r) => r.size,
        }
    }

    /// Whether the data is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn parse(el: &Element, name: &'static str) -> Result<Self, ParseError> {
        // Only the reference form has child elements.
        if el.children().next().is_some() {
            return DataRef::parse(el, name).map(Data::Ref);
        }
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
            Data::Ref(r) => {
                let hash = Builder::in_ns("hash", NS_HASHES)
                    .attr("algo", "sha-256")
                    .text(encode_base64(&r.sha256))
                    .build();
                let mut b = Builder::new(name)
                    .attr("size", r.size)
                    .opt("type", r.mime.as_deref())
                    .child(hash);
                if !r.sources.is_empty() {
                    b = b.child(
                        Builder::new("sources")
                            .children(r.sources.iter().map(|u| {
                                Builder::in_ns("url-data", NS_URL_DATA)
                                    .attr("target", u.as_str())
                                    .build()
                            }))
                            .build(),
                    );
                }
                b.build()
            }
        }
    }
}

impl DataRef {
    /// Reads the reference form of `<input>`/`<output>` (the caller saw a child element).
    fn parse(el: &Element, name: &'static str) -> Result<Self, ParseError> {
        let mut r = Reader::unchecked(el, name);
        let mime = r.opt::<Mime>("type")?.map(|m| m.0);
        let size = r.req::<u64>("size")?;
        if el.attr("blob").is_some() || el.attr("sha256").is_some() {
            return Err(ParseError::Invalid {
                element: name,
                reason: "a reference with <hash/> takes no 'blob' or 'sha256' attribute".into(),
            });
        }
        r.no_text()?;
        r.finish()?;
        let (mut sha256, mut sources) = (None, None);
        for c in el.children() {
            if c.is("hash", NS_HASHES) {
                if let Some(digest) = read_sha256_hash(c)? {
                    if sha256.replace(digest).is_some() {
                        return Err(ParseError::Invalid {
                            element: name,
                            reason: "more than one <hash algo='sha-256'/>".into(),
                        });
                    }
                }
            } else if c.is("sources", crate::NS) {
                set_once(&mut sources, read_sources(c)?, name, "sources")?;
            } else {
                return Err(unknown_child(name, c));
            }
        }
        let sha256 = sha256.ok_or(ParseError::MissingChild {
            element: name,
            child: "hash algo='sha-256'",
        })?;
        Ok(DataRef {
            size,
            sha256,
            mime,
            sources: sources.unwrap_or_default(),
        })
    }
}

/// The digest of a XEP-0300 `<hash/>` if its algorithm is SHA-256; `None` for another
/// algorithm (a sender may add several, and the receiver uses the one it knows).
fn read_sha256_hash(el: &Element) -> Result<Option<[u8; 32]>, ParseError> {
    let mut r = Reader::unchecked(el, "hash");
    let algo: String = r.req("algo")?;
    if algo != "sha-256" {
        return Ok(None);
    }
    r.no_children()?;
    r.finish()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(el.text().trim())
        .map_err(|e| ParseError::InvalidBase64 {
            element: "hash",
            reason: e.to_string(),
        })?;
    let digest: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| ParseError::Invalid {
        element: "hash",
        reason: format!("a SHA-256 digest has 32 bytes, this one {}", b.len()),
    })?;
    Ok(Some(digest))
}

/// `<sources>`: 1 to [`MAX_SOURCES`] `<url-data target='…'/>`.
fn read_sources(el: &Element) -> Result<Vec<String>, ParseError> {
    let r = Reader::unchecked(el, "sources");
    r.no_text()?;
    r.finish()?;
    let mut urls = Vec::new();
    for c in el.children() {
        if !c.is("url-data", NS_URL_DATA) {
            return Err(unknown_child("sources", c));
        }
        let mut u = Reader::unchecked(c, "url-data");
        let target: SourceUrl = u.req("target")?;
        u.no_text()?;
        u.no_children()?;
        u.finish()?;
        if urls.len() == MAX_SOURCES {
            return Err(ParseError::Invalid {
                element: "sources",
                reason: format!("more than {MAX_SOURCES} <url-data/>"),
            });
        }
        urls.push(target.0);
    }
    if urls.is_empty() {
        return Err(ParseError::MissingChild {
            element: "sources",
            child: "url-data",
        });
    }
    Ok(urls)
}

/// An `http://` or `https://` URL of at most [`MAX_URL_LEN`] characters, without spaces or
/// control characters.
pub(crate) struct SourceUrl(pub String);

impl crate::xml::FromAttr for SourceUrl {
    fn from_attr(s: &str) -> Result<Self, String> {
        let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
        let rest = if lower.starts_with("https://") {
            &s[8..]
        } else if lower.starts_with("http://") {
            &s[7..]
        } else {
            return Err("expected an http:// or https:// URL".to_owned());
        };
        if s.chars().count() > MAX_URL_LEN {
            return Err(format!("longer than {MAX_URL_LEN} characters"));
        }
        if rest.is_empty() || rest.starts_with('/') {
            return Err("the URL names no host".to_owned());
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("a URL has no spaces or control characters".to_owned());
        }
        Ok(SourceUrl(s.to_owned()))
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

/// A string that is not a SHA-256 in lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected a SHA-256 as 64 lowercase hexadecimal digits, got {0:?}")]
pub struct ParseSha256Error(pub String);

/// Parses 64 lowercase hex digits (the form in URLs, file names and `<request-slot>`).
/// Uppercase is refused so that one blob has one name.
pub fn parse_sha256(s: &str) -> Result<[u8; 32], ParseSha256Error> {
    let bad = || {
        let mut shown: String = s.chars().take(80).collect();
        if shown.len() < s.len() {
            shown.push('…');
        }
        ParseSha256Error(shown)
    };
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    if s.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
        *o = (digit(pair[0]).ok_or_else(bad)? << 4) | digit(pair[1]).ok_or_else(bad)?;
    }
    Ok(out)
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
