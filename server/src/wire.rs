//! A bound client's stream: stanzas found by the stanza scanner, relayed as read or typed,
//! and written with rxml's encoder.
//!
//! Most of what the server carries is an `<iq/>` or a `<message/>` from one client to another
//! client's full JID (a job to an agent, its result, a submitter's request and its answer).
//! Read through tokio-xmpp's XML stream, every such stanza went through rxml's parser, event by
//! event: about 8 µs of the server's CPU per job request, most of its share of a job's cost
//! (issue 19, BENCHMARKS.md). After resource binding the server now reads the stream with
//! [`spine_protocol::scan`], which finds each stanza in the bytes and checks that it is
//! well-formed restricted XML, as rxml would, at a fraction of the cost, and:
//!
//! - **relays** a stanza the typed path would pass on unchanged: an IQ request with exactly one
//!   payload, an IQ result with at most one, a message of a known type without a body, subject
//!   or thread, addressed to a valid full JID, without text of its own and
//!   [self-contained](spine_protocol::scan::Stanza::self_contained). It is written for its
//!   recipient as a new head (`from` as the server stamps it, `to` normalised, `id`, `type`,
//!   and the namespace prefixes the stanza's own head declared) followed by its inside as the
//!   sender wrote it. Nothing else a client puts on a stanza's head reaches another client:
//!   what the typed path would not pass is not relayed.
//! - **types** everything else (a stanza for the server or a bare JID, an error, presence,
//!   anything the typed path would refuse or change, and a relay whose recipient is gone): its
//!   bytes are parsed by rxml under the client stream's header and built by tokio-xmpp's types,
//!   event for event as tokio-xmpp would have built them.
//!
//! Two things of the stream header are not carried over from tokio-xmpp's reading of it, which
//! keeps them to itself: an `xml:lang` on the header (a stanza without its own language is read
//! without one) and namespace prefixes the header declares besides `stream` (a stanza using one
//! is refused as not well-formed). No client Spine has met sends either.
//!
//! Hand-written because no crate reads an XMPP stream without building every stanza (the cost
//! this removes); the scanner's checks are compared with rxml's by its differential tests and
//! fuzz target.

use std::io;

use jid::{FullJid, Jid};
use spine_protocol::emit::{attribute, EmitError};
use spine_protocol::scan::{Reader, Scan, ScanError, Scope, Stanza as Found};
pub(crate) use spine_xmpp::codec::decode;
use spine_xmpp::codec::{StanzaEncoder, CLIENT_NS};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_xmpp::xmlstream::{FallibleStreamElement, ReadError, Timeouts};
use tracing::debug;
use xmpp_parsers::stanza::Stanza;
use xso::AsXml;

use crate::session::Io;

/// What the server reads from a bound client.
#[derive(Debug)]
pub(crate) enum Read {
    /// A stanza for another client's full JID that the typed path would pass unchanged.
    Relay(Relay),
    /// Anything else, as tokio-xmpp types it.
    Element(Box<FallibleStreamElement>),
}

/// A stanza written for its recipient (see the module's comment).
#[derive(Debug)]
pub(crate) struct Relay {
    /// The recipient, normalised.
    pub(crate) to: FullJid,
    /// The stanza as the recipient's stream gets it.
    pub(crate) bytes: Vec<u8>,
}

impl Relay {
    /// The stanza as the typed path reads it (when it cannot be relayed after all).
    pub(crate) fn into_element(self) -> Result<FallibleStreamElement, ReadError> {
        decode(&self.bytes)
    }
}

/// The established stream of one bound client.
pub(crate) struct Wire {
    io: Io,
    reader: Reader,
    /// The client's full JID: `from` on what it sends.
    me: String,
    encoder: StanzaEncoder,
    /// Encoded and not yet written.
    out: Vec<u8>,
    timeouts: Timeouts,
    /// When the next read timeout fires.
    deadline: Instant,
    /// Whether the soft timeout fired since the last bytes (the next one is hard).
    soft_fired: bool,
    /// The client closed its side of the connection.
    eof: bool,
}

impl Wire {
    /// Takes over a client's transport after binding. `io` may hold bytes already read (a
    /// client that sent on before the bind's answer).
    pub(crate) fn new(io: Io, me: &FullJid, max_bytes: usize, timeouts: Timeouts) -> Wire {
        Wire {
            io,
            reader: Reader::new(Scope {
                default_ns: CLIENT_NS,
                max_bytes,
                // The stream's nesting limit counts the stream's element; the scanner's, the
                // stanza's.
                max_depth: spine_protocol::depth::MAX_STREAM_DEPTH - 1,
            }),
            me: me.to_string(),
            encoder: StanzaEncoder::new(),
            out: Vec::with_capacity(4096),
            deadline: Instant::now() + timeouts.read_timeout,
            timeouts,
            soft_fired: false,
            eof: false,
        }
    }

    /// The next thing the client sent: `None` once it closed the connection.
    ///
    /// Cancellation safe: bytes are taken from the transport only where nothing can interrupt
    /// until they are in the reader, so a `select!` branch that loses the race loses nothing.
    pub(crate) async fn next(&mut self) -> Option<Result<Read, ReadError>> {
        loop {
            // What was found, and the bytes it took (owned: the scan borrows the reader).
            let found = match self.reader.next_with_text() {
                Ok(Some((Scan::Stanza(st), text))) => Some((st.len, take(&st, text, &self.me))),
                Ok(Some((Scan::StreamEnd { len }, _))) => {
                    Some((len, Err(ReadError::StreamFooterReceived)))
                }
                Ok(Some((Scan::Incomplete, _)) | None) => None,
                Err(e) => Some((
                    0,
                    Err(ReadError::HardError(io::Error::new(
                        io::ErrorKind::InvalidData,
                        e,
                    ))),
                )),
            };
            if let Some((len, read)) = found {
                self.reader.consume(len);
                return Some(read);
            }
            if self.eof {
                if self.reader.buffered() > 0 {
                    debug!(jid = %self.me, "connection closed by peer (mid-stanza)");
                }
                return None;
            }
            match tokio::time::timeout_at(self.deadline, self.io.fill_buf()).await {
                Ok(Ok([])) => self.eof = true,
                Ok(Ok(bytes)) => {
                    let n = bytes.len();
                    self.reader.extend(bytes);
                    self.io.consume(n);
                    self.deadline = Instant::now() + self.timeouts.read_timeout;
                    self.soft_fired = false;
                }
                Ok(Err(e)) => return Some(Err(ReadError::HardError(e))),
                Err(_) if self.soft_fired => {
                    return Some(Err(ReadError::HardError(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "read and response timeouts elapsed",
                    ))))
                }
                Err(_) => {
                    self.soft_fired = true;
                    self.deadline = Instant::now() + self.timeouts.response_timeout;
                    return Some(Err(ReadError::SoftTimeout));
                }
            }
        }
    }

    /// Encodes `x` for the next flush; nothing of it if it cannot be encoded.
    pub(crate) fn feed<T: AsXml>(&mut self, x: &T) -> io::Result<()> {
        self.encoder.encode(x, &mut self.out)
    }

    /// Encodes a stanza for the next flush: directly if [`spine_protocol::emit`] takes it,
    /// with the general writer otherwise.
    pub(crate) fn feed_stanza(&mut self, st: Stanza) -> io::Result<()> {
        self.encoder.encode_stanza(st, &mut self.out)
    }

    /// Adds a relayed stanza for the next flush.
    pub(crate) fn feed_relayed(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Writes what was fed.
    pub(crate) async fn flush(&mut self) -> io::Result<()> {
        let written = self.io.write_all(&self.out).await;
        self.out.clear();
        written?;
        self.io.flush().await
    }

    /// Closes the stream: `error` if any, the stream's end tag, then the connection's sending
    /// side.
    pub(crate) async fn close<T: AsXml>(&mut self, error: Option<&T>) -> io::Result<()> {
        if let Some(e) = error {
            if let Err(why) = self.feed(e) {
                // The stream still ends properly, without the error.
                debug!(jid = %self.me, "the stream error could not be written: {why}");
            }
        }
        self.out.extend_from_slice(b"</stream:stream>");
        self.flush().await?;
        self.io.shutdown().await
    }
}

/// What the scanner found, relayed or typed.
fn take(st: &Found<'_>, text: &str, me: &str) -> Result<Read, ReadError> {
    if let Some(to) = relayable(st, text) {
        if let Ok(bytes) = relayed(st, text, me, &to) {
            return Ok(Read::Relay(Relay { to, bytes }));
        }
    }
    decode(&text.as_bytes()[st.start..st.len]).map(|e| Read::Element(Box::new(e)))
}

/// The recipient, if the typed path would pass this stanza on unchanged (the module's rules;
/// the caller checks that the recipient is of this server).
fn relayable(st: &Found<'_>, text: &str) -> Option<FullJid> {
    if st.ns != CLIENT_NS || st.text || !st.self_contained {
        return None;
    }
    // Written without a prefix: its children without one are then of the client namespace
    // in the recipient's stream too.
    let after_name = text[st.start + 1..].strip_prefix(st.name)?;
    if !after_name.starts_with(|c: char| c == '>' || c == '/' || c.is_ascii_whitespace()) {
        return None;
    }
    if st.attr("from").is_some_and(|f| Jid::new(f).is_err()) {
        return None;
    }
    let passes = match st.name {
        "iq" => {
            st.attr("id").is_some()
                && match st.attr("type") {
                    Some("get" | "set") => st.children == 1,
                    Some("result") => st.children <= 1,
                    _ => false,
                }
        }
        "message" => {
            !st.default_ns_child
                && matches!(
                    st.attr("type"),
                    None | Some("normal" | "chat" | "headline" | "groupchat")
                )
        }
        _ => false,
    };
    if !passes {
        return None;
    }
    FullJid::new(st.attr("to")?).ok()
}

/// The stanza as its recipient gets it: a new head, then its inside as read.
///
/// An error only for a value with a character XML cannot carry, which the scanner never lets
/// through (the caller then takes the typed path).
fn relayed(st: &Found<'_>, text: &str, me: &str, to: &FullJid) -> Result<Vec<u8>, EmitError> {
    let inside = st.end_tag.map_or("", |end| &text[st.head_end..end]);
    let mut out = Vec::with_capacity(inside.len() + me.len() + 96);
    out.push(b'<');
    out.extend_from_slice(st.name.as_bytes());
    attribute(&mut out, "from", me)?;
    attribute(&mut out, "to", to.as_str())?;
    for name in ["id", "type"] {
        if let Some(v) = st.attr(name) {
            attribute(&mut out, name, v)?;
        }
    }
    for a in st.attrs.iter().filter(|a| a.name.starts_with("xmlns:")) {
        attribute(&mut out, a.name, &a.value)?;
    }
    if st.end_tag.is_none() {
        out.extend_from_slice(b"/>");
    } else {
        out.push(b'>');
        out.extend_from_slice(inside.as_bytes());
        out.extend_from_slice(b"</");
        out.extend_from_slice(st.name.as_bytes());
        out.push(b'>');
    }
    Ok(out)
}

/// The limit a scan error is about, as the text of a `policy-violation`, if it is one.
pub(crate) fn limit_exceeded(e: &io::Error) -> Option<String> {
    match e.get_ref()?.downcast_ref::<ScanError>()? {
        ScanError::TooLarge { limit } => Some(format!("stanza larger than {limit} bytes")),
        ScanError::TooDeep { .. } => Some(format!(
            "elements nested deeper than {} levels",
            spine_protocol::depth::MAX_STANZA_DEPTH
        )),
        ScanError::Malformed { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spine_protocol::scan::scan;
    use tokio_xmpp::xmlstream::XmppStreamElement;
    use xmpp_parsers::iq::Iq;

    const SCOPE: Scope<'static> = Scope {
        default_ns: CLIENT_NS,
        max_bytes: 1 << 20,
        max_depth: 64,
    };
    const ME: &str = "me@example.org/e";

    /// What the wire makes of one stanza's text.
    fn read(xml: &str) -> Read {
        let Ok(Scan::Stanza(st)) = scan(xml, &SCOPE) else {
            panic!("not a stanza: {xml}")
        };
        assert_eq!(st.len, xml.len());
        take(&st, xml, ME).unwrap_or_else(|e| panic!("{xml}: {e}"))
    }

    fn relay(xml: &str) -> Relay {
        match read(xml) {
            Read::Relay(r) => r,
            Read::Element(e) => panic!("not relayed: {xml} ({e:?})"),
        }
    }

    /// What tokio-xmpp's own reading makes of it (xso from the bytes, no stream around).
    fn typed(xml: &str) -> Stanza {
        match xso::from_bytes::<FallibleStreamElement>(xml.as_bytes()).expect("parses") {
            FallibleStreamElement::Ok(XmppStreamElement::Stanza(s)) => s,
            other => panic!("not a stanza: {other:?}"),
        }
    }

    /// What a client reads from bytes written into its stream.
    fn received(bytes: &[u8]) -> Stanza {
        match decode(bytes) {
            Ok(FallibleStreamElement::Ok(XmppStreamElement::Stanza(s))) => s,
            other => panic!("{}: {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    fn as_typed(s: &Stanza) -> String {
        String::from_utf8(xso::to_vec(s).expect("writes")).expect("utf-8")
    }

    const JOB: &str = "<iq xmlns='jabber:client' type='set' id='j1' to='agent@example.org/w1' \
        from='spoof@evil/x' extra='dropped'><job xmlns='urn:spine:1' id='J' capability='text.upper' \
        attempt='1'><input encoding='utf8'>a &amp; b &lt;c&gt;</input><empty/></job></iq>";

    #[test]
    fn a_job_request_is_relayed_with_its_new_head_and_its_inside_as_read() {
        let r = relay(JOB);
        assert_eq!(r.to.as_str(), "agent@example.org/w1");
        let out = String::from_utf8(r.bytes).expect("utf-8");
        assert_eq!(
            out,
            "<iq from='me@example.org/e' to='agent@example.org/w1' id='j1' type='set'>\
             <job xmlns='urn:spine:1' id='J' capability='text.upper' attempt='1'>\
             <input encoding='utf8'>a &amp; b &lt;c&gt;</input><empty/></job></iq>"
        );
        let Stanza::Iq(Iq::Set { from, payload, .. }) = received(out.as_bytes()) else {
            panic!("not a set: {out}")
        };
        assert_eq!(from.expect("from").as_str(), ME);
        let input = payload.get_child("input", "urn:spine:1").expect("input");
        assert_eq!(input.text(), "a & b <c>");
    }

    #[test]
    fn the_typed_path_reads_what_tokio_xmpp_reads() {
        for xml in [
            JOB,
            "<presence xmlns='jabber:client' to='a@b/c'><show>away</show></presence>",
            "<message xmlns='jabber:client' xml:lang='de' to='b@c' id='m'><body>hallo</body></message>",
        ] {
            assert_eq!(
                as_typed(&received(xml.as_bytes())),
                as_typed(&typed(xml)),
                "{xml}"
            );
        }
    }

    #[test]
    fn what_the_typed_path_would_refuse_or_change_is_not_relayed() {
        // An IQ get without a payload: the typed path's invalid stanza (answered bad-request).
        match read("<iq xmlns='jabber:client' type='get' id='a' to='b@c/d'/>") {
            Read::Element(e) => assert!(matches!(*e, FallibleStreamElement::Err(_)), "{e:?}"),
            Read::Relay(r) => panic!("relayed: {r:?}"),
        }
        for xml in [
            "<iq xmlns='jabber:client' type='get' to='b@c/d'><ping xmlns='urn:xmpp:ping'/></iq>",
            "<iq xmlns='jabber:client' type='set' id='a' to='b@c/d'><x xmlns='y'/><z xmlns='y'/></iq>",
            "<iq xmlns='jabber:client' type='result' id='a' to='b@c/d'><x xmlns='y'/><z xmlns='y'/></iq>",
            "<iq xmlns='jabber:client' type='error' id='a' to='b@c/d'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
            "<iq xmlns='jabber:client' type='bogus' id='a' to='b@c/d'><x xmlns='y'/></iq>",
            "<iq xmlns='jabber:client' type='set' id='a' to='b@c'><x xmlns='y'/></iq>",
            "<iq xmlns='jabber:client' type='set' id='a'><x xmlns='y'/></iq>",
            "<iq xmlns='jabber:client' type='set' id='a' to='@@/x'><x xmlns='y'/></iq>",
            "<message xmlns='jabber:client' to='b@c/d'><body>hi</body></message>",
            "<message xmlns='jabber:client' type='error' to='b@c/d'><x xmlns='y'/></message>",
            "<message xmlns='jabber:client' type='bogus' to='b@c/d'><x xmlns='y'/></message>",
            "<message xmlns='jabber:client' to='b@c/d'>text<x xmlns='y'/></message>",
            "<iq xmlns='jabber:client' type='set' id='a' to='b@c/d' from='@@'><x xmlns='y'/></iq>",
            "<presence xmlns='jabber:client' to='b@c/d'/>",
            // A prefixed head: its unprefixed children would change namespace.
            "<c:iq xmlns:c='jabber:client' xmlns='urn:o' type='set' id='a' to='b@c/d'><x/></c:iq>",
            "<iqx:iq xmlns:iqx='jabber:client' type='set' id='a' to='b@c/d'><x xmlns='y'/></iqx:iq>",
        ] {
            assert!(matches!(read(xml), Read::Element(_)), "{xml}");
        }
        for xml in [
            "<iq xmlns='jabber:client' type='result' id='a' to='b@c/d'/>",
            "<iq xmlns='jabber:client' type='result' id='a' to='b@c/d'><x xmlns='y'/></iq>",
            "<message xmlns='jabber:client' to='b@c/d'><job-status xmlns='urn:spine:1'/></message>",
            "<message xmlns='jabber:client' type='headline' to='b@c/d'><x xmlns='y'/></message>",
        ] {
            assert!(matches!(read(xml), Read::Relay(_)), "{xml}");
        }
    }

    /// For every stanza that is relayed, the recipient parses the relayed bytes into what the
    /// typed path would have sent it: the same stanza, compared as the typed path writes it.
    #[test]
    fn a_relayed_stanza_reads_as_the_typed_path_would_send_it() {
        let corpus = [
            JOB,
            "<iq xmlns='jabber:client' type='result' id='r' to='a@c/d'/>",
            "<iq xmlns='jabber:client' type='result' id='r' to='a@c/d'>\n  <accepted xmlns='urn:spine:1' job='J'/>\n</iq>",
            "<iq xmlns='jabber:client' type='get' id='g' to='a@c/d' xmlns:s='urn:x'><s:q s:a='1' b='&quot;2&apos;'><s:r/>t<![CDATA[<raw>]]></s:q></iq>",
            "<iq type='get' id='g' to='a@c/d' xmlns:s='urn:x' xml:lang='en'><s:q xmlns:t='urn:t' t:x='&#10;'/></iq>",
            "<iq xmlns='jabber:client' type='set' id='l' to='a@c/d'><x xmlns='y' xml:lang='fr'><z xmlns='jabber:client'/>é ü 😀 &#x1F600;</x></iq>",
            "<iq xmlns='jabber:client' type='set' id=\"it's &lt;&amp;&#9;&#10;&#13;\" to='A@C/d'><x xmlns='y'>a\r\nb</x></iq>",
            "<message xmlns='jabber:client' to='a@c/d' id='m'><job-status xmlns='urn:spine:1' job='J' state='succeeded'><output>&lt;b&gt;</output></job-status></message>",
            "<message xmlns='jabber:client' type='headline' to='a@c/d'><event xmlns='urn:spine:1' name='n'/><x xmlns='y'/></message>",
            "<message xmlns='jabber:client' type='chat' to='a@c/d' xml:lang='de'><x xmlns='y'>a\tb</x></message>",
            "<message to='a@c/d'/>",
        ];
        for xml in corpus {
            let r = relay(xml);
            let out = String::from_utf8(r.bytes).expect("utf-8");
            let got = received(out.as_bytes());
            // What the server's typed path reads from the stanza, stamped as it would send it.
            let mut sent = received(xml.as_bytes());
            let me: Jid = Jid::new(ME).expect("jid");
            let to: Jid = r.to.into();
            match &mut sent {
                Stanza::Iq(iq) => {
                    *iq.from_mut() = Some(me);
                    *iq.to_mut() = Some(to);
                }
                Stanza::Message(m) => {
                    m.from = Some(me);
                    m.to = Some(to);
                }
                Stanza::Presence(_) => panic!("presence is not relayed"),
            }
            assert_eq!(as_typed(&got), as_typed(&sent), "{xml} relayed as {out}");
        }
    }

    /// Stanzas that are relayed, mutated where namespaces, prefixes and heads can go wrong:
    /// whatever the scanner takes and the wire relays reads, in the recipient's stream, as the
    /// typed path would have sent it, and nothing the scanner takes makes the wire panic.
    #[test]
    fn mutated_relays_read_as_the_typed_path_would_send_them() {
        use rand::{Rng as _, SeedableRng as _};
        const CORPUS: &[&str] = &[
            JOB,
            "<iq type='result' id='r' to='a@c/d'><accepted xmlns='urn:spine:1' job='J'/></iq>",
            "<iq type='get' id='g' to='a@c/d' xmlns:s='urn:x'><s:q s:a='1'><s:r/>t</s:q></iq>",
            "<message to='a@c/d' id='m'><job-status xmlns='urn:spine:1' job='J'><output>&lt;b&gt;</output></job-status></message>",
            "<message type='headline' to='a@c/d' xml:lang='de'><x xmlns='y'>a</x></message>",
        ];
        const PIECES: &[&str] = &[
            " xmlns:s='urn:s'",
            " xmlns:t='urn:t'",
            " xmlns='jabber:client'",
            " xmlns='urn:other'",
            " xmlns=''",
            " xmlns:c='jabber:client'",
            "s:",
            "t:",
            "c:",
            " s:a='1'",
            " xml:lang='fr'",
            " to='b@c/e'",
            " to='b@c'",
            " from='x@y/z'",
            " type='result'",
            " type='error'",
            " id='&amp;&#10;'",
            "<body>b</body>",
            "<error type='cancel'/>",
            "<y xmlns='urn:y'/>",
            "<s:z/>",
            "text",
            "&lt;",
            "<![CDATA[<]]>",
            "\r\n",
            "/",
            ">",
            "'",
        ];
        let me: Jid = Jid::new(ME).expect("jid");
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x3e1a);
        let (mut relayed, mut typed_only) = (0, 0);
        for _ in 0..60_000 {
            let mut s = CORPUS[rng.random_range(0..CORPUS.len())].to_string();
            for _ in 0..rng.random_range(1..=3) {
                let at = loop {
                    let i = rng.random_range(0..=s.len());
                    if s.is_char_boundary(i) {
                        break i;
                    }
                };
                if rng.random_range(0..3) == 0 {
                    let end = (at + rng.random_range(1..6)).min(s.len());
                    if s.is_char_boundary(end) {
                        s.replace_range(at..end, "");
                    }
                } else {
                    s.insert_str(at, PIECES[rng.random_range(0..PIECES.len())]);
                }
            }
            let Ok(Scan::Stanza(st)) = scan(&s, &SCOPE) else {
                continue;
            };
            let r = match take(&st, &s, ME) {
                Ok(Read::Relay(r)) => r,
                _ => {
                    typed_only += 1;
                    continue;
                }
            };
            relayed += 1;
            let out = String::from_utf8(r.bytes).expect("utf-8");
            let got = match decode(out.as_bytes()) {
                Ok(FallibleStreamElement::Ok(XmppStreamElement::Stanza(got))) => got,
                other => panic!("{s}\nrelayed as {out}\nreads as {other:?}"),
            };
            let mut sent = received(&s.as_bytes()[st.start..st.len]);
            let to: Jid = r.to.into();
            match &mut sent {
                Stanza::Iq(iq) => {
                    *iq.from_mut() = Some(me.clone());
                    *iq.to_mut() = Some(to);
                }
                Stanza::Message(m) => {
                    m.from = Some(me.clone());
                    m.to = Some(to);
                }
                Stanza::Presence(_) => panic!("presence relayed: {s}"),
            }
            assert_eq!(as_typed(&got), as_typed(&sent), "{s}\nrelayed as {out}");
        }
        // The mutations reach both paths, not only one (most are not well-formed at all).
        assert!(
            relayed > 2_000 && typed_only > 1_000,
            "{relayed} relayed, {typed_only} typed"
        );
    }

    #[test]
    fn the_typed_path_has_the_language_in_force() {
        let xml = "<message xmlns='jabber:client' xml:lang='de' to='b@c/d' id='m'>\
            <body>hallo</body><x xmlns='y' xml:lang='fr'><t>bonjour</t></x></message>";
        let Read::Element(e) = read(xml) else {
            panic!("a body is the typed path's")
        };
        let FallibleStreamElement::Ok(XmppStreamElement::Stanza(Stanza::Message(m))) = *e else {
            panic!("not a message: {e:?}")
        };
        assert_eq!(m.bodies.get("de").map(|b| b.as_str()), Some("hallo"));
        assert!(!m.bodies.contains_key("fr"));
    }

    /// A client's side and the server's wire over loopback TCP.
    async fn pair(timeouts: Timeouts) -> (tokio::net::TcpStream, Wire) {
        use crate::io::{Limited, StanzaMeter, Transport};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (client, server) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        let meter = std::sync::Arc::new(StanzaMeter::default());
        let io = tokio::io::BufStream::new(Limited::new(
            Transport::Plain(server.expect("accept").0),
            meter,
            1 << 20,
            None,
        ));
        let me = FullJid::new(ME).expect("jid");
        (
            client.expect("connect"),
            Wire::new(io, &me, 1 << 20, timeouts),
        )
    }

    #[tokio::test]
    async fn a_wire_reads_stanzas_across_reads_and_writes_inside_the_stream() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, mut wire) = pair(Timeouts {
            read_timeout: std::time::Duration::from_secs(60),
            response_timeout: std::time::Duration::from_secs(60),
        })
        .await;
        let sent = format!(
            "{JOB}\n <presence xmlns='jabber:client'/><iq type='result' id='r' to='a@c/d'/>\
             </stream:stream>"
        );
        let writer = tokio::spawn(async move {
            // In pieces of 7 bytes, each flushed: stanzas arrive cut anywhere.
            for piece in sent.as_bytes().chunks(7) {
                client.write_all(piece).await.expect("write");
                client.flush().await.expect("flush");
                tokio::task::yield_now().await;
            }
            client
        });
        let Some(Ok(Read::Relay(r))) = wire.next().await else {
            panic!("the job request is relayed")
        };
        assert_eq!(r.to.as_str(), "agent@example.org/w1");
        let Some(Ok(Read::Element(p))) = wire.next().await else {
            panic!("presence is typed")
        };
        assert!(
            matches!(
                *p,
                FallibleStreamElement::Ok(XmppStreamElement::Stanza(Stanza::Presence(_)))
            ),
            "{p:?}"
        );
        let Some(Ok(Read::Relay(r))) = wire.next().await else {
            panic!("the result is relayed")
        };
        assert_eq!(
            String::from_utf8(r.bytes).expect("utf-8"),
            "<iq from='me@example.org/e' to='a@c/d' id='r' type='result'/>"
        );
        assert!(matches!(
            wire.next().await,
            Some(Err(ReadError::StreamFooterReceived))
        ));
        let mut client = writer.await.expect("writer");

        wire.feed_stanza(Stanza::Iq(Iq::empty_result(
            Jid::new(ME).expect("jid"),
            "x".to_owned(),
        )))
        .expect("feeds");
        wire.feed(&XmppStreamElement::Stanza(Stanza::Iq(Iq::empty_result(
            Jid::new(ME).expect("jid"),
            "y".to_owned(),
        ))))
        .expect("feeds");
        wire.feed_relayed(b"<message from='a@c/d' to='me@example.org/e'/>");
        let error = xmpp_parsers::stream_error::StreamError::new(
            xmpp_parsers::stream_error::DefinedCondition::NotWellFormed,
            "en",
            "malformed",
        );
        wire.close(Some(&error)).await.expect("closes");
        let mut got = String::new();
        client.read_to_string(&mut got).await.expect("reads");
        assert_eq!(
            got,
            "<iq type='result' id='x' to='me@example.org/e'/>\
             <iq type='result' to='me@example.org/e' id='y'></iq>\
             <message from='a@c/d' to='me@example.org/e'/>\
             <stream:error><not-well-formed xmlns='urn:ietf:params:xml:ns:xmpp-streams'>\
             </not-well-formed><text xmlns='urn:ietf:params:xml:ns:xmpp-streams' \
             xml:lang='en'>malformed</text></stream:error></stream:stream>"
        );
    }

    #[tokio::test]
    async fn a_silent_client_gets_a_soft_timeout_then_a_hard_one() {
        let ms = std::time::Duration::from_millis;
        let (_client, mut wire) = pair(Timeouts {
            read_timeout: ms(50),
            response_timeout: ms(50),
        })
        .await;
        assert!(matches!(
            wire.next().await,
            Some(Err(ReadError::SoftTimeout))
        ));
        match wire.next().await {
            Some(Err(ReadError::HardError(e))) => {
                assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn malformed_and_oversized_input_are_hard_errors_naming_the_limit() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut wire) = pair(Timeouts {
            read_timeout: std::time::Duration::from_secs(60),
            response_timeout: std::time::Duration::from_secs(60),
        })
        .await;
        client.write_all(b"<<<not xml").await.expect("write");
        match wire.next().await {
            Some(Err(ReadError::HardError(e))) => {
                assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                assert_eq!(limit_exceeded(&e), None);
            }
            other => panic!("{other:?}"),
        }
        let (mut client, mut wire) = pair(Timeouts {
            read_timeout: std::time::Duration::from_secs(60),
            response_timeout: std::time::Duration::from_secs(60),
        })
        .await;
        wire.reader = Reader::new(Scope {
            max_bytes: 100,
            ..SCOPE
        });
        client
            .write_all(format!("<message to='a@b/c'><x xmlns='y'>{}", "z".repeat(200)).as_bytes())
            .await
            .expect("write");
        match wire.next().await {
            Some(Err(ReadError::HardError(e))) => assert_eq!(
                limit_exceeded(&e).as_deref(),
                Some("stanza larger than 100 bytes")
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_unknown_top_level_element_is_a_parse_error() {
        let xml = "<x xmlns='urn:unknown'/>";
        let Ok(Scan::Stanza(st)) = scan(xml, &SCOPE) else {
            panic!("scans")
        };
        assert!(matches!(take(&st, xml, ME), Err(ReadError::ParseError(_))));
    }
}
