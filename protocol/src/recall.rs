//! A new leader asks each agent which of its jobs the agent has (PROTOCOL.md §10.1, protocol
//! 1.2): `<recall/>` (dispatcher → agent, IQ get) is answered by `<recalled>` listing the jobs
//! the agent runs or has the outcome of for the asking dispatcher's account, newest first.
//!
//! It is what lets a leader among several dispatchers send a job to an agent before the job's
//! dispatch is stored, as a lone dispatcher does: should it die before that commit, the next
//! leader learns from the agents where such jobs went and sends each back to its agent with
//! the same attempt (which the agent attaches, §10), instead of placing it afresh on another.

use minidom::Element;
use xmpp_parsers::iq::{IqGetPayload, IqResultPayload};

use crate::error::ParseError;
use crate::names::JobId;
use crate::xml::{unknown_child, Builder, Reader};

/// Most jobs a `<recalled>` lists: the running ones and the newest outcomes, so the answer
/// stays well within a server's stanza limit (about 55 bytes a job).
pub const MAX_RECALLED: usize = 1024;

/// `<recall/>`: which of our jobs do you have? (dispatcher → agent, IQ get, protocol 1.2).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recall;

impl TryFrom<Element> for Recall {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let r = Reader::new(&el, "recall")?;
        r.no_text()?;
        r.no_children()?;
        r.finish()?;
        Ok(Recall)
    }
}

impl From<Recall> for Element {
    fn from(_: Recall) -> Element {
        Builder::new("recall").build()
    }
}

impl IqGetPayload for Recall {}

/// One job an agent has: its id and the attempt it runs or ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Had {
    /// The job's id.
    pub job: JobId,
    /// The attempt the agent was sent (the latest, when it was sent several).
    pub attempt: u64,
}

/// `<recalled>`: the answer to [`Recall`], at most [`MAX_RECALLED`] jobs, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recalled {
    /// The jobs, newest first: those running, then those whose outcome the agent keeps.
    pub jobs: Vec<Had>,
}

impl TryFrom<Element> for Recalled {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let r = Reader::new(&el, "recalled")?;
        r.no_text()?;
        let mut jobs = Vec::new();
        for c in r.children() {
            let c = c?;
            if c.name() != "had" {
                return Err(unknown_child("recalled", c));
            }
            let mut h = Reader::unchecked(c, "had");
            let job = h.req("job")?;
            let attempt: u64 = h.req("attempt")?;
            if attempt == 0 {
                return Err(h.invalid("attempt", "attempts count from 1"));
            }
            h.no_text()?;
            h.no_children()?;
            h.finish()?;
            jobs.push(Had { job, attempt });
        }
        if jobs.len() > MAX_RECALLED {
            return Err(r.invalid(
                "had",
                format!("at most {MAX_RECALLED} jobs, not {}", jobs.len()),
            ));
        }
        r.finish()?;
        Ok(Recalled { jobs })
    }
}

impl From<Recalled> for Element {
    fn from(r: Recalled) -> Element {
        Builder::new("recalled")
            .children(r.jobs.into_iter().map(|h| {
                Builder::new("had")
                    .attr("job", h.job.as_str())
                    .attr("attempt", h.attempt)
                    .build()
            }))
            .build()
    }
}

impl IqResultPayload for Recalled {}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: u8) -> JobId {
        format!("01a219d7-3ebc-f3db-62b9-4449a23516{n:02}")
            .parse()
            .expect("a job id")
    }

    #[test]
    fn recalled_round_trips() {
        let r = Recalled {
            jobs: vec![
                Had {
                    job: job(1),
                    attempt: 2,
                },
                Had {
                    job: job(2),
                    attempt: 1,
                },
            ],
        };
        let el: Element = r.clone().into();
        assert_eq!(Recalled::try_from(el).expect("parses"), r);
        let el: Element = Recall.into();
        assert_eq!(Recall::try_from(el).expect("parses"), Recall);
    }

    #[test]
    fn bad_recalled_is_refused_naming_the_field() {
        let zero: Element = "<recalled xmlns='urn:spine:1'><had job='01a219d7-3ebc-f3db-62b9-4449a2351601' attempt='0'/></recalled>"
            .parse()
            .expect("xml");
        let e = Recalled::try_from(zero).expect_err("attempt 0");
        assert!(e.to_string().contains("attempt"), "{e}");
        let stray: Element = "<recalled xmlns='urn:spine:1'><job id='x'/></recalled>"
            .parse()
            .expect("xml");
        assert!(Recalled::try_from(stray).is_err());
        let extra: Element = "<recall xmlns='urn:spine:1' since='1'/>"
            .parse()
            .expect("xml");
        let e = Recall::try_from(extra).expect_err("unknown attribute");
        assert!(e.to_string().contains("since"), "{e}");
    }
}
