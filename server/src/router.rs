//! The routing table: which resources of which account are connected, and how to reach each
//! session's task.
//!
//! A sharded concurrent map keyed by bare JID (dashmap), so sessions of different accounts
//! never contend for one lock; an entry is held only to clone a channel sender. Delivery uses
//! `try_send`: a session task never waits on another session's queue, so two sessions
//! sending to each other cannot deadlock, and a stuck client cannot stall its senders.

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use jid::{BareJid, FullJid};
use tokio::sync::mpsc;
use xmpp_parsers::stanza::Stanza;
use xmpp_parsers::stream_error::StreamError;

/// What the router hands a session task.
pub(crate) enum Outbound {
    /// A stanza to write to the client (boxed: a stanza is ~400 bytes, queues hold many).
    Stanza(Box<Stanza>),
    /// A stanza another client sent, written for this one ([`crate::wire`]).
    Relayed(Vec<u8>),
    /// Close the stream with this error (a newer session took the resource, shutdown).
    Close(StreamError),
}

struct Resource {
    name: String,
    conn: u64,
    tx: mpsc::Sender<Outbound>,
    /// Sent initial presence and not unavailable since.
    available: bool,
    priority: i8,
}

/// Result of handing a stanza to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Queued for the session.
    Delivered,
    /// No such session.
    Offline,
    /// The session's queue is full.
    Full,
}

#[derive(Default)]
pub(crate) struct Router {
    accounts: DashMap<BareJid, Vec<Resource>>,
    next_conn: AtomicU64,
}

fn send(tx: &mpsc::Sender<Outbound>, st: Stanza) -> Delivery {
    match tx.try_send(Outbound::Stanza(Box::new(st))) {
        Ok(()) => Delivery::Delivered,
        Err(mpsc::error::TrySendError::Full(_)) => Delivery::Full,
        Err(mpsc::error::TrySendError::Closed(_)) => Delivery::Offline,
    }
}

/// Copies a stanza (xmpp-parsers' `Stanza` is not `Clone`).
pub(crate) fn clone_stanza(st: &Stanza) -> Stanza {
    match st {
        Stanza::Iq(x) => Stanza::Iq(x.clone()),
        Stanza::Message(x) => Stanza::Message(x.clone()),
        Stanza::Presence(x) => Stanza::Presence(x.clone()),
    }
}

impl Router {
    /// A fresh connection number.
    pub(crate) fn new_conn(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Number of bound sessions.
    pub(crate) fn sessions(&self) -> usize {
        self.accounts.iter().map(|e| e.value().len()).sum()
    }

    /// Binds `full` to connection `conn`. Returns the sender of the session that held the same
    /// full JID before (the newer session wins; the caller tells the old one to close).
    pub(crate) fn bind(
        &self,
        full: &FullJid,
        conn: u64,
        tx: mpsc::Sender<Outbound>,
    ) -> Option<mpsc::Sender<Outbound>> {
        let mut entry = self.accounts.entry(full.to_bare()).or_default();
        let res = Resource {
            name: full.resource().to_string(),
            conn,
            tx,
            available: false,
            priority: 0,
        };
        match entry.iter_mut().find(|r| r.name == res.name) {
            Some(old) => Some(std::mem::replace(old, res).tx),
            None => {
                entry.push(res);
                None
            }
        }
    }

    /// Whether `full` is bound to some connection.
    #[cfg(test)]
    pub(crate) fn is_bound(&self, full: &FullJid) -> bool {
        self.accounts
            .get(&full.to_bare())
            .is_some_and(|v| v.iter().any(|r| r.name == full.resource().as_str()))
    }

    /// Removes `full` if it is still bound to `conn` (a newer session may have replaced it).
    pub(crate) fn unbind(&self, full: &FullJid, conn: u64) {
        let bare = full.to_bare();
        let now_empty = match self.accounts.get_mut(&bare) {
            Some(mut v) => {
                v.retain(|r| !(r.conn == conn && r.name == full.resource().as_str()));
                v.is_empty()
            }
            None => false,
        };
        if now_empty {
            self.accounts.remove_if(&bare, |_, v| v.is_empty());
        }
    }

    /// Records broadcast presence of a session.
    pub(crate) fn set_available(&self, full: &FullJid, conn: u64, available: bool, priority: i8) {
        if let Some(mut v) = self.accounts.get_mut(&full.to_bare()) {
            if let Some(r) = v
                .iter_mut()
                .find(|r| r.conn == conn && r.name == full.resource().as_str())
            {
                r.available = available;
                r.priority = priority;
            }
        }
    }

    /// Queues `out` for the session bound to `full`; gives it back with why when it could not
    /// be queued (the sender may then answer with an error, or try another way).
    pub(crate) fn deliver(
        &self,
        full: &FullJid,
        out: Outbound,
    ) -> Result<(), (Delivery, Outbound)> {
        let tx = self.accounts.get(&full.to_bare()).and_then(|v| {
            v.iter()
                .find(|r| r.name == full.resource().as_str())
                .map(|r| r.tx.clone())
        });
        let Some(tx) = tx else {
            return Err((Delivery::Offline, out));
        };
        tx.try_send(out).map_err(|e| match e {
            mpsc::error::TrySendError::Full(o) => (Delivery::Full, o),
            mpsc::error::TrySendError::Closed(o) => (Delivery::Offline, o),
        })
    }

    /// Hands a stanza to the session bound to `full`.
    pub(crate) fn to_full(&self, full: &FullJid, st: Stanza) -> Delivery {
        match self.deliver(full, Outbound::Stanza(Box::new(st))) {
            Ok(()) => Delivery::Delivered,
            Err((d, _)) => d,
        }
    }

    /// Presence to a bare JID: every available resource (RFC 6121 §8.5.2.1.1).
    pub(crate) fn presence_to_bare(&self, bare: &BareJid, st: Stanza) -> Delivery {
        let txs: Vec<_> = match self.accounts.get(bare) {
            Some(v) => v
                .iter()
                .filter(|r| r.available)
                .map(|r| r.tx.clone())
                .collect(),
            None => Vec::new(),
        };
        let mut result = Delivery::Offline;
        for tx in &txs {
            if send(tx, clone_stanza(&st)) == Delivery::Delivered {
                result = Delivery::Delivered;
            }
        }
        result
    }

    /// Message to a bare JID: the available resources with the highest non-negative priority
    /// (RFC 6121 §8.5.2.1.1).
    pub(crate) fn message_to_bare(&self, bare: &BareJid, st: Stanza) -> Delivery {
        let txs: Vec<_> = match self.accounts.get(bare) {
            Some(v) => {
                let best = v
                    .iter()
                    .filter(|r| r.available && r.priority >= 0)
                    .map(|r| r.priority)
                    .max();
                v.iter()
                    .filter(|r| r.available && Some(r.priority) == best)
                    .map(|r| r.tx.clone())
                    .collect()
            }
            None => Vec::new(),
        };
        let mut result = Delivery::Offline;
        for tx in &txs {
            match send(tx, clone_stanza(&st)) {
                Delivery::Delivered => result = Delivery::Delivered,
                Delivery::Full if result == Delivery::Offline => result = Delivery::Full,
                _ => {}
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xmpp_parsers::message::Message;
    use xmpp_parsers::presence::Presence;

    fn jid(s: &str) -> FullJid {
        s.parse().unwrap()
    }

    #[test]
    fn newer_binding_wins_and_old_unbind_is_ignored() {
        let r = Router::default();
        let (tx1, _rx1) = mpsc::channel(4);
        let (tx2, mut rx2) = mpsc::channel(4);
        let a = jid("a@x/r");
        assert!(r.bind(&a, 1, tx1).is_none(), "first bind replaces nothing");
        assert!(
            r.bind(&a, 2, tx2).is_some(),
            "second bind returns the old session"
        );
        r.unbind(&a, 1); // stale: must not remove conn 2
        assert!(r.is_bound(&a));
        assert_eq!(
            r.to_full(&a, Stanza::Message(Message::new(None))),
            Delivery::Delivered
        );
        assert!(matches!(rx2.try_recv(), Ok(Outbound::Stanza(_))));
        r.unbind(&a, 2);
        assert!(!r.is_bound(&a));
        assert_eq!(r.sessions(), 0);
    }

    #[test]
    fn bare_routing_follows_availability_and_priority() {
        let r = Router::default();
        let (tx1, mut rx1) = mpsc::channel(4);
        let (tx2, mut rx2) = mpsc::channel(4);
        let (a1, a2) = (jid("a@x/one"), jid("a@x/two"));
        r.bind(&a1, 1, tx1);
        r.bind(&a2, 2, tx2);
        let bare = a1.to_bare();
        let msg = || Stanza::Message(Message::new(None));
        assert_eq!(
            r.message_to_bare(&bare, msg()),
            Delivery::Offline,
            "nobody available yet"
        );
        r.set_available(&a1, 1, true, 5);
        r.set_available(&a2, 2, true, 1);
        assert_eq!(r.message_to_bare(&bare, msg()), Delivery::Delivered);
        assert!(rx1.try_recv().is_ok());
        assert!(rx2.try_recv().is_err(), "lower priority gets no message");
        assert_eq!(
            r.presence_to_bare(&bare, Stanza::Presence(Presence::available())),
            Delivery::Delivered
        );
        assert!(
            rx1.try_recv().is_ok() && rx2.try_recv().is_ok(),
            "presence goes to all"
        );
        r.set_available(&a1, 1, true, -1);
        r.set_available(&a2, 2, true, -1);
        assert_eq!(
            r.message_to_bare(&bare, msg()),
            Delivery::Offline,
            "negative priority gets no bare messages"
        );
    }

    #[test]
    fn full_queue_is_reported() {
        let r = Router::default();
        let (tx, _rx) = mpsc::channel(1);
        let a = jid("a@x/r");
        r.bind(&a, 1, tx);
        assert_eq!(
            r.to_full(&a, Stanza::Message(Message::new(None))),
            Delivery::Delivered
        );
        assert_eq!(
            r.to_full(&a, Stanza::Message(Message::new(None))),
            Delivery::Full
        );
        assert_eq!(
            r.to_full(&jid("b@x/r"), Stanza::Message(Message::new(None))),
            Delivery::Offline
        );
    }
}
