//! Every stanza the agent receives, classified once: the first step of the data flow, between
//! the connection (read by [`crate::driver`]) and the state machine ([`crate::machine::Core`]).
//!
//! [`classify`] turns a [`Stanza`] into one [`Inbound`] variant and is the one place where the
//! sender is checked: only a configured dispatcher may send jobs, cancels, chunks, drains and
//! undrains, recalls, chunk acknowledgements and hellos; disco#info is answered for anyone. A request that is refused
//! before any state is looked at (not a Spine payload, not from a dispatcher, unparsable)
//! comes out as [`Inbound::Refused`] with the error to answer, so the core's `match` is flat.

use jid::{BareJid, Jid};
use spine_protocol::{Cancel, Chunk, Condition, Drain, Job, SpineError};
use tokio_xmpp::Stanza;
use tracing::{debug, warn};
use xmpp_parsers::disco::DiscoInfoQuery;
use xmpp_parsers::iq::Iq;
use xmpp_parsers::presence::Type as PresenceType;
use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};

/// A received stanza the agent acts on, its sender checked.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// A job from a configured dispatcher (IQ set).
    Job { from: Jid, id: String, job: Job },
    /// A cancel from a configured dispatcher (IQ set).
    Cancel {
        from: Jid,
        id: String,
        cancel: Cancel,
    },
    /// A chunk of an input blob from a configured dispatcher (IQ set).
    Chunk { from: Jid, id: String, chunk: Chunk },
    /// An operator's drain (`Some`, with its reason) or undrain (`None`), relayed by a
    /// configured dispatcher (IQ set, PROTOCOL.md §5.6).
    Drain {
        from: Jid,
        id: String,
        drain: Option<Drain>,
    },
    /// A new leader asks which of its account's jobs this agent has (IQ get, protocol 1.2,
    /// PROTOCOL.md §10.1).
    Recall { from: Jid, id: String },
    /// A disco#info query without a node, from anyone: answered with the capabilities.
    DiscoInfo { from: Jid, id: String },
    /// A configured dispatcher's answer to one of the agent's IQs (a chunk of an output
    /// upload, a slot request): acknowledged with its `payload`, or refused with `error`.
    Reply {
        id: String,
        payload: Option<minidom::Element>,
        error: Option<StanzaError>,
    },
    /// A configured dispatcher's hello: it wants our advertisement, and says which protocol
    /// version it speaks.
    Hello {
        from: Jid,
        protocol: spine_protocol::ProtocolVersion,
    },
    /// A request refused as it arrived: answer `id` to `to` with `error`.
    Refused {
        to: Jid,
        id: String,
        error: StanzaError,
    },
}

fn not_supported() -> StanzaError {
    StanzaError::new(
        ErrorType::Cancel,
        DefinedCondition::ServiceUnavailable,
        "en",
        "not supported by this agent",
    )
}

fn refused(to: Jid, id: String, e: SpineError) -> Inbound {
    Inbound::Refused {
        to,
        id,
        error: StanzaError::from(e),
    }
}

/// Classifies one stanza; `None` for what the agent ignores (messages, presences other than
/// a dispatcher's hello, IQ replies from anyone but a dispatcher, IQs without a sender).
pub(crate) fn classify(st: Stanza, dispatchers: &[BareJid]) -> Option<Inbound> {
    let is_dispatcher = |from: &Jid| dispatchers.iter().any(|d| *d == from.to_bare());
    match st {
        Stanza::Iq(Iq::Set {
            from: Some(from),
            id,
            payload,
            ..
        }) => {
            if !payload.ns().starts_with(spine_protocol::NS_PREFIX) {
                return Some(Inbound::Refused {
                    to: from,
                    id,
                    error: not_supported(),
                });
            }
            if !is_dispatcher(&from) {
                warn!(from = %from, "refused request from a JID that is not a configured dispatcher");
                let e = SpineError::new(Condition::NotAuthorized)
                    .with_text("only configured dispatchers may send requests to this agent");
                return Some(refused(from, id, e));
            }
            Some(match spine_protocol::parse_payload(payload) {
                Ok(spine_protocol::Payload::Job(job)) => Inbound::Job { from, id, job },
                Ok(spine_protocol::Payload::Cancel(cancel)) => Inbound::Cancel { from, id, cancel },
                Ok(spine_protocol::Payload::Chunk(chunk)) => Inbound::Chunk { from, id, chunk },
                Ok(spine_protocol::Payload::Drain(d)) => Inbound::Drain {
                    from,
                    id,
                    drain: Some(d),
                },
                Ok(spine_protocol::Payload::Undrain(_)) => Inbound::Drain {
                    from,
                    id,
                    drain: None,
                },
                Ok(_) => refused(
                    from,
                    id,
                    SpineError::new(Condition::Malformed).with_text(
                        "an agent takes only <job/>, <cancel/>, <chunk/>, <drain/> and <undrain/> requests",
                    ),
                ),
                Err(e) => refused(from, id, e.to_spine_error()),
            })
        }
        Stanza::Iq(Iq::Get {
            from: Some(from),
            id,
            payload,
            ..
        }) => {
            if payload.is("recall", spine_protocol::NS) {
                if !is_dispatcher(&from) {
                    let e = SpineError::new(Condition::NotAuthorized)
                        .with_text("only configured dispatchers may ask for their jobs");
                    return Some(refused(from, id, e));
                }
                return Some(match spine_protocol::Recall::try_from(payload) {
                    Ok(_) => Inbound::Recall { from, id },
                    Err(e) => refused(from, id, e.to_spine_error()),
                });
            }
            if payload.is("query", xmpp_parsers::ns::DISCO_INFO)
                && DiscoInfoQuery::try_from(payload).is_ok_and(|q| q.node.is_none())
            {
                Some(Inbound::DiscoInfo { from, id })
            } else {
                Some(Inbound::Refused {
                    to: from,
                    id,
                    error: not_supported(),
                })
            }
        }
        Stanza::Iq(Iq::Result {
            from: Some(from),
            id,
            payload,
            ..
        }) if is_dispatcher(&from) => Some(Inbound::Reply {
            id,
            payload,
            error: None,
        }),
        Stanza::Iq(Iq::Error {
            from: Some(from),
            id,
            error,
            ..
        }) if is_dispatcher(&from) => Some(Inbound::Reply {
            id,
            payload: None,
            error: Some(error),
        }),
        Stanza::Presence(p) => {
            let from = p.from.clone()?;
            if !is_dispatcher(&from) {
                return None;
            }
            if p.type_ == PresenceType::Unavailable {
                debug!(dispatcher = %from, "dispatcher went unavailable");
                return None;
            }
            match spine_protocol::presence_payloads(&p.payloads) {
                Ok(found) => found.hello.map(|h| Inbound::Hello {
                    from,
                    protocol: h.protocol,
                }),
                Err(e) => {
                    warn!(dispatcher = %from, "ignoring presence: {e}");
                    None
                }
            }
        }
        _ => None,
    }
}
