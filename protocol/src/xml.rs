//! Strict element reading and writing shared by every payload.
//!
//! Payloads are parsed by hand from `minidom::Element` rather than with xso derives because each
//! one needs semantic checks a derive does not express (capability grammar, JSON arguments,
//! base64 with a declared size, cross-attribute rules), and every failure must name the element
//! and attribute in its message. This module keeps that code in one place: a parser asks for
//! `req`/`opt` attributes and walks `children`, and `finish` rejects what it did not ask for.

use minidom::rxml::{Namespace, NcName};
use minidom::Element;

use crate::error::ParseError;
use crate::{NS, NS_PREFIX};

/// Values that can be read from an attribute string.
pub(crate) trait FromAttr: Sized {
    /// Parses the value, or says in a few words why it is not acceptable.
    fn from_attr(s: &str) -> Result<Self, String>;
}

/// Values that can be written as an attribute string.
pub(crate) trait ToAttr {
    fn to_attr(&self) -> String;
}

/// Parses an unsigned decimal integer strictly: ASCII digits only (no sign, no spaces).
pub(crate) fn parse_u64(s: &str) -> Result<u64, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("expected an unsigned decimal integer".to_owned());
    }
    s.parse::<u64>()
        .map_err(|_| "integer does not fit in 64 bits".to_owned())
}

impl FromAttr for u64 {
    fn from_attr(s: &str) -> Result<Self, String> {
        parse_u64(s)
    }
}
impl ToAttr for u64 {
    fn to_attr(&self) -> String {
        self.to_string()
    }
}

impl FromAttr for i64 {
    fn from_attr(s: &str) -> Result<Self, String> {
        let digits = s.strip_prefix('-').unwrap_or(s);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err("expected a decimal integer".to_owned());
        }
        s.parse::<i64>()
            .map_err(|_| "integer does not fit in 64 bits".to_owned())
    }
}
impl ToAttr for i64 {
    fn to_attr(&self) -> String {
        self.to_string()
    }
}

impl FromAttr for bool {
    fn from_attr(s: &str) -> Result<Self, String> {
        // xs:boolean, as XMPP uses it.
        match s {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err("expected 'true', 'false', '1' or '0'".to_owned()),
        }
    }
}
impl ToAttr for bool {
    fn to_attr(&self) -> String {
        if *self { "true" } else { "false" }.to_owned()
    }
}

/// A finite, non-negative decimal number (load figures).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub(crate) struct NonNegative(pub f64);

impl FromAttr for NonNegative {
    fn from_attr(s: &str) -> Result<Self, String> {
        let ok_chars = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
        let v = if ok_chars {
            s.parse::<f64>().ok()
        } else {
            None
        };
        match v {
            Some(v) if v.is_finite() && v >= 0.0 => Ok(NonNegative(v)),
            _ => Err("expected a finite non-negative decimal number".to_owned()),
        }
    }
}
impl ToAttr for NonNegative {
    fn to_attr(&self) -> String {
        // Rust prints the shortest string that reads back to the same f64.
        self.0.to_string()
    }
}

impl FromAttr for String {
    fn from_attr(s: &str) -> Result<Self, String> {
        Ok(s.to_owned())
    }
}
impl ToAttr for String {
    fn to_attr(&self) -> String {
        self.clone()
    }
}
impl ToAttr for &str {
    fn to_attr(&self) -> String {
        (*self).to_owned()
    }
}

impl FromAttr for jid::Jid {
    fn from_attr(s: &str) -> Result<Self, String> {
        jid::Jid::new(s).map_err(|e| format!("not a valid JID: {e}"))
    }
}
impl ToAttr for jid::Jid {
    fn to_attr(&self) -> String {
        self.to_string()
    }
}

/// Implements `FromAttr`/`ToAttr` for a type with `FromStr<Err = String>` and `Display`.
macro_rules! attr_via_str {
    ($($t:ty),* $(,)?) => {$(
        impl $crate::xml::FromAttr for $t {
            fn from_attr(s: &str) -> Result<Self, String> {
                s.parse::<$t>().map_err(|e| e.to_string())
            }
        }
        impl $crate::xml::ToAttr for $t {
            fn to_attr(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
pub(crate) use attr_via_str;

/// Checks that `el` is `<name xmlns='urn:spine:1'>`; a `urn:spine:N` of another major version
/// is reported as [`ParseError::UnsupportedVersion`].
pub(crate) fn check_element(el: &Element, name: &'static str) -> Result<(), ParseError> {
    let ns = el.ns();
    if ns != NS && ns.starts_with(NS_PREFIX) && el.name() == name {
        return Err(ParseError::UnsupportedVersion {
            namespace: ns,
            supported: NS,
        });
    }
    if el.name() != name || ns != NS {
        return Err(ParseError::WrongElement {
            expected: name,
            namespace: NS,
            found_name: el.name().to_owned(),
            found_ns: ns,
        });
    }
    Ok(())
}

/// A strict reader over one element: attributes are taken one by one and `finish` rejects
/// any attribute that was not asked for.
pub(crate) struct Reader<'a> {
    pub(crate) el: &'a Element,
    pub(crate) name: &'static str,
    known: Vec<&'static str>,
}

impl<'a> Reader<'a> {
    /// Starts reading `el`, which must be `<name xmlns='urn:spine:1'>`.
    pub(crate) fn new(el: &'a Element, name: &'static str) -> Result<Self, ParseError> {
        check_element(el, name)?;
        Ok(Self::unchecked(el, name))
    }

    /// Starts reading an element whose name and namespace the caller has already checked.
    pub(crate) fn unchecked(el: &'a Element, name: &'static str) -> Self {
        Reader {
            el,
            name,
            known: Vec::new(),
        }
    }

    fn raw(&mut self, attr: &'static str) -> Option<&'a str> {
        self.known.push(attr);
        self.el.attr(attr)
    }

    /// A required attribute.
    pub(crate) fn req<T: FromAttr>(&mut self, attr: &'static str) -> Result<T, ParseError> {
        match self.opt(attr)? {
            Some(v) => Ok(v),
            None => Err(ParseError::MissingAttribute {
                element: self.name,
                attribute: attr,
            }),
        }
    }

    /// An optional attribute.
    pub(crate) fn opt<T: FromAttr>(&mut self, attr: &'static str) -> Result<Option<T>, ParseError> {
        let name = self.name;
        match self.raw(attr) {
            None => Ok(None),
            Some(s) => T::from_attr(s)
                .map(Some)
                .map_err(|reason| ParseError::InvalidAttribute {
                    element: name,
                    attribute: attr,
                    value: s.chars().take(200).collect(),
                    reason,
                }),
        }
    }

    /// An error about attribute `attr` of this element, for checks beyond its own grammar.
    pub(crate) fn invalid(&self, attr: &'static str, reason: impl Into<String>) -> ParseError {
        ParseError::InvalidAttribute {
            element: self.name,
            attribute: attr,
            value: self
                .el
                .attr(attr)
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect(),
            reason: reason.into(),
        }
    }

    /// Child elements, each of which must be in the Spine namespace.
    pub(crate) fn children(&self) -> impl Iterator<Item = Result<&'a Element, ParseError>> + 'a {
        let name = self.name;
        self.el.children().map(move |c| {
            if c.ns() == NS {
                Ok(c)
            } else {
                Err(unknown_child(name, c))
            }
        })
    }

    /// The element's text, which must be absent or whitespace.
    pub(crate) fn no_text(&self) -> Result<(), ParseError> {
        if self.el.texts().any(|t| !t.trim().is_empty()) {
            return Err(ParseError::UnexpectedText { element: self.name });
        }
        Ok(())
    }

    /// The element must have no child elements.
    pub(crate) fn no_children(&self) -> Result<(), ParseError> {
        match self.el.children().next() {
            Some(c) => Err(unknown_child(self.name, c)),
            None => Ok(()),
        }
    }

    /// Ends reading: rejects any attribute that was not asked for.
    pub(crate) fn finish(self) -> Result<(), ParseError> {
        for ((ns, attr), _) in self.el.attrs().iter() {
            let attr: &str = attr.as_ref();
            if *ns != Namespace::NONE || !self.known.contains(&attr) {
                return Err(ParseError::UnknownAttribute {
                    element: self.name,
                    attribute: attr.to_owned(),
                });
            }
        }
        Ok(())
    }
}

pub(crate) fn unknown_child(parent: &'static str, c: &Element) -> ParseError {
    ParseError::UnknownChild {
        element: parent,
        child: c.name().to_owned(),
        namespace: c.ns(),
    }
}

/// Sets `child` once, or reports a duplicate.
pub(crate) fn set_once<T>(
    slot: &mut Option<T>,
    value: T,
    parent: &'static str,
    child: &'static str,
) -> Result<(), ParseError> {
    if slot.is_some() {
        return Err(ParseError::DuplicateChild {
            element: parent,
            child,
        });
    }
    *slot = Some(value);
    Ok(())
}

/// Builds a Spine element attribute by attribute.
pub(crate) struct Builder {
    el: Element,
}

impl Builder {
    pub(crate) fn new(name: &str) -> Self {
        Self::in_ns(name, NS)
    }

    /// An element of another namespace (the XEP-0300 hash, XEP-0103 url-data).
    pub(crate) fn in_ns(name: &str, ns: &str) -> Self {
        Builder {
            el: Element::bare(name, ns),
        }
    }

    /// Sets an attribute. Attribute names are constants of this crate, all valid NCNames
    /// (the round-trip tests cover each one).
    pub(crate) fn attr(mut self, name: &'static str, value: impl ToAttr) -> Self {
        if let Ok(n) = NcName::try_from(name) {
            self.el.set_attr(Namespace::NONE, n, value.to_attr());
        } else {
            debug_assert!(false, "invalid attribute name constant {name}");
        }
        self
    }

    pub(crate) fn opt(self, name: &'static str, value: Option<impl ToAttr>) -> Self {
        match value {
            Some(v) => self.attr(name, v),
            None => self,
        }
    }

    pub(crate) fn child(mut self, child: Element) -> Self {
        self.el.append_child(child);
        self
    }

    pub(crate) fn children(mut self, children: impl IntoIterator<Item = Element>) -> Self {
        for c in children {
            self.el.append_child(c);
        }
        self
    }

    pub(crate) fn text(mut self, text: impl Into<String>) -> Self {
        let t = text.into();
        if !t.is_empty() {
            self.el.append_text(t);
        }
        self
    }

    pub(crate) fn build(self) -> Element {
        self.el
    }
}
