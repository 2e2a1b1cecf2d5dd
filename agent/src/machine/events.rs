//! Events from the agent's watchers (PROTOCOL.md §11.9.1, [`crate::watch`]): the part of
//! [`Core`] that sends them to a dispatcher and decides what a failure means.
//!
//! An event goes to the full JID of the dispatcher last heard from (its hello, or a job), or
//! of the leader a standby named. JSON data goes inline. A file goes by reference: an event
//! slot is asked for (`<request-event-slot/>`), the file is PUT there by the driver's data
//! plane (streamed from disk, [`FilePut`]), then the event names the bytes. The dispatcher's
//! `<fired/>` ends it (an [`Ack`] with the jobs' ids); a refusal of type `wait` (a standby,
//! a full queue), a lost answer or a failed upload tries again after a growing pause; any
//! other refusal gives it up (an [`Ack`] with the reason). The event's id names what it is
//! about, so sending it again never makes a second job.

use std::time::Duration;

use jid::Jid;
use minidom::Element;
use spine_protocol::events::{Event, EventData, EventSlot, Fired, RequestEventSlot};
use spine_protocol::{DataRef, SpineError};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::stanza_error::{ErrorType, StanzaError};

use super::{Core, FilePut};
use crate::watch::{Ack, Watched, WatchedData};

/// How long the dispatcher has to answer an event or a slot request before it is sent again.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Pauses between tries: from the first to the longest, doubling.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Events waiting to be sent at once; a watcher's next event waits in its channel.
pub(crate) const MAX_OUTGOING: usize = 256;

/// Where an outgoing event is.
#[derive(Debug)]
enum Stage {
    /// To be sent (again) at this time.
    Waiting(Instant),
    /// Its slot request is out (IQ id), unanswered until the deadline.
    Slot(String, Instant),
    /// Its file is being put (the transfer's key maps to it in `event_puts`).
    Putting,
    /// The event IQ is out (IQ id), unanswered until the deadline.
    Sent(String, Instant),
}

/// One event on its way.
#[derive(Debug)]
pub(super) struct Outgoing {
    event: Watched,
    stage: Stage,
    /// The file was put to a slot in this session's dispatcher: the event may name it.
    put: bool,
    tries: u32,
}

impl Core {
    /// The agent's events are sent from `/agents/<bare JID>/<watch>`.
    fn event_source(&self, watch: &str) -> String {
        format!("/agents/{}/{watch}", self.me)
    }

    /// Room for another watched event?
    pub(crate) fn can_take_event(&self) -> bool {
        self.outgoing.len() < MAX_OUTGOING
    }

    /// A watcher saw an event: it is sent (`key` names it in the [`Ack`]).
    pub(crate) fn watched(&mut self, key: u64, event: Watched, now: Instant) {
        self.outgoing.insert(
            key,
            Outgoing {
                event,
                stage: Stage::Waiting(now),
                put: false,
                tries: 0,
            },
        );
        self.pump_event(key, now);
    }

    /// Where events go: the leader a standby named, or the dispatcher last heard from.
    fn event_target(&self) -> Option<Jid> {
        self.leader_hint.clone().or_else(|| self.heard_from.clone())
    }

    /// Moves an event on from [`Stage::Waiting`] once its time has come.
    fn pump_event(&mut self, key: u64, now: Instant) {
        let Some(target) = self.event_target() else {
            if let Some(o) = self.outgoing.get_mut(&key) {
                o.stage = Stage::Waiting(now + RETRY_FIRST);
            }
            return;
        };
        let Some(o) = self.outgoing.get(&key) else {
            return;
        };
        if !matches!(o.stage, Stage::Waiting(t) if t <= now) {
            return;
        }
        let file = match &o.event.data {
            WatchedData::File {
                size, sha256, mime, ..
            } if !o.put => Some(RequestEventSlot {
                size: *size,
                sha256: *sha256,
                mime: mime.clone(),
            }),
            _ => None,
        };
        let ev = self.wire_event(&o.event);
        let iq_id = self.new_iq_id();
        let (iq, stage) = match file {
            Some(req) => (
                Iq::from_get(iq_id.clone(), req).with_to(target),
                Stage::Slot(iq_id.clone(), now + ANSWER_TIMEOUT),
            ),
            None => (
                Iq::from_set(iq_id.clone(), ev).with_to(target),
                Stage::Sent(iq_id.clone(), now + ANSWER_TIMEOUT),
            ),
        };
        if let Some(o) = self.outgoing.get_mut(&key) {
            o.stage = stage;
        }
        self.event_iqs.insert(iq_id, key);
        self.push(iq);
    }

    fn wire_event(&self, w: &Watched) -> Event {
        let data = match &w.data {
            WatchedData::Json(v) => EventData::Json(v.clone()),
            WatchedData::File {
                size, sha256, mime, ..
            } => EventData::Ref(DataRef {
                size: *size,
                sha256: *sha256,
                mime: mime.clone(),
                sources: Vec::new(),
            }),
        };
        Event {
            id: w.id.clone(),
            source: self.event_source(&w.watch),
            ty: w.ty.clone(),
            subject: w.subject.clone(),
            time: Some(w.time.clone()),
            data,
        }
    }

    /// Whether `iq_id` is the answer to an event or its slot request.
    pub(super) fn is_event_reply(&self, iq_id: &str) -> bool {
        self.event_iqs.contains_key(iq_id)
    }

    /// The dispatcher answered an event or its slot request.
    pub(super) fn on_event_reply(
        &mut self,
        iq_id: &str,
        payload: Option<Element>,
        error: Option<StanzaError>,
        now: Instant,
    ) {
        let Some(key) = self.event_iqs.remove(iq_id) else {
            return;
        };
        let Some(o) = self.outgoing.get(&key) else {
            return;
        };
        let slot = matches!(o.stage, Stage::Slot(..));
        if let Some(e) = error {
            return self.event_refused(key, &e, now);
        }
        if slot {
            match payload.map(EventSlot::try_from) {
                Some(Ok(s)) => {
                    let WatchedData::File {
                        path, size, mime, ..
                    } = &o.event.data
                    else {
                        return;
                    };
                    self.next_id += 1;
                    let put_key = self.next_id;
                    debug!(event = %o.event.id, bytes = size, "putting the file to its event slot");
                    self.ready.file_puts.push(FilePut {
                        key: put_key,
                        url: s.put,
                        path: path.clone(),
                        size: *size,
                        mime: mime.clone(),
                        deadline: now + super::refs::put_window(s.expires_ms),
                    });
                    self.event_puts.insert(put_key, key);
                    if let Some(o) = self.outgoing.get_mut(&key) {
                        o.stage = Stage::Putting;
                    }
                }
                other => {
                    let why = match other {
                        Some(Err(e)) => format!("the event slot answer is invalid: {e}"),
                        _ => "the event slot answer is empty".to_owned(),
                    };
                    self.retry_event(key, &why, now);
                }
            }
            return;
        }
        let jobs = match payload.map(Fired::try_from) {
            Some(Ok(f)) => f.jobs.into_iter().map(|j| j.job.to_string()).collect(),
            Some(Err(e)) => {
                warn!(event = %o.event.id, "the dispatcher's answer to an event is invalid ({e}); taking it as taken");
                Vec::new()
            }
            None => Vec::new(),
        };
        if let Some(o) = self.outgoing.remove(&key) {
            info!(watch = %o.event.watch, event = %o.event.id, jobs = jobs.len(), "event taken by the dispatcher");
        }
        self.ready.acks.push((key, Ok(jobs)));
    }

    /// The driver finished putting an event's file (`put_key`). False: not an event's.
    pub(crate) fn event_put_done(
        &mut self,
        put_key: u64,
        result: &Result<(), String>,
        now: Instant,
    ) -> bool {
        let Some(key) = self.event_puts.remove(&put_key) else {
            return false;
        };
        match result {
            Ok(()) => {
                if let Some(o) = self.outgoing.get_mut(&key) {
                    o.put = true;
                    o.stage = Stage::Waiting(now);
                }
                self.pump_event(key, now);
            }
            Err(why) => self.retry_event(key, &format!("putting the file failed: {why}"), now),
        }
        true
    }

    /// A refusal: a standby's (to the leader it names), or any other of type `wait`, tries
    /// again; the rest gives the event up.
    fn event_refused(&mut self, key: u64, e: &StanzaError, now: Instant) {
        let text = e
            .texts
            .values()
            .next()
            .cloned()
            .unwrap_or_else(|| format!("{:?}", e.defined_condition));
        if let Some(leader) = text
            .split("the leader is ")
            .nth(1)
            .and_then(|j| j.trim().parse::<Jid>().ok())
        {
            debug!(leader = %leader, "a standby named the leader: events go there");
            self.leader_hint = Some(leader);
        }
        let why = match SpineError::from_stanza_error(e) {
            Ok(Some(se)) => se.to_string(),
            _ => text,
        };
        if e.type_ == ErrorType::Wait {
            return self.retry_event(key, &why, now);
        }
        if let Some(o) = self.outgoing.remove(&key) {
            if matches!(o.event.data, WatchedData::File { .. }) && o.put {
                // The slot may have expired before the event: put it again, once more.
                if o.tries < 2 && why.contains("event slot") {
                    let mut o = o;
                    o.put = false;
                    o.tries += 1;
                    o.stage = Stage::Waiting(now);
                    self.outgoing.insert(key, o);
                    return self.pump_event(key, now);
                }
            }
            warn!(watch = %o.event.watch, event = %o.event.id, "the dispatcher refused the event: {why}");
        }
        self.ready.acks.push((key, Err(why)));
    }

    /// Sends the event again after a pause that grows with each try.
    fn retry_event(&mut self, key: u64, why: &str, now: Instant) {
        let Some(o) = self.outgoing.get_mut(&key) else {
            return;
        };
        o.tries += 1;
        let pause = RETRY_FIRST
            .saturating_mul(1 << o.tries.min(8))
            .min(RETRY_MAX);
        if o.tries <= 3 {
            debug!(event = %o.event.id, "event not taken yet ({why}): again in {pause:?}");
        } else {
            warn!(event = %o.event.id, tries = o.tries, "event not taken yet ({why}): again in {pause:?}");
        }
        o.stage = Stage::Waiting(now + pause);
    }

    /// The earliest time an event needs the core (a retry or an answer's deadline).
    pub(super) fn events_timeout(&self) -> Option<Instant> {
        self.outgoing
            .values()
            .filter_map(|o| match o.stage {
                Stage::Waiting(t) | Stage::Slot(_, t) | Stage::Sent(_, t) => Some(t),
                Stage::Putting => None,
            })
            .min()
    }

    /// Retries what is due: waits that are over, answers that did not come.
    pub(super) fn events_tick(&mut self, now: Instant) {
        let due: Vec<(u64, bool)> = self
            .outgoing
            .iter()
            .filter_map(|(k, o)| match &o.stage {
                Stage::Waiting(t) if *t <= now => Some((*k, false)),
                Stage::Slot(_, t) | Stage::Sent(_, t) if *t <= now => Some((*k, true)),
                _ => None,
            })
            .collect();
        for (key, lost) in due {
            if lost {
                if let Some(o) = self.outgoing.get(&key) {
                    if let Stage::Slot(id, _) | Stage::Sent(id, _) = &o.stage {
                        self.event_iqs.remove(id);
                    }
                }
                self.retry_event(key, "no answer", now);
            } else {
                self.pump_event(key, now);
            }
        }
    }

    /// A new session: answers to the old one's IQs are lost, so those events go again.
    pub(super) fn events_session_started(&mut self, now: Instant) {
        self.event_iqs.clear();
        let mut again = Vec::new();
        for (key, o) in self.outgoing.iter_mut() {
            if matches!(o.stage, Stage::Slot(..) | Stage::Sent(..)) {
                o.stage = Stage::Waiting(now);
                again.push(*key);
            }
        }
        for key in again {
            self.pump_event(key, now);
        }
    }
}

/// An acknowledgement for the driver to pass to the watcher of `key`.
pub(crate) type EventAck = (u64, Ack);
