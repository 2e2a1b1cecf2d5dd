//! Stanzas to bytes and back inside an established client stream, shared by the clients'
//! stream ([`crate::stream`]) and the embedded server's (`spine_server`'s `wire`).
//!
//! After resource binding neither side reads through tokio-xmpp's XML stream any more: the
//! stanza scanner ([`spine_protocol::scan`]) finds each stanza in the bytes, and
//! [`decode`] types the ones that need typing exactly as tokio-xmpp would have. Writing goes
//! through [`spine_protocol::emit`] for the shapes it takes and through rxml's encoder for the
//! rest ([`StanzaEncoder`]).

use std::io;
use std::io::Read as _;

use jid::Jid;
use minidom::rxml::writer::{SimpleNamespaces, TrackNamespace};
use minidom::rxml::{self, xml_lang::XmlLangStack, Encoder, Event};
use spine_protocol::scan::{self, STREAM_NS};
use tokio_xmpp::xmlstream::{FallibleStreamElement, ReadError, XmppStreamElement};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::stanza::Stanza;
use xso::error::{Error, FromEventsError};
use xso::{AsXml, Context, FromEventsBuilder, FromXml};

/// The default namespace of a client's stream.
pub const CLIENT_NS: &str = "jabber:client";

/// The header a stanza is parsed under: a client stream's namespaces, no language.
const HEADER: &str =
    "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";

/// A stanza the scanner found in `text`, typed as [`decode`] types it: an IQ request or result
/// in the shape of Spine's own traffic (no namespace prefixes, no attributes on its head but
/// `from`, `to`, `id`, `type`) directly from the scanned bytes, anything else by [`decode`].
///
/// The direct path builds the same stanza without parsing the bytes a second time with rxml,
/// which cost a client about a third of its CPU (issue 19); `tests` compare the two paths on
/// a corpus and on mutations of it.
pub fn decode_found(st: &scan::Stanza<'_>, text: &str) -> Result<FallibleStreamElement, ReadError> {
    if let Some(iq) = direct_iq(st, text) {
        return Ok(FallibleStreamElement::Ok(XmppStreamElement::Stanza(
            Stanza::Iq(iq),
        )));
    }
    decode(&text.as_bytes()[st.start..st.len])
}

/// The IQ, if it takes the direct path (see [`decode_found`]).
fn direct_iq(st: &scan::Stanza<'_>, text: &str) -> Option<Iq> {
    if st.name != "iq" || st.ns != CLIENT_NS || st.text {
        return None;
    }
    // Written without a prefix.
    let after = text.get(st.start + 1..)?.strip_prefix("iq")?;
    if !after.starts_with(|c: char| c == '>' || c == '/' || c.is_ascii_whitespace()) {
        return None;
    }
    let (mut from, mut to, mut id, mut kind) = (None, None, None, None);
    for a in st.attrs.iter() {
        match a.name {
            "from" => from = Some(Jid::new(&a.value).ok()?),
            "to" => to = Some(Jid::new(&a.value).ok()?),
            "id" => id = Some(a.value.clone().into_owned()),
            "type" => kind = Some(a.value.as_ref()),
            "xmlns" if a.value == CLIENT_NS => {}
            _ => return None,
        }
    }
    let id = id?;
    let mut children = scan::children(text, st, CLIENT_NS)?;
    match (kind?, children.len()) {
        ("get", 1) => Some(Iq::Get {
            from,
            to,
            id,
            payload: children.pop()?,
        }),
        ("set", 1) => Some(Iq::Set {
            from,
            to,
            id,
            payload: children.pop()?,
        }),
        ("result", 0 | 1) => Some(Iq::Result {
            from,
            to,
            id,
            payload: children.pop(),
        }),
        _ => None,
    }
}

/// A stanza's bytes (from its `<` to its end) as tokio-xmpp reads them in a client stream: the
/// same events, with the same language in force at each, fed to its types.
///
/// The stream header's own `xml:lang`, if the peer wrote one, is not in force: tokio-xmpp keeps
/// the header to itself. A stanza without its own language is read without one.
pub fn decode(stanza: &[u8]) -> Result<FallibleStreamElement, ReadError> {
    let hard = |e: io::Error| ReadError::HardError(e);
    let malformed =
        |what: &'static str| ReadError::HardError(io::Error::new(io::ErrorKind::InvalidData, what));
    let mut reader = rxml::Reader::new(HEADER.as_bytes().chain(stanza));
    let mut langs = XmlLangStack::new();
    match reader.read().map_err(hard)? {
        Some(ev @ Event::StartElement(..)) => langs.handle_event(&ev),
        _ => return Err(malformed("the stream's header did not parse")),
    }
    let (name, attrs) = match reader.read().map_err(hard)? {
        Some(ev @ Event::StartElement(..)) => {
            langs.handle_event(&ev);
            match ev {
                Event::StartElement(_, name, attrs) => (name, attrs),
                _ => return Err(malformed("not an element")),
            }
        }
        _ => return Err(malformed("not an element")),
    };
    let ctx = Context::empty().with_language(langs.current());
    let mut builder = match <FallibleStreamElement as FromXml>::from_events(name, attrs, &ctx) {
        Ok(b) => b,
        Err(FromEventsError::Invalid(e)) => return Err(ReadError::ParseError(e)),
        Err(FromEventsError::Mismatch { .. }) => {
            return Err(ReadError::ParseError(Error::TypeMismatch))
        }
    };
    loop {
        let Some(ev) = reader.read().map_err(hard)? else {
            return Err(malformed("the stanza ended early"));
        };
        langs.handle_event(&ev);
        let ctx = Context::empty().with_language(langs.current());
        match builder.feed(ev, &ctx) {
            Ok(Some(el)) => return Ok(el),
            Ok(None) => {}
            Err(e) => {
                return Err(ReadError::HardError(io::Error::new(
                    io::ErrorKind::InvalidData,
                    e,
                )))
            }
        }
    }
}

/// Writes stanzas and other stream elements as children of a client stream whose header is
/// already sent.
pub struct StanzaEncoder {
    encoder: Encoder<SimpleNamespaces>,
}

impl Default for StanzaEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StanzaEncoder {
    /// An encoder inside a client stream (`jabber:client` by default, `stream` bound).
    pub fn new() -> StanzaEncoder {
        let stream = rxml::NcName::try_from("stream").expect("a valid name");
        let mut encoder = Encoder::new();
        encoder
            .ns_tracker_mut()
            .declare_fixed(Some(&stream), STREAM_NS.into());
        encoder
            .ns_tracker_mut()
            .declare_fixed(None, CLIENT_NS.into());
        // The encoder writes inside the stream's element, whose header is already sent: open
        // it on a scratch buffer so that stanzas are its children, not documents of their own.
        let mut scratch = Vec::new();
        for item in [
            rxml::Item::ElementHeadStart(rxml::Namespace::from(STREAM_NS), &stream),
            rxml::Item::ElementHeadEnd,
        ] {
            // An element head the encoder is given first: nothing to refuse.
            let _ = encoder.encode(item, &mut scratch);
        }
        StanzaEncoder { encoder }
    }

    /// Appends `x` to `out`; nothing of it if it cannot be encoded.
    pub fn encode<T: AsXml>(&mut self, x: &T, out: &mut Vec<u8>) -> io::Result<()> {
        let mark = out.len();
        let result = (|| {
            for item in x.as_xml_iter().map_err(invalid_input)? {
                let item = item.map_err(invalid_input)?;
                self.encoder
                    .encode(item.as_rxml_item(), out)
                    .map_err(invalid_input)?;
            }
            Ok(())
        })();
        if result.is_err() {
            out.truncate(mark);
        }
        result
    }

    /// Appends a stanza to `out`: directly if [`spine_protocol::emit`] takes it, with the
    /// general writer otherwise; nothing of it if it cannot be encoded.
    pub fn encode_stanza(&mut self, st: Stanza, out: &mut Vec<u8>) -> io::Result<()> {
        let mark = out.len();
        match spine_protocol::emit::stanza(&st, out) {
            Ok(true) => Ok(()),
            // Another shape, or something the direct writer refuses: the general writer
            // then writes it or says why not.
            Ok(false) | Err(_) => {
                out.truncate(mark);
                self.encode(&XmppStreamElement::Stanza(st), out)
            }
        }
    }
}

fn invalid_input(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng as _, SeedableRng as _};
    use scan::{Scan, Scope};

    const SCOPE: Scope<'static> = Scope {
        default_ns: CLIENT_NS,
        max_bytes: 1 << 20,
        max_depth: 64,
    };

    const CORPUS: &[&str] = &[
        "<iq type='set' id='j1' from='d@example.org/d' to='a@example.org/w1'>\
         <job xmlns='urn:spine:1' id='J' capability='text.upper' attempt='1'>\
         <input encoding='utf8'>a &amp; b &lt;c&gt; &#x41;&#66;</input><empty/></job></iq>",
        "<iq type='result' id='r1' to='a@example.org/w1'/>",
        "<iq type='result' id='r2' from='example.org'><ping xmlns='urn:xmpp:ping'/></iq>",
        "<iq xmlns='jabber:client' type='get' id='p' from='example.org'>\n  <ping xmlns='urn:xmpp:ping'/>\n</iq>",
        "<iq type='set' id='x' to='d@example.org/d'><result xmlns='urn:spine:1' job='J' \
         status='ok' note='tab\there&#9;and\nline'>\n  <output encoding='base64'>aGVsbG8=</output>\n  \
         <meta k=\"v&quot;\"/><deep><deeper><deepest>t</deepest></deeper></deep></result></iq>",
        "<iq type='set' id='y'><a xmlns='urn:a'><b xmlns='urn:b'>x</b><c>y</c></a></iq>",
        "<iq type='set' id='z'><a xmlns='urn:a' xml:lang='de'>x</a></iq>",
        "<iq type='set' id='z'><a xmlns='urn:a'><p:b xmlns:p='urn:p'/></a></iq>",
        "<iq type='set' id='z'><a xmlns='urn:a'><![CDATA[x<y]]></a></iq>",
        "<iq type='set' id='two'><a xmlns='urn:a'/><b xmlns='urn:b'/></iq>",
        "<iq type='get' id='none'/>",
        "<iq type='error' id='e'><error type='cancel'><item-not-found \
         xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
        "<iq type='set' id='t'>text<a xmlns='urn:a'/></iq>",
        "<iq type='set' id='u' extra='1'><a xmlns='urn:a'/></iq>",
        "<iq type='set' id='v' xml:lang='en'><a xmlns='urn:a'>t</a></iq>",
        "<iq type='set' id='w' to='not a jid@@'><a xmlns='urn:a'/></iq>",
        "<iq type='set'><a xmlns='urn:a'/></iq>",
        "<iq type='set' id='n'><a xmlns=''/></iq>",
        "<iq type='set' id='ws'><a xmlns='urn:a'>  <b>1</b>\n<b>2</b>  </a></iq>",
        "<iq type='set' id='cr'><a xmlns='urn:a'>x\r\ny</a></iq>",
        "<message to='a@b/c' id='m'><body>hi</body></message>",
        "<presence/>",
    ];

    /// Both paths' reading of one stanza's text (`None` when it is no single stanza), as the
    /// typed stanza writes. Compared as written: rxml cuts text at each reference into nodes of
    /// its own, the direct path keeps a run in one, and minidom reads both alike.
    fn both(xml: &str) -> Option<(String, String, bool)> {
        let Ok(Scan::Stanza(st)) = scan::scan(xml, &SCOPE) else {
            return None;
        };
        let direct = direct_iq(&st, xml).is_some();
        let show = |r: Result<FallibleStreamElement, ReadError>| match r {
            Ok(FallibleStreamElement::Ok(XmppStreamElement::Stanza(s))) => {
                let bytes = xso::to_vec(&s).expect("a typed stanza writes");
                String::from_utf8(bytes).expect("UTF-8")
            }
            other => format!("not a stanza: {other:?}"),
        };
        Some((
            show(decode_found(&st, xml)),
            show(decode(&xml.as_bytes()[st.start..st.len])),
            direct,
        ))
    }

    #[test]
    fn the_direct_path_types_the_corpus_as_rxml_does() {
        let mut direct = 0;
        for xml in CORPUS {
            let (found, general, took) = both(xml).unwrap_or_else(|| panic!("scans: {xml}"));
            assert_eq!(found, general, "{xml}");
            direct += usize::from(took);
        }
        // A job, results, a ping, nested and whitespace-only children: the direct path's.
        assert_eq!(direct, 7, "stanzas that took the direct path");
    }

    #[test]
    fn mutated_stanzas_type_alike_on_both_paths() {
        const PIECES: &[&str] = &[
            "<",
            ">",
            "/",
            "'",
            "\"",
            "=",
            " ",
            "\n",
            "\t",
            "\r",
            "&",
            ";",
            "&amp;",
            "&#x20;",
            "&#10;",
            ":",
            "xmlns",
            "xmlns='urn:x'",
            " xmlns=''",
            "xml:lang='fr'",
            "<x/>",
            "<y xmlns='urn:y'>",
            "</y>",
            "]]>",
            "<![CDATA[",
            "a",
            "é",
            "id='q'",
            " type='get'",
            " type='result'",
            " from='a@b/c'",
            " to='x'",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(19);
        let (mut compared, mut direct) = (0, 0);
        for round in 0..40_000 {
            let mut xml = CORPUS[round % 6].to_owned();
            for _ in 0..rng.random_range(1..=3) {
                let mut at = rng.random_range(0..=xml.len());
                while !xml.is_char_boundary(at) {
                    at -= 1;
                }
                if rng.random_bool(0.3) {
                    let mut end = (at + rng.random_range(1..8)).min(xml.len());
                    while !xml.is_char_boundary(end) {
                        end += 1;
                    }
                    xml.replace_range(at..end, "");
                } else {
                    xml.insert_str(at, PIECES[rng.random_range(0..PIECES.len())]);
                }
            }
            if let Some((found, general, took)) = both(&xml) {
                assert_eq!(found, general, "{xml}");
                compared += 1;
                direct += usize::from(took);
            }
        }
        assert!(
            compared > 5_000 && direct > 2_000,
            "{compared} compared, {direct} on the direct path"
        );
    }
}
