//! Stanzas found and checked in a stream's bytes, without building them.
//!
//! Everything Spine reads from an XMPP stream goes through rxml today (the parser under
//! tokio-xmpp, xso and minidom): about 4.4 µs per stanza of a no-op job's life for rxml's
//! events alone on the project's 2-core test machine, where this scanner takes about 1.0 µs
//! (`cargo bench -p spine-protocol --bench scan`). Reading and writing XML is about 38 µs of
//! the 129 µs of CPU a no-op job costs over HTTP (issue 19, BENCHMARKS.md). [`scan`] finds
//! the next complete top-level element of a stream in a buffer and checks that it is
//! well-formed *restricted* XML with namespaces, as rxml would:
//!
//! - no comments, processing instructions, XML declarations or document types;
//! - no entity references but the five predefined ones; character references only to
//!   characters XML allows; every character an XML `Char`; no `]]>` in text; no `<` in an
//!   attribute value;
//! - every element and attribute name a valid name, at most one colon, each part an NCName;
//! - every prefix declared (the stream's own `stream` prefix and `xml` are known); no prefix
//!   undeclared or bound to the `xml`/`xmlns` namespaces; no attribute twice, by name or by
//!   namespace and local name;
//! - end tags that match their start tags.
//!
//! It reports where the stanza's parts are (its start tag, its inside, its end tag), its
//! name, namespace and attributes, and its children, so that a caller can relay or decode it
//! without a parser's events. It allocates only for an attribute value with a reference or
//! white space to normalise, and for what outgrows its inline room (more than six attributes
//! on a start tag, four namespace declarations in scope, eight open elements).
//!
//! quick-xml tokenises. The checks quick-xml does not make (names, characters, references,
//! namespaces, the space between attributes) are made here with rxml's own character classes
//! (`rxml_validation`). The tests compare the verdicts and what is reported with rxml's on a
//! corpus and on thousands of mutations of it: the checks are written here because no XML
//! crate both tokenises at this speed and enforces restricted XML.

use std::borrow::Cow;

use quick_xml::errors::{Error as QxError, IllFormedError, SyntaxError};
use quick_xml::events::Event;
use smallvec::SmallVec;

/// The namespace of the stream's own elements (`stream:` prefix).
pub const STREAM_NS: &str = "http://etherx.jabber.org/streams";
/// The namespace bound to the `xml` prefix.
pub const XML_NS: &str = "http://www.w3.org/XML/1998/namespace";
/// The namespace bound to the `xmlns` prefix (never declared).
const XMLNS_NS: &str = "http://www.w3.org/2000/xmlns/";

/// What surrounds the stanzas: the stream's default namespace and the limits.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'s> {
    /// The stream's default namespace (`jabber:client` on a client stream).
    pub default_ns: &'s str,
    /// The most bytes one stanza may take (leading whitespace included).
    pub max_bytes: usize,
    /// The deepest nesting allowed, the stanza itself counted as 1.
    pub max_depth: u32,
}

/// What the start of a buffer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(
    clippy::large_enum_variant,
    reason = "a stanza is what nearly every scan finds: boxing it would allocate each time"
)]
pub enum Scan<'a> {
    /// Only whitespace, or the beginning of a stanza: more bytes are needed.
    Incomplete,
    /// A complete stanza.
    Stanza(Stanza<'a>),
    /// The stream's end tag (`</stream:stream>`); `len` bytes with the whitespace before it.
    StreamEnd {
        /// Bytes it takes.
        len: usize,
    },
}

/// A complete, well-formed top-level element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stanza<'a> {
    /// Bytes it takes from the start of the buffer (the whitespace before it included).
    pub len: usize,
    /// Where its start tag begins (the `<`).
    pub start: usize,
    /// Just after its start tag's `>`.
    pub head_end: usize,
    /// Where its end tag begins (`</`); `None` if the start tag closed it (`<iq/>`).
    pub end_tag: Option<usize>,
    /// Its local name.
    pub name: &'a str,
    /// Its namespace.
    pub ns: Cow<'a, str>,
    /// Its attributes as written (namespace declarations included), values unescaped.
    pub attrs: Attrs<'a>,
    /// Elements directly inside it.
    pub children: u32,
    /// Whether one of those is in the stream's default namespace (`<body/>`, `<error/>`).
    pub default_ns_child: bool,
    /// Whether text other than white space is directly inside it (written, referenced or in
    /// a CDATA section).
    pub text: bool,
    /// Whether every prefix used inside it is declared inside it (or is `xml`): its bytes
    /// then mean the same in another stream with the same default namespace.
    pub self_contained: bool,
}

impl Stanza<'_> {
    /// The value of an attribute without a prefix.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.value.as_ref())
    }
}

/// A start tag's attributes: a stanza's head has a few (kept without an allocation).
pub type Attrs<'a> = SmallVec<[Attr<'a>; 6]>;

/// An attribute of a stanza's start tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr<'a> {
    /// Its name as written (`type`, `xml:lang`, `xmlns:x`).
    pub name: &'a str,
    /// Its value, references replaced.
    pub value: Cow<'a, str>,
}

/// Why the bytes are not a stanza.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    /// Not well-formed restricted XML (or not a stanza where one must be).
    #[error("not well-formed XML at byte {at}: {what}")]
    Malformed {
        /// About where (bytes from the start of the buffer).
        at: usize,
        /// What is wrong.
        what: String,
    },
    /// The stanza is larger than [`Scope::max_bytes`].
    #[error("a stanza of more than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The stanza nests deeper than [`Scope::max_depth`].
    #[error("elements nested deeper than {limit} levels")]
    TooDeep {
        /// The limit.
        limit: u32,
    },
}

fn bad(at: usize, what: impl Into<String>) -> ScanError {
    ScanError::Malformed {
        at,
        what: what.into(),
    }
}

/// Finds the stanza (or the stream's end) at the start of `input`, after any whitespace.
///
/// `input` is what has been read of the stream so far, from just after the previous stanza;
/// a UTF-8 sequence cut at its end must be left out by the caller (scan the valid prefix).
pub fn scan<'a>(input: &'a str, scope: &Scope<'a>) -> Result<Scan<'a>, ScanError> {
    // quick-xml would skip a byte order mark at the start as a document's; between stanzas it
    // is text.
    if input.starts_with('\u{feff}') {
        return Err(bad(0, "text outside a stanza (a byte order mark)"));
    }
    let mut r = quick_xml::Reader::from_str(input);
    {
        let c = r.config_mut();
        // The stream's end tag comes at depth 0: checked here.
        c.allow_unmatched_ends = true;
        c.check_end_names = true;
        c.expand_empty_elements = false;
        c.trim_text(false);
        c.allow_dangling_amp = false;
    }
    let mut ns = Namespaces::default();
    let mut top: Option<Stanza<'a>> = None;
    // The names of the open elements (the stanza's first), for an end tag cut short.
    let mut open: SmallVec<[&'a str; 8]> = SmallVec::new();
    loop {
        // Open elements (the stanza is 1).
        let depth = open.len() as u32;
        let at = r.buffer_position() as usize;
        let ev = match r.read_event() {
            Ok(ev) => ev,
            Err(e) => {
                let pos = r.error_position() as usize;
                if !need_more(&e, input, pos) {
                    return Err(bad(pos, e.to_string()));
                }
                let expected = open.last().copied().unwrap_or("stream:stream");
                markup_begun(input.get(at..).unwrap_or(""), at, depth, expected)?;
                return incomplete(input, scope);
            }
        };
        let (e, empty) = match ev {
            Event::Start(e) => (e, false),
            Event::Empty(e) => (e, true),
            Event::End(e) => {
                if depth == 0 {
                    return match e.name().0 {
                        "stream:stream" => Ok(Scan::StreamEnd {
                            len: r.buffer_position() as usize,
                        }),
                        other => Err(bad(
                            at,
                            format!("an end tag '</{}>' without its start tag", clip(other)),
                        )),
                    };
                }
                ns.close(depth);
                open.pop();
                if open.is_empty() {
                    return done(top, r.buffer_position() as usize, Some(at), scope);
                }
                continue;
            }
            Event::Text(t) => {
                let s: &str = &t;
                if depth == 0 {
                    if let Some(i) = s.find(|c| !matches!(c, ' ' | '\t' | '\r' | '\n')) {
                        return Err(bad(at + i, "text outside a stanza"));
                    }
                } else {
                    chars(s, at)?;
                    if memchr::memchr(b']', s.as_bytes()).is_some() {
                        if let Some(i) = s.find("]]>") {
                            return Err(bad(at + i, "']]>' in text"));
                        }
                    }
                    if depth == 1 {
                        mark_text(&mut top, s);
                    }
                }
                continue;
            }
            Event::GeneralRef(g) => {
                if depth == 0 {
                    return Err(bad(at, "a reference outside a stanza"));
                }
                let c = reference(&g, at)?;
                if depth == 1 {
                    mark_text(&mut top, c.encode_utf8(&mut [0; 4]));
                }
                continue;
            }
            Event::CData(c) => {
                if depth == 0 {
                    return Err(bad(at, "a CDATA section outside a stanza"));
                }
                let s: &str = &c;
                chars(s, at)?;
                if depth == 1 {
                    mark_text(&mut top, s);
                }
                continue;
            }
            Event::Comment(_) => return Err(bad(at, "a comment (XMPP allows none)")),
            Event::PI(_) | Event::Decl(_) => {
                return Err(bad(at, "a processing instruction (XMPP allows none)"))
            }
            Event::DocType(_) => return Err(bad(at, "a document type (XMPP allows none)")),
            Event::Eof => return incomplete(input, scope),
        };
        let level = depth + 1;
        if level > scope.max_depth {
            return Err(ScanError::TooDeep {
                limit: scope.max_depth,
            });
        }
        // The tag's content (name and attributes) as a slice of the input, which it is: the
        // reader borrows from `input`, just after the `<`.
        let content: &'a str = match input.get(at + 1..at + 1 + e.len()) {
            Some(c) if std::ptr::eq(c.as_ptr(), (*e).as_ptr()) => c,
            _ => return Err(bad(at, "a start tag the scanner could not place")),
        };
        let qname: &'a str = &content[..e.name().0.len()];
        let (prefix, local) = split_qname(qname)
            .ok_or_else(|| bad(at, format!("'{}' is not a valid element name", clip(qname))))?;
        if prefix == Some("xmlns") {
            return Err(bad(at, "an element cannot have the prefix xmlns"));
        }
        let attrs = attributes(&content[qname.len()..], at, level, &mut ns, false)?;
        let uri = ns.resolve(prefix, scope).ok_or_else(|| {
            bad(
                at,
                format!(
                    "the prefix '{}' is not declared",
                    prefix.unwrap_or_default()
                ),
            )
        })?;
        let mut contained = ns.contained(prefix);
        check_attribute_names(&attrs, at, &ns, scope, &mut contained)?;
        if level == 1 {
            top = Some(Stanza {
                len: 0,
                start: at,
                head_end: r.buffer_position() as usize,
                end_tag: None,
                name: local,
                ns: uri,
                attrs,
                children: 0,
                default_ns_child: false,
                text: false,
                self_contained: contained,
            });
        } else if let Some(t) = top.as_mut() {
            if level == 2 {
                t.children += 1;
                t.default_ns_child |= uri == scope.default_ns;
            }
            t.self_contained &= contained;
        }
        if empty {
            ns.close(level);
            if level == 1 {
                return done(top, r.buffer_position() as usize, None, scope);
            }
        } else {
            open.push(qname);
        }
    }
}

/// A stream's bytes as they are read, and the stanzas in them: [`scan`] over a buffer that
/// grows by reads and shrinks by stanzas.
///
/// It checks that the bytes are UTF-8 once each (a character cut by a read waits for the
/// next), and scans again after an incomplete stanza only once a `>` has come (no stanza ends
/// without one), so that a large stanza arriving in many reads is not scanned from its start
/// after every read. The size limit holds between scans too. So what is wrong inside a stanza
/// that has begun is refused at the next `>` (or the limit), where rxml refuses it at once;
/// before a stanza begins, every read is scanned.
#[derive(Debug)]
pub struct Reader {
    buf: Vec<u8>,
    /// Where the unread part of `buf` begins.
    start: usize,
    /// How much of `buf` is known to be UTF-8.
    valid: usize,
    /// The end of `buf` when a scan last found the stanza incomplete.
    waited: Option<usize>,
    scope: Scope<'static>,
}

impl Reader {
    /// A reader of a stream in `scope`.
    pub fn new(scope: Scope<'static>) -> Reader {
        Reader {
            buf: Vec::new(),
            start: 0,
            valid: 0,
            waited: None,
            scope,
        }
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            // Most of the buffer is read: move the rest to the front.
            self.buf.drain(..self.start);
            self.valid -= self.start;
            self.waited = self.waited.map(|w| w - self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes read and not yet taken by [`Reader::consume`].
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next stanza or the stream's end, if all of it has been read; `Ok(None)` until
    /// then. What it returns borrows the buffer: [`Reader::consume`] its `len` after use.
    pub fn next_stanza(&mut self) -> Result<Option<Scan<'_>>, ScanError> {
        Ok(self.next_with_text()?.map(|(found, _)| found))
    }

    /// [`Reader::next_stanza`], with the text its offsets count in (from the first byte not
    /// yet consumed): a relay takes a stanza's bytes from it.
    pub fn next_with_text(&mut self) -> Result<Option<(Scan<'_>, &str)>, ScanError> {
        match std::str::from_utf8(&self.buf[self.valid..]) {
            Ok(_) => self.valid = self.buf.len(),
            Err(e) => {
                self.valid += e.valid_up_to();
                if e.error_len().is_some() {
                    return Err(bad(self.valid - self.start, "bytes that are not UTF-8"));
                }
            }
        }
        if let Some(w) = self.waited {
            if memchr::memchr(b'>', &self.buf[w..self.valid]).is_none() {
                if self.valid - self.start > self.scope.max_bytes {
                    return Err(ScanError::TooLarge {
                        limit: self.scope.max_bytes,
                    });
                }
                return Ok(None);
            }
        }
        // Checked above, up to `valid`.
        let Ok(text) = std::str::from_utf8(&self.buf[self.start..self.valid]) else {
            return Err(bad(0, "bytes that are not UTF-8"));
        };
        match scan(text, &self.scope)? {
            Scan::Incomplete => {
                // Until a stanza has begun, every read is scanned: what comes first may be
                // refused at once (`<<`), and white space costs nothing to scan.
                if memchr::memchr(b'<', text.as_bytes()).is_some() {
                    self.waited = Some(self.valid);
                }
                Ok(None)
            }
            found => {
                self.waited = None;
                Ok(Some((found, text)))
            }
        }
    }

    /// Takes `n` bytes (a stanza's `len`) off the front.
    pub fn consume(&mut self, n: usize) {
        // Never past what was checked (a stanza's `len` never is).
        self.start = (self.start + n).min(self.valid);
        self.waited = None;
    }
}

/// The child elements of a stanza the scanner found in `text`, built as minidom elements the
/// way rxml's events build them (xso's `minidom_compat`): a second, cheaper pass than parsing
/// the stanza again with rxml, for a reader that types the stanza itself.
///
/// Only for what needs no namespace prefixes: `None` (the caller then parses the general way)
/// when an element or attribute inside has a prefixed name (`xml:lang` included), when a
/// default namespace is declared empty, or for a CDATA section or a carriage return in text.
/// Text directly inside the stanza is left out (a caller checks [`Stanza::text`]); text inside
/// the children is kept, white space included, one node per run between two tags.
///
/// `stream_ns`: the stream's default namespace (unprefixed children are in it unless the
/// stanza's head declares another). Assumes `st` was found in `text` by [`scan`] or
/// [`Reader`] (so the bytes are well-formed): anything else gives `None` too.
pub fn children(text: &str, st: &Stanza<'_>, stream_ns: &str) -> Option<Vec<minidom::Element>> {
    use minidom::rxml::{Namespace, NcName};
    use minidom::Element;
    let Some(end) = st.end_tag else {
        return Some(Vec::new());
    };
    let default_ns: &str = st.attr("xmlns").unwrap_or(stream_ns);
    if default_ns.is_empty() {
        return None;
    }
    let inside = text.get(st.head_end..end)?;
    let mut r = quick_xml::Reader::from_str(inside);
    {
        let c = r.config_mut();
        c.allow_unmatched_ends = false;
        c.check_end_names = false;
        c.expand_empty_elements = false;
        c.trim_text(false);
    }
    // The open elements with their namespaces; the text run not yet added.
    let mut open: SmallVec<[(Element, String); 8]> = SmallVec::new();
    let mut run = String::new();
    let mut out = Vec::new();
    loop {
        let ev = r.read_event().ok()?;
        let (e, empty) = match ev {
            Event::Start(e) => (e, false),
            Event::Empty(e) => (e, true),
            Event::End(_) => {
                let (mut el, _) = open.pop()?;
                if !run.is_empty() {
                    el.append_text_node(std::mem::take(&mut run));
                }
                match open.last_mut() {
                    Some((parent, _)) => {
                        parent.append_child(el);
                    }
                    None => out.push(el),
                }
                continue;
            }
            Event::Text(t) => {
                if !open.is_empty() {
                    let s: &str = &t;
                    if memchr::memchr(b'\r', s.as_bytes()).is_some() {
                        return None;
                    }
                    run.push_str(s);
                }
                continue;
            }
            Event::GeneralRef(g) => {
                if !open.is_empty() {
                    run.push(reference(&g, 0).ok()?);
                }
                continue;
            }
            Event::Eof if open.is_empty() => return Some(out),
            _ => return None,
        };
        let content: &str = &e;
        let name = content.get(..e.name().0.len())?;
        if name.contains(':') {
            return None;
        }
        if let Some((parent, _)) = open.last_mut() {
            if !run.is_empty() {
                parent.append_text_node(std::mem::take(&mut run));
            }
        }
        run.clear();
        let attrs = attributes(
            &content[name.len()..],
            0,
            1,
            &mut Namespaces::default(),
            false,
        )
        .ok()?;
        let mut ns = open
            .last()
            .map_or(default_ns, |(_, ns)| ns.as_str())
            .to_owned();
        if let Some(a) = attrs.iter().find(|a| a.name == "xmlns") {
            if a.value.is_empty() {
                return None;
            }
            ns.clear();
            ns.push_str(&a.value);
        }
        let mut el = Element::builder(name, ns.as_str()).build();
        for a in attrs.iter().filter(|a| a.name != "xmlns") {
            if a.name.contains(':') {
                return None;
            }
            let n = NcName::try_from(a.name).ok()?;
            el.set_attr(Namespace::NONE, n, a.value.clone().into_owned());
        }
        if empty {
            match open.last_mut() {
                Some((parent, _)) => {
                    parent.append_child(el);
                }
                None => out.push(el),
            }
        } else {
            open.push((el, ns));
        }
    }
}

/// Notes text directly inside the stanza unless it is white space.
fn mark_text(top: &mut Option<Stanza<'_>>, s: &str) {
    if let Some(t) = top.as_mut() {
        t.text |= !s.bytes().all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'));
    }
}

/// The stanza ends at `end`.
fn done<'a>(
    top: Option<Stanza<'a>>,
    end: usize,
    end_tag: Option<usize>,
    scope: &Scope<'_>,
) -> Result<Scan<'a>, ScanError> {
    let Some(mut t) = top else {
        return Err(bad(end, "an element closed that never opened"));
    };
    if end > scope.max_bytes {
        return Err(ScanError::TooLarge {
            limit: scope.max_bytes,
        });
    }
    t.len = end;
    t.end_tag = end_tag;
    Ok(Scan::Stanza(t))
}

/// More bytes are needed, unless the stanza has already outgrown the limit.
fn incomplete<'a>(input: &str, scope: &Scope<'_>) -> Result<Scan<'a>, ScanError> {
    if input.len() > scope.max_bytes {
        return Err(ScanError::TooLarge {
            limit: scope.max_bytes,
        });
    }
    Ok(Scan::Incomplete)
}

/// Whether quick-xml stopped only because the input ends.
fn need_more(e: &QxError, input: &str, at: usize) -> bool {
    match e {
        QxError::Syntax(
            SyntaxError::UnclosedTag
            | SyntaxError::UnclosedSingleQuotedAttributeValue
            | SyntaxError::UnclosedDoubleQuotedAttributeValue
            | SyntaxError::UnclosedCData
            | SyntaxError::UnclosedComment
            | SyntaxError::UnclosedPI
            | SyntaxError::UnclosedXmlDecl
            | SyntaxError::UnclosedDoctype,
        ) => true,
        // `<!` or `<![CDA` cut short.
        QxError::Syntax(SyntaxError::InvalidBangMarkup) => {
            let rest = input.get(at..).unwrap_or("");
            rest.len() < 9 && ("<![CDATA[".starts_with(rest) || "<!--".starts_with(rest))
        }
        // `&amp` with the `;` still to come ([`markup_begun`] checks the name so far).
        QxError::IllFormed(IllFormedError::UnclosedReference) => {
            let rest = input.get(at..).unwrap_or("");
            !rest.contains(['<', ';'])
        }
        _ => false,
    }
}

/// Prefix and local part of a name (None: not a valid QName).
fn split_qname(q: &str) -> Option<(Option<&str>, &str)> {
    let (prefix, local) = match memchr::memchr(b':', q.as_bytes()) {
        Some(i) => (Some(&q[..i]), &q[i + 1..]),
        None => (None, q),
    };
    (prefix.is_none_or(ncname) && ncname(local)).then_some((prefix, local))
}

/// Checks the characters of text, of a CDATA section or of an attribute value.
fn chars(s: &str, at: usize) -> Result<(), ScanError> {
    // Printable ASCII and the three white space controls need no table.
    if s.bytes()
        .all(|b| matches!(b, 0x20..=0x7f | b'\t' | b'\n' | b'\r'))
    {
        return Ok(());
    }
    rxml_validation::validate_cdata(s)
        .map_err(|e| bad(at, format!("a character XML does not allow ({e})")))
}

/// Whether `s` is an NCName (a name without a colon), as rxml's character classes say.
fn ncname(s: &str) -> bool {
    let b = s.as_bytes();
    if s.is_ascii() {
        return b
            .first()
            .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_')
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'));
    }
    rxml_validation::validate_ncname(s).is_ok()
}

/// The most digits a character reference may have: rxml refuses more (leading zeros count),
/// though XML would not.
const MAX_REF_DIGITS: usize = 8;

/// Checks an entity or character reference (its name, between `&` and `;`).
fn reference(name: &str, at: usize) -> Result<char, ScanError> {
    let c = match name {
        "lt" => '<',
        "gt" => '>',
        "amp" => '&',
        "apos" => '\'',
        "quot" => '"',
        _ => {
            let digits = name.trim_start_matches(['#', 'x']).len();
            if name.starts_with('#') && digits > MAX_REF_DIGITS {
                return Err(bad(
                    at,
                    format!(
                        "the character reference '&{};' (at most {MAX_REF_DIGITS} digits)",
                        clip(name)
                    ),
                ));
            }
            let n = if let Some(h) = name.strip_prefix("#x") {
                (!h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
                    .then(|| u32::from_str_radix(h, 16).ok())
                    .flatten()
            } else if let Some(d) = name.strip_prefix('#') {
                (!d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| d.parse::<u32>().ok())
                    .flatten()
            } else {
                return Err(bad(
                    at,
                    format!(
                        "the entity '&{};' (only the five predefined ones exist)",
                        clip(name)
                    ),
                ));
            };
            let c = n
                .and_then(char::from_u32)
                .ok_or_else(|| bad(at, format!("the character reference '&{};'", clip(name))))?;
            let mut b = [0u8; 4];
            chars(c.encode_utf8(&mut b), at)?;
            c
        }
    };
    Ok(c)
}

/// Checks an attribute value as written and returns it with its references replaced and
/// its whitespace normalised (XML §3.3.3: a tab, a line end or `\r\n` written in it is one
/// space; one made by a character reference stays).
///
/// A carriage return must be followed by a line feed. XML reads one alone as a line end; rxml
/// refuses it before most characters and drops it before others, and what reaches the parsers
/// behind the scanner must be what they accept and read alike.
fn value(raw: &str, at: usize) -> Result<Cow<'_, str>, ScanError> {
    let b = raw.as_bytes();
    // One pass: what is refused at once, and whether anything needs a closer look (a
    // character outside printable ASCII) or a change (a reference, white space to normalise).
    let (mut table, mut plain) = (false, true);
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'<' => return Err(bad(at, "'<' in an attribute value")),
            b'\r' if b.get(i + 1) != Some(&b'\n') => {
                return Err(bad(
                    at,
                    "a carriage return without a line feed in an attribute value",
                ))
            }
            b'&' | b'\t' | b'\n' | b'\r' => plain = false,
            0x00..=0x1f | 0x80.. => table = true,
            _ => {}
        }
    }
    if table {
        chars(raw, at)?;
    }
    if plain {
        return Ok(Cow::Borrowed(raw));
    }
    let first = raw.find(['&', '\t', '\r', '\n']).unwrap_or(raw.len());
    let mut out = String::with_capacity(raw.len());
    out.push_str(&raw[..first]);
    let mut rest = &raw[first..];
    while let Some(n) = rest.find(['&', '\t', '\r', '\n']) {
        out.push_str(&rest[..n]);
        let after = &rest[n + 1..];
        rest = match rest.as_bytes()[n] {
            b'&' => {
                let semi = after
                    .find(';')
                    .ok_or_else(|| bad(at, "'&' without ';' in an attribute value"))?;
                out.push(reference(&after[..semi], at)?);
                &after[semi + 1..]
            }
            b'\r' => {
                out.push(' ');
                after.strip_prefix('\n').unwrap_or(after)
            }
            _ => {
                out.push(' ');
                after
            }
        };
    }
    out.push_str(rest);
    Ok(Cow::Owned(out))
}

/// Checks the beginning of an attribute value cut by the end of the input.
fn value_begun(raw: &str, at: usize) -> Result<(), ScanError> {
    match raw.rfind('&') {
        Some(amp) if !raw[amp..].contains(';') => {
            let (done, cut) = raw.split_at(amp);
            value(done, at)?;
            ref_begun(&cut[1..], at)
        }
        // A line feed may yet follow a carriage return at the cut.
        _ => value(raw.strip_suffix('\r').unwrap_or(raw), at).map(drop),
    }
}

/// Checks the beginning of a reference's name (after `&`) cut by the end of the input: a
/// beginning of one of the five predefined entities, or of a character reference not already
/// past the last character.
fn ref_begun(name: &str, at: usize) -> Result<(), ScanError> {
    let number = |digits: &str, radix: u32| {
        digits.len() <= MAX_REF_DIGITS
            && digits.chars().all(|c| c.is_digit(radix))
            && (digits.is_empty()
                || u32::from_str_radix(digits, radix).is_ok_and(|n| n <= 0x10_FFFF))
    };
    let ok = if let Some(h) = name.strip_prefix("#x") {
        number(h, 16)
    } else if let Some(d) = name.strip_prefix('#') {
        number(d, 10)
    } else {
        ["lt", "gt", "amp", "apos", "quot"]
            .iter()
            .any(|e| e.starts_with(name))
    };
    match ok {
        true => Ok(()),
        false => Err(bad(at, format!("the reference '&{}'", clip(name)))),
    }
}

/// Whether a name cut by the end of the input can still become a valid QName.
fn name_begun(name: &str) -> bool {
    match name.split_once(':') {
        None => ncname(name),
        Some((p, l)) => ncname(p) && (l.is_empty() || ncname(l)),
    }
}

/// The attributes of a start tag (`raw`: everything after its name), checked as written;
/// namespace declarations among them are made in `ns` at `level`. A `partial` tag is cut by
/// the end of the input: what there is must be able to begin a well-formed tag.
fn attributes<'a>(
    raw: &'a str,
    at: usize,
    level: u32,
    ns: &mut Namespaces<'a>,
    partial: bool,
) -> Result<Attrs<'a>, ScanError> {
    let mut out = Attrs::new();
    let b = raw.as_bytes();
    let space = |i: &mut usize| {
        while *i < b.len() && matches!(b[*i], b' ' | b'\t' | b'\r' | b'\n') {
            *i += 1;
        }
    };
    let mut i = 0;
    loop {
        // Whitespace is required before each attribute (and allowed before `/`).
        let ws = i;
        space(&mut i);
        if i == b.len() || (partial && b[i] == b'/' && i + 1 == b.len()) {
            return Ok(out);
        }
        if i == ws {
            return Err(bad(at, "no whitespace between attributes"));
        }
        let name_end = b[i..]
            .iter()
            .position(|c| matches!(c, b'=' | b' ' | b'\t' | b'\r' | b'\n'))
            .map(|n| i + n);
        let name = &raw[i..name_end.unwrap_or(b.len())];
        let Some(name_end) = name_end else {
            return match partial && name_begun(name) {
                true => Ok(out),
                false => Err(bad(
                    at,
                    format!("the attribute '{}' has no value", clip(name)),
                )),
            };
        };
        if split_qname(name).is_none() {
            return Err(bad(
                at,
                format!("'{}' is not a valid attribute name", clip(name)),
            ));
        }
        if name == "xmlns:xmlns" {
            return Err(bad(at, "the prefix xmlns cannot be declared"));
        }
        i = name_end;
        space(&mut i);
        if partial && i == b.len() {
            return Ok(out);
        }
        if i == b.len() || b[i] != b'=' {
            return Err(bad(
                at,
                format!("the attribute '{}' has no value", clip(name)),
            ));
        }
        i += 1;
        space(&mut i);
        let q = match b.get(i) {
            Some(q @ (b'\'' | b'"')) => *q,
            None if partial => return Ok(out),
            _ => {
                return Err(bad(
                    at,
                    format!("the value of '{}' is not quoted", clip(name)),
                ))
            }
        };
        let Some(close) = memchr::memchr(q, &b[i + 1..]).map(|n| i + 1 + n) else {
            return match partial {
                true => value_begun(&raw[i + 1..], at).map(|()| out),
                false => Err(bad(
                    at,
                    format!("the value of '{}' is not closed", clip(name)),
                )),
            };
        };
        let v = value(&raw[i + 1..close], at)?;
        i = close + 1;
        if out.iter().any(|a: &Attr<'_>| a.name == name) {
            return Err(bad(at, format!("the attribute '{}' twice", clip(name))));
        }
        if name == "xmlns" {
            if v == XML_NS || v == XMLNS_NS {
                return Err(bad(at, format!("the default namespace cannot be '{v}'")));
            }
            ns.declare(level, None, v.clone());
        } else if let Some(p) = name.strip_prefix("xmlns:") {
            match p {
                "xmlns" => return Err(bad(at, "the prefix xmlns cannot be declared")),
                "xml" if v != XML_NS => {
                    return Err(bad(
                        at,
                        "the prefix xml cannot be bound to another namespace",
                    ))
                }
                "xml" => {}
                _ if v.is_empty() => {
                    return Err(bad(at, format!("the prefix '{p}' declared empty")))
                }
                _ if v == XML_NS || v == XMLNS_NS => {
                    return Err(bad(at, format!("the prefix '{p}' bound to '{v}'")))
                }
                _ => ns.declare(level, Some(p), v.clone()),
            }
        }
        out.push(Attr { name, value: v });
    }
}

/// Checks the markup or reference cut by the end of the input at `at` (`rest`: from its `<`
/// or `&` on): whether it can still become well-formed (more bytes needed) or already cannot.
/// `expected`: the name an end tag must have here.
fn markup_begun(rest: &str, at: usize, depth: u32, expected: &str) -> Result<(), ScanError> {
    if let Some(name) = rest.strip_prefix('&') {
        if depth == 0 {
            return Err(bad(at, "a reference outside a stanza"));
        }
        return ref_begun(name, at);
    }
    let Some(m) = rest.strip_prefix('<') else {
        return Ok(());
    };
    if let Some(name) = m.strip_prefix('/') {
        let end = name.find([' ', '\t', '\r', '\n']).unwrap_or(name.len());
        let (n, tail) = name.split_at(end);
        let ok = match tail.is_empty() {
            true => expected.starts_with(n),
            false => n == expected,
        } && tail
            .bytes()
            .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'));
        return match ok {
            true => Ok(()),
            false => Err(bad(at, "a malformed end tag")),
        };
    }
    if let Some(bang) = m.strip_prefix('!') {
        const CDATA: &str = "[CDATA[";
        return match bang.strip_prefix(CDATA) {
            Some(text) if depth > 0 => chars(text, at),
            None if depth > 0 && CDATA.starts_with(bang) => Ok(()),
            _ if depth == 0 && (bang.starts_with(CDATA) || CDATA.starts_with(bang)) => {
                Err(bad(at, "a CDATA section outside a stanza"))
            }
            _ if bang.starts_with('-') => Err(bad(at, "a comment (XMPP allows none)")),
            _ => Err(bad(at, "markup XMPP does not allow ('<!')")),
        };
    }
    if m.starts_with('?') {
        return Err(bad(at, "a processing instruction (XMPP allows none)"));
    }
    let end = m.find([' ', '\t', '\r', '\n', '/']).unwrap_or(m.len());
    let (name, tail) = m.split_at(end);
    if name.is_empty() && !tail.is_empty() {
        return Err(bad(at, "a tag without a name"));
    }
    if !name.is_empty() && !name_begun(name) {
        return Err(bad(
            at,
            format!("'{}' is not a valid element name", clip(name)),
        ));
    }
    if !tail.is_empty() && !matches!(split_qname(name), Some((p, _)) if p != Some("xmlns")) {
        return Err(bad(
            at,
            format!("'{}' is not a valid element name", clip(name)),
        ));
    }
    // Declarations made here are not kept: the tag is scanned again when it is complete.
    attributes(tail, at, u32::MAX, &mut Namespaces::default(), true).map(drop)
}

/// Checks that the prefixed attributes of an element are declared and unique by namespace
/// and local name; clears `contained` if one uses a prefix declared outside the stanza.
fn check_attribute_names<'a>(
    attrs: &[Attr<'a>],
    at: usize,
    ns: &Namespaces<'a>,
    scope: &Scope<'a>,
    contained: &mut bool,
) -> Result<(), ScanError> {
    let mut seen: SmallVec<[(Cow<'a, str>, &str); 4]> = SmallVec::new();
    for a in attrs {
        let Some((Some(p), local)) = split_qname(a.name) else {
            continue;
        };
        if p == "xmlns" {
            continue;
        }
        let uri = ns
            .resolve(Some(p), scope)
            .ok_or_else(|| bad(at, format!("the prefix '{p}' is not declared")))?;
        *contained &= ns.contained(Some(p));
        if seen.iter().any(|(u, l)| *u == uri && *l == local) {
            return Err(bad(
                at,
                format!("the attribute {{{uri}}}{local} twice (two prefixes of one namespace)"),
            ));
        }
        seen.push((uri, local));
    }
    // An unprefixed attribute is in no namespace: it cannot clash with a prefixed one.
    Ok(())
}

/// A namespace declaration: the level of the element making it, the prefix (None: the default
/// namespace), the namespace.
type Decl<'a> = (u32, Option<&'a str>, Cow<'a, str>);

/// Namespace declarations made inside the stanza, innermost last.
#[derive(Default)]
struct Namespaces<'a> {
    decls: SmallVec<[Decl<'a>; 4]>,
}

impl<'a> Namespaces<'a> {
    /// The element at `level` closed: its declarations go.
    fn close(&mut self, level: u32) {
        while self.decls.last().is_some_and(|d| d.0 >= level) {
            self.decls.pop();
        }
    }

    fn declare(&mut self, level: u32, prefix: Option<&'a str>, uri: Cow<'a, str>) {
        self.decls.push((level, prefix, uri));
    }

    /// The namespace of a prefix (None: the default namespace; an empty URI means none).
    fn resolve(&self, prefix: Option<&str>, scope: &Scope<'a>) -> Option<Cow<'a, str>> {
        if let Some(d) = self.decls.iter().rev().find(|d| d.1 == prefix) {
            return match (prefix, d.2.is_empty()) {
                (Some(_), true) => None,
                _ => Some(d.2.clone()),
            };
        }
        match prefix {
            None => Some(Cow::Borrowed(scope.default_ns)),
            Some("xml") => Some(Cow::Borrowed(XML_NS)),
            Some("stream") => Some(Cow::Borrowed(STREAM_NS)),
            Some(_) => None,
        }
    }

    /// Whether a prefix is declared inside the stanza (or needs no declaration).
    fn contained(&self, prefix: Option<&str>) -> bool {
        match prefix {
            None | Some("xml") => true,
            p => self.decls.iter().any(|d| d.1 == p),
        }
    }
}

/// At most 40 characters of a name, for an error message.
fn clip(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The scanner against rxml, for its tests and the `scan` fuzz target (feature
/// `differential`).
#[cfg(any(test, feature = "differential"))]
pub mod differential {
    use minidom::rxml::{self, Parse as _};

    use super::*;

    /// A client stream's scope, with limits no test comes near.
    pub const SCOPE: Scope<'static> = Scope {
        default_ns: "jabber:client",
        max_bytes: 1 << 20,
        max_depth: 64,
    };

    /// The stream header rxml reads first.
    pub const HEADER: &str =
        "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";

    /// What a reader makes of the start of a buffer, in terms both readers share.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Verdict {
        /// More bytes are needed.
        Incomplete,
        /// A stanza.
        Stanza {
            /// Bytes it takes.
            len: usize,
            /// Local name.
            name: String,
            /// Namespace.
            ns: String,
            /// Attributes in no namespace (name, value), sorted.
            plain: Vec<(String, String)>,
            /// Attributes with a namespace.
            namespaced: usize,
            /// Elements directly inside.
            children: u32,
            /// Whether one of those is in the stream's default namespace.
            default_ns_child: bool,
            /// Whether text other than white space is directly inside.
            text: bool,
        },
        /// The stream's end tag, and the bytes it takes.
        StreamEnd(usize),
        /// Not well-formed.
        Malformed,
    }

    /// What rxml (behind tokio-xmpp) makes of `s` inside a client stream.
    pub fn by_rxml(s: &str) -> Verdict {
        let doc = format!("{HEADER}{s}");
        let mut p = rxml::Parser::default();
        let mut buf = doc.as_bytes();
        let mut depth = 0u32;
        let mut top: Option<Verdict> = None;
        loop {
            let ev = match p.parse(&mut buf, false) {
                Ok(Some(ev)) => ev,
                Ok(None) | Err(rxml::error::EndOrError::NeedMoreData) => {
                    return Verdict::Incomplete
                }
                Err(rxml::error::EndOrError::Error(_)) => return Verdict::Malformed,
            };
            match ev {
                rxml::Event::XmlDeclaration(..) => {}
                rxml::Event::StartElement(_, (ns, name), attrs) => {
                    depth += 1;
                    if depth == 2 {
                        let mut plain = Vec::new();
                        let mut namespaced = 0;
                        for ((ans, aname), v) in attrs.iter() {
                            if ans.is_none() {
                                plain.push((aname.to_string(), v.to_string()));
                            } else {
                                namespaced += 1;
                            }
                        }
                        plain.sort();
                        top = Some(Verdict::Stanza {
                            len: 0,
                            name: name.to_string(),
                            ns: ns.to_string(),
                            plain,
                            namespaced,
                            children: 0,
                            default_ns_child: false,
                            text: false,
                        });
                    } else if depth == 3 {
                        if let Some(Verdict::Stanza {
                            children,
                            default_ns_child,
                            ..
                        }) = top.as_mut()
                        {
                            *children += 1;
                            *default_ns_child |= ns.as_str() == "jabber:client";
                        }
                    }
                }
                rxml::Event::EndElement(_) => {
                    // What rxml has read (its event sizes leave out an empty CDATA section).
                    let consumed = doc.len() - buf.len();
                    depth -= 1;
                    if depth == 0 {
                        return Verdict::StreamEnd(consumed - HEADER.len());
                    }
                    if depth == 1 {
                        let mut t = top.take().expect("a stanza began");
                        if let Verdict::Stanza { len, .. } = &mut t {
                            *len = consumed - HEADER.len();
                        }
                        return t;
                    }
                }
                rxml::Event::Text(_, t) => {
                    let blank = t.chars().all(|c| matches!(c, ' ' | '\t' | '\r' | '\n'));
                    if depth == 1 && !blank {
                        return Verdict::Malformed;
                    }
                    if let (2, Some(Verdict::Stanza { text, .. })) = (depth, top.as_mut()) {
                        *text |= !blank;
                    }
                }
            }
        }
    }

    /// What [`scan`] makes of `s`.
    pub fn by_scan(s: &str) -> Verdict {
        match scan(s, &SCOPE) {
            Ok(Scan::Incomplete) => Verdict::Incomplete,
            Ok(Scan::StreamEnd { len }) => Verdict::StreamEnd(len),
            Ok(Scan::Stanza(st)) => {
                let mut plain = Vec::new();
                let mut namespaced = 0;
                for a in &st.attrs {
                    if a.name == "xmlns" || a.name.starts_with("xmlns:") {
                        continue;
                    }
                    if a.name.contains(':') {
                        namespaced += 1;
                    } else {
                        plain.push((a.name.to_string(), a.value.to_string()));
                    }
                }
                plain.sort();
                Verdict::Stanza {
                    len: st.len,
                    name: st.name.to_string(),
                    ns: st.ns.to_string(),
                    plain,
                    namespaced,
                    children: st.children,
                    default_ns_child: st.default_ns_child,
                    text: st.text,
                }
            }
            Err(ScanError::Malformed { .. }) => Verdict::Malformed,
            Err(e) => panic!("no limit is near in these tests: {e}"),
        }
    }

    /// Continuations of a cut tag or text, for [`rejected_earlier`].
    const ENDINGS: &[&str] = &[
        "",
        ">",
        "/>",
        "'/>",
        "\"/>",
        "'>",
        "\">",
        "='1'/>",
        "='1'>",
        ";",
        ";/>",
        "]]>",
        "-->",
        "?>",
        "></iq>",
        "/></iq>",
        "'/></iq>",
        "\"/></iq>",
        "'></iq>",
        "\"></iq>",
        ">x</iq>",
        "></a></iq>",
        "'></a></iq>",
    ];

    /// Whether the scanner refused at once what rxml still waits on and refuses, or does not
    /// accept, after every likely continuation: rxml reports some errors only once it has
    /// read further (text between stanzas, a bad first character of a name).
    fn rejected_earlier(s: &str, rxml: &Verdict, scanned: &Verdict) -> bool {
        *rxml == Verdict::Incomplete
            && *scanned == Verdict::Malformed
            && ENDINGS.iter().all(|e| {
                !matches!(
                    by_rxml(&format!("{s}{e}  <presence/>")),
                    Verdict::Stanza { .. } | Verdict::StreamEnd(_)
                )
            })
    }

    /// Where the scanner is stricter than rxml. XML is too here: rxml keeps the last of two
    /// declarations of one prefix (or of the default namespace) on one element, which XML
    /// forbids (an attribute twice).
    /// And a carriage return alone in an attribute value, which rxml drops before `&` or the
    /// closing quote (XML makes it a space) and refuses elsewhere. And a character reference
    /// or a CDATA section between stanzas, which rxml reads as text (white space, if it is
    /// `&#9;`; nothing, if the section is empty).
    fn stricter(s: &str) -> bool {
        matches!(scan(s, &SCOPE), Err(ScanError::Malformed { what, .. })
            if (what.starts_with("the attribute 'xmlns") && what.ends_with("twice"))
                || what.starts_with("a carriage return without a line feed")
                || what == "a reference outside a stanza"
                || what == "a CDATA section outside a stanza")
    }

    /// The elements directly inside the stanza at the start of `s`, as rxml's events build
    /// them (xso's `minidom_compat`, as tokio-xmpp reads a payload), each written out.
    pub fn children_by_rxml(s: &str) -> Vec<String> {
        use xso::FromEventsBuilder as _;
        let doc = format!("{HEADER}{s}");
        let mut p = rxml::Parser::default();
        let mut buf = doc.as_bytes();
        let mut depth = 0u32;
        let mut out = Vec::new();
        let mut building: Option<xso::minidom_compat::ElementFromEvents> = None;
        let ctx = xso::Context::empty();
        while let Ok(Some(ev)) = p.parse(&mut buf, false) {
            if let Some(b) = building.as_mut() {
                match b.feed(ev, &ctx) {
                    Ok(Some(el)) => {
                        out.push(String::from(&el));
                        building = None;
                        depth -= 1;
                    }
                    Ok(None) => {}
                    Err(_) => return out,
                }
                continue;
            }
            match ev {
                rxml::Event::StartElement(_, qname, attrs) => {
                    depth += 1;
                    if depth == 3 {
                        building = Some(xso::minidom_compat::ElementFromEvents::new(qname, attrs));
                    }
                }
                rxml::Event::EndElement(_) => {
                    depth -= 1;
                    if depth <= 1 {
                        return out;
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Whether [`children`] builds the elements rxml's events build for the stanza at the
    /// start of `s`, where it builds them: `Err` says how they differ.
    pub fn check_children(s: &str) -> Result<(), String> {
        let Ok(Scan::Stanza(st)) = scan(s, &SCOPE) else {
            return Ok(());
        };
        let Some(built) = children(s, &st, SCOPE.default_ns) else {
            return Ok(());
        };
        let built: Vec<String> = built.iter().map(String::from).collect();
        let want = children_by_rxml(s);
        if built == want {
            return Ok(());
        }
        Err(format!("{s:?}\n   rxml: {want:?}\n   children: {built:?}"))
    }

    /// Whether the scanner and rxml read `s` alike, and [`children`] builds what rxml does:
    /// `Err` says how they differ.
    pub fn check(s: &str) -> Result<(), String> {
        let (want, got) = (by_rxml(s), by_scan(s));
        if want == got {
            return check_children(s);
        }
        if rejected_earlier(s, &want, &got) || stricter(s) {
            return Ok(());
        }
        Err(format!("{s:?}\n   rxml: {want:?}\n   scan: {got:?}"))
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng as _, SeedableRng as _};

    use super::differential::{by_scan, check, Verdict, SCOPE};
    use super::*;

    /// Stanzas as Spine and XMPP send them, and the corners of the grammar.
    const CORPUS: &[&str] = &[
        "<iq type='set' id='j1' to='agent1@localhost/spine-agent-1' from='dispatcher@localhost/d'><job xmlns='urn:spine:1' id='0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44' capability='text.upper' attempt='1' deadline-ms='30000' submitter='http:local'><input encoding='utf-8'>hello &amp; world</input></job></iq>",
        "<iq type='result' id='j1' to='dispatcher@localhost/d'><result xmlns='urn:spine:1' job='0190f5e2'><output encoding='base64'>aGVsbG8=</output></result></iq>",
        "<iq type='result' id='x'/>",
        "<iq xmlns='jabber:client' type='get' id=\"p&quot;1\"><ping xmlns='urn:xmpp:ping'/></iq>",
        "<message type='normal' to='a@b/c'><status xmlns='urn:spine:1' job='j' state='done'/></message>",
        "<message to='a@b'><body>hi &lt;there&gt; &#x263A; &#9731;</body><thread>t1</thread></message>",
        "<presence><show>away</show><status xml:lang='en'>out</status><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='v'/></presence>",
        "<presence/>",
        "  \n\t<iq type='get' id='w'><query xmlns='jabber:iq:roster'/></iq>",
        "<iq type='set' id='n' xml:lang='de'><s:q xmlns:s='urn:x' s:a='1' b='2'><s:r><t xmlns='urn:y'>text<![CDATA[ <raw> & ]] ]]></t></s:r></s:q></iq>",
        "<message to='a@b/c' id='m'><x xmlns='urn:a' xmlns:p='urn:p' p:v='1' v='2'><p:y p:z='3'/></x></message>",
        "<iq type='error' id='e'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
        "<iq type='set' id='s'><stream:features/></iq>",
        "<iq\ttype = 'set'\nid=\"q\" ><a xmlns='urn:a'\r\n/></iq >",
        "<iq type='set' id='ws' to='a&#x20;b'><a xmlns='urn:a' v='x\ty&#9;z\r\nw'/></iq>",
        "<r xmlns='urn:other'><a/><b/></r>",
        "<iq type='set' id='u'><a xmlns='urn:a'>&#x10000;&#xD7FF;&#xE000;&#xFFFD;é€😀</a></iq>",
        "</stream:stream>",
        "<iq type='set' id='d'><a xmlns=''><b/></a></iq>",
        "<iq type='set' id='bom'><a xmlns='urn:a'>\u{feff}</a></iq>",
        "<message to='a@b'> \n <x xmlns='urn:x'/>\t</message>",
        "<message to='a@b'>&#32;&#x9;<x xmlns='urn:x'/>&#65;</message>",
        "<message to='a@b'><![CDATA[ ]]><x xmlns='urn:x'/><![CDATA[t]]></message>",
        "<message to='a@b'>&amp;<x xmlns='urn:x'/></message>",
    ];

    /// Pieces a mutation inserts.
    const PIECES: &[&str] = &[
        "<",
        ">",
        "/",
        "&",
        ";",
        "'",
        "\"",
        "=",
        " ",
        ":",
        "]]>",
        "&amp;",
        "&#0;",
        "&#x41;",
        "&#xD800;",
        "&#xFFFE;",
        "&foo;",
        "&#;",
        "&#x;",
        "&#000000000065;",
        "&#x0000000041;",
        "&#1114112;",
        "&l",
        "&O",
        "<!--c-->",
        "<?pi x?>",
        "<![CDATA[x]]>",
        "<!DOCTYPE x>",
        " xmlns:a='urn:a'",
        " a:b='1'",
        " xmlns=''",
        " xmlns:a=''",
        " xmlns:xml='urn:x'",
        " xmlns:xmlns='urn:x'",
        " xmlns:x='http://www.w3.org/XML/1998/namespace'",
        " xml:lang='en'",
        " b='2'",
        " b='3'",
        "\u{1}",
        "\u{7f}",
        "é",
        "\u{FFFE}",
        "\u{FFFF}",
        "\t",
        "\r\n",
        "<a>",
        "</a>",
        "<a/>",
        "</iq>",
        "<x:y/>",
        "<xmlns:y/>",
        "<1/>",
        "-",
        ".",
        "·",
        "\u{300}",
        "</stream:stream>",
        "<stream:x/>",
        "a",
        "0",
        "\r",
        "\u{feff}",
    ];

    fn agree(s: &str) {
        if let Err(e) = check(s) {
            panic!("the scanner and rxml differ on {e}");
        }
    }

    /// Inputs on which the scanner and rxml once differed (the fuzz target's and the
    /// mutations' finds), each handled since.
    const FOUND: &[&str] = &[
        "\u{feff}<r<r x",
        "<message to='a@b'>hi &lt;there&gt; &#x263A; &OOOOOOOOOOO",
        "<iqB type='se$' id='ws' to='a&#x0000000000",
        "<iq type='#sD7FF;&#xE000;&#\r",
        "&#9",
        "&#9y9yw>",
        "<![CDATA[",
        "<![CDATA[\u{0}[>",
        "<iq type='set' id='s'><stream:features/>iq&>",
        "<iq type='set' id='d'><a xmlns=''><b/></a></i\r",
        "<p xmlns:xmlns='urn:resence/>",
        "<a v='z\rw'/>",
        "<a v='p\r&quot;1'/>",
        "<iq type='set' id='u'><a xmlns='urn:a'>&#x10000;<![CDATA[]]>&#xD7FF;</a></iq>",
        "<message to='a@b/c' id='m'><x xmlns='urn&#000000000065;:a'/></message>",
    ];

    #[test]
    fn what_was_once_read_apart_is_read_alike() {
        for s in FOUND {
            agree(s);
        }
    }

    #[test]
    fn the_corpus_is_read_as_rxml_reads_it() {
        for s in CORPUS {
            let v = by_scan(s);
            assert!(
                matches!(v, Verdict::Stanza { .. } | Verdict::StreamEnd(_)),
                "{s:?}: {v:?}"
            );
            agree(s);
        }
    }

    #[test]
    fn a_stanza_cut_anywhere_is_incomplete_and_one_followed_by_more_ends_where_it_ends() {
        for s in CORPUS {
            for (cut, _) in s.char_indices() {
                agree(&s[..cut]);
            }
            let next = format!("{s}<iq type='get' id='next'");
            agree(&next);
            let Verdict::Stanza { len, .. } = by_scan(&next) else {
                continue;
            };
            assert_eq!(&next[..len], *s);
        }
    }

    #[test]
    fn mutated_stanzas_get_rxmls_verdict() {
        const CASES: usize = 30_000;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5ca9);
        let mut failures = Vec::new();
        for _ in 0..CASES {
            let mut s = CORPUS[rng.random_range(0..CORPUS.len())].to_string();
            for _ in 0..rng.random_range(1..=3) {
                let at = loop {
                    let i = rng.random_range(0..=s.len());
                    if s.is_char_boundary(i) {
                        break i;
                    }
                };
                match rng.random_range(0..4) {
                    0 | 1 => s.insert_str(at, PIECES[rng.random_range(0..PIECES.len())]),
                    2 => {
                        let end = (at + rng.random_range(1..4)).min(s.len());
                        if s.is_char_boundary(end) {
                            s.replace_range(at..end, "");
                        }
                    }
                    _ => {
                        let end = (at + rng.random_range(1..12)).min(s.len());
                        if s.is_char_boundary(end) {
                            let piece = s[at..end].to_string();
                            s.insert_str(at, &piece);
                        }
                    }
                }
            }
            if let Err(e) = check(&s) {
                failures.push(e);
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {CASES} differ, the first:\n{}",
            failures.len(),
            failures[..failures.len().min(12)].join("\n")
        );
    }

    #[test]
    fn the_parts_of_a_stanza_are_where_it_says() {
        let s = "  <iq type='set' id='a&amp;b'><q xmlns='urn:x'/><body>b</body></iq>rest";
        let Ok(Scan::Stanza(st)) = scan(s, &SCOPE) else {
            panic!("a stanza");
        };
        assert_eq!(st.start, 2);
        assert_eq!(&s[st.start..st.head_end], "<iq type='set' id='a&amp;b'>");
        let end = st.end_tag.expect("an end tag");
        assert_eq!(&s[st.head_end..end], "<q xmlns='urn:x'/><body>b</body>");
        assert_eq!(&s[end..st.len], "</iq>");
        assert_eq!((st.name, st.ns.as_ref()), ("iq", "jabber:client"));
        assert_eq!(st.attr("id"), Some("a&b"));
        assert_eq!((st.children, st.default_ns_child), (2, true));
        assert!(st.self_contained);

        let s = "<iq type='get' id='b'><stream:features/></iq>";
        let Ok(Scan::Stanza(st)) = scan(s, &SCOPE) else {
            panic!("a stanza");
        };
        assert!(!st.self_contained, "it uses the stream's own prefix");
        assert_eq!(st.end_tag.map(|e| &s[e..]), Some("</iq>"));

        let Ok(Scan::Stanza(st)) = scan("<presence/>", &SCOPE) else {
            panic!("a stanza");
        };
        assert_eq!((st.head_end, st.end_tag, st.len), (11, None, 11));
    }

    /// The corpus as one stream's stanzas, the stream's end last.
    fn stream() -> (String, Vec<&'static str>) {
        let mut stanzas: Vec<&str> = CORPUS
            .iter()
            .copied()
            .filter(|s| *s != "</stream:stream>")
            .collect();
        stanzas.push("</stream:stream>");
        (stanzas.concat(), stanzas)
    }

    /// What a reader fed `bytes` in reads of `step` gives: each stanza's text, in order.
    fn read_in_steps(bytes: &[u8], step: usize) -> Result<Vec<String>, ScanError> {
        let mut r = Reader::new(SCOPE);
        let (mut out, mut at) = (Vec::new(), 0);
        for read in bytes.chunks(step) {
            r.extend(read);
            loop {
                let len = match r.next_stanza()? {
                    None => break,
                    Some(Scan::Stanza(st)) => st.len,
                    Some(Scan::StreamEnd { len }) => len,
                    Some(Scan::Incomplete) => unreachable!("a reader returns None instead"),
                };
                out.push(String::from_utf8_lossy(&bytes[at..at + len]).into_owned());
                r.consume(len);
                at += len;
            }
        }
        assert_eq!(r.buffered(), 0, "everything read was taken");
        Ok(out)
    }

    #[test]
    fn a_reader_gives_the_same_stanzas_whatever_the_reads() {
        let (text, stanzas) = stream();
        for step in (1..64).chain([100, 333, 1000, text.len()]) {
            assert_eq!(
                read_in_steps(text.as_bytes(), step),
                Ok(stanzas.iter().map(|s| s.to_string()).collect()),
                "reads of {step} bytes"
            );
        }
    }

    #[test]
    fn a_reader_refuses_what_cannot_begin_a_stanza_at_once() {
        for first in ["", "  \n", "<iq type='get' id='a'><q xmlns='urn:q'/></iq>"] {
            let mut r = Reader::new(SCOPE);
            r.extend(first.as_bytes());
            loop {
                let len = match r.next_stanza().expect("well-formed") {
                    Some(Scan::Stanza(st)) => st.len,
                    None => break,
                    Some(other) => panic!("{other:?}"),
                };
                r.consume(len);
            }
            r.extend(b"<<<not xml");
            assert!(
                matches!(r.next_stanza(), Err(ScanError::Malformed { .. })),
                "after {first:?}"
            );
        }
    }

    #[test]
    fn a_reader_refuses_bytes_that_are_not_utf8_and_a_stanza_past_the_limit() {
        let mut r = Reader::new(SCOPE);
        r.extend(b"<iq type='get' id='a'><q xmlns='urn:q'>\xff</q></iq>");
        assert!(
            matches!(r.next_stanza(), Err(ScanError::Malformed { what, .. }) if what.contains("UTF-8"))
        );

        // A character cut by a read waits for the rest.
        let mut r = Reader::new(SCOPE);
        let s = "<message to='a@b'><x xmlns='urn:x'>€</x></message>".as_bytes();
        let cut = s.iter().position(|b| *b == 0xe2).expect("the euro sign") + 1;
        r.extend(&s[..cut]);
        assert_eq!(r.next_stanza(), Ok(None));
        r.extend(&s[cut..]);
        assert!(matches!(r.next_stanza(), Ok(Some(Scan::Stanza(st))) if st.len == s.len()));

        // No `>` for a long time: the limit still holds, without a scan.
        let mut r = Reader::new(Scope {
            max_bytes: 1000,
            ..SCOPE
        });
        r.extend(b"<message to='a@b'><x xmlns='urn:x'>");
        assert_eq!(r.next_stanza(), Ok(None));
        for _ in 0..30 {
            r.extend(&[b'y'; 40]);
            match r.next_stanza() {
                Ok(None) => {}
                Err(e) => {
                    assert_eq!(e, ScanError::TooLarge { limit: 1000 });
                    return;
                }
                Ok(Some(other)) => panic!("{other:?}"),
            }
        }
        panic!("the limit did not hold");
    }

    #[test]
    fn limits_hold_before_the_stanza_ends() {
        let scope = Scope {
            max_bytes: 64,
            max_depth: 3,
            ..SCOPE
        };
        let big = format!("<iq type='set' id='x'><a xmlns='urn:a'>{}", "y".repeat(80));
        assert_eq!(scan(&big, &scope), Err(ScanError::TooLarge { limit: 64 }));
        let done = format!("{big}</a></iq>");
        assert_eq!(scan(&done, &scope), Err(ScanError::TooLarge { limit: 64 }));
        assert_eq!(
            scan("<iq><a><b><c>", &scope),
            Err(ScanError::TooDeep { limit: 3 })
        );
        assert!(matches!(
            scan("<iq><a><b/></a></iq>", &scope),
            Ok(Scan::Stanza(_))
        ));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = scan("<iq><!-- hi --></iq>", &SCOPE).unwrap_err();
        assert!(e.to_string().contains("comment"), "{e}");
        let e = scan("<iq><p:a/></iq>", &SCOPE).unwrap_err();
        assert!(e.to_string().contains("'p' is not declared"), "{e}");
        let e = scan("<iq a='1' a='2'/>", &SCOPE).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = scan("<iq>&nbsp;</iq>", &SCOPE).unwrap_err();
        assert!(e.to_string().contains("predefined"), "{e}");
    }
}
