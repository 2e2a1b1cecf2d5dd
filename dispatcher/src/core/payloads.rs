//! Where the core puts payloads: bytes over the inline limit go to the blob store (through
//! the [`BlobAccess`] the driver gave the core) before any record holding them is kept, so a
//! record holds a large payload's hash and size, never its bytes; a stored payload a
//! submitter names must be in the store.
//!
//! Part of the [`Core`](super::Core): submission (both front ends), a result with a large
//! output, and map/reduce steps made from other steps' outputs come through here.

use spine_protocol::{Condition, JobId, SpineError};
use tracing::warn;

use super::Core;
use crate::jobs::{BlobRefused, Body};

impl Core {
    /// `body` as a record may hold it: inline bytes over the inline limit moved to the blob
    /// store; a stored body checked to be there. `field` names it in errors.
    pub(super) fn keep_body(&mut self, body: Body, field: &str) -> Result<Body, SpineError> {
        match body {
            Body::Stored(s) if !self.blob_store.contains(&s) => {
                Err(SpineError::new(Condition::BadArguments)
                    .with_field(field)
                    .with_text(format!(
                        "blob {} ({} bytes) is not in the dispatcher's blob store (never uploaded, or deleted when no job held it): upload it again",
                        s.hex(),
                        s.size
                    )))
            }
            Body::Inline(bytes) if bytes.len() > spine_protocol::INLINE_LIMIT => {
                match self.blob_store.put(&bytes) {
                    Ok(s) => Ok(Body::Stored(s)),
                    Err(e) => Err(storage_refused(e, field, bytes.len() as u64)),
                }
            }
            b => Ok(b),
        }
    }

    /// The new steps of a map/reduce job whose inputs (other steps' outputs put together) are
    /// over the inline limit get them stored. One whose input the store refuses (its quota)
    /// keeps it inline, in the job store's table of inputs, as before the blob store existed:
    /// a running map/reduce job is not failed for it.
    pub(super) fn keep_step_inputs(&mut self, created: &[JobId]) {
        for id in created {
            let Some(input) = self
                .jobs
                .get(id)
                .filter(|j| j.spec.input.is_oversized())
                .map(|j| j.spec.input.clone())
            else {
                continue;
            };
            match self.keep_body(input, "input") {
                Ok(b) => self.jobs.set_input(id, b),
                Err(e) => warn!(job = %id, "step input kept in the job store: {e}"),
            }
        }
    }
}

/// The error for bytes the blob store refused.
pub(super) fn storage_refused(e: BlobRefused, field: &str, size: u64) -> SpineError {
    match e {
        BlobRefused::Quota(why) => SpineError::new(Condition::Busy)
            .with_field(field)
            .with_text(format!("{size} bytes not stored: {why}")),
        BlobRefused::Io(why) => SpineError::new(Condition::Retryable)
            .with_field(field)
            .with_text(format!("{size} bytes not stored: {why}")),
    }
}
