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

use minidom::rxml::writer::{SimpleNamespaces, TrackNamespace};
use minidom::rxml::{self, xml_lang::XmlLangStack, Encoder, Event};
use spine_protocol::scan::STREAM_NS;
use tokio_xmpp::xmlstream::{FallibleStreamElement, ReadError, XmppStreamElement};
use xmpp_parsers::stanza::Stanza;
use xso::error::{Error, FromEventsError};
use xso::{AsXml, Context, FromEventsBuilder, FromXml};

/// The default namespace of a client's stream.
pub const CLIENT_NS: &str = "jabber:client";

/// The header a stanza is parsed under: a client stream's namespaces, no language.
const HEADER: &str =
    "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";

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
