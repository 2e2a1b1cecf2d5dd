//! A test-side dispatcher: a real XMPP client that speaks docs/PROTOCOL.md with the
//! `spine-protocol` types, to drive agents before (and besides) the real dispatcher. It keeps
//! every stanza it did not consume in a backlog, acknowledges `<chunk/>` uploads and assembles
//! their blobs.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use jid::{BareJid, Jid};
use sha2::{Digest, Sha256};
use spine_protocol::{
    presence_payloads, Advertise, Chunk, Data, DispatcherHello, Job, JobResult, Load,
};
use spine_xmpp::Connection;
use tokio::time::Instant;
use tokio_xmpp::stanzastream::Event;
use tokio_xmpp::Stanza;
use xmpp_parsers::iq::Iq;
use xmpp_parsers::presence::Presence;
use xmpp_parsers::stanza_error::StanzaError;

use crate::PATIENCE;

/// A load report as received.
#[derive(Debug, Clone)]
pub struct SeenLoad {
    /// The agent's full JID.
    pub from: Jid,
    /// The report.
    pub load: Load,
    /// When it arrived.
    pub at: Instant,
}

/// The test dispatcher.
pub struct TestDispatcher {
    /// The connection.
    pub conn: Connection,
    backlog: VecDeque<Stanza>,
    blobs: HashMap<String, Vec<u8>>,
    next: u64,
}

impl TestDispatcher {
    /// Wraps a logged-in connection (initial presence is sent here).
    pub async fn new(conn: Connection) -> Self {
        conn.send(Presence::available()).await;
        TestDispatcher {
            conn,
            backlog: VecDeque::new(),
            blobs: HashMap::new(),
            next: 0,
        }
    }

    /// The dispatcher's full JID.
    pub fn jid(&self) -> Jid {
        self.conn.jid().clone().into()
    }

    /// Sends a `<dispatcher/>` hello to `agent` (bare or full).
    pub async fn hello(&self, agent: &Jid) {
        self.conn
            .send(
                Presence::available()
                    .with_to(agent.clone())
                    .with_payload(DispatcherHello::default()),
            )
            .await;
    }

    /// Pulls the next stanza from the connection, handling chunk uploads on the way.
    async fn pull(&mut self, deadline: Instant) -> Option<Stanza> {
        loop {
            match tokio::time::timeout_at(deadline, self.conn.next()).await {
                Ok(Some(Event::Stanza(Stanza::Iq(Iq::Set {
                    id,
                    from: Some(from),
                    payload,
                    ..
                }))))
                    if payload.is("chunk", spine_protocol::NS) =>
                {
                    match Chunk::try_from(payload) {
                        Ok(c) => {
                            let buf = self
                                .blobs
                                .entry(c.blob.to_string())
                                .or_insert_with(|| vec![0; c.total as usize]);
                            let start = c.offset as usize;
                            buf[start..start + c.bytes.len()].copy_from_slice(&c.bytes);
                            self.conn.send(Iq::empty_result(from, id)).await;
                        }
                        Err(e) => {
                            self.conn
                                .send(
                                    Iq::from_error(id, StanzaError::from(e.to_spine_error()))
                                        .with_to(from),
                                )
                                .await;
                        }
                    }
                }
                Ok(Some(Event::Stanza(st))) => return Some(st),
                // A new session after a reconnect: available again, or bare-JID presence
                // (agents' advertisements) would not reach us.
                Ok(Some(Event::Stream(tokio_xmpp::stanzastream::StreamEvent::Reset {
                    ..
                }))) => {
                    self.conn.send(Presence::available()).await;
                }
                Ok(Some(Event::Stream(_))) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Waits for the first stanza (backlog first) that `pick` accepts; others stay queued.
    pub async fn wait_for<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&Stanza) -> Option<T>,
    ) -> T {
        self.try_wait_for(PATIENCE, &mut pick)
            .await
            .unwrap_or_else(|| panic!("no {what} within {PATIENCE:?}"))
    }

    /// Like [`wait_for`](Self::wait_for) with a timeout; `None` if nothing matched.
    pub async fn try_wait_for<T>(
        &mut self,
        within: Duration,
        mut pick: impl FnMut(&Stanza) -> Option<T>,
    ) -> Option<T> {
        if let Some(i) = self.backlog.iter().position(|st| pick(st).is_some()) {
            let st = self.backlog.remove(i)?;
            return pick(&st);
        }
        let deadline = Instant::now() + within;
        loop {
            let st = self.pull(deadline).await?;
            if let Some(v) = pick(&st) {
                return Some(v);
            }
            self.backlog.push_back(st);
        }
    }

    /// Waits for an advertisement from the account `agent`.
    pub async fn wait_advertise(&mut self, agent: &BareJid) -> (Jid, Advertise, Load) {
        self.wait_for("advertisement", |st| match st {
            Stanza::Presence(p) if p.from.as_ref().is_some_and(|f| f.to_bare() == *agent) => {
                let found = presence_payloads(&p.payloads).ok()?;
                Some((p.from.clone()?, found.advertise?, found.load?))
            }
            _ => None,
        })
        .await
    }

    /// Waits for a load report from `agent` that satisfies `pred`.
    pub async fn wait_load(
        &mut self,
        agent: &BareJid,
        mut pred: impl FnMut(&Load) -> bool,
    ) -> SeenLoad {
        self.wait_for("load report", |st| match st {
            Stanza::Presence(p) if p.from.as_ref().is_some_and(|f| f.to_bare() == *agent) => {
                let load = presence_payloads(&p.payloads).ok()?.load?;
                let from = p.from.clone()?;
                pred(&load).then(|| SeenLoad {
                    from,
                    load,
                    at: Instant::now(),
                })
            }
            _ => None,
        })
        .await
    }

    /// Sends a job; returns the IQ id to wait on.
    pub async fn send_job(&mut self, to: &Jid, job: Job) -> String {
        self.next += 1;
        let id = format!("job-{}", self.next);
        self.conn
            .send(Iq::from_set(id.clone(), job).with_to(to.clone()))
            .await;
        id
    }

    /// Sends any IQ set payload; returns the IQ id.
    pub async fn send_set(
        &mut self,
        to: &Jid,
        payload: impl xmpp_parsers::iq::IqSetPayload,
    ) -> String {
        self.next += 1;
        let id = format!("set-{}", self.next);
        self.conn
            .send(Iq::from_set(id.clone(), payload).with_to(to.clone()))
            .await;
        id
    }

    /// Waits for the reply to IQ `id`: the payload of a result (if any) or the error.
    pub async fn wait_reply(&mut self, id: &str) -> Result<Option<minidom::Element>, StanzaError> {
        self.wait_for(&format!("reply to {id}"), |st| match st {
            Stanza::Iq(Iq::Result {
                id: got, payload, ..
            }) if got == id => Some(Ok(payload.clone())),
            Stanza::Iq(Iq::Error { id: got, error, .. }) if got == id => Some(Err(error.clone())),
            _ => None,
        })
        .await
    }

    /// Waits for a job's result; a blob output is replaced by its assembled bytes (after the
    /// sha256 and size are checked).
    pub async fn wait_result(&mut self, id: &str) -> Result<JobResult, StanzaError> {
        let payload = self.wait_reply(id).await?;
        let mut r = JobResult::try_from(payload.expect("result payload")).expect("valid <result/>");
        if let Some(Data::Blob(b)) = &r.output {
            let bytes = self
                .blobs
                .remove(b.blob.as_str())
                .expect("blob chunks arrived before the result");
            assert_eq!(bytes.len() as u64, b.size, "blob size");
            let digest: [u8; 32] = Sha256::digest(&bytes).into();
            assert_eq!(digest, b.sha256, "blob sha256");
            r.output = Some(Data::Inline {
                mime: b.mime.clone(),
                bytes,
            });
        }
        Ok(r)
    }
}
