//! Known capabilities in the registry (issue 15, item 7): a capability no agent has offered
//! since the start, nor in an earlier run, is refused at submission with `unknown-capability`,
//! naming the field and the known capabilities closest first; one offered once stays known
//! after its agents left (its jobs wait for them).

use std::time::Instant;

use jid::FullJid;
use rand::rngs::StdRng;
use rand::SeedableRng;
use spine_dispatcher::registry::{submission_steps, Registry};
use spine_protocol::{
    Advertise, AgentState, CapabilityAd, CapabilityName, Condition, Load, MapReduce,
    ProtocolVersion,
};

fn cap(s: &str) -> CapabilityName {
    s.parse().unwrap()
}

fn ad(caps: &[&str]) -> Advertise {
    Advertise {
        protocol: ProtocolVersion::CURRENT,
        instance: "i1".into(),
        gen: 1,
        slots: 2,
        heartbeat_ms: 1000,
        attrs: Default::default(),
        serves: None,
        capabilities: caps.iter().map(|c| CapabilityAd::new(cap(c))).collect(),
    }
}

fn load() -> Load {
    Load {
        seq: 1,
        gen: 1,
        state: AgentState::Ready,
        in_flight: 0,
        yours: 0,
        slots: 2,
        queue: 0,
        loadavg: None,
        mem_used: None,
        mem_total: None,
        caps: vec![],
    }
}

fn agent(n: usize) -> FullJid {
    format!("agent{n}@localhost/w").parse().unwrap()
}

const HINT: &str = "\"wait_for_agent\": true";

#[test]
fn advertised_capabilities_become_known_and_are_learnt_once() {
    let mut reg = Registry::new();
    let mut rng = StdRng::seed_from_u64(1);
    assert!(!reg.is_known(&cap("image.thumbnail")));
    reg.on_advertise(
        &agent(1),
        &ad(&["image.thumbnail", "image.resize"]),
        &load(),
        Instant::now(),
        &mut rng,
    );
    let mut learnt = reg.take_learned();
    learnt.sort();
    assert_eq!(learnt, vec![cap("image.resize"), cap("image.thumbnail")]);
    // Another agent with one of them and a new one: only the new one is learnt.
    reg.on_advertise(
        &agent(2),
        &ad(&["image.thumbnail", "text.upper"]),
        &load(),
        Instant::now(),
        &mut rng,
    );
    assert_eq!(reg.take_learned(), vec![cap("text.upper")]);
    assert_eq!(reg.take_learned(), vec![], "handed over once");
    // Every agent gone: still known (its next jobs wait for an agent, as before).
    reg.on_agent_gone(&agent(1));
    reg.on_agent_gone(&agent(2));
    assert!(reg.capabilities().is_empty());
    assert!(reg.is_known(&cap("image.thumbnail")));
    assert!(reg
        .check_known(&[("capability", &cap("image.resize"))], |_| true, HINT)
        .is_ok());
}

#[test]
fn remembered_capabilities_are_known_but_not_learnt_again() {
    let mut reg = Registry::new();
    reg.remember([cap("report.pdf")]);
    assert!(reg.is_known(&cap("report.pdf")));
    assert_eq!(reg.take_learned(), vec![]);
    reg.on_advertise(
        &agent(1),
        &ad(&["report.pdf"]),
        &load(),
        Instant::now(),
        &mut StdRng::seed_from_u64(1),
    );
    assert_eq!(reg.take_learned(), vec![], "the store has it already");
}

#[test]
fn an_unknown_capability_names_its_field_and_the_known_ones_closest_first() {
    let mut reg = Registry::new();
    reg.remember(
        [
            "image.thumbnail",
            "image.resize",
            "text.upper",
            "wordcount.map",
            "wordcount.reduce",
        ]
        .map(cap),
    );
    let e = reg
        .check_known(&[("capability", &cap("image.thumbnal"))], |_| true, HINT)
        .unwrap_err();
    assert_eq!(e.condition, Condition::UnknownCapability);
    assert_eq!(e.field.as_deref(), Some("capability"));
    let text = e.text.unwrap_or_default();
    assert!(
        text.starts_with("no agent has offered image.thumbnal to this dispatcher; known capabilities, closest first: image.thumbnail, image.resize,"),
        "{text}"
    );
    assert!(text.contains(HINT), "{text}");
    assert_eq!(
        reg.closest_known("wordcount.reduse", |_| true)[..2],
        [cap("wordcount.reduce"), cap("wordcount.map")]
    );
    // Only what the submitter may run is listed.
    let e = reg
        .check_known(
            &[("capability", &cap("image.thumbnal"))],
            |c| c.as_str().starts_with("text."),
            HINT,
        )
        .unwrap_err();
    let text = e.text.unwrap_or_default();
    assert!(text.contains("closest first: text.upper ("), "{text}");
    assert!(!text.contains("image.resize"), "{text}");
    let e = reg
        .check_known(&[("capability", &cap("x.y"))], |_| false, HINT)
        .unwrap_err();
    assert!(e
        .text
        .unwrap_or_default()
        .contains("no capability has been offered that this submitter may run"),);
}

#[test]
fn map_reduce_submissions_check_every_step_naming_the_field() {
    let mut reg = Registry::new();
    reg.remember(["wordcount.map", "wordcount.reduce"].map(cap));
    let map = cap("wordcount.map");
    let mut mr = MapReduce::new(cap("wordcount.reduce"));
    assert!(reg
        .check_known(&submission_steps(&map, Some(&mr)), |_| true, HINT)
        .is_ok());
    mr.split = Some(cap("wordcount.splitt"));
    let e = reg
        .check_known(&submission_steps(&map, Some(&mr)), |_| true, HINT)
        .unwrap_err();
    assert_eq!(e.field.as_deref(), Some("split"));
    mr.split = None;
    mr.reduce = cap("wordcount.redux");
    let e = reg
        .check_known(&submission_steps(&map, Some(&mr)), |_| true, HINT)
        .unwrap_err();
    assert_eq!(e.field.as_deref(), Some("reduce"));
    assert!(e
        .text
        .unwrap_or_default()
        .contains("closest first: wordcount.reduce, wordcount.map"));
}

#[test]
fn the_list_is_cut_to_ten_and_says_how_many_more() {
    let mut reg = Registry::new();
    reg.remember((0..25).map(|i| cap(&format!("c.n{i:02}"))));
    let e = reg
        .check_known(&[("capability", &cap("c.n7"))], |_| true, HINT)
        .unwrap_err();
    let text = e.text.unwrap_or_default();
    assert!(text.contains(" and 15 more ("), "{text}");
}
