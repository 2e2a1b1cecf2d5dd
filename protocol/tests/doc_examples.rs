//! Every XML example in docs/PROTOCOL.md is a valid stanza whose Spine payloads parse with
//! this crate, and the spec shows every payload at least once. The spec and the code cannot
//! drift apart without this test failing.

use std::collections::BTreeSet;

use spine_protocol::*;
use xmpp_parsers::disco::{DiscoInfoQuery, DiscoInfoResult};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::message::Message;
use xmpp_parsers::ping::Ping;
use xmpp_parsers::presence::Presence;
use xmpp_parsers::stanza_error::StanzaError;

const SPEC: &str = include_str!("../../docs/PROTOCOL.md");

/// The ```xml blocks of the spec with their line numbers.
fn xml_blocks() -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in SPEC.lines().enumerate() {
        let trimmed = line.trim_start();
        match &mut current {
            None if trimmed.starts_with("```xml") => current = Some((n + 1, String::new())),
            Some(_) if trimmed.starts_with("```") => blocks.extend(current.take()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
            None => {}
        }
    }
    assert!(
        current.is_none(),
        "unterminated ```xml block in PROTOCOL.md"
    );
    blocks
}

/// Stanzas in the spec leave out the default namespace, as XMPP streams do; put it back.
fn with_client_ns(text: &str) -> String {
    let t = text.trim();
    let end = t[1..]
        .find([' ', '>', '/'])
        .map(|i| i + 1)
        .unwrap_or(t.len());
    format!("{} xmlns='jabber:client'{}", &t[..end], &t[end..])
}

#[derive(Default)]
struct Seen {
    payloads: BTreeSet<&'static str>,
    conditions: BTreeSet<String>,
}

fn payload_name(p: &Payload) -> &'static str {
    match p {
        Payload::Advertise(_) => "advertise",
        Payload::Load(_) => "load",
        Payload::DispatcherHello(_) => "dispatcher",
        Payload::Job(_) => "job",
        Payload::Result(_) => "result",
        Payload::Cancel(_) => "cancel",
        Payload::Progress(_) => "progress",
        Payload::Partial(_) => "partial",
        Payload::Chunk(_) => "chunk",
        Payload::Submit(_) => "submit",
        Payload::Accepted(_) => "accepted",
        Payload::Status(_) => "status",
        Payload::JobStatus(_) => "job-status",
        Payload::Discover(_) => "discover",
        Payload::Agents(_) => "agents",
        Payload::RequestSlot(_) => "request-slot",
        Payload::Slot(_) => "slot",
        Payload::Drain(_) => "drain",
        Payload::Undrain(_) => "undrain",
        Payload::Event(_) => "event",
        Payload::Fired(_) => "fired",
        Payload::RequestEventSlot(_) => "request-event-slot",
        Payload::EventSlot(_) => "event-slot",
        Payload::Recall(_) => "recall",
        Payload::Recalled(_) => "recalled",
    }
}

/// Checks one child of a stanza; returns how many payloads it recognised.
fn check_child(line: usize, child: &Element, seen: &mut Seen) -> Result<usize, String> {
    let ns = child.ns();
    if ns.starts_with(NS_PREFIX) {
        return match parse_payload(child.clone()) {
            Ok(p) => {
                seen.payloads.insert(payload_name(&p));
                Ok(1)
            }
            // The versioning section shows a payload of a future version on purpose.
            Err(ParseError::UnsupportedVersion { .. }) if ns != NS => Ok(1),
            Err(e) => Err(format!(
                "line {line}: <{}> does not parse: {e}",
                child.name()
            )),
        };
    }
    match (child.name(), ns.as_str()) {
        ("error", "jabber:client") => {
            let se = StanzaError::try_from(child.clone())
                .map_err(|e| format!("line {line}: <error> is not a stanza error: {e:?}"))?;
            match SpineError::from_stanza_error(&se) {
                Ok(Some(e)) => {
                    let (cond, typ) = e.condition.xmpp();
                    let expected = StanzaError::from(SpineError::new(e.condition));
                    if se.defined_condition != cond || se.type_ != typ {
                        return Err(format!(
                            "line {line}: <{}/> must travel as {:?}/{:?}, the example has {:?}/{:?}",
                            e.condition, expected.defined_condition, expected.type_, se.defined_condition, se.type_
                        ));
                    }
                    seen.conditions.insert(e.condition.to_string());
                    Ok(1)
                }
                Ok(None) => Ok(1), // a plain XMPP error, e.g. service-unavailable from a server
                Err(e) => Err(format!("line {line}: spine condition does not parse: {e}")),
            }
        }
        ("query", "http://jabber.org/protocol/disco#info") => {
            let ok = DiscoInfoResult::try_from(child.clone()).is_ok()
                || DiscoInfoQuery::try_from(child.clone()).is_ok();
            if ok {
                Ok(1)
            } else {
                Err(format!("line {line}: disco#info query does not parse"))
            }
        }
        ("ping", "urn:xmpp:ping") => Ping::try_from(child.clone())
            .map(|_| 1)
            .map_err(|e| format!("line {line}: ping does not parse: {e:?}")),
        _ => Ok(0),
    }
}

#[test]
fn every_example_parses() {
    let blocks = xml_blocks();
    assert!(
        blocks.len() >= 25,
        "PROTOCOL.md has only {} xml examples",
        blocks.len()
    );
    let mut seen = Seen::default();
    let mut errors = Vec::new();
    for (line, text) in &blocks {
        let doc = with_client_ns(text);
        let root: Element = match doc.parse() {
            Ok(e) => e,
            Err(e) => {
                errors.push(format!("line {line}: not well-formed XML: {e}"));
                continue;
            }
        };
        // The stanza itself must be valid XMPP.
        let stanza_ok = match root.name() {
            "iq" => Iq::try_from(root.clone())
                .map(|_| ())
                .map_err(|e| format!("{e:?}")),
            "message" => Message::try_from(root.clone())
                .map(|_| ())
                .map_err(|e| format!("{e:?}")),
            "presence" => Presence::try_from(root.clone())
                .map(|_| ())
                .map_err(|e| format!("{e:?}")),
            other => Err(format!("root <{other}> is not a stanza")),
        };
        if let Err(e) = stanza_ok {
            errors.push(format!("line {line}: invalid stanza: {e}"));
            continue;
        }
        let is_empty_iq_result = matches!(
            Iq::try_from(root.clone()),
            Ok(Iq::Result { payload: None, .. })
        );
        let mut recognised = 0;
        for child in root.children() {
            match check_child(*line, child, &mut seen) {
                Ok(n) => recognised += n,
                Err(e) => errors.push(e),
            }
        }
        // Stanzas without children (an unavailable presence) need no payload.
        if recognised == 0 && !is_empty_iq_result && root.children().next().is_some() {
            errors.push(format!(
                "line {line}: example carries no payload this test knows"
            ));
        }
    }
    assert!(
        errors.is_empty(),
        "PROTOCOL.md examples:\n{}",
        errors.join("\n")
    );

    let all: BTreeSet<&str> = [
        "advertise",
        "load",
        "dispatcher",
        "job",
        "result",
        "cancel",
        "event",
        "fired",
        "request-event-slot",
        "event-slot",
        "progress",
        "partial",
        "chunk",
        "submit",
        "accepted",
        "status",
        "job-status",
        "discover",
        "agents",
        "request-slot",
        "slot",
        "drain",
        "undrain",
        "recall",
        "recalled",
    ]
    .into_iter()
    .collect();
    let missing: Vec<_> = all.difference(&seen.payloads).collect();
    assert!(
        missing.is_empty(),
        "PROTOCOL.md shows no example of {missing:?}"
    );
    for c in [
        "busy",
        "bad-arguments",
        "deadline-exceeded",
        "cancelled",
        "unsupported-version",
        "fetch-failed",
    ] {
        assert!(
            seen.conditions.contains(c),
            "PROTOCOL.md shows no <{c}/> error example"
        );
    }
}

#[test]
fn condition_table_matches_code() {
    // Each row of the spec's mapping table: | `name` | `xmpp-condition` | `type` | ...
    let mut rows = 0;
    for c in Condition::ALL {
        let se = StanzaError::from(SpineError::new(c));
        let el: Element = se.clone().into();
        let cond = el
            .children()
            .find(|ch| ch.ns() == "urn:ietf:params:xml:ns:xmpp-stanzas")
            .map(|ch| ch.name().to_owned())
            .unwrap();
        let typ = el.attr("type").unwrap().to_owned();
        let row = SPEC.lines().find(|l| {
            let cells: Vec<String> = l
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_owned())
                .collect();
            cells.len() > 4 && cells[1].split_whitespace().next() == Some(c.as_str())
        });
        let row = row.unwrap_or_else(|| panic!("PROTOCOL.md has no table row for <{c}/>"));
        assert!(
            row.contains(&cond) && row.contains(&typ),
            "row for {c} should name {cond} and {typ}: {row}"
        );
        rows += 1;
    }
    assert_eq!(rows, Condition::ALL.len());
}

/// Every ```json block of the spec is a fragment list (§11.7, §11.7.1) this crate reads and
/// writes back the same.
#[test]
fn json_examples_are_fragment_lists() {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in SPEC.lines().enumerate() {
        match &mut current {
            None if line.trim_start().starts_with("```json") => {
                current = Some((n + 1, String::new()))
            }
            Some(_) if line.trim_start().starts_with("```") => blocks.extend(current.take()),
            Some((_, text)) => text.push_str(line),
            None => {}
        }
    }
    assert!(blocks.len() >= 3, "the spec's fragment list examples");
    let mut named = 0;
    for (line, text) in blocks {
        let list = fragments::decode(text.as_bytes())
            .unwrap_or_else(|e| panic!("PROTOCOL.md line {line}: {e}"));
        named += list.iter().filter(|f| f.source.is_some()).count();
        let again: serde_json::Value = serde_json::from_slice(&fragments::encode(&list)).unwrap();
        let original: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(again, original, "PROTOCOL.md line {line}");
    }
    assert!(
        named >= 2,
        "the spec shows fragments by reference, with and without url"
    );
}

/// §11.7.1's split step answering with its fragments by reference: the result parses, and its
/// inline output is a fragment list naming every fragment by SHA-256 and size, with no bytes
/// and no URL (the agent uploaded each to a slot of its own, §13.4).
#[test]
fn the_split_result_by_reference_names_every_fragment() {
    let (line, text) = xml_blocks()
        .into_iter()
        .find(|(_, t)| t.contains("job='wc7.split'"))
        .expect("PROTOCOL.md shows a split step's result by reference");
    let el: minidom::Element = with_client_ns(&text)
        .parse()
        .unwrap_or_else(|e| panic!("PROTOCOL.md line {line}: {e}"));
    let Iq::Result {
        payload: Some(p), ..
    } = Iq::try_from(el).unwrap()
    else {
        panic!("PROTOCOL.md line {line}: not a result IQ with a payload");
    };
    let r = JobResult::try_from(p).unwrap();
    let Some(Data::Inline { mime, bytes }) = r.output else {
        panic!(
            "PROTOCOL.md line {line}: the list goes inline: {:?}",
            r.output
        );
    };
    assert_eq!(mime.as_deref(), Some(FRAGMENTS_MIME));
    let list = fragments::decode(&bytes).unwrap();
    assert_eq!(list.len(), 2);
    for f in &list {
        let s = f.source.as_ref().expect("by reference");
        assert!(s.url.is_none() && f.data.is_empty(), "line {line}");
    }
    assert_eq!(list.iter().map(Fragment::size).sum::<u64>(), 5_242_993);
    // The same list as the JSON example just above it.
    let json_line = SPEC[..SPEC.find(&text).unwrap()]
        .rfind("```json")
        .map(|at| &SPEC[at + 7..])
        .and_then(|rest| rest.split("```").next())
        .unwrap();
    assert_eq!(
        fragments::decode(json_line.trim().as_bytes()).unwrap(),
        list
    );
}
