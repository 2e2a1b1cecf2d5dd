//! Watched events: where they go, how a file goes by reference, what a refusal means.

use super::*;
use crate::watch::{Watched, WatchedData};
use spine_protocol::events::{Event, EventData, EventSlot, Fired, FiredJob, RequestEventSlot};
use spine_protocol::JobState;
use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType};

const LEADER: &str = "dispatcher@localhost/d9";

fn hello(c: &mut Core, from: &str, now: Instant) {
    let p =
        Presence::available()
            .with_from(jid(from))
            .with_payload(spine_protocol::DispatcherHello {
                protocol: ProtocolVersion::V1_1,
            });
    c.stanza(p.into(), now);
    c.take_ready();
}

fn probe_event(id: &str) -> Watched {
    Watched {
        watch: "disk".into(),
        id: id.into(),
        ty: "spine.probe.result".into(),
        subject: Some("/usr/bin/check".into()),
        time: "2026-11-27T09:00:00.000Z".into(),
        data: WatchedData::Json(serde_json::json!({"ok": false, "exit_code": 2})),
    }
}

fn file_event() -> Watched {
    Watched {
        watch: "uploads".into(),
        id: "f1".into(),
        ty: "spine.file.created".into(),
        subject: Some("cat.jpg".into()),
        time: "2026-11-27T09:00:00.000Z".into(),
        data: WatchedData::File {
            path: "/in/cat.jpg".into(),
            size: 5,
            sha256: [3; 32],
            mime: Some("image/jpeg".into()),
        },
    }
}

/// The IQs sent, with their id, recipient and payload.
fn sent(r: &Ready) -> Vec<(String, Jid, minidom::Element)> {
    iqs(r)
        .into_iter()
        .filter_map(|iq| match iq {
            Iq::Set {
                id, to, payload, ..
            }
            | Iq::Get {
                id, to, payload, ..
            } => Some((id.clone(), to.clone()?, payload.clone())),
            _ => None,
        })
        .collect()
}

fn fired(c: &mut Core, from: &str, iq: &str, event: &str, now: Instant) -> Ready {
    let f = Fired {
        event: event.into(),
        jobs: vec![FiredJob {
            rule: "r".into(),
            job: job_id("j-1"),
            state: JobState::Queued,
        }],
    };
    c.stanza(
        Iq::from_result(iq, Some(f)).with_from(jid(from)).into(),
        now,
    );
    c.take_ready()
}

fn refuse(
    c: &mut Core,
    from: &str,
    iq: &str,
    t: ErrorType,
    cond: DefinedCondition,
    text: &str,
    now: Instant,
) -> Ready {
    let e = StanzaError::new(t, cond, "en", text);
    c.stanza(Iq::from_error(iq, e).with_from(jid(from)).into(), now);
    c.take_ready()
}

#[test]
fn an_event_waits_for_a_dispatcher_then_goes_to_the_one_heard_from_under_the_agents_source() {
    let t0 = Instant::now();
    let mut c = core(2, t0);
    c.watched(1, probe_event("disk-1"), t0);
    assert!(
        sent(&c.take_ready()).is_empty(),
        "no dispatcher heard from yet"
    );
    hello(&mut c, DISPATCHER, t0 + 100 * MS);
    c.tick(t0 + 600 * MS);
    let out = sent(&c.take_ready());
    assert_eq!(out.len(), 1);
    let (iq, to, payload) = &out[0];
    assert_eq!(to, &jid(DISPATCHER));
    let ev = Event::try_from(payload.clone()).unwrap();
    assert_eq!(ev.source, "/agents/agent1@localhost/disk");
    assert_eq!(ev.id, "disk-1");
    assert_eq!(
        ev.data,
        EventData::Json(serde_json::json!({"ok": false, "exit_code": 2}))
    );
    let r = fired(&mut c, DISPATCHER, iq, "disk-1", t0 + 700 * MS);
    assert_eq!(r.acks, vec![(1, Ok(vec!["j-1".to_owned()]))]);
    assert!(c.events_timeout().is_none(), "nothing left to send");
}

#[test]
fn a_file_goes_to_an_event_slot_then_the_event_names_it_by_reference() {
    let t0 = Instant::now();
    let mut c = core(2, t0);
    hello(&mut c, DISPATCHER, t0);
    c.watched(7, file_event(), t0);
    let out = sent(&c.take_ready());
    let (iq, _, payload) = &out[0];
    let req = RequestEventSlot::try_from(payload.clone()).unwrap();
    assert_eq!(
        (req.size, req.sha256, req.mime.as_deref()),
        (5, [3; 32], Some("image/jpeg"))
    );
    let slot = EventSlot {
        put: "http://127.0.0.1:1/v1/uploads/events?attempt=0".into(),
        expires_ms: 60_000,
    };
    c.stanza(
        Iq::from_result(iq.clone(), Some(slot))
            .with_from(jid(DISPATCHER))
            .into(),
        t0 + MS,
    );
    let r = c.take_ready();
    assert_eq!(r.file_puts.len(), 1);
    let put = &r.file_puts[0];
    assert_eq!((put.path.to_str(), put.size), (Some("/in/cat.jpg"), 5));
    // A failed put tries again later, from the slot request.
    c.file_put_done(put.key, Err("127.0.0.1:1: refused".into()), t0 + 2 * MS);
    assert!(sent(&c.take_ready()).is_empty());
    c.tick(t0 + 2 * MS + RETRY);
    let out = sent(&c.take_ready());
    assert!(
        RequestEventSlot::try_from(out[0].2.clone()).is_ok(),
        "asked again"
    );
    let iq = out[0].0.clone();
    let slot = EventSlot {
        put: "http://127.0.0.1:1/v1/uploads/events?attempt=0".into(),
        expires_ms: 60_000,
    };
    c.stanza(
        Iq::from_result(iq, Some(slot))
            .with_from(jid(DISPATCHER))
            .into(),
        t0 + RETRY * 2,
    );
    let key = c.take_ready().file_puts[0].key;
    c.file_put_done(key, Ok(()), t0 + RETRY * 2);
    let out = sent(&c.take_ready());
    let ev = Event::try_from(out[0].2.clone()).unwrap();
    assert_eq!(ev.subject.as_deref(), Some("cat.jpg"));
    assert_eq!(ev.source, "/agents/agent1@localhost/uploads");
    let EventData::Ref(r) = ev.data else {
        panic!("not by reference: {:?}", ev.data)
    };
    assert_eq!((r.size, r.sha256, r.sources.len()), (5, [3; 32], 0));
    let r = fired(&mut c, DISPATCHER, &out[0].0, "f1", t0 + RETRY * 3);
    assert_eq!(r.acks.len(), 1);
    assert!(r.acks[0].1.is_ok());
}

/// Longer than the first pause between tries.
const RETRY: Duration = Duration::from_secs(2);

#[test]
fn a_standby_sends_the_event_to_the_leader_and_a_hard_refusal_gives_it_up() {
    let t0 = Instant::now();
    let mut c = core(2, t0);
    hello(&mut c, DISPATCHER, t0);
    c.watched(1, probe_event("p-1"), t0);
    let out = sent(&c.take_ready());
    let text = format!("standby: this dispatcher does not lead; the leader is {LEADER}");
    let r = refuse(
        &mut c,
        DISPATCHER,
        &out[0].0,
        ErrorType::Wait,
        DefinedCondition::ServiceUnavailable,
        &text,
        t0 + MS,
    );
    assert!(r.acks.is_empty(), "tried again, not given up");
    c.tick(t0 + RETRY);
    let out = sent(&c.take_ready());
    assert_eq!(out[0].1, jid(LEADER));
    // A refusal of another type than `wait` gives the event up, with the reason.
    let r = refuse(
        &mut c,
        LEADER,
        &out[0].0,
        ErrorType::Auth,
        DefinedCondition::NotAuthorized,
        "this JID may not send events",
        t0 + RETRY + MS,
    );
    assert_eq!(r.acks.len(), 1);
    let why = r.acks[0].1.clone().unwrap_err();
    assert!(why.contains("may not send events"), "{why}");
    assert!(c.events_timeout().is_none());
}

#[test]
fn an_unanswered_event_is_sent_again_and_a_new_session_resends_at_once() {
    let t0 = Instant::now();
    let mut c = core(2, t0);
    hello(&mut c, DISPATCHER, t0);
    c.watched(1, probe_event("p-2"), t0);
    let first = sent(&c.take_ready())[0].0.clone();
    c.tick(t0 + Duration::from_secs(31));
    c.take_ready();
    c.tick(t0 + Duration::from_secs(33));
    let again = sent(&c.take_ready());
    assert_eq!(again.len(), 1, "sent again after the answer's deadline");
    assert_ne!(again[0].0, first);
    // The old answer is ignored; a new session sends again at once.
    let r = fired(
        &mut c,
        DISPATCHER,
        &first,
        "p-2",
        t0 + Duration::from_secs(34),
    );
    assert!(r.acks.is_empty());
    c.session_started(t0 + Duration::from_secs(35));
    let r = c.take_ready();
    let evs: Vec<_> = sent(&r)
        .into_iter()
        .filter(|(_, _, p)| p.name() == "event")
        .collect();
    assert_eq!(evs.len(), 1);
}
