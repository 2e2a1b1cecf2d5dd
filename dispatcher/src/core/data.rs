//! The fast path for large payloads (protocol 1.1, PROTOCOL.md §13.4): agents that announced
//! 1.1 get a large input as a reference — its size, SHA-256 and a signed, expiring URL of
//! this dispatcher's HTTP API — instead of chunks, and upload a large output to a slot this
//! dispatcher grants before referring to it in their result.
//!
//! Part of the [`Core`](super::Core): placement asks [`Core::input_reference`] whether a
//! stored input may go by reference to an agent; an agent's `fetch-failed` sends the same job
//! again in chunks ([`Core::fetch_failed`]) and that agent gets chunks for
//! [`CHUNKS_AFTER_FETCH_FAILED`]; `<request-slot/>` is answered here; the HTTP side reports a
//! filled slot ([`Core::slot_filled`]) before the agent's result, which
//! [`Core::slot_output`] then resolves. Signing is pure (a key and the time given,
//! [`crate::signing`]), so the core stays free of I/O; the HTTP side parses and checks the
//! same grants.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jid::{BareJid, FullJid, Jid};
use spine_protocol::fragments::{self, Fragment};
use spine_protocol::{Condition, DataRef, JobId, RequestSlot, Slot, SpineError};
use tracing::{info, warn};
use xmpp_parsers::iq::Iq;

use super::{Core, Now};
use crate::blobs::Stored;
use crate::signing::{BlobGrant, UploadGrant, UrlKey};

/// How long an agent whose fetch failed gets chunks before HTTP is tried again.
pub(crate) const CHUNKS_AFTER_FETCH_FAILED: Duration = Duration::from_secs(600);

/// What the core needs to hand out URLs: where agents reach this dispatcher's HTTP API, the
/// key that signs, and how long a URL is valid.
#[derive(Clone)]
pub(crate) struct DataPlane {
    /// The API's base URL as agents reach it (`public_url`), without a trailing slash.
    pub base: String,
    /// The signing key.
    pub key: Arc<UrlKey>,
    /// Lifetime of a signed URL.
    pub ttl: Duration,
}

/// What the core knows of an agent that announced 1.1.
#[derive(Debug, Default)]
pub(crate) struct AgentData {
    /// After a failed fetch: chunks until then.
    chunks_until: Option<Instant>,
    /// The base URL where it serves the outputs it keeps (`data_listen`, §13.5).
    serves: Option<String>,
    /// It announced 1.2: it answers `<recall/>` (§10.1).
    pub(super) recalls: bool,
}

/// An upload slot granted: what the agent said it will put there, and whether it did.
#[derive(Debug)]
pub(crate) struct Granted {
    agent: BareJid,
    want: Stored,
    filled: bool,
}

impl DataPlane {
    fn exp(&self, now: Now) -> u64 {
        (now.ms / 1000).saturating_add(self.ttl.as_secs().max(1))
    }

    /// A signed URL for `agent` to fetch `blob`, the input of `job`.
    fn fetch_url(&self, blob: &Stored, job: &JobId, agent: &BareJid, now: Now) -> String {
        let grant = BlobGrant {
            sha256: blob.sha256,
            job: job.clone(),
            agent: agent.clone(),
        };
        grant.url(&self.base, self.exp(now), &self.key)
    }

    /// A signed upload URL for `agent`'s output of `job`'s attempt.
    fn put_url(
        &self,
        job: &JobId,
        attempt: u64,
        agent: &BareJid,
        want: &Stored,
        now: Now,
    ) -> String {
        let grant = UploadGrant {
            job: job.clone(),
            agent: agent.clone(),
            attempt,
            size: want.size,
            sha256: want.sha256,
        };
        grant.url(&self.base, self.exp(now), &self.key)
    }
}

impl Core {
    /// A signed URL for `agent` to put the bytes of an event (PROTOCOL.md §11.9.1), and how
    /// long it is valid (ms); `None` without a data plane.
    pub(super) fn event_slot_url(
        &self,
        agent: &BareJid,
        want: &Stored,
        now: Now,
    ) -> Option<(String, u64)> {
        let dp = self.data.as_ref()?;
        let job: JobId = super::events::EVENT_UPLOADS.parse().ok()?;
        Some((
            dp.put_url(&job, 0, agent, want, now),
            dp.ttl.as_millis() as u64,
        ))
    }

    /// Turns the fast path on: `<dispatcher protocol='1.1'/>` hellos, references, slots.
    pub(crate) fn set_data_plane(&mut self, dp: DataPlane) {
        info!(base = %dp.base, "large payloads go by reference to agents that fetch over HTTP");
        self.data = Some(dp);
    }

    /// Whether `agent` announced 1.2 to this dispatcher, which announces it too: it tells a
    /// new leader which jobs it has (`<recall/>`, [`super::recall`]).
    pub(super) fn recalls(&self, agent: &jid::FullJid) -> bool {
        self.http_agents.get(agent).is_some_and(|a| a.recalls)
    }

    /// Whether this dispatcher offers the fast path (and announces 1.1).
    pub(super) fn offers_references(&self) -> bool {
        self.data.is_some()
    }

    /// An agent announced its protocol version: 1.1 agents can fetch and upload over HTTP.
    /// `new`: it was just registered (or restarted), so it gets a hello telling it our
    /// version, which it answers with its advertisement.
    pub(super) fn agent_version(
        &mut self,
        agent: &FullJid,
        minor: u32,
        serves: Option<String>,
        new: bool,
    ) {
        if minor < 1 || !self.offers_references() {
            self.http_agents.remove(agent);
            return;
        }
        let a = self.http_agents.entry(agent.clone()).or_default();
        a.recalls = minor >= 2;
        if a.serves != serves {
            if let Some(s) = &serves {
                info!(agent = %agent, url = %s, "agent keeps map outputs and serves them itself");
            }
            a.serves = serves;
        }
        if new {
            self.hello(Jid::from(agent.clone()));
        }
    }

    /// The reference form of a stored input for `agent`, if it may fetch it over HTTP.
    pub(super) fn input_reference(
        &self,
        blob: &Stored,
        mime: Option<String>,
        job: &JobId,
        agent: &FullJid,
        now: Now,
    ) -> Option<DataRef> {
        if !self.fetches_over_http(agent, now) {
            return None;
        }
        let dp = self.data.as_ref()?;
        Some(DataRef {
            size: blob.size,
            sha256: blob.sha256,
            mime,
            sources: vec![dp.fetch_url(blob, job, &agent.to_bare(), now)],
        })
    }

    /// Whether `agent` gets this job's stored data by reference now: this dispatcher offers
    /// HTTP, the agent fetches over it, and it has not failed a fetch lately.
    fn fetches_over_http(&self, agent: &FullJid, now: Now) -> bool {
        self.data.is_some()
            && self
                .http_agents
                .get(agent)
                .is_some_and(|a| a.chunks_until.is_none_or(|t| now.mono >= t))
    }

    /// The `<keep/>` of a job for `agent`: when it serves kept outputs (`data_listen`) and
    /// fetches over HTTP, the key its URLs are checked with (PROTOCOL.md §13.5).
    pub(super) fn keep_for(&self, agent: &FullJid, now: Now) -> Option<spine_protocol::Keep> {
        let dp = self.data.as_ref()?;
        self.http_agents.get(agent)?.serves.as_ref()?;
        if !self.fetches_over_http(agent, now) {
            return None;
        }
        Some(spine_protocol::Keep {
            key: dp.key.for_holder(&agent.to_bare()).to_bytes(),
        })
    }

    /// Whether `url` is one `agent` may name for an output it kept: `{serves}/v1/blobs/{hex}`
    /// of the hash and under the base it advertised.
    pub(super) fn kept_url_ok(&self, agent: &FullJid, url: &str, sha256: &[u8; 32]) -> bool {
        self.http_agents
            .get(agent)
            .and_then(|a| a.serves.as_deref())
            .is_some_and(|base| {
                url == format!("{base}/v1/blobs/{}", spine_protocol::data::hex(sha256))
            })
    }

    /// The agent (bare JID) that serves `base` now, if it is connected.
    fn holder_of(&self, base: &str) -> Option<BareJid> {
        self.http_agents
            .iter()
            .find(|(_, a)| a.serves.as_deref() == Some(base))
            .map(|(j, _)| j.to_bare())
    }

    /// A fragment list that names blobs (a reduce step's map outputs, PROTOCOL.md §11.7.1) as
    /// `agent` gets it in `job`: every reference with a signed URL when the agent fetches
    /// over HTTP, otherwise each blob's bytes inline, read from the store here (at most
    /// `max_blob` of them, what chunks carry).
    ///
    /// A reference to an output an agent keeps (§13.5) gets a URL to that agent signed with
    /// its key; it cannot be inlined, so an agent that does not fetch over HTTP, or a holder
    /// no longer connected, is `fetch-failed`, and the caller runs the map steps again
    /// ([`Core::kept_lost`]).
    pub(super) fn fragments_for(
        &self,
        list: &[u8],
        job: &JobId,
        agent: &FullJid,
        now: Now,
    ) -> Result<Vec<u8>, SpineError> {
        let failed = |text: String| SpineError::new(Condition::Failed).with_text(text);
        let mut frags = fragments::decode(list).map_err(|e| failed(format!("input: {e}")))?;
        let lost = |text: String| SpineError::new(Condition::FetchFailed).with_text(text);
        if let (true, Some(dp)) = (self.fetches_over_http(agent, now), self.data.as_ref()) {
            let bare = agent.to_bare();
            for r in frags.iter_mut().filter_map(|f| f.source.as_mut()) {
                let b = Stored {
                    sha256: r.sha256,
                    size: r.size,
                };
                r.url = Some(match r.url.take() {
                    None => dp.fetch_url(&b, job, &bare, now),
                    Some(kept) => {
                        let base = kept
                            .strip_suffix(&format!("/v1/blobs/{}", b.hex()))
                            .unwrap_or(&kept);
                        let holder = self.holder_of(base).ok_or_else(|| {
                            lost(format!("the agent serving {base} is not connected"))
                        })?;
                        let grant = BlobGrant {
                            sha256: b.sha256,
                            job: job.clone(),
                            agent: bare.clone(),
                        };
                        grant.url(base, dp.exp(now), &dp.key.for_holder(&holder))
                    }
                });
            }
            return Ok(fragments::encode(&frags));
        }
        if frags
            .iter()
            .any(|f| f.source.as_ref().is_some_and(|r| r.url.is_some()))
        {
            return Err(lost(format!(
                "{agent} does not fetch over HTTP, and agents keep some of this step's inputs"
            )));
        }
        let total: u64 = frags.iter().map(Fragment::size).sum();
        let max = self.cfg.max_blob.as_u64();
        if total > max {
            return Err(SpineError::new(Condition::TooLarge).with_text(format!(
                "the input's fragments take {total} bytes, over max_blob ({max}), the most sent in chunks, and {agent} does not fetch over HTTP (protocol 1.1, PROTOCOL.md §13.4)"
            )));
        }
        for f in &mut frags {
            if let Some(r) = f.source.take() {
                let b = Stored {
                    sha256: r.sha256,
                    size: r.size,
                };
                f.data = self.blob_store.read(&b).map_err(|e| {
                    failed(format!(
                        "fragment {} cannot be read from the dispatcher's blob store: {e}",
                        b.hex()
                    ))
                })?;
            }
        }
        Ok(fragments::encode(&frags))
    }

    /// The reference form of a job's stored output for the XMPP submitter `to`, if the job
    /// was submitted with `refs='true'` and this dispatcher offers references.
    pub(super) fn output_reference(
        &self,
        rec: &crate::jobs::JobRecord,
        to: &Jid,
        now: Now,
    ) -> Option<DataRef> {
        let dp = self.data.as_ref()?;
        if !rec.spec.output_refs {
            return None;
        }
        let Some(crate::jobs::Recorded::Succeeded {
            output: crate::jobs::Body::Stored(b),
            mime,
            ..
        }) = &rec.outcome
        else {
            return None;
        };
        Some(DataRef {
            size: b.size,
            sha256: b.sha256,
            mime: mime.clone(),
            sources: vec![dp.fetch_url(b, &rec.id, &to.to_bare(), now)],
        })
    }

    /// An agent could not fetch an input: it gets chunks for a while (logged once until
    /// then), and this job goes to it again at once, in chunks, as the same attempt.
    pub(super) fn fetch_failed(&mut self, job: &JobId, agent: &FullJid, why: &str, now: Now) {
        let a = self.http_agents.entry(agent.clone()).or_default();
        if a.chunks_until.is_none_or(|t| now.mono >= t) {
            warn!(agent = %agent, "agent could not fetch an input over HTTP ({why}): it gets chunks for {} s", CHUNKS_AFTER_FETCH_FAILED.as_secs());
        }
        a.chunks_until = Some(now.mono + CHUNKS_AFTER_FETCH_FAILED);
        self.send_job(job, agent, now);
    }

    /// `<request-slot/>` from an agent: a signed upload URL for its output, if the job runs
    /// on that agent in that attempt. An attempt may hold several slots, one per distinct
    /// SHA-256: a split step uploads each fragment file to a slot of its own and then answers
    /// with a fragment list naming them (PROTOCOL.md §13.4). Asking again for the same bytes
    /// grants the same slot anew.
    pub(super) fn on_request_slot(&mut self, from: Jid, id: String, r: RequestSlot, now: Now) {
        let refuse = |c: Condition, text: String| SpineError::new(c).with_text(text);
        let Some(dp) = self.data.as_ref() else {
            let e = refuse(
                Condition::Malformed,
                "this dispatcher offers no upload slots (no public_url for its HTTP API): send the output in chunks".into(),
            );
            return self.reply_error(from, id, e);
        };
        let runs_here = self.jobs.get(&r.job).is_some_and(|j| {
            !j.state.is_final()
                && j.attempts == r.attempt
                && j.agent
                    .as_ref()
                    .is_some_and(|a| a.as_str() == from.as_str())
        });
        if !runs_here {
            let e = refuse(
                Condition::UnknownJob,
                format!(
                    "job {} attempt {} is not running on {from}",
                    r.job, r.attempt
                ),
            );
            return self.reply_error(from, id, e);
        }
        let max = self.cfg.max_input.as_u64();
        if r.size > max {
            let mut e = SpineError::new(Condition::TooLarge).with_text(format!(
                "an output of {} bytes is over this dispatcher's limit of {max} (max_input)",
                r.size
            ));
            e.max = Some(max);
            return self.reply_error(from, id, e);
        }
        let want = Stored {
            sha256: r.sha256,
            size: r.size,
        };
        let agent = from.to_bare();
        let put = dp.put_url(&r.job, r.attempt, &agent, &want, now);
        let expires_ms = dp.ttl.as_millis() as u64;
        self.slots.insert(
            (r.job.clone(), r.attempt, r.sha256),
            Granted {
                agent,
                want,
                filled: false,
            },
        );
        let slot = Slot {
            job: r.job,
            put,
            expires_ms,
        };
        self.send(Iq::from_result(id, Some(slot)).with_to(from));
    }

    /// The HTTP side stored the bytes of a slot (their size and hash checked against what
    /// was signed): the agent's result may refer to them now.
    pub(super) fn slot_filled(
        &mut self,
        job: &JobId,
        attempt: u64,
        agent: &str,
        got: Stored,
    ) -> Result<(), SpineError> {
        // Attempts count from 1: attempt 0 is an event slot (PROTOCOL.md §11.9.1).
        if attempt == 0 && job.as_str() == super::events::EVENT_UPLOADS {
            return self.event_slot_filled(agent, got);
        }
        match self.slots.get_mut(&(job.clone(), attempt, got.sha256)) {
            Some(g) if g.agent.as_str() == agent && g.want == got => {
                g.filled = true;
                Ok(())
            }
            _ => Err(SpineError::new(Condition::UnknownJob).with_text(format!(
                "no upload slot for job {job} attempt {attempt} (the attempt ended, or the slot was never granted)"
            ))),
        }
    }

    /// The output a result refers to by reference without sources: the bytes put to this
    /// attempt's slot, if they were put and match.
    pub(super) fn slot_output(
        &mut self,
        job: &JobId,
        attempt: u64,
        r: &DataRef,
    ) -> Result<Stored, String> {
        let got = Stored {
            sha256: r.sha256,
            size: r.size,
        };
        match self.slots.remove(&(job.clone(), attempt, got.sha256)) {
            Some(g) if g.filled && g.want == got && self.blob_store.contains(&got) => Ok(got),
            Some(g) if !g.filled => {
                Err("the output was not uploaded to its slot before the result".into())
            }
            Some(_) => Err("the output's size or hash differs from what was uploaded".into()),
            None => Err("no upload slot was granted for these bytes in this attempt".into()),
        }
    }

    /// Forgets the slots of a job's attempts that ended (called when it settles).
    pub(super) fn forget_slots(&mut self, job: &JobId) {
        if !self.slots.is_empty() {
            self.slots.retain(|(j, _, _), _| j != job);
        }
    }
}

/// For the core's maps: the slots granted, by job, attempt and the SHA-256 the agent named
/// (several per attempt when a split step uploads its fragment files one by one).
pub(crate) type Slots = HashMap<(JobId, u64, [u8; 32]), Granted>;
