//! Property tests: every payload serialises and parses back to an equal value, through the
//! XML text form (what goes on the wire), for arbitrary valid values.

use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::strategy::Strategy;
use spine_protocol::Strategy as Placement;
use spine_protocol::*;

fn cap() -> impl Strategy<Value = CapabilityName> {
    "[a-z0-9][a-z0-9_-]{0,8}(\\.[a-z0-9][a-z0-9_-]{0,8}){0,3}".prop_map(|s| s.parse().unwrap())
}
fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:-]{1,40}"
}
fn job_id() -> impl Strategy<Value = JobId> {
    id().prop_map(|s| s.parse().unwrap())
}
fn blob_id() -> impl Strategy<Value = BlobId> {
    id().prop_map(|s| s.parse().unwrap())
}
fn text() -> impl Strategy<Value = String> {
    // Any printable text, including XML specials, quotes and non-ASCII; no leading/trailing
    // whitespace-only strings (empty text means "absent").
    "[ -~éß€\u{1F600}]{0,30}".prop_map(|s| s.trim().to_owned())
}
fn nonempty_text() -> impl Strategy<Value = String> {
    text().prop_filter("non-empty", |s| !s.is_empty())
}
fn attrs() -> impl Strategy<Value = Attributes> {
    btree_map(
        "[a-z_][a-z0-9_.-]{0,8}".prop_map(|s| s.parse::<AttrName>().unwrap()),
        text(),
        0..4,
    )
}
fn mime() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("image/png".to_owned()),
        Just("text/plain; charset=utf-8".to_owned()),
        "[a-z]{1,8}/[a-z0-9.+-]{1,8}"
    ]
}
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
fn args() -> impl Strategy<Value = Args> {
    btree_map("[a-zA-Z_ ]{1,8}", json_value(), 0..4).prop_map(|m| Args(m.into_iter().collect()))
}
fn data() -> impl Strategy<Value = Data> {
    prop_oneof![
        (option::of(mime()), vec(any::<u8>(), 0..300))
            .prop_map(|(mime, bytes)| Data::Inline { mime, bytes }),
        (
            blob_id(),
            any::<u64>(),
            any::<[u8; 32]>(),
            option::of(mime())
        )
            .prop_map(|(blob, size, sha256, mime)| Data::Blob(BlobRef {
                blob,
                size,
                sha256,
                mime
            })),
    ]
}
/// `http://` or `https://` URLs of the shapes a dispatcher signs (query strings, escapes).
fn url() -> impl Strategy<Value = String> {
    (
        prop_oneof![Just("http"), Just("https"), Just("HTTPS")],
        "[a-z0-9.-]{1,20}(:[0-9]{1,5})?",
        "(/[A-Za-z0-9._~%-]{0,12}){0,4}(\\?[a-z]{1,5}=[A-Za-z0-9%&=._-]{0,30})?",
    )
        .prop_map(|(scheme, host, rest)| format!("{scheme}://{host}{rest}"))
}
fn data_ref(sources: bool) -> impl Strategy<Value = Data> {
    (
        any::<u64>(),
        any::<[u8; 32]>(),
        option::of(mime()),
        vec(url(), if sources { 1..=8 } else { 0..=0 }),
    )
        .prop_map(|(size, sha256, mime, sources)| {
            Data::Ref(DataRef {
                size,
                sha256,
                mime,
                sources,
            })
        })
}
/// A job's input: inline, a blob, or a reference with sources.
fn input_data() -> impl Strategy<Value = Data> {
    prop_oneof![data(), data_ref(true)]
}
/// A result's output: inline, a blob, or a reference without sources.
fn output_data() -> impl Strategy<Value = Data> {
    prop_oneof![data(), data_ref(false)]
}
fn filter() -> impl Strategy<Value = Filter> {
    prop_oneof![
        Just("gpu=true, zone in (eu-1,eu-2)"),
        Just("mem>=16 && !draining"),
        Just("name='a b', cost<0.5"),
        Just("zone not in (x, 'y z')"),
    ]
    .prop_map(|s| s.parse().unwrap())
}
fn version() -> impl Strategy<Value = ProtocolVersion> {
    (0u32..1000).prop_map(|minor| ProtocolVersion { major: 1, minor })
}
fn agent_state() -> impl Strategy<Value = AgentState> {
    prop_oneof![Just(AgentState::Ready), Just(AgentState::Draining)]
}
fn load_figure() -> impl Strategy<Value = f64> {
    prop_oneof![
        0.0f64..1e6,
        Just(0.0),
        (0u32..1000).prop_map(|x| x as f64 / 100.0)
    ]
}

fn advertise() -> impl Strategy<Value = Advertise> {
    let capad = (
        cap(),
        option::of(nonempty_text()),
        option::of(1u64..1000),
        attrs(),
    )
        .prop_map(|(name, version, slots, attrs)| CapabilityAd {
            name,
            version,
            slots,
            attrs,
        });
    (
        version(),
        id(),
        any::<u64>(),
        1u64..10_000,
        100u64..1_000_000,
        attrs(),
        vec(capad, 1..5),
        option::of(prop_oneof![
            Just("http://127.0.0.1:7443".to_owned()),
            Just("https://worker1.example.com:7443".to_owned()),
        ]),
    )
        .prop_map(
            |(protocol, instance, gen, slots, heartbeat_ms, attrs, mut capabilities, serves)| {
                capabilities.sort_by(|a, b| a.name.cmp(&b.name));
                capabilities.dedup_by(|a, b| a.name == b.name);
                Advertise {
                    protocol,
                    instance,
                    gen,
                    slots,
                    heartbeat_ms,
                    attrs,
                    serves,
                    capabilities,
                }
            },
        )
}

fn load() -> impl Strategy<Value = Load> {
    (
        (
            any::<u64>(),
            any::<u64>(),
            agent_state(),
            0u64..1000,
            0u64..1000,
            any::<u64>(),
            any::<u64>(),
        ),
        (
            option::of(load_figure()),
            option::of(any::<u64>()),
            option::of(any::<u64>()),
        ),
        vec((cap(), any::<u64>()), 0..4),
    )
        .prop_map(
            |(
                (seq, gen, state, in_flight, yours, slots, queue),
                (loadavg, mem_used, mem_total),
                caps,
            )| {
                let mut caps: Vec<CapLoad> = caps
                    .into_iter()
                    .map(|(name, in_flight)| CapLoad { name, in_flight })
                    .collect();
                caps.sort_by(|a, b| a.name.cmp(&b.name));
                caps.dedup_by(|a, b| a.name == b.name);
                Load {
                    seq,
                    gen,
                    state,
                    in_flight,
                    yours: yours.min(in_flight),
                    slots,
                    queue,
                    loadavg,
                    mem_used,
                    mem_total,
                    caps,
                }
            },
        )
}

fn job() -> impl Strategy<Value = Job> {
    (
        job_id(),
        cap(),
        1u64..,
        option::of(any::<u64>()),
        option::of(nonempty_text()),
        any::<bool>(),
        args(),
        option::of(input_data()),
        option::of(any::<[u8; 32]>()),
    )
        .prop_map(
            |(id, capability, attempt, deadline_ms, submitter, progress, args, input, keep)| Job {
                id,
                capability,
                attempt,
                deadline_ms,
                submitter,
                progress,
                args,
                input,
                keep: keep.map(|key| spine_protocol::Keep { key }),
            },
        )
}

fn job_result() -> impl Strategy<Value = JobResult> {
    (
        job_id(),
        1u64..,
        option::of(any::<u64>()),
        args(),
        option::of(output_data()),
    )
        .prop_map(|(job, attempt, elapsed_ms, meta, output)| JobResult {
            job,
            attempt,
            elapsed_ms,
            meta,
            output,
        })
}

fn submit() -> impl Strategy<Value = Submit> {
    (
        (
            cap(),
            prop_oneof![
                Just(Placement::LeastLoaded),
                Just(Placement::Random),
                Just(Placement::RoundRobin),
                Just(Placement::PowerOfTwo),
                Just(Placement::All)
            ],
            option::of(filter()),
        ),
        (
            option::of("[a-z]{1,6}".prop_map(|s| s.parse::<AttrName>().unwrap())),
            option::of(any::<u64>()),
            any::<i64>(),
            option::of(1u64..100),
        ),
        (
            option::of("[ -~]{1,40}"),
            any::<bool>(),
            args(),
            option::of(data()),
            option::of(nonempty_text()),
        ),
    )
        .prop_map(
            |(
                (capability, strategy, filter),
                (sort, deadline_ms, priority, max_attempts),
                (idempotency_key, watch, args, input, key),
            )| {
                let (strategy, affinity_key) = match key {
                    Some(k) if strategy == Placement::All => (Placement::Affinity, Some(k)),
                    _ => (strategy, None),
                };
                // The all strategy also draws a limit (count or percentage) and a batch size.
                let (limit, batch) = if strategy == Placement::All {
                    let n = priority.unsigned_abs();
                    let limit = if n % 2 == 0 {
                        Limit::Count(n % 50 + 1)
                    } else {
                        Limit::Percent((n % 100) as u8 + 1)
                    };
                    (Some(limit), max_attempts)
                } else {
                    (None, None)
                };
                // Other strategies may be a map/reduce (drawn from the priority's bits).
                let mapreduce = (strategy != Placement::All && priority % 3 == 0).then(|| {
                    let n = priority.unsigned_abs();
                    MapReduce {
                        reduce: capability.clone(),
                        split: (n % 2 == 0).then(|| capability.clone()),
                        fan_in: n % (spine_protocol::MAX_FAN_IN - 1) + 2,
                    }
                });
                Submit {
                    capability,
                    strategy,
                    filter,
                    sort,
                    affinity_key,
                    deadline_ms,
                    // Drawn from the deadline's bits.
                    delay_ms: deadline_ms.filter(|d| d % 2 == 0),
                    priority,
                    max_attempts,
                    idempotency_key,
                    watch,
                    // Drawn from the deadline's bits, within the protocol's limit.
                    wait_ms: deadline_ms
                        .filter(|d| d % 3 == 0)
                        .map(|d| d % (spine_protocol::MAX_SUBMIT_WAIT_MS + 1)),
                    // Drawn from the priority's bits, like the map/reduce below.
                    wait_for_agent: priority % 5 == 0,
                    refs: priority % 7 == 0,
                    limit,
                    batch,
                    mapreduce,
                    args,
                    input,
                }
            },
        )
}

fn job_state() -> impl Strategy<Value = JobState> {
    (0usize..JobState::ALL.len()).prop_map(|i| JobState::ALL[i])
}

fn job_status() -> impl Strategy<Value = JobStatus> {
    let agent = option::of(
        "[a-z]{1,6}@[a-z]{1,6}\\.com/[a-z0-9]{1,6}".prop_map(|s| s.parse::<jid::Jid>().unwrap()),
    );
    (
        job_id(),
        cap(),
        job_state(),
        any::<u64>(),
        agent,
        option::of(0u8..=100),
        job_result(),
        0usize..15,
        option::of(nonempty_text()),
        option::of("[a-z_][a-z0-9_-]{0,15}"),
    )
        .prop_map(
            |(job, capability, state, attempts, agent, percent, result, cond, message, field)| {
                let outcome = match state {
                    JobState::Succeeded => Some(Outcome::Result(result)),
                    s if s.is_final() => Some(Outcome::Failure(Failure {
                        condition: Condition::ALL[cond],
                        message,
                        field,
                    })),
                    _ => None,
                };
                JobStatus {
                    job,
                    capability,
                    state,
                    attempts,
                    agent,
                    percent,
                    outcome,
                }
            },
        )
}

fn agents() -> impl Strategy<Value = Agents> {
    let info = (
        "[a-z]{1,6}@[a-z]{1,6}\\.com/[a-z0-9]{1,6}".prop_map(|s| s.parse::<jid::Jid>().unwrap()),
        agent_state(),
        load_figure(),
        any::<u64>(),
        any::<u64>(),
        option::of(load_figure()),
        option::of(any::<u64>()),
        option::of(any::<u64>()),
        attrs(),
    )
        .prop_map(
            |(jid, state, load, in_flight, slots, loadavg, mem_used, mem_total, attrs)| AgentInfo {
                jid,
                state,
                load,
                in_flight,
                slots,
                loadavg,
                mem_used,
                mem_total,
                attrs,
            },
        );
    (cap(), vec(info, 0..4)).prop_map(|(capability, agents)| Agents { capability, agents })
}

/// Serialise to wire text, parse the text, and read the payload back.
fn through_wire(p: Payload) -> Payload {
    let el: Element = p.into();
    let text = String::from(&el);
    let back: Element = text
        .parse()
        .unwrap_or_else(|e| panic!("serialised form is not XML ({e}): {text}"));
    parse_payload(back).unwrap_or_else(|e| panic!("serialised form does not parse ({e}): {text}"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test] fn advertise_roundtrip(x in advertise()) { prop_assert_eq!(through_wire(Payload::Advertise(x.clone())), Payload::Advertise(x)); }
    #[test] fn load_roundtrip(x in load()) { prop_assert_eq!(through_wire(Payload::Load(x.clone())), Payload::Load(x)); }
    #[test] fn hello_roundtrip(protocol in version()) {
        let x = DispatcherHello { protocol };
        prop_assert_eq!(through_wire(Payload::DispatcherHello(x)), Payload::DispatcherHello(x));
    }
    #[test] fn job_roundtrip(x in job()) { prop_assert_eq!(through_wire(Payload::Job(x.clone())), Payload::Job(x)); }
    #[test] fn result_roundtrip(x in job_result()) { prop_assert_eq!(through_wire(Payload::Result(x.clone())), Payload::Result(x)); }
    #[test] fn cancel_status_roundtrip(job in job_id()) {
        prop_assert_eq!(through_wire(Payload::Cancel(Cancel { job: job.clone() })), Payload::Cancel(Cancel { job: job.clone() }));
        prop_assert_eq!(through_wire(Payload::Status(Status { job: job.clone() })), Payload::Status(Status { job }));
    }
    #[test] fn progress_roundtrip(job in job_id(), attempt in 1u64.., percent in option::of(0u8..=100), message in option::of(nonempty_text())) {
        let x = Progress { job, attempt, percent, message };
        prop_assert_eq!(through_wire(Payload::Progress(x.clone())), Payload::Progress(x));
    }
    #[test] fn partial_roundtrip(job in job_id(), attempt in 1u64.., seq in any::<u64>(), mime in option::of(mime()), bytes in vec(any::<u8>(), 0..500)) {
        let x = Partial { job, attempt, seq, mime, bytes };
        prop_assert_eq!(through_wire(Payload::Partial(x.clone())), Payload::Partial(x));
    }
    #[test] fn chunk_roundtrip(blob in blob_id(), offset in 0u64..1_000_000, bytes in vec(any::<u8>(), 1..500), extra in 0u64..1000) {
        let x = Chunk { blob, offset, total: offset + bytes.len() as u64 + extra, bytes };
        prop_assert_eq!(through_wire(Payload::Chunk(x.clone())), Payload::Chunk(x));
    }
    #[test] fn submit_roundtrip(x in submit()) { prop_assert_eq!(through_wire(Payload::Submit(x.clone())), Payload::Submit(x)); }
    #[test] fn accepted_roundtrip(job in job_id(), state in job_state()) {
        let x = Accepted { job, state };
        prop_assert_eq!(through_wire(Payload::Accepted(x.clone())), Payload::Accepted(x));
    }
    #[test] fn job_status_roundtrip(x in job_status()) { prop_assert_eq!(through_wire(Payload::JobStatus(x.clone())), Payload::JobStatus(x)); }
    #[test] fn discover_roundtrip(capability in cap(), filter in option::of(filter()), sort in option::of("[a-z]{1,5}".prop_map(|s| s.parse::<AttrName>().unwrap())), limit in option::of(any::<u64>())) {
        let x = Discover { capability, filter, sort, limit };
        prop_assert_eq!(through_wire(Payload::Discover(x.clone())), Payload::Discover(x));
    }
    #[test] fn request_slot_roundtrip(job in job_id(), attempt in 1u64.., size in any::<u64>(), sha256 in any::<[u8; 32]>(), mime in option::of(mime())) {
        let x = RequestSlot { job, attempt, size, sha256, mime };
        prop_assert_eq!(through_wire(Payload::RequestSlot(x.clone())), Payload::RequestSlot(x));
    }
    #[test] fn slot_roundtrip(job in job_id(), put in url(), expires_ms in any::<u64>()) {
        let x = Slot { job, put, expires_ms };
        prop_assert_eq!(through_wire(Payload::Slot(x.clone())), Payload::Slot(x));
    }
    #[test] fn drain_roundtrip(reason in option::of(nonempty_text())) {
        let x = Drain { reason };
        prop_assert_eq!(through_wire(Payload::Drain(x.clone())), Payload::Drain(x));
        prop_assert_eq!(through_wire(Payload::Undrain(Undrain)), Payload::Undrain(Undrain));
    }
    #[test] fn agents_roundtrip(x in agents()) { prop_assert_eq!(through_wire(Payload::Agents(x.clone())), Payload::Agents(x)); }
}
