//! Issue 14, finding 5, the pure parts: a job's arguments are measured as they travel in its job
//! stanza and refused over `max_args`; a job whose sending ends the dispatcher's session counts
//! that as a failed attempt, and the largest request sent just before is the one blamed.

use jid::FullJid;
use spine_dispatcher::jobs::*;
use spine_protocol::{Condition, JobState};

mod common;
use common::{id, spec};

fn args(json: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    json.as_object().cloned().unwrap()
}

#[test]
fn arguments_are_measured_as_they_travel_escaped_for_xml() {
    assert_eq!(args_wire_size(&Default::default()), 0, "no element at all");
    let plain = args(serde_json::json!({ "a": "x".repeat(1000) }));
    let size = args_wire_size(&plain);
    assert!((1000..1100).contains(&size), "{size}");
    // The same length of JSON made of characters XML escapes is several times larger.
    let escaped = args(serde_json::json!({ "a": "<&".repeat(500) }));
    assert!(
        args_wire_size(&escaped) > 4 * 1000,
        "{}",
        args_wire_size(&escaped)
    );

    // A 300 KB argument is refused naming the field; 60 KB passes.
    let mut s = spec("c", "http:web");
    s.args = args(serde_json::json!({ "blob": "A".repeat(300_000) }));
    let e = s.check_args(64 * 1024).unwrap_err();
    assert_eq!(e.condition, Condition::BadArguments);
    assert_eq!(e.field.as_deref(), Some("args"));
    assert!(e.to_string().contains("max_args"), "{e}");
    s.args = args(serde_json::json!({ "blob": "A".repeat(60_000) }));
    s.check_args(64 * 1024).unwrap();
    // Escaping counts: 20,000 '<' are 80 KB in the stanza.
    s.args = args(serde_json::json!({ "blob": "<".repeat(20_000) }));
    assert_eq!(
        s.check_args(64 * 1024).unwrap_err().field.as_deref(),
        Some("args")
    );
}

/// Issue 14, finding 5: a job whose stanza the server refuses ends the dispatcher's session
/// each time it is sent. Each such end counts as an attempt, and after the last one the job
/// fails, instead of being sent again forever.
#[test]
fn a_job_that_ends_the_session_each_time_fails_after_its_attempts() {
    let mut t = JobTable::new(10);
    let agent: FullJid = "agent1@localhost/w".parse().unwrap();
    t.submit(id("big"), spec("c", "http:a"), 1).unwrap();
    t.dispatched(&id("big"), &agent, 2).unwrap();
    assert_eq!(
        t.session_lost(&id("big"), 3),
        Some(SessionLost::Resend { attempt: 2 })
    );
    assert_eq!(
        t.session_lost(&id("big"), 4),
        Some(SessionLost::Resend { attempt: 3 })
    );
    assert_eq!(t.get(&id("big")).unwrap().state, JobState::Dispatched);
    assert_eq!(t.session_lost(&id("big"), 5), Some(SessionLost::Final));
    let j = t.get(&id("big")).unwrap();
    assert_eq!((j.state, j.attempts), (JobState::Failed, 3));
    match &j.outcome {
        Some(Recorded::Failure {
            condition, message, ..
        }) => {
            assert_eq!(condition.as_str(), "retryable");
            let m = message.as_deref().unwrap_or_default();
            assert!(
                m.contains("gave up after 3 attempts") && m.contains("session"),
                "{m}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(t.session_lost(&id("big"), 6), None, "ended: nothing more");
    // A queued job was not sent: not its fault.
    t.submit(id("q"), spec("c", "http:a"), 7).unwrap();
    assert_eq!(t.session_lost(&id("q"), 8), None);
}

#[test]
fn the_largest_request_sent_just_before_the_end_is_blamed() {
    let sent = [
        ("small", 300, 10),
        ("big", 90_000, 12),
        ("old-big", 200_000, 1),
    ];
    assert_eq!(
        blame(sent, 5, 20),
        vec!["big"],
        "old requests are not suspects"
    );
    assert_eq!(blame(sent, 0, 20), vec!["old-big"]);
    let tie = [("a", 500, 10), ("b", 500, 11), ("c", 10, 12)];
    assert_eq!(blame(tie, 0, 20), vec!["a", "b"]);
    assert!(blame(sent, 13, 20).is_empty(), "nothing sent in the window");
    assert!(
        blame([("late", 5, 30)], 0, 20).is_empty(),
        "sent after the end: not a suspect"
    );
}

#[test]
fn max_args_is_bounded_below_the_servers_stanza_limit() {
    for toml in ["max_args = \"512B\"", "max_args = \"1MiB\""] {
        let e = spine_dispatcher::DispatcherConfig::from_toml(&format!(
            "jid = \"d@example.com/d\"\npassword = \"x\"\n{toml}\n"
        ))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            e.contains("max_args: must be 1KiB to 128KiB"),
            "{toml}: {e}"
        );
    }
}
