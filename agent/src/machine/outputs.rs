//! Outputs over the inline limit: the part of [`Core`] that uploads a finished job's output to
//! its dispatcher as a blob, at most [`CHUNK_WINDOW`] chunks unacknowledged
//! ([`UploadWindow`], shared with the dispatcher), and answers the job's waiting IQs with a
//! result referring to the blob once the last chunk is acknowledged (docs/PROTOCOL.md §13).
//! A refused chunk fails the job with `retryable`; a new session starts every upload over.
//! This is also where an output goes whose upload over HTTP failed (`refs`).

use std::sync::Arc;

use jid::{BareJid, Jid};
use rand::Rng as _;
use sha2::{Digest, Sha256};
use spine_protocol::{
    Args, BlobId, BlobRef, Condition, Data, JobId, JobResult, SpineError, UploadWindow,
};
use tokio::time::Instant;
use tracing::debug;
use xmpp_parsers::iq::Iq;
use xmpp_parsers::stanza_error::StanzaError;

use super::{Core, CHUNK_WINDOW};
use crate::store::Outcome;

/// A job that succeeded with an output over the inline limit, on its way to the dispatcher
/// (over HTTP, or in chunks).
pub(super) struct Finished {
    pub(super) job: JobId,
    pub(super) attempt: u64,
    pub(super) elapsed_ms: u64,
    pub(super) meta: Args,
    pub(super) mime: Option<String>,
    pub(super) bytes: Arc<Vec<u8>>,
    /// The dispatcher's full JID (the job IQ's sender).
    pub(super) to: Jid,
    pub(super) from_bare: BareJid,
    /// IQs waiting for the outcome.
    pub(super) waiters: Vec<(Jid, String)>,
}

/// A finished job whose output is being uploaded in chunks before its result can be sent.
pub(super) struct Upload {
    to: Jid,
    window: UploadWindow,
    job: JobId,
    result: JobResult,
    waiters: Vec<(Jid, String)>,
}

impl Core {
    /// Output over the inline limit: send it as a blob (chunks, windowed), then the result.
    pub(super) fn start_upload(&mut self, f: Finished, now: Instant) {
        let blob: BlobId = format!("out-{:032x}", self.rng.random::<u128>())
            .parse()
            .expect("generated blob id is valid");
        let sha256: [u8; 32] = Sha256::digest(f.bytes.as_slice()).into();
        let size = f.bytes.len();
        let result = JobResult {
            job: f.job.clone(),
            attempt: f.attempt,
            elapsed_ms: Some(f.elapsed_ms),
            meta: f.meta,
            output: Some(Data::Blob(BlobRef {
                blob: blob.clone(),
                size: size as u64,
                sha256,
                mime: f.mime,
            })),
        };
        debug!(job = %f.job, bytes = size, "uploading output as blob {blob}");
        let window = UploadWindow::new(blob, f.bytes, CHUNK_WINDOW);
        self.next_id += 1;
        let key = self.next_id;
        self.uploads.insert(
            key,
            Upload {
                to: f.to,
                window,
                job: f.job,
                result,
                waiters: f.waiters,
            },
        );
        self.pump_upload(key, now);
    }

    /// Sends chunks up to the window; once all are acknowledged, the result.
    fn pump_upload(&mut self, key: u64, now: Instant) {
        let Some(u) = self.uploads.get_mut(&key) else {
            return;
        };
        let to = u.to.clone();
        let mut chunks = Vec::new();
        while let Some(c) = u.window.next_chunk() {
            chunks.push(c);
        }
        if u.window.is_complete() {
            if let Some(u) = self.uploads.remove(&key) {
                self.finish(u.job, Outcome::Result(u.result), u.waiters, now);
            }
            return;
        }
        for c in chunks {
            let id = self.new_iq_id();
            self.chunk_iqs.insert(id.clone(), key);
            self.push(Iq::from_set(id, c).with_to(to.clone()));
        }
    }

    /// A dispatcher acknowledged (or refused) a chunk of an output upload.
    pub(super) fn on_chunk_reply(&mut self, iq_id: &str, error: Option<StanzaError>, now: Instant) {
        let Some(key) = self.chunk_iqs.remove(iq_id) else {
            return;
        };
        match error {
            None => {
                if let Some(u) = self.uploads.get_mut(&key) {
                    u.window.acked();
                }
                self.pump_upload(key, now);
            }
            Some(err) => {
                if let Some(u) = self.uploads.remove(&key) {
                    self.chunk_iqs.retain(|_, k| *k != key);
                    let e = SpineError::new(Condition::Retryable).with_text(format!(
                        "uploading the output failed: {:?}",
                        err.defined_condition
                    ));
                    self.finish(u.job, Outcome::Error(e), u.waiters, now);
                }
            }
        }
    }

    /// The session was re-established: the acknowledgements of the old one are lost, so
    /// every upload starts over from its first chunk (the receiver takes a resent chunk again).
    pub(super) fn restart_uploads(&mut self, now: Instant) {
        self.chunk_iqs.clear();
        let keys: Vec<u64> = self.uploads.keys().copied().collect();
        for key in keys {
            if let Some(u) = self.uploads.get_mut(&key) {
                u.window.restart();
            }
            self.pump_upload(key, now);
        }
    }

    /// A repeated job id whose output is uploading waits for the same result; the request
    /// comes back when no upload is for that job.
    pub(super) fn attach_to_upload(
        &mut self,
        job: &JobId,
        from: Jid,
        iq_id: String,
    ) -> Option<(Jid, String)> {
        let waiters = match self.uploads.values_mut().find(|u| &u.job == job) {
            Some(u) => &mut u.waiters,
            None => match self.puts.values_mut().find(|u| &u.fin.job == job) {
                Some(u) => &mut u.fin.waiters,
                None => return Some((from, iq_id)),
            },
        };
        debug!(job = %job, "duplicate of a job uploading its output: attached");
        waiters.push((from, iq_id));
        None
    }
}
