//! Presence payloads: an agent's advertisement and load, and a dispatcher's hello.
//!
//! Agents send these as directed presence to dispatchers, so that the XMPP server itself tells
//! a dispatcher (with `unavailable`) when an agent's session ends. A dispatcher's `<dispatcher/>`
//! hello asks an agent to (re)send its advertisement at once.

use std::fmt;
use std::str::FromStr;

use minidom::Element;
use xmpp_parsers::presence::PresencePayload;

use crate::data::{attr_elements, read_attr, Attributes};
use crate::error::ParseError;
use crate::names::CapabilityName;
use crate::xml::{set_once, unknown_child, Builder, NonNegative, Reader};

/// Shortest heartbeat interval an agent may announce, in milliseconds.
pub const MIN_HEARTBEAT_MS: u64 = 100;

/// `major.minor` protocol version. The major version is also in the namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtocolVersion {
    /// Always 1 for `urn:spine:1`.
    pub major: u32,
    /// Backward-compatible additions; a sender uses only those its peer announced.
    pub minor: u32,
}

impl ProtocolVersion {
    /// The version this crate implements.
    pub const CURRENT: ProtocolVersion = ProtocolVersion { major: 1, minor: 0 };
    /// 1.1: payloads by reference over HTTP, `<request-slot/>`/`<slot/>`, the conditions
    /// `fetch-failed` and `storage-full` (PROTOCOL.md §13.4). A peer uses them only with a
    /// peer that announced at least this version.
    pub const V1_1: ProtocolVersion = ProtocolVersion { major: 1, minor: 1 };
    /// 1.2: 1.1 and `<recall/>`/`<recalled>` (PROTOCOL.md §10.1): an agent that announces it
    /// tells a new leader which jobs it has, so a leader among several dispatchers may send it
    /// jobs before their dispatch is stored.
    pub const V1_2: ProtocolVersion = ProtocolVersion { major: 1, minor: 2 };
}

impl Default for ProtocolVersion {
    fn default() -> Self {
        Self::CURRENT
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl FromStr for ProtocolVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let err = || format!("expected '{}.<minor>'", Self::CURRENT.major);
        let (a, b) = s.split_once('.').ok_or_else(err)?;
        let num = |x: &str| -> Result<u32, String> {
            if x.is_empty() || !x.bytes().all(|c| c.is_ascii_digit()) {
                return Err(err());
            }
            x.parse::<u32>().map_err(|_| err())
        };
        let v = ProtocolVersion {
            major: num(a)?,
            minor: num(b)?,
        };
        if v.major != Self::CURRENT.major {
            return Err(format!(
                "major version {} does not match the namespace (version {})",
                v.major,
                Self::CURRENT.major
            ));
        }
        Ok(v)
    }
}
crate::xml::attr_via_str!(ProtocolVersion);

/// One capability an agent offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilityAd {
    /// The capability, e.g. `image.thumbnail`.
    pub name: CapabilityName,
    /// The implementation's version, free-form.
    pub version: Option<String>,
    /// At most this many jobs of this capability at once (besides the agent's total).
    pub slots: Option<u64>,
    /// Attributes for this capability; they override agent-wide ones of the same name.
    pub attrs: Attributes,
}

impl CapabilityAd {
    /// A capability with no version, limit or attributes.
    pub fn new(name: CapabilityName) -> Self {
        CapabilityAd {
            name,
            version: None,
            slots: None,
            attrs: Attributes::new(),
        }
    }

    fn parse(el: &Element) -> Result<Self, ParseError> {
        let mut r = Reader::unchecked(el, "capability");
        let name = r.req("name")?;
        let version = r.opt::<String>("version")?;
        let slots = r.opt::<u64>("slots")?;
        if slots == Some(0) {
            return Err(r.invalid("slots", "must be at least 1"));
        }
        r.no_text()?;
        let mut attrs = Attributes::new();
        for c in r.children() {
            let c = c?;
            match c.name() {
                "attr" => read_attr(c, "capability", &mut attrs)?,
                _ => return Err(unknown_child("capability", c)),
            }
        }
        r.finish()?;
        Ok(CapabilityAd {
            name,
            version,
            slots,
            attrs,
        })
    }

    fn to_element(&self) -> Element {
        Builder::new("capability")
            .attr("name", self.name.as_str())
            .opt("version", self.version.as_deref())
            .opt("slots", self.slots)
            .children(attr_elements(&self.attrs))
            .build()
    }
}

/// `<advertise/>`: what an agent offers. Always sent together with a [`Load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertise {
    /// Protocol version the agent speaks.
    pub protocol: ProtocolVersion,
    /// Random id of this agent process; a new value means the agent restarted.
    pub instance: String,
    /// Advertisement generation: bumped whenever capabilities or attributes change.
    pub gen: u64,
    /// Total concurrent jobs.
    pub slots: u64,
    /// Interval of the agent's load heartbeat, in milliseconds.
    pub heartbeat_ms: u64,
    /// Agent-wide attributes.
    pub attrs: Attributes,
    /// Offered capabilities, unique by name, at least one.
    pub capabilities: Vec<CapabilityAd>,
    /// Protocol 1.1: the base URL (`http://` or `https://`, scheme, host and port) where this
    /// agent serves the outputs it keeps when a job asks it to (`<keep/>`, PROTOCOL.md
    /// §13.5); absent when it keeps none.
    pub serves: Option<String>,
}

impl Advertise {
    /// The effective attributes of one capability: agent-wide, overridden by its own.
    pub fn effective_attrs(&self, cap: &CapabilityAd) -> Attributes {
        let mut a = self.attrs.clone();
        a.extend(cap.attrs.iter().map(|(k, v)| (k.clone(), v.clone())));
        a
    }

    /// The capability of that name, if offered.
    pub fn capability(&self, name: &str) -> Option<&CapabilityAd> {
        self.capabilities.iter().find(|c| c.name.as_str() == name)
    }
}

impl TryFrom<Element> for Advertise {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "advertise")?;
        let protocol = r.req("protocol")?;
        let instance: String = r.req("instance")?;
        if instance.parse::<crate::JobId>().is_err() {
            return Err(r.invalid(
                "instance",
                "expected 1 to 128 characters of [A-Za-z0-9._:-]",
            ));
        }
        let gen = r.req("gen")?;
        let slots: u64 = r.req("slots")?;
        if slots == 0 {
            return Err(r.invalid("slots", "must be at least 1"));
        }
        let heartbeat_ms: u64 = r.req("heartbeat-ms")?;
        if heartbeat_ms < MIN_HEARTBEAT_MS {
            return Err(r.invalid(
                "heartbeat-ms",
                format!("must be at least {MIN_HEARTBEAT_MS}"),
            ));
        }
        let serves: Option<String> = r.opt("serves")?;
        if let Some(s) = &serves {
            check_serves(s).map_err(|why| r.invalid("serves", why))?;
        }
        r.no_text()?;
        let mut attrs = Attributes::new();
        let mut capabilities: Vec<CapabilityAd> = Vec::new();
        for c in r.children() {
            let c = c?;
            match c.name() {
                "attr" => read_attr(c, "advertise", &mut attrs)?,
                "capability" => {
                    let cap = CapabilityAd::parse(c)?;
                    if capabilities.iter().any(|x| x.name == cap.name) {
                        return Err(ParseError::Invalid {
                            element: "advertise",
                            reason: format!("capability '{}' is listed twice", cap.name),
                        });
                    }
                    capabilities.push(cap);
                }
                _ => return Err(unknown_child("advertise", c)),
            }
        }
        if capabilities.is_empty() {
            return Err(ParseError::MissingChild {
                element: "advertise",
                child: "capability",
            });
        }
        r.finish()?;
        Ok(Advertise {
            protocol,
            instance,
            gen,
            slots,
            heartbeat_ms,
            attrs,
            capabilities,
            serves,
        })
    }
}

/// A `serves` base URL: `http://` or `https://`, a host, an optional port, nothing after.
fn check_serves(s: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or("must start with http:// or https://")?;
    if s.len() > crate::data::MAX_URL_LEN {
        return Err(format!(
            "longer than {} characters",
            crate::data::MAX_URL_LEN
        ));
    }
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) || rest.contains(char::is_whitespace)
    {
        return Err(
            "expected scheme, host and port only, such as https://worker1.example.com:7443".into(),
        );
    }
    Ok(())
}

impl From<Advertise> for Element {
    fn from(a: Advertise) -> Element {
        Builder::new("advertise")
            .attr("protocol", a.protocol)
            .attr("instance", a.instance.as_str())
            .attr("gen", a.gen)
            .attr("slots", a.slots)
            .attr("heartbeat-ms", a.heartbeat_ms)
            .opt("serves", a.serves.as_deref())
            .children(attr_elements(&a.attrs))
            .children(a.capabilities.iter().map(CapabilityAd::to_element))
            .build()
    }
}

impl PresencePayload for Advertise {}

/// Whether an agent takes new jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AgentState {
    /// Takes jobs.
    #[default]
    Ready,
    /// Finishing its jobs before shutting down; takes no new ones.
    Draining,
}

impl AgentState {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Ready => "ready",
            AgentState::Draining => "draining",
        }
    }
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AgentState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ready" => Ok(AgentState::Ready),
            "draining" => Ok(AgentState::Draining),
            _ => Err("expected 'ready' or 'draining'".to_owned()),
        }
    }
}
crate::xml::attr_via_str!(AgentState);

/// In-flight jobs of one capability, in a [`Load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapLoad {
    /// The capability.
    pub name: CapabilityName,
    /// Its jobs running now.
    pub in_flight: u64,
}

/// `<load/>`: how busy an agent is. Sent on change (debounced) and every heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct Load {
    /// Increases with every load report of one agent instance; older reports are ignored.
    pub seq: u64,
    /// The advertisement generation this report belongs to.
    pub gen: u64,
    /// Ready or draining.
    pub state: AgentState,
    /// Jobs running on the agent, from every dispatcher.
    pub in_flight: u64,
    /// Of those, the jobs received from the recipient (by bare JID).
    pub yours: u64,
    /// Total slots.
    pub slots: u64,
    /// Jobs held but not started (Spine agents never queue: 0).
    pub queue: u64,
    /// 1-minute OS load average.
    pub loadavg: Option<f64>,
    /// Memory in use, bytes.
    pub mem_used: Option<u64>,
    /// Total memory, bytes.
    pub mem_total: Option<u64>,
    /// Per-capability in-flight counts (required for capabilities with their own slots).
    pub caps: Vec<CapLoad>,
}

impl Load {
    /// Free slots: `slots − in-flight`, never negative.
    pub fn free(&self) -> u64 {
        self.slots.saturating_sub(self.in_flight)
    }

    /// In-flight count of one capability, if reported.
    pub fn cap_in_flight(&self, name: &str) -> Option<u64> {
        self.caps
            .iter()
            .find(|c| c.name.as_str() == name)
            .map(|c| c.in_flight)
    }
}

impl TryFrom<Element> for Load {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "load")?;
        let seq = r.req("seq")?;
        let gen = r.req("gen")?;
        let state = r.req("state")?;
        let in_flight = r.req("in-flight")?;
        let yours: u64 = r.req("yours")?;
        if yours > in_flight {
            return Err(r.invalid("yours", "cannot exceed in-flight"));
        }
        let slots = r.req("slots")?;
        let queue = r.opt("queue")?.unwrap_or(0);
        let loadavg = r.opt::<NonNegative>("loadavg")?.map(|v| v.0);
        let mem_used = r.opt("mem-used")?;
        let mem_total = r.opt("mem-total")?;
        r.no_text()?;
        let mut caps: Vec<CapLoad> = Vec::new();
        for c in r.children() {
            let c = c?;
            if c.name() != "cap" {
                return Err(unknown_child("load", c));
            }
            let mut cr = Reader::unchecked(c, "cap");
            let cap = CapLoad {
                name: cr.req("name")?,
                in_flight: cr.req("in-flight")?,
            };
            cr.no_text()?;
            cr.no_children()?;
            cr.finish()?;
            if caps.iter().any(|x| x.name == cap.name) {
                return Err(ParseError::Invalid {
                    element: "load",
                    reason: format!("capability '{}' is reported twice", cap.name),
                });
            }
            caps.push(cap);
        }
        r.finish()?;
        Ok(Load {
            seq,
            gen,
            state,
            in_flight,
            yours,
            slots,
            queue,
            loadavg,
            mem_used,
            mem_total,
            caps,
        })
    }
}

impl From<Load> for Element {
    fn from(l: Load) -> Element {
        Builder::new("load")
            .attr("seq", l.seq)
            .attr("gen", l.gen)
            .attr("state", l.state)
            .attr("in-flight", l.in_flight)
            .attr("yours", l.yours)
            .attr("slots", l.slots)
            .opt("queue", (l.queue != 0).then_some(l.queue))
            .opt("loadavg", l.loadavg.map(NonNegative))
            .opt("mem-used", l.mem_used)
            .opt("mem-total", l.mem_total)
            .children(l.caps.iter().map(|c| {
                Builder::new("cap")
                    .attr("name", c.name.as_str())
                    .attr("in-flight", c.in_flight)
                    .build()
            }))
            .build()
    }
}

impl PresencePayload for Load {}

/// `<dispatcher/>`: a dispatcher's hello; the agent answers with its advertisement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DispatcherHello {
    /// Protocol version the dispatcher speaks.
    pub protocol: ProtocolVersion,
}

impl TryFrom<Element> for DispatcherHello {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "dispatcher")?;
        let protocol = r.req("protocol")?;
        r.no_text()?;
        r.no_children()?;
        r.finish()?;
        Ok(DispatcherHello { protocol })
    }
}

impl From<DispatcherHello> for Element {
    fn from(h: DispatcherHello) -> Element {
        Builder::new("dispatcher")
            .attr("protocol", h.protocol)
            .build()
    }
}

impl PresencePayload for DispatcherHello {}

/// The Spine payloads found in one presence stanza.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PresencePayloads {
    /// An agent's advertisement (always with `load` beside it).
    pub advertise: Option<Advertise>,
    /// An agent's load.
    pub load: Option<Load>,
    /// A dispatcher's hello.
    pub hello: Option<DispatcherHello>,
}

/// Reads the Spine payloads of one presence: an advertisement (which needs a load beside it),
/// a load, or a hello. Non-Spine payloads are ignored.
pub fn presence_payloads(payloads: &[Element]) -> Result<PresencePayloads, ParseError> {
    let mut out = PresencePayloads::default();
    for p in payloads {
        if !p.ns().starts_with(crate::NS_PREFIX) {
            continue;
        }
        match p.name() {
            "advertise" => set_once(
                &mut out.advertise,
                Advertise::try_from(p.clone())?,
                "presence",
                "advertise",
            )?,
            "load" => set_once(
                &mut out.load,
                Load::try_from(p.clone())?,
                "presence",
                "load",
            )?,
            "dispatcher" => set_once(
                &mut out.hello,
                DispatcherHello::try_from(p.clone())?,
                "presence",
                "dispatcher",
            )?,
            _ => return Err(unknown_child("presence", p)),
        }
    }
    if out.advertise.is_some() && out.load.is_none() {
        return Err(ParseError::MissingChild {
            element: "presence",
            child: "load",
        });
    }
    Ok(out)
}
