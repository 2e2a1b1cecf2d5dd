//! The job lifecycle as a pure state machine: accepted → queued → dispatched(agent, attempt)
//! → running → succeeded | failed | cancelled | timed-out, with retries.
//!
//! The dispatcher's core feeds it events (submitted, dispatched, started, result,
//! attempt failed, agent gone, cancel, time passing) with the time as a parameter (milliseconds
//! since the UNIX epoch, so deadlines survive a restart) and acts on the decisions it returns:
//! which job to place next, which agent to tell to cancel, which jobs timed out. Each job ends
//! in exactly one recorded outcome: a second result for the same job (two agents ran it) is
//! reported as a duplicate and not recorded.
//!
//! Finished jobs stay in the table for their retention (24 h by default: hundreds of thousands
//! of them on a busy dispatcher), so nothing done per event or per tick may walk the table:
//! the [`JobTable`] keeps indexes with its records (`index`) — the queues, the jobs waiting
//! for fan-out or a map/reduce start, deadlines and retention in time order, counts for the
//! metrics, and the newest-first listing — and every change of a record goes through one step
//! that keeps them right.
//!
//! Files: `spec` (the request and its checks), `record` (the record, outcomes, errors),
//! `table` (the table, its indexed reads, retention and deadlines), `index` (the indexes and
//! the one function that moves a record's keys), `attempts` (dispatch, results, failures,
//! cancel), `all` (the `all` strategy's fan-out), `mapreduce` (map/reduce jobs).

mod all;
mod attempts;
mod body;
mod index;
mod mapreduce;
mod record;
mod spec;
mod table;
#[cfg(test)]
mod tests;

pub use body::{BlobAccess, BlobRefused, Body, Kept, MemoryBlobs};
pub use mapreduce::{Advance, MapReduceState, Straggler, Task};
pub use record::{
    backoff_ms, blame, AfterFailure, Duplicate, JobRecord, Recorded, SessionLost, Step,
    SubmitError, UnknownJob, MAX_HISTORY,
};
pub use spec::{args_wire_size, serialized_size, EventRef, JobSpec};
pub use table::{JobFilter, JobTable, Page};
