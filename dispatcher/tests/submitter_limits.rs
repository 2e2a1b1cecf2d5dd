//! Issue 14, finding 11, the pure parts: each submitter's share of a capability's queue, and
//! bounds on the attempts and priority it may ask for, from the defaults or its own rule.

use jid::FullJid;
use spine_dispatcher::jobs::*;
use spine_dispatcher::policy::{Policy, SubmitLimits};
use spine_dispatcher::DispatcherConfig;
use spine_protocol::Condition;

mod common;
use common::{id, spec};

#[test]
fn attempts_and_priority_are_bounded_per_submitter_naming_the_field() {
    let limits = SubmitLimits {
        max_queued: 10,
        max_attempts: 2,
        max_priority: 5,
        ..SubmitLimits::default()
    };
    let mut s = spec("c", "http:web");
    s.max_attempts = 2;
    s.check_limits(&limits).unwrap();
    // Asking for more is refused, with the field as each front end spells it.
    let mut s = spec("c", "http:web");
    s.max_attempts = 50;
    let e = s.check_limits(&limits).unwrap_err();
    assert_eq!(
        (e.condition, e.field.as_deref()),
        (Condition::BadArguments, Some("max_attempts"))
    );
    let mut s = spec("c", "webapp@example.com");
    s.max_attempts = 50;
    let e = s.check_limits(&limits).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("max-attempts"));
    let mut s = spec("c", "webapp@example.com");
    s.max_attempts = 2;
    s.priority = 6;
    let e = s.check_limits(&limits).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("priority"));
    assert!(e.to_string().contains("limit of 5"), "{e}");
    s.priority = 5;
    s.check_limits(&limits).unwrap();
}

/// Issue 14, finding 11: 50 jobs from one token filled `max_queue` and everyone else got
/// `queue-full`. With shares, the token stops at its own and the others are still accepted.
#[test]
fn one_submitter_cannot_fill_a_shared_queue() {
    let mut t = JobTable::new(50);
    let share = 25;
    let mut accepted = 0;
    for i in 0..50 {
        match t.submit_within(id(&format!("a{i}")), spec("c", "http:a"), 1, share) {
            Ok(_) => accepted += 1,
            Err(e) => {
                assert!(
                    matches!(e, SubmitError::SubmitterQuota { limit: 25, .. }),
                    "{e}"
                );
                assert!(e.to_string().contains("max_queued"), "{e}");
            }
        }
    }
    assert_eq!(accepted, 25);
    assert_eq!(t.queued_by("http:a", &"c".parse().unwrap()), 25);
    // Another token and an XMPP submitter still get in.
    t.submit_within(id("b1"), spec("c", "http:b"), 2, share)
        .unwrap();
    t.submit_within(id("x1"), spec("c", "ops@example.com"), 2, share)
        .unwrap();
    // Shares are per capability.
    t.submit_within(id("a-other"), spec("d", "http:a"), 2, share)
        .unwrap();
    // A job leaving the queue frees its submitter's place.
    let agent: FullJid = "agent1@localhost/w".parse().unwrap();
    t.dispatched(&id("a0"), &agent, 3).unwrap();
    assert_eq!(t.queued_by("http:a", &"c".parse().unwrap()), 24);
    t.submit_within(id("a-again"), spec("c", "http:a"), 4, share)
        .unwrap();
    // A retry goes back into the queue without asking (its place counts again).
    t.attempt_failed(&id("a0"), Some(&agent), None, 5);
    assert_eq!(t.queued_by("http:a", &"c".parse().unwrap()), 26);
    // The whole queue's bound still holds for everyone.
    let mut t = JobTable::new(2);
    t.submit_within(id("p"), spec("c", "http:a"), 1, 10)
        .unwrap();
    t.submit_within(id("q"), spec("c", "http:b"), 1, 10)
        .unwrap();
    assert!(matches!(
        t.submit_within(id("r"), spec("c", "http:c"), 1, 10),
        Err(SubmitError::QueueFull { .. })
    ));
}

#[test]
fn rules_and_tokens_set_their_own_limits_and_the_rest_get_the_defaults() {
    let cfg = DispatcherConfig::from_toml(
        "jid = \"dispatcher@example.com/d1\"\npassword = \"x\"\nmax_queue = 200\nmax_attempts = 1\n\
         submitters = [\"ops@example.com\"]\n\
         submitter_max_queued = \"10%\"\nsubmitter_max_attempts = 7\nsubmitter_max_priority = 3\n\
         [[submitter]]\njid = \"webapp@example.com\"\ncapabilities = [\"image.*\"]\nmax_queued = 5\nmax_priority = 1\n\
         [[submitter]]\njid = \"*@batch.example.com\"\ncapabilities = [\"*\"]\nmax_queued = \"50%\"\nmax_attempts = 20\n\
         [[http_token]]\nname = \"app\"\ntoken = \"0123456789abcdef0123\"\ncapabilities = [\"*\"]\nmax_queued = 3\nmax_attempts = 1\nmax_priority = -1\n\
         [[http_token]]\nname = \"plain\"\ntoken = \"fedcba98765432100123\"\ncapabilities = [\"*\"]\n",
    )
    .unwrap();
    let p = Policy::from_config(&cfg).unwrap();
    let defaults = SubmitLimits {
        max_queued: 20,
        max_attempts: 7,
        max_priority: 3,
        ..SubmitLimits::default()
    };
    assert_eq!(p.limits("ops@example.com"), defaults);
    assert_eq!(p.limits("http:plain"), defaults);
    assert_eq!(
        p.limits("http:local"),
        defaults,
        "the operator without tokens"
    );
    assert_eq!(
        p.limits("webapp@example.com"),
        SubmitLimits {
            max_queued: 5,
            max_attempts: 7,
            max_priority: 1,
            ..SubmitLimits::default()
        }
    );
    assert_eq!(
        p.limits("w1@batch.example.com"),
        SubmitLimits {
            max_queued: 100,
            max_attempts: 20,
            max_priority: 3,
            ..SubmitLimits::default()
        }
    );
    assert_eq!(
        p.limits("http:app"),
        SubmitLimits {
            max_queued: 3,
            max_attempts: 1,
            max_priority: -1,
            ..SubmitLimits::default()
        }
    );
}

#[test]
fn bad_submitter_limits_name_their_key() {
    for (toml, key) in [
        ("submitter_max_queued = \"0%\"", "submitter_max_queued"),
        ("submitter_max_queued = 0", "submitter_max_queued"),
        ("submitter_max_queued = \"half\"", "submitter_max_queued"),
        ("submitter_max_attempts = 0", "submitter_max_attempts"),
        (
            "max_attempts = 200",
            "submitter_max_attempts: must be at least max_attempts (200)",
        ),
        (
            "[[submitter]]\njid = \"a@b.c\"\ncapabilities = [\"*\"]\nmax_attempts = 2",
            "submitter[0].max_attempts: must be at least max_attempts (3)",
        ),
        (
            "[[http_token]]\nname = \"t\"\ntoken = \"0123456789abcdef0123\"\ncapabilities = [\"*\"]\nmax_queued = \"101%\"",
            "max_queued",
        ),
    ] {
        let e = DispatcherConfig::from_toml(&format!(
            "jid = \"d@example.com/d\"\npassword = \"x\"\n{toml}\n"
        ))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains(key), "{toml}: {e}");
    }
}
