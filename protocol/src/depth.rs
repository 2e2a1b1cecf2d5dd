//! Element nesting depth of an XML byte stream, counted before any parser sees the bytes.
//!
//! The XML stack under tokio-xmpp (rxml, then xso and minidom) builds a received element
//! recursively, one stack frame chain per level: a stanza nested a few thousand levels deep
//! (35 KB of `<a><a><a>…`) overflowed a 2 MiB worker stack and aborted the whole process.
//! Neither rxml nor xso has a depth limit, so every stream Spine reads passes through a
//! [`DepthGuard`] first. No XMPP or Spine payload comes near [`MAX_STANZA_DEPTH`].
//!
//! The guard is a byte-level state machine, not a parser: it knows start tags (and
//! self-closing ones), end tags, attribute values (where `>` and `/` are just characters),
//! comments, CDATA sections, processing instructions and declarations. For every document
//! that an XML parser accepts it counts the same depth as the parser (a property the fuzz
//! target `depth` checks against rxml); for malformed input it never counts less than the
//! number of start tags still open, so it cannot be talked below the limit. It keeps a few
//! bytes of state and works on input split anywhere.
//!
//! Written here because no XML crate offers a depth check on raw bytes ahead of its own
//! tree building, and the limit has to hold before a tree exists.

/// Deepest element nesting accepted inside a stanza, the stanza itself counted as 1
/// (`<iq><spine:job><args>` is 3). Spine's own payloads reach 5; XMPP's deepest common
/// payloads (pubsub items with XHTML) stay under 20.
pub const MAX_STANZA_DEPTH: u32 = 64;

/// Open elements allowed on a client-to-server stream: [`MAX_STANZA_DEPTH`] plus the stream
/// root, plus the new root of the stream restarted after authentication (the old one is never
/// closed on the wire).
pub const MAX_STREAM_DEPTH: u32 = MAX_STANZA_DEPTH + 2;

/// The input opened more nested elements than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooDeep {
    /// The limit that was exceeded.
    pub limit: u32,
}

impl std::fmt::Display for TooDeep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "elements nested deeper than {} levels", self.limit)
    }
}

impl std::error::Error for TooDeep {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Character data between tags.
    Text,
    /// Just after `<`.
    Lt,
    /// Inside a start tag (name and attributes), outside quotes.
    Start,
    /// Inside a start tag, just after `/` (a `>` now closes an empty element).
    StartSlash,
    /// Inside an attribute value quoted with this byte.
    Quoted(u8),
    /// Inside an end tag.
    End,
    /// Just after `<!`.
    Bang,
    /// Inside a comment; the number of `-` just seen (at most 2).
    Comment(u8),
    /// Inside a CDATA section; the number of `]` just seen (at most 2).
    CData(u8),
    /// Inside a processing instruction or the XML declaration; whether `?` was just seen.
    Pi(bool),
    /// Inside a declaration such as `<!DOCTYPE …>` (which the parsers refuse anyway).
    Decl,
}

/// What one byte did to the depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Nothing.
    None,
    /// A start tag began: depth is one more than before.
    Open,
    /// An element ended (end tag or `/>`): depth is one less than before.
    Close,
}

/// Tracks the element depth of a byte stream; see the module documentation.
#[derive(Debug, Clone)]
pub struct DepthGuard {
    limit: u32,
    depth: u32,
    deepest: u32,
    state: State,
    /// Filtering: content is being dropped until the depth returns to this level.
    eliding: Option<u32>,
    /// Filtering: a `<` was withheld at the limit until the next byte tells whether it begins
    /// a start tag (dropped) or anything else (passed on).
    held_lt: bool,
    elided: u64,
}

impl DepthGuard {
    /// A guard allowing at most `limit` open elements.
    pub fn new(limit: u32) -> Self {
        DepthGuard {
            limit,
            depth: 0,
            deepest: 0,
            state: State::Text,
            eliding: None,
            held_lt: false,
            elided: 0,
        }
    }

    /// Elements open now.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// The most elements that were open at once.
    pub fn deepest(&self) -> u32 {
        self.deepest
    }

    /// Elements dropped by [`DepthGuard::filter`] so far.
    pub fn elided(&self) -> u64 {
        self.elided
    }

    fn step(&mut self, b: u8) -> Step {
        let (next, step) = match self.state {
            State::Text => (if b == b'<' { State::Lt } else { State::Text }, Step::None),
            State::Lt => match b {
                b'/' => (State::End, Step::None),
                b'!' => (State::Bang, Step::None),
                b'?' => (State::Pi(false), Step::None),
                b'>' => (State::Text, Step::None),
                _ => (State::Start, Step::Open),
            },
            State::Start | State::StartSlash => match b {
                b'"' | b'\'' => (State::Quoted(b), Step::None),
                b'/' => (State::StartSlash, Step::None),
                b'>' if self.state == State::StartSlash => (State::Text, Step::Close),
                b'>' => (State::Text, Step::None),
                _ => (State::Start, Step::None),
            },
            State::Quoted(q) => (
                if b == q {
                    State::Start
                } else {
                    State::Quoted(q)
                },
                Step::None,
            ),
            State::End => match b {
                b'>' => (State::Text, Step::Close),
                _ => (State::End, Step::None),
            },
            State::Bang => match b {
                b'-' => (State::Comment(0), Step::None),
                b'[' => (State::CData(0), Step::None),
                b'>' => (State::Text, Step::None),
                _ => (State::Decl, Step::None),
            },
            State::Comment(n) => match b {
                b'-' => (State::Comment((n + 1).min(2)), Step::None),
                b'>' if n == 2 => (State::Text, Step::None),
                _ => (State::Comment(0), Step::None),
            },
            State::CData(n) => match b {
                b']' => (State::CData((n + 1).min(2)), Step::None),
                b'>' if n == 2 => (State::Text, Step::None),
                _ => (State::CData(0), Step::None),
            },
            State::Pi(q) => match b {
                b'>' if q => (State::Text, Step::None),
                _ => (State::Pi(b == b'?'), Step::None),
            },
            State::Decl => (
                if b == b'>' { State::Text } else { State::Decl },
                Step::None,
            ),
        };
        self.state = next;
        match step {
            Step::Open => {
                self.depth += 1;
                self.deepest = self.deepest.max(self.depth);
            }
            // An end tag without a start tag is the parser's error to report.
            Step::Close => self.depth = self.depth.saturating_sub(1),
            Step::None => {}
        }
        step
    }

    /// How many of the first bytes of `input` leave the state as it is (no quote, tag end or
    /// other byte the current state reacts to): the run a loop may pass over in one search
    /// instead of stepping byte by byte. Text between tags is most of a large payload, the
    /// names and attribute values inside tags most of a small stanza.
    fn inert(&self, input: &[u8]) -> usize {
        // memchr's searches are vectorised (long runs: text, attribute values); the runs of
        // a tag between its quotes are a few bytes, where a plain loop is as fast.
        let at = match self.state {
            State::Text => memchr::memchr(b'<', input),
            State::Start => input
                .iter()
                .position(|&b| matches!(b, b'"' | b'\'' | b'/' | b'>')),
            State::Quoted(q) => memchr::memchr(q, input),
            State::End | State::Decl => memchr::memchr(b'>', input),
            _ => Some(0),
        };
        at.unwrap_or(input.len())
    }

    /// Checks `input`, the next bytes of the stream. Fails at the first start tag that would
    /// open more than the limit; the guard is then spent (the stream should be closed).
    pub fn scan(&mut self, input: &[u8]) -> Result<(), TooDeep> {
        let mut i = 0;
        while i < input.len() {
            // Fast path: bytes that change nothing are passed over in one search.
            i += self.inert(&input[i..]);
            if i == input.len() {
                return Ok(());
            }
            if self.step(input[i]) == Step::Open && self.depth > self.limit {
                return Err(TooDeep { limit: self.limit });
            }
            i += 1;
        }
        Ok(())
    }

    /// Copies `input` to `out`, leaving out every element that would open deeper than the
    /// limit, with everything inside it. The result stays well-formed wherever the input is,
    /// and no element in it is deeper than the limit. For a reader that must keep its stream
    /// (a client whose server relays stanzas from anyone) where [`DepthGuard::scan`] would
    /// make it drop the connection.
    pub fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len() + 1);
        let mut i = 0;
        while i < input.len() {
            // Fast path: a run of bytes that change nothing is copied in one go, or dropped in
            // one go inside a left-out element (a withheld '<' waits for the next byte).
            if !self.held_lt {
                let run = self.inert(&input[i..]);
                if self.eliding.is_none() {
                    out.extend_from_slice(&input[i..i + run]);
                }
                i += run;
                if i == input.len() {
                    break;
                }
            }
            let b = input[i];
            i += 1;
            let at_limit = self.depth >= self.limit;
            let before = self.state;
            let step = self.step(b);
            match self.eliding {
                Some(level) => {
                    if step == Step::Close && self.depth == level {
                        self.eliding = None;
                    }
                }
                None if before == State::Text && b == b'<' && at_limit => {
                    // Decided by the next byte.
                    self.held_lt = true;
                }
                None if self.held_lt => {
                    self.held_lt = false;
                    if step == Step::Open {
                        self.eliding = Some(self.depth - 1);
                        self.elided += 1;
                    } else {
                        out.push(b'<');
                        out.push(b);
                    }
                }
                None => out.push(b),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deepest(xml: &str) -> u32 {
        let mut g = DepthGuard::new(u32::MAX);
        g.scan(xml.as_bytes()).unwrap();
        g.deepest()
    }

    fn nested(n: usize) -> String {
        format!("{}{}", "<a>".repeat(n), "</a>".repeat(n))
    }

    #[test]
    fn counts_elements_not_lookalikes() {
        assert_eq!(deepest("<a/>"), 1);
        assert_eq!(deepest("<a><b/><c><d/></c></a>"), 3);
        assert_eq!(deepest(&nested(10)), 10);
        // '>' and '/' inside attribute values, either quote.
        assert_eq!(deepest(r#"<a x="/>" y='>/'><b z="a/b"/></a>"#), 2);
        // Comments, CDATA, processing instructions and the declaration hold no elements.
        assert_eq!(
            deepest("<?xml version='1.0'?><a><!-- <b><c> --><![CDATA[<b><c>]]]></a>"),
            1
        );
        assert_eq!(deepest("<a><?pi <b> ?><b/></a>"), 2);
        // A stream that stays open: the depth is what is open now.
        let mut g = DepthGuard::new(10);
        g.scan(b"<stream:stream xmlns='jabber:client'><iq><query/></iq>")
            .unwrap();
        assert_eq!((g.depth(), g.deepest()), (1, 3));
    }

    #[test]
    fn scan_fails_past_the_limit_wherever_the_input_is_split() {
        let doc = nested(10_000);
        for split in [1, 2, 3, 7, 4096] {
            let mut g = DepthGuard::new(MAX_STREAM_DEPTH);
            let err = doc
                .as_bytes()
                .chunks(split)
                .try_for_each(|c| g.scan(c))
                .unwrap_err();
            assert_eq!(err.limit, MAX_STREAM_DEPTH);
            assert_eq!(g.depth(), MAX_STREAM_DEPTH + 1, "split {split}");
        }
        let mut g = DepthGuard::new(MAX_STREAM_DEPTH);
        g.scan(nested(MAX_STREAM_DEPTH as usize).as_bytes())
            .unwrap();
    }

    #[test]
    fn filter_drops_what_is_too_deep_and_keeps_the_rest() {
        let input = "<s><iq id='1'><q><a><b>x</b><b/></a><ok/></q></iq><m>hi</m>";
        let want = "<s><iq id='1'><q><a></a><ok/></q></iq><m>hi</m>";
        for split in 1..input.len() {
            let mut g = DepthGuard::new(4);
            let mut out = Vec::new();
            for c in input.as_bytes().chunks(split) {
                g.filter(c, &mut out);
            }
            assert_eq!(String::from_utf8(out).unwrap(), want, "split {split}");
            assert_eq!(g.elided(), 2);
        }
        // At the limit, a '<' that begins an end tag, a comment or CDATA is kept.
        let input = "<a><b><!--c--><![CDATA[d]]></b></a>";
        let mut g = DepthGuard::new(2);
        let mut out = Vec::new();
        g.filter(input.as_bytes(), &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), input);
        assert_eq!(g.elided(), 0);
    }

    #[test]
    fn filter_bounds_a_10000_deep_stanza() {
        let input = format!("<stream><iq>{}</iq><iq/>", nested(10_000));
        let mut g = DepthGuard::new(MAX_STREAM_DEPTH);
        let mut out = Vec::new();
        g.filter(input.as_bytes(), &mut out);
        let out = String::from_utf8(out).unwrap();
        let mut check = DepthGuard::new(u32::MAX);
        check.scan(out.as_bytes()).unwrap();
        assert_eq!(check.deepest(), MAX_STREAM_DEPTH);
        assert_eq!(check.depth(), 1, "balanced: only the stream root is open");
        assert!(out.ends_with("</iq><iq/>"), "{}", &out[out.len() - 20..]);
        assert_eq!(g.elided(), 1);
    }
}
