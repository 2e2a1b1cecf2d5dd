//! Payloads by reference over HTTP (protocol 1.1, docs/PROTOCOL.md §13.4): the part of
//! [`Core`] that decides about input fetches and output uploads while the driver's data plane
//! ([`crate::dataplane`]) performs them.
//!
//! A job whose input is a reference holds its slots while the input is fetched
//! ([`Fetch`] out, [`Core::fetched`] in); its handler starts once the verified bytes are in. A
//! fetch that fails answers the job IQ with `fetch-failed` and forgets the job, so that the
//! dispatcher's resend of the same id and attempt, with chunks, runs. An output over the inline
//! limit for a dispatcher that speaks 1.1 asks for an upload slot (`<request-slot/>`), is PUT
//! there ([`Put`] out, [`Core::put_done`] in) and answered with the reference form; any failure
//! sends it in chunks instead (`outputs`). Failures are logged once per dispatcher until the
//! next success, not once per job.

use std::time::Duration;

use jid::BareJid;
use minidom::Element;
use sha2::{Digest, Sha256};
use spine_protocol::{Condition, Data, DataRef, JobId, JobResult, RequestSlot, Slot, SpineError};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::stanza_error::StanzaError;

use super::outputs::Finished;
use super::{iq_error, Core, Fetched, Put};
use crate::store::Outcome;

/// How long the dispatcher has to answer a slot request before the output goes in chunks.
pub(crate) const SLOT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds of one PUT, whatever the slot's validity says.
const PUT_MIN: Duration = Duration::from_secs(10);
const PUT_MAX: Duration = Duration::from_secs(600);

/// An output on its way to an upload slot.
pub(super) struct PutUpload {
    pub(super) fin: Finished,
    sha256: [u8; 32],
    /// The slot request's IQ id while it is unanswered.
    slot_iq: Option<String>,
    deadline: Instant,
}

/// Logs a data-plane failure at `warn` the first time for a dispatcher (until a success clears
/// it), at `debug` after that.
pub(super) fn log_once(
    warned: &mut std::collections::HashSet<BareJid>,
    dispatcher: &BareJid,
    what: &str,
) {
    if warned.insert(dispatcher.clone()) {
        warn!(dispatcher = %dispatcher, "{what} (logged once per dispatcher until HTTP works again)");
    } else {
        debug!(dispatcher = %dispatcher, "{what}");
    }
}

/// How long one PUT may take: the slot's validity, bounded.
pub(super) fn put_window(expires_ms: u64) -> Duration {
    Duration::from_millis(expires_ms).clamp(PUT_MIN, PUT_MAX)
}

impl Core {
    /// The data plane finished fetching input `key`: start the handler, or answer
    /// `fetch-failed` and forget the job.
    pub(crate) fn fetched(&mut self, key: u64, result: Result<Fetched, String>, now: Instant) {
        let Some(id) = self
            .running
            .iter()
            .find(|(_, r)| matches!(r.fetching, Some((k, _)) if k == key))
            .map(|(id, _)| id.clone())
        else {
            // Cancelled or stopped meanwhile: a fetched file is deleted off this task.
            if let Ok(Fetched::File(work)) = result {
                self.clean_up(Some(work), Vec::new());
            }
            return;
        };
        match result {
            Ok(fetched) => {
                let Some(r) = self.running.get_mut(&id) else {
                    return;
                };
                let Some((_, mut start)) = r.fetching.take() else {
                    return;
                };
                self.fetch_warned.remove(&r.from_bare);
                match fetched {
                    Fetched::Bytes(bytes) => {
                        info!(job = %id, bytes = bytes.len(), "input fetched over HTTP: job started");
                        start.input = bytes;
                    }
                    Fetched::File(work) => {
                        info!(job = %id, file = %work.input().display(), "input fetched over HTTP into a file: job started");
                        start.work = Some(work);
                    }
                }
                self.ready.starts.push(start);
                self.hold_start_notice(&id, now);
            }
            Err(reason) => {
                let Some(r) = self.running.remove(&id) else {
                    return;
                };
                log_once(
                    &mut self.fetch_warned,
                    &r.from_bare,
                    &format!("fetching a job input over HTTP failed: {reason}; the dispatcher resends it in chunks"),
                );
                let e = SpineError::new(Condition::FetchFailed).with_text(reason);
                // Not cached: the same id and attempt comes back with chunks and must run.
                for (to, iq_id) in r.waiters {
                    self.push(iq_error(iq_id, to, e.clone()));
                }
                self.mark_load_dirty(now);
                self.check_end();
            }
        }
    }

    /// A cancel of a job still fetching its input: the fetch is aborted and the job answered
    /// `cancelled` at once (no handler ran). False if the job is not fetching.
    pub(super) fn cancel_fetch(&mut self, job: &JobId, now: Instant) -> bool {
        if self.running.get(job).is_none_or(|r| r.fetching.is_none()) {
            return false;
        }
        let Some(r) = self.running.remove(job) else {
            return false;
        };
        if let Some((key, _)) = r.fetching {
            self.ready.aborts.push(key);
        }
        info!(job = %job, "cancelled while its input was being fetched");
        let e = SpineError::new(Condition::Cancelled).with_text("cancelled by the dispatcher");
        self.finish(job.clone(), Outcome::Error(e), r.waiters, now);
        self.mark_load_dirty(now);
        true
    }

    /// The drain grace is over: jobs still fetching their input end `retryable`, like stopped
    /// handlers.
    pub(super) fn stop_fetches(&mut self, now: Instant) {
        let ids: Vec<JobId> = self
            .running
            .iter()
            .filter(|(_, r)| r.fetching.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            if let Some(r) = self.running.remove(&id) {
                if let Some((key, _)) = r.fetching {
                    self.ready.aborts.push(key);
                }
                let e = SpineError::new(Condition::Retryable)
                    .with_text("agent stopped before the job's input arrived");
                self.finish(id, Outcome::Error(e), r.waiters, now);
            }
        }
    }

    /// Asks the dispatcher for an upload slot for this output.
    pub(super) fn request_slot(&mut self, fin: Finished, now: Instant) {
        let sha256: [u8; 32] = Sha256::digest(fin.bytes.as_slice()).into();
        let req = RequestSlot {
            job: fin.job.clone(),
            attempt: fin.attempt,
            size: fin.bytes.len() as u64,
            sha256,
            mime: fin.mime.clone(),
        };
        let iq_id = self.new_iq_id();
        let key = self.next_id;
        let deadline = now + SLOT_TIMEOUT;
        debug!(job = %fin.job, bytes = fin.bytes.len(), "asking for an upload slot");
        self.push(Iq::from_get(iq_id.clone(), req).with_to(fin.to.clone()));
        self.slot_iqs.insert(iq_id.clone(), key);
        self.slot_deadlines.insert((deadline, key));
        self.puts.insert(
            key,
            PutUpload {
                fin,
                sha256,
                slot_iq: Some(iq_id),
                deadline,
            },
        );
    }

    /// The dispatcher answered a slot request: PUT the output there, or send it in chunks.
    pub(super) fn on_slot_reply(
        &mut self,
        iq_id: &str,
        payload: Option<Element>,
        error: Option<StanzaError>,
        now: Instant,
    ) {
        let Some(key) = self.slot_iqs.remove(iq_id) else {
            return;
        };
        let Some(u) = self.puts.get_mut(&key) else {
            return;
        };
        self.slot_deadlines.remove(&(u.deadline, key));
        u.slot_iq = None;
        let slot = match (error, payload) {
            (Some(e), _) => Err(match SpineError::from_stanza_error(&e) {
                Ok(Some(se)) => format!("the slot request was refused: {se}"),
                _ => format!("the slot request was refused: {:?}", e.defined_condition),
            }),
            (None, Some(el)) => Slot::try_from(el)
                .map_err(|e| format!("the slot answer is invalid: {e}"))
                .and_then(|s| {
                    if s.job == u.fin.job {
                        Ok(s)
                    } else {
                        Err(format!("the slot answer is for job {}", s.job))
                    }
                }),
            (None, None) => Err("the slot answer is empty".to_owned()),
        };
        match slot {
            Ok(s) => {
                let valid = put_window(s.expires_ms);
                debug!(job = %u.fin.job, "uploading the output to its slot");
                self.ready.puts.push(Put {
                    key,
                    url: s.put,
                    bytes: u.fin.bytes.clone(),
                    mime: u.fin.mime.clone(),
                    deadline: now + valid,
                });
            }
            Err(reason) => self.put_fallback(key, &reason, now),
        }
    }

    /// The data plane finished uploading output `key`: answer with the reference form, or
    /// send the output in chunks.
    pub(crate) fn put_done(&mut self, key: u64, result: Result<(), String>, now: Instant) {
        match result {
            Ok(()) => {
                let Some(u) = self.puts.remove(&key) else {
                    return;
                };
                self.upload_warned.remove(&u.fin.from_bare);
                info!(job = %u.fin.job, bytes = u.fin.bytes.len(), "output uploaded over HTTP");
                let f = u.fin;
                let res = JobResult {
                    job: f.job.clone(),
                    attempt: f.attempt,
                    elapsed_ms: Some(f.elapsed_ms),
                    meta: f.meta,
                    output: Some(Data::Ref(DataRef {
                        size: f.bytes.len() as u64,
                        sha256: u.sha256,
                        mime: f.mime,
                        sources: Vec::new(),
                    })),
                };
                self.finish(f.job, Outcome::Result(res), f.waiters, now);
                self.check_end();
            }
            Err(reason) => self.put_fallback(key, &format!("the upload failed: {reason}"), now),
        }
    }

    /// The `serves` URL of `data_listen` (bound by the driver before the session starts):
    /// this agent advertises it and keeps the outputs of jobs that carry `<keep/>`.
    pub(crate) fn set_serves(&mut self, url: String) {
        self.settings.serves = Some(url.trim_end_matches('/').to_owned());
    }

    /// A large output of a job with `<keep/>`: written to the keep directory by the driver,
    /// then answered with the reference form naming this agent's URL ([`Core::kept`]).
    pub(super) fn keep_output(&mut self, fin: Finished, holder_key: [u8; 32]) {
        let sha256: [u8; 32] = Sha256::digest(fin.bytes.as_slice()).into();
        self.next_id += 1;
        let key = self.next_id;
        self.ready.keeps.push(super::KeepOut {
            key,
            sha256,
            bytes: fin.bytes.clone(),
            holder_key,
        });
        self.keeps.insert(key, (fin, sha256));
    }

    /// The driver kept output `key`, or could not (then it goes to an upload slot, as
    /// without `data_listen`).
    pub(crate) fn kept(&mut self, key: u64, result: Result<(), String>, now: Instant) {
        let Some((f, sha256)) = self.keeps.remove(&key) else {
            return;
        };
        let (Ok(()), Some(base)) = (&result, &self.settings.serves) else {
            let why = result.err().unwrap_or_default();
            warn!(job = %f.job, "keeping the output failed ({why}): uploading it to the dispatcher");
            self.request_slot(f, now);
            return;
        };
        let url = format!("{base}/v1/blobs/{}", spine_protocol::data::hex(&sha256));
        info!(job = %f.job, bytes = f.bytes.len(), "output kept here for the steps that take it");
        let res = JobResult {
            job: f.job.clone(),
            attempt: f.attempt,
            elapsed_ms: Some(f.elapsed_ms),
            meta: f.meta,
            output: Some(Data::Ref(DataRef {
                size: f.bytes.len() as u64,
                sha256,
                mime: f.mime,
                sources: vec![url],
            })),
        };
        self.finish(f.job, Outcome::Result(res), f.waiters, now);
        self.check_end();
    }

    /// Slot requests unanswered for [`SLOT_TIMEOUT`]: their outputs go in chunks.
    pub(super) fn slot_timeouts(&mut self, now: Instant) {
        while let Some(&(t, key)) = self.slot_deadlines.first() {
            if t > now {
                break;
            }
            self.slot_deadlines.remove(&(t, key));
            if let Some(iq) = self.puts.get_mut(&key).and_then(|u| u.slot_iq.take()) {
                self.slot_iqs.remove(&iq);
            }
            let reason = format!("no answer to the slot request within {SLOT_TIMEOUT:?}");
            self.put_fallback(key, &reason, now);
        }
    }

    /// A new session: the answers to the old one's slot requests are lost.
    pub(super) fn slots_lost(&mut self, now: Instant) {
        let keys: Vec<u64> = self.slot_iqs.drain().map(|(_, k)| k).collect();
        for key in keys {
            if let Some(u) = self.puts.get_mut(&key) {
                self.slot_deadlines.remove(&(u.deadline, key));
                u.slot_iq = None;
            }
            self.put_fallback(key, "the session restarted before the slot answer", now);
        }
    }

    /// Sends output `key` in chunks instead (§13.1), logging why once per dispatcher.
    fn put_fallback(&mut self, key: u64, reason: &str, now: Instant) {
        let Some(u) = self.puts.remove(&key) else {
            return;
        };
        log_once(
            &mut self.upload_warned,
            &u.fin.from_bare,
            &format!("uploading an output over HTTP: {reason}; sending it in chunks"),
        );
        self.start_upload(u.fin, now);
    }
}
