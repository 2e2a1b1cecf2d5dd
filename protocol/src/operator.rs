//! The operator's requests to an agent (PROTOCOL.md §5.6): `<drain/>` takes the agent out of
//! rotation — it finishes the jobs it runs, refuses new ones with `draining` and keeps
//! running — and `<undrain/>` puts it back. A dispatcher sends them (IQ set) when an operator
//! asks it to, over HTTP or the command line; the agent answers with an empty result once
//! its new state is in effect, and reports it in its loads to every dispatcher.
//!
//! Unlike SIGTERM's drain, these do not end the process: they change only whether the agent
//! takes jobs.

use minidom::Element;
use xmpp_parsers::iq::IqSetPayload;

use crate::error::ParseError;
use crate::xml::{Builder, Reader};

/// Longest `reason` of a [`Drain`], in characters: a line for logs and `spine agents`, not a
/// document.
pub const MAX_REASON: usize = 1024;

/// `<drain/>`: stop taking jobs, finish those running, keep running (dispatcher → agent,
/// IQ set). Answered by an empty result, also when the agent was already drained (the new
/// reason replaces the old one).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Drain {
    /// Why, for the agent's log and its state file (at most [`MAX_REASON`] characters).
    pub reason: Option<String>,
}

impl TryFrom<Element> for Drain {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "drain")?;
        let reason: Option<String> = r.opt("reason")?;
        if reason
            .as_ref()
            .is_some_and(|s| s.chars().count() > MAX_REASON)
        {
            return Err(r.invalid("reason", format!("at most {MAX_REASON} characters")));
        }
        r.no_text()?;
        r.no_children()?;
        r.finish()?;
        Ok(Drain { reason })
    }
}

impl From<Drain> for Element {
    fn from(d: Drain) -> Element {
        Builder::new("drain").opt("reason", d.reason).build()
    }
}

impl IqSetPayload for Drain {}

/// `<undrain/>`: take jobs again after a [`Drain`] (dispatcher → agent, IQ set). Answered by
/// an empty result, also when the agent was not drained. It does not stop the drain of an
/// agent that is shutting down (SIGTERM).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Undrain;

impl TryFrom<Element> for Undrain {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let r = Reader::new(&el, "undrain")?;
        r.no_text()?;
        r.no_children()?;
        r.finish()?;
        Ok(Undrain)
    }
}

impl From<Undrain> for Element {
    fn from(_: Undrain) -> Element {
        Builder::new("undrain").build()
    }
}

impl IqSetPayload for Undrain {}
