//! Outputs that are files (a split step's fragment files, [`crate::FragmentFile`]): the part
//! of [`Core`] that has each file uploaded to an upload slot of its own and answers with the
//! fragment list naming them (docs/PROTOCOL.md §11.7.1, §13.4), or falls back to the list with
//! the bytes inline.
//!
//! For a dispatcher that speaks 1.1, when `http_data` is on, each file gets a
//! `<request-slot/>` with its size and SHA-256 (hashed by the supervisor once the handler
//! returned), and a granted slot becomes a [`FilePut`] the data plane streams from the file;
//! at most [`FILE_TRANSFERS`] files are in flight at once. When every file is stored, the
//! result is the list of references — small, inline unless it is over the inline limit (then
//! it goes like any large output). Anything else — no HTTP, a 1.0 dispatcher, a slot refused
//! or unanswered, an upload failed, a new session — reads the files back into a list with the
//! bytes inline ([`InlineFiles`], bounded by `max_input_size`) and sends it as any output is
//! sent without HTTP: inline if small, else in chunks. The files and the attempt's work
//! directory are handed to the driver for deletion once the result is decided.

use std::sync::Arc;

use jid::Jid;
use minidom::Element;
use spine_protocol::{
    Condition, Data, JobId, JobResult, RequestSlot, Slot, SpineError, FRAGMENTS_MIME, INLINE_LIMIT,
};
use tokio::time::Instant;
use tracing::{debug, info};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::stanza_error::StanzaError;

use super::outputs::Finished;
use super::refs::{log_once, put_window, SLOT_TIMEOUT};
use super::Core;
use crate::files::{Cleanup, OutFile, WorkDir};
use crate::store::Outcome;

/// Files of one output with a slot requested or an upload running, at most.
pub(crate) const FILE_TRANSFERS: usize = 4;

/// A fragment file to PUT to its slot: the data plane streams it from disk and calls
/// [`Core::file_put_done`] with `key` (success only on `201`).
#[derive(Debug)]
pub(crate) struct FilePut {
    pub(crate) key: u64,
    pub(crate) url: String,
    pub(crate) path: std::path::PathBuf,
    pub(crate) size: u64,
    pub(crate) mime: Option<String>,
    /// The upload ends by then (the slot's validity, bounded).
    pub(crate) deadline: Instant,
}

/// Fragment files to read back into a list with the bytes inline: the driver reads them on
/// the blocking pool (deleting them after) and calls [`Core::files_inlined`] with `key`.
#[derive(Debug)]
pub(crate) struct InlineFiles {
    pub(crate) key: u64,
    pub(crate) files: Vec<OutFile>,
}

/// A job whose fragment files are going to slots.
pub(super) struct FileOutput {
    fin: Finished,
    files: Vec<OutFile>,
    work: Option<WorkDir>,
    /// The next file to ask a slot for.
    next: usize,
    /// Files with a slot requested or an upload running.
    in_flight: usize,
    /// Files stored.
    uploaded: usize,
}

/// A job whose fragment files are being read back for the inline fallback.
pub(super) struct Inlining {
    fin: Finished,
    work: Option<WorkDir>,
}

impl Core {
    /// A handler returned fragment files: upload them to slots, or send them inline.
    pub(super) fn start_file_output(
        &mut self,
        mut fin: Finished,
        files: Vec<OutFile>,
        work: Option<WorkDir>,
        now: Instant,
    ) {
        // Whatever the handler said, the output is a fragment list.
        fin.mime = Some(FRAGMENTS_MIME.to_owned());
        self.next_id += 1;
        let key = self.next_id;
        let total: u64 = files.iter().map(|f| f.size).sum();
        info!(job = %fin.job, files = files.len(), bytes = total, "output is fragment files");
        let out = FileOutput {
            fin,
            files,
            work,
            next: 0,
            in_flight: 0,
            uploaded: 0,
        };
        let http = self.settings.http_data && self.speaks_1_1.contains(&out.fin.from_bare);
        self.file_outputs.insert(key, out);
        if total <= INLINE_LIMIT as u64 {
            // Fits the result stanza with the bytes inline: no slot is worth it.
            debug!("fragment files small enough to go inline");
            self.inline_files(key, "small enough to go inline", now);
        } else if http {
            self.pump_files(key, now);
        } else {
            let why = match self.settings.http_data {
                true => "the dispatcher does not speak protocol 1.1",
                false => "http_data is off",
            };
            self.inline_files(key, why, now);
        }
    }

    /// Asks for slots up to [`FILE_TRANSFERS`] files in flight; once all are stored, the
    /// result.
    fn pump_files(&mut self, key: u64, now: Instant) {
        let Some(o) = self.file_outputs.get_mut(&key) else {
            return;
        };
        if o.uploaded == o.files.len() {
            self.files_uploaded(key, now);
            return;
        }
        let mut requests = Vec::new();
        while o.in_flight < FILE_TRANSFERS && o.next < o.files.len() {
            let f = &o.files[o.next];
            requests.push((
                o.next,
                RequestSlot {
                    job: o.fin.job.clone(),
                    attempt: o.fin.attempt,
                    size: f.size,
                    sha256: f.sha256,
                    mime: f.mime.clone(),
                },
            ));
            o.next += 1;
            o.in_flight += 1;
        }
        let to = o.fin.to.clone();
        for (i, req) in requests {
            let iq_id = self.new_iq_id();
            self.push(Iq::from_get(iq_id.clone(), req).with_to(to.clone()));
            self.file_slot_deadlines
                .insert((now + SLOT_TIMEOUT, iq_id.clone()));
            self.file_slot_iqs.insert(iq_id, (key, i));
        }
    }

    /// The dispatcher answered the slot request of a file: PUT it there, or fall back.
    pub(super) fn on_file_slot_reply(
        &mut self,
        iq_id: &str,
        payload: Option<Element>,
        error: Option<StanzaError>,
        now: Instant,
    ) {
        let Some((key, i)) = self.file_slot_iqs.remove(iq_id) else {
            return;
        };
        self.file_slot_deadlines.retain(|(_, id)| id != iq_id);
        let Some(o) = self.file_outputs.get(&key) else {
            return;
        };
        let slot = match (error, payload) {
            (Some(e), _) => Err(match SpineError::from_stanza_error(&e) {
                Ok(Some(se)) => format!("the slot request was refused: {se}"),
                _ => format!("the slot request was refused: {:?}", e.defined_condition),
            }),
            (None, Some(el)) => Slot::try_from(el)
                .map_err(|e| format!("the slot answer is invalid: {e}"))
                .and_then(|s| match s.job == o.fin.job {
                    true => Ok(s),
                    false => Err(format!("the slot answer is for job {}", s.job)),
                }),
            (None, None) => Err("the slot answer is empty".to_owned()),
        };
        let Some(f) = o.files.get(i) else {
            return;
        };
        match slot {
            Ok(s) => {
                self.next_id += 1;
                let put_key = self.next_id;
                debug!(job = %o.fin.job, file = i, bytes = f.size, "uploading a fragment file to its slot");
                self.ready.file_puts.push(FilePut {
                    key: put_key,
                    url: s.put,
                    path: f.path.clone(),
                    size: f.size,
                    mime: f.mime.clone(),
                    deadline: now + put_window(s.expires_ms),
                });
                self.file_put_keys.insert(put_key, (key, i));
            }
            Err(why) => self.inline_files(key, &why, now),
        }
    }

    /// The data plane finished uploading a fragment file: the next one, or fall back.
    pub(crate) fn file_put_done(&mut self, put_key: u64, result: Result<(), String>, now: Instant) {
        if self.event_put_done(put_key, &result, now) {
            return;
        }
        let Some((key, _)) = self.file_put_keys.remove(&put_key) else {
            return;
        };
        match result {
            Ok(()) => {
                if let Some(o) = self.file_outputs.get_mut(&key) {
                    o.in_flight -= 1;
                    o.uploaded += 1;
                }
                self.pump_files(key, now);
            }
            Err(why) => self.inline_files(key, &format!("the upload failed: {why}"), now),
        }
    }

    /// Every file is stored: the result is the list naming them.
    fn files_uploaded(&mut self, key: u64, now: Instant) {
        let Some(o) = self.file_outputs.remove(&key) else {
            return;
        };
        self.upload_warned.remove(&o.fin.from_bare);
        let list = crate::files::reference_list(&o.files);
        info!(job = %o.fin.job, files = o.files.len(), list_bytes = list.len(), "fragment files uploaded over HTTP");
        self.clean_up(o.work, o.files);
        let mut fin = o.fin;
        fin.bytes = Arc::new(list);
        if fin.bytes.len() > INLINE_LIMIT {
            // A long list goes like any large output; HTTP just worked.
            self.request_slot(fin, now);
        } else {
            self.finish_list_inline(fin, now);
        }
        self.check_end();
    }

    /// Uploading over HTTP is not possible for this output: stop its transfers and read the
    /// files back into a list with the bytes inline, if they fit `max_input_size`.
    fn inline_files(&mut self, key: u64, why: &str, now: Instant) {
        let Some(o) = self.file_outputs.remove(&key) else {
            return;
        };
        self.stop_file_transfers(key);
        let total: u64 = o.files.iter().map(|f| f.size).sum();
        let max = self.settings.max_input_size;
        if total > max {
            let text = format!(
                "the output's {} fragment files take {total} bytes: they could not be uploaded over HTTP ({why}), and inline they are over this agent's max_input_size ({max}); let the agent reach the dispatcher's HTTP port (http_data, protocol 1.1) or raise max_input_size",
                o.files.len()
            );
            log_once(&mut self.upload_warned, &o.fin.from_bare, &text);
            self.clean_up(o.work, o.files);
            let e = SpineError::new(Condition::Failed).with_text(text);
            self.finish(o.fin.job, Outcome::Error(e), o.fin.waiters, now);
            self.check_end();
            return;
        }
        if total > INLINE_LIMIT as u64 {
            log_once(
                &mut self.upload_warned,
                &o.fin.from_bare,
                &format!("uploading fragment files over HTTP: {why}; sending them inline"),
            );
        }
        self.ready.inlines.push(InlineFiles {
            key,
            files: o.files,
        });
        self.inlining.insert(
            key,
            Inlining {
                fin: o.fin,
                work: o.work,
            },
        );
    }

    /// The files of output `key` were read back (and deleted): send the list, inline if
    /// small, else in chunks.
    pub(crate) fn files_inlined(
        &mut self,
        key: u64,
        result: Result<Vec<u8>, String>,
        now: Instant,
    ) {
        let Some(i) = self.inlining.remove(&key) else {
            return;
        };
        self.clean_up(i.work, Vec::new());
        let mut fin = i.fin;
        match result {
            Ok(list) if list.len() > INLINE_LIMIT => {
                fin.bytes = Arc::new(list);
                self.start_upload(fin, now);
            }
            Ok(list) => {
                fin.bytes = Arc::new(list);
                self.finish_list_inline(fin, now);
            }
            Err(why) => {
                let e = SpineError::new(Condition::Retryable).with_text(why);
                self.finish(fin.job, Outcome::Error(e), fin.waiters, now);
            }
        }
        self.check_end();
    }

    /// The result with the list inline.
    fn finish_list_inline(&mut self, fin: Finished, now: Instant) {
        let res = JobResult {
            job: fin.job.clone(),
            attempt: fin.attempt,
            elapsed_ms: Some(fin.elapsed_ms),
            meta: fin.meta,
            output: Some(Data::Inline {
                mime: fin.mime,
                bytes: Arc::unwrap_or_clone(fin.bytes),
            }),
        };
        self.finish(fin.job, Outcome::Result(res), fin.waiters, now);
    }

    /// Slot requests of files unanswered for [`SLOT_TIMEOUT`]: their outputs go inline.
    pub(super) fn file_slot_timeouts(&mut self, now: Instant) {
        while let Some((t, id)) = self.file_slot_deadlines.first().cloned() {
            if t > now {
                break;
            }
            self.file_slot_deadlines.remove(&(t, id.clone()));
            if let Some((key, _)) = self.file_slot_iqs.remove(&id) {
                let why = format!("no answer to the slot request within {SLOT_TIMEOUT:?}");
                self.inline_files(key, &why, now);
            }
        }
    }

    /// A new session: the answers to the old one's slot requests are lost.
    pub(super) fn file_slots_lost(&mut self, now: Instant) {
        let keys: Vec<u64> = self.file_slot_iqs.values().map(|(k, _)| *k).collect();
        for key in keys {
            self.inline_files(key, "the session restarted before the slot answer", now);
        }
    }

    /// A cancel of a job whose fragment files are on their way: its uploads stop, its files
    /// are deleted and it is answered `cancelled` (a long upload of a large split is not
    /// finished for nothing). False if no files of that job are on their way.
    pub(super) fn cancel_file_output(&mut self, job: &JobId, now: Instant) -> bool {
        let Some(key) = self
            .file_outputs
            .iter()
            .find(|(_, o)| &o.fin.job == job)
            .map(|(k, _)| *k)
        else {
            return false;
        };
        self.stop_file_transfers(key);
        let Some(o) = self.file_outputs.remove(&key) else {
            return false;
        };
        info!(job = %job, "cancelled while its fragment files were being uploaded");
        self.clean_up(o.work, o.files);
        let e = SpineError::new(Condition::Cancelled).with_text("cancelled by the dispatcher");
        self.finish(o.fin.job, Outcome::Error(e), o.fin.waiters, now);
        self.check_end();
        true
    }

    /// Forgets the slot requests of output `key` and aborts its uploads.
    fn stop_file_transfers(&mut self, key: u64) {
        let puts: Vec<u64> = self
            .file_put_keys
            .iter()
            .filter(|(_, (k, _))| *k == key)
            .map(|(p, _)| *p)
            .collect();
        for p in puts {
            self.file_put_keys.remove(&p);
            self.ready.aborts.push(p);
        }
        let iqs: Vec<String> = self
            .file_slot_iqs
            .iter()
            .filter(|(_, (k, _))| *k == key)
            .map(|(id, _)| id.clone())
            .collect();
        for id in iqs {
            self.file_slot_iqs.remove(&id);
            self.file_slot_deadlines.retain(|(_, i)| *i != id);
        }
    }

    /// Deletes a work directory and files off the connection task.
    pub(super) fn clean_up(&mut self, work: Option<WorkDir>, files: Vec<OutFile>) {
        if let Some(w) = work {
            self.ready.cleanups.push(Cleanup::Dir(w));
        }
        if !files.is_empty() {
            self.ready.cleanups.push(Cleanup::Files(files));
        }
    }

    /// A repeated job id whose fragment files are on their way waits for the same result;
    /// the request comes back when none are for that job.
    pub(super) fn attach_to_file_output(
        &mut self,
        job: &JobId,
        from: Jid,
        iq_id: String,
    ) -> Option<(Jid, String)> {
        let waiters = match self.file_outputs.values_mut().find(|o| &o.fin.job == job) {
            Some(o) => &mut o.fin.waiters,
            None => match self.inlining.values_mut().find(|i| &i.fin.job == job) {
                Some(i) => &mut i.fin.waiters,
                None => return Some((from, iq_id)),
            },
        };
        debug!(job = %job, "duplicate of a job sending its fragment files: attached");
        waiters.push((from, iq_id));
        None
    }
}
