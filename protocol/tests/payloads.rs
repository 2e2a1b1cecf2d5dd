//! Literal documents (as in docs/PROTOCOL.md) parse to the values they say, and invalid ones
//! are refused with the specific error.

use spine_protocol::*;

fn el(xml: &str) -> Element {
    xml.parse()
        .unwrap_or_else(|e| panic!("test document is not XML: {e}\n{xml}"))
}

const JOB_ID: &str = "0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44";

#[test]
fn advertise_literal() {
    let a = Advertise::try_from(el(
        "<advertise xmlns='urn:spine:1' protocol='1.0' instance='4f1c9a' gen='3' slots='8' heartbeat-ms='10000'>
           <attr name='zone' value='eu-1'/>
           <capability name='image.thumbnail' version='1.2.0' slots='4'><attr name='gpu' value='true'/></capability>
           <capability name='wordcount.map'/>
         </advertise>",
    ))
    .unwrap();
    assert_eq!(a.protocol, ProtocolVersion { major: 1, minor: 0 });
    assert_eq!(
        (a.instance.as_str(), a.gen, a.slots, a.heartbeat_ms),
        ("4f1c9a", 3, 8, 10000)
    );
    assert_eq!(a.attrs.get("zone").map(String::as_str), Some("eu-1"));
    assert_eq!(a.capabilities.len(), 2);
    let thumb = &a.capabilities[0];
    assert_eq!(thumb.name.as_str(), "image.thumbnail");
    assert_eq!(thumb.version.as_deref(), Some("1.2.0"));
    assert_eq!(thumb.slots, Some(4));
    let eff = a.effective_attrs(thumb);
    assert_eq!(eff.get("gpu").map(String::as_str), Some("true"));
    assert_eq!(eff.get("zone").map(String::as_str), Some("eu-1"));
    assert_eq!(a.capabilities[1].slots, None);
}

#[test]
fn load_literal() {
    let l = Load::try_from(el(
        "<load xmlns='urn:spine:1' seq='42' gen='3' state='draining' in-flight='3' yours='2' slots='8' queue='0' loadavg='1.50' mem-used='4294967296' mem-total='17179869184'>
           <cap name='image.thumbnail' in-flight='2'/>
         </load>",
    ))
    .unwrap();
    assert_eq!(
        (l.seq, l.gen, l.in_flight, l.yours, l.slots, l.queue),
        (42, 3, 3, 2, 8, 0)
    );
    assert_eq!(l.state, AgentState::Draining);
    assert_eq!(l.loadavg, Some(1.5));
    assert_eq!(l.mem_used, Some(4_294_967_296));
    assert_eq!(l.free(), 5);
    assert_eq!(l.cap_in_flight("image.thumbnail"), Some(2));
    assert_eq!(l.cap_in_flight("other"), None);
}

#[test]
fn hello_literal() {
    let h =
        DispatcherHello::try_from(el("<dispatcher xmlns='urn:spine:1' protocol='1.7'/>")).unwrap();
    assert_eq!(h.protocol.minor, 7);
}

#[test]
fn job_literal_keeps_64_bit_integers() {
    let j = Job::try_from(el(&format!(
        "<job xmlns='urn:spine:1' id='{JOB_ID}' capability='image.thumbnail' attempt='1' deadline-ms='30000' submitter='webapp@example.com' progress='true'>
           <args>{{\"width\":128,\"height\":96,\"seed\":9007199254740993}}</args>
           <input type='image/png' size='5'>aGVsbG8=</input>
         </job>"
    )))
    .unwrap();
    assert_eq!(j.id.as_str(), JOB_ID);
    assert_eq!(j.capability.as_str(), "image.thumbnail");
    assert_eq!(
        (j.attempt, j.deadline_ms, j.progress),
        (1, Some(30000), true)
    );
    assert_eq!(j.submitter.as_deref(), Some("webapp@example.com"));
    assert_eq!(j.args.get("width").and_then(|v| v.as_u64()), Some(128));
    // 2^53 + 1: not representable as f64, must survive exactly.
    assert_eq!(
        j.args.get("seed").and_then(|v| v.as_u64()),
        Some(9_007_199_254_740_993)
    );
    assert_eq!(
        j.input,
        Some(Data::Inline {
            mime: Some("image/png".into()),
            bytes: b"hello".to_vec()
        })
    );
}

#[test]
fn job_with_blob_reference() {
    let sha = "a".repeat(64);
    let j = Job::try_from(el(&format!(
        "<job xmlns='urn:spine:1' id='j1' capability='c' attempt='2'>
           <input blob='j1.in' size='20971520' sha256='{sha}' type='application/octet-stream'/>
         </job>"
    )))
    .unwrap();
    match j.input {
        Some(Data::Blob(b)) => {
            assert_eq!(b.blob.as_str(), "j1.in");
            assert_eq!(b.size, 20_971_520);
            assert_eq!(b.sha256, [0xaa; 32]);
        }
        other => panic!("expected a blob, got {other:?}"),
    }
    assert!(j.args.is_empty());
    assert!(!j.progress);
}

#[test]
fn result_literal() {
    let r = JobResult::try_from(el(&format!(
        "<result xmlns='urn:spine:1' job='{JOB_ID}' attempt='1' elapsed-ms='12'>
           <meta>{{\"width\":128,\"height\":96}}</meta>
           <output type='image/png' size='5'>aGVsbG8=</output>
         </result>"
    )))
    .unwrap();
    assert_eq!((r.attempt, r.elapsed_ms), (1, Some(12)));
    assert_eq!(r.meta.get("height").and_then(|v| v.as_i64()), Some(96));
    assert_eq!(r.output.as_ref().map(|o| o.len()), Some(5));
}

#[test]
fn messages_literal() {
    let p = Progress::try_from(el(&format!(
        "<progress xmlns='urn:spine:1' job='{JOB_ID}' attempt='1' percent='40'>resizing</progress>"
    )))
    .unwrap();
    assert_eq!(
        (p.percent, p.message.as_deref()),
        (Some(40), Some("resizing"))
    );
    let p = Partial::try_from(el(&format!(
        "<partial xmlns='urn:spine:1' job='{JOB_ID}' attempt='1' seq='0' type='text/plain'>aGVsbG8=</partial>"
    )))
    .unwrap();
    assert_eq!(
        (p.seq, p.bytes.as_slice(), p.mime.as_deref()),
        (0, &b"hello"[..], Some("text/plain"))
    );
}

#[test]
fn chunk_literal_and_cutting() {
    let c = Chunk::try_from(el(
        "<chunk xmlns='urn:spine:1' blob='b.in' offset='65536' total='65541'>aGVsbG8=</chunk>",
    ))
    .unwrap();
    assert_eq!(
        (c.offset, c.total, c.bytes.as_slice()),
        (65536, 65541, &b"hello"[..])
    );

    let blob: BlobId = "b".parse().unwrap();
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let parts = chunks(&blob, &bytes);
    assert_eq!(parts.len(), 4);
    assert_eq!(parts[3].offset, 3 * 65536);
    let mut joined = Vec::new();
    for p in parts {
        let back = Chunk::try_from(Element::from(p.clone())).unwrap();
        assert_eq!(back, p);
        joined.extend(back.bytes);
    }
    assert_eq!(joined, bytes);
    assert_eq!(chunks(&blob, &[]).len(), 1);
}

#[test]
fn submit_literal() {
    let s = Submit::try_from(el(
        "<submit xmlns='urn:spine:1' capability='image.thumbnail' strategy='least-loaded' filter='gpu=true, zone in (eu-1,eu-2)' sort='cost' deadline-ms='60000' priority='5' max-attempts='3' idempotency-key='upload-8812' watch='true'>
           <args>{\"width\":128}</args><input type='image/png'>aGVsbG8=</input>
         </submit>",
    ))
    .unwrap();
    assert_eq!(s.strategy, Strategy::LeastLoaded);
    assert_eq!(s.filter.as_ref().map(|f| f.clauses.len()), Some(2));
    assert_eq!(s.sort.as_ref().map(|x| x.as_str()), Some("cost"));
    assert_eq!(
        (s.deadline_ms, s.priority, s.max_attempts, s.watch),
        (Some(60000), 5, Some(3), true)
    );
    assert_eq!(s.idempotency_key.as_deref(), Some("upload-8812"));
    let s = Submit::try_from(el(
        "<submit xmlns='urn:spine:1' capability='a.b' strategy='affinity' affinity-key='user-7' priority='-3'/>",
    ))
    .unwrap();
    assert_eq!(
        (s.strategy, s.affinity_key.as_deref(), s.priority),
        (Strategy::Affinity, Some("user-7"), -3)
    );
    assert!(!s.wait_for_agent, "wait-for-agent defaults to false");
    let s = Submit::try_from(el(
        "<submit xmlns='urn:spine:1' capability='report.pdf' wait-for-agent='true'/>",
    ))
    .unwrap();
    assert!(s.wait_for_agent);
    let e = Element::from(s.clone());
    assert_eq!(e.attr("wait-for-agent"), Some("true"));
    assert_eq!(Submit::try_from(e).unwrap(), s);
    let plain = Element::from(Submit::new("report.pdf".parse().unwrap()));
    assert_eq!(plain.attr("wait-for-agent"), None, "false is left out");
}

#[test]
fn accepted_status_literal() {
    let a = Accepted::try_from(el(&format!(
        "<accepted xmlns='urn:spine:1' job='{JOB_ID}' state='queued'/>"
    )))
    .unwrap();
    assert_eq!(a.state, JobState::Queued);
    let s = Status::try_from(el(&format!("<status xmlns='urn:spine:1' job='{JOB_ID}'/>"))).unwrap();
    assert_eq!(s.job.as_str(), JOB_ID);
    let st = JobStatus::try_from(el(&format!(
        "<job-status xmlns='urn:spine:1' job='{JOB_ID}' capability='image.thumbnail' state='succeeded' attempts='2' agent='agent1@example.com/worker'>
           <result job='{JOB_ID}' attempt='2' elapsed-ms='12'><output type='image/png' size='5'>aGVsbG8=</output></result>
         </job-status>"
    )))
    .unwrap();
    assert_eq!((st.state, st.attempts), (JobState::Succeeded, 2));
    assert_eq!(
        st.agent.map(|j| j.to_string()).as_deref(),
        Some("agent1@example.com/worker")
    );
    assert!(matches!(st.outcome, Some(Outcome::Result(ref r)) if r.attempt == 2));
    let st = JobStatus::try_from(el(&format!(
        "<job-status xmlns='urn:spine:1' job='{JOB_ID}' capability='c' state='timed-out' attempts='1'><failure condition='deadline-exceeded'>30 s passed</failure></job-status>"
    )))
    .unwrap();
    assert_eq!(
        st.outcome,
        Some(Outcome::Failure(Failure {
            condition: Condition::DeadlineExceeded,
            message: Some("30 s passed".into()),
            field: None,
        }))
    );
    // A bad-arguments failure names the argument the agent refused (issue 15, item 5).
    let st = JobStatus::try_from(el(&format!(
        "<job-status xmlns='urn:spine:1' job='{JOB_ID}' capability='image.thumbnail' state='failed' attempts='1'><failure condition='bad-arguments' field='size'>must be an integer from 1 to 16384</failure></job-status>"
    )))
    .unwrap();
    assert_eq!(
        st.outcome,
        Some(Outcome::Failure(Failure {
            condition: Condition::BadArguments,
            message: Some("must be an integer from 1 to 16384".into()),
            field: Some("size".into()),
        }))
    );
}

#[test]
fn discover_and_agents_literal() {
    let d = Discover::try_from(el(
        "<discover xmlns='urn:spine:1' capability='image.thumbnail' filter='gpu=true' sort='cost' limit='10'/>",
    ))
    .unwrap();
    assert_eq!(d.limit, Some(10));
    let a = Agents::try_from(el(
        "<agents xmlns='urn:spine:1' capability='image.thumbnail'>
           <agent jid='agent2@example.com/worker' state='ready' load='0.25' in-flight='1' slots='4' loadavg='0.10'><attr name='gpu' value='true'/></agent>
           <agent jid='agent1@example.com/worker' state='ready' load='0.75' in-flight='3' slots='4'/>
         </agents>",
    ))
    .unwrap();
    assert_eq!(a.agents.len(), 2);
    assert_eq!(a.agents[0].load, 0.25);
    assert_eq!(a.agents[1].in_flight, 3);
    assert_eq!(a.agents[0].attrs.len(), 1);
}

#[test]
fn presence_payloads_need_a_load_beside_an_advertisement() {
    let ad = el("<advertise xmlns='urn:spine:1' protocol='1.0' instance='i' gen='1' slots='1' heartbeat-ms='1000'><capability name='a'/></advertise>");
    let load = el("<load xmlns='urn:spine:1' seq='1' gen='1' state='ready' in-flight='0' yours='0' slots='1'/>");
    let other = el("<x xmlns='urn:other'/>");
    let found = presence_payloads(&[ad.clone(), load.clone(), other.clone()]).unwrap();
    assert_eq!(found.advertise.map(|a| a.slots), Some(1));
    assert_eq!(found.load.map(|l| l.seq), Some(1));
    assert!(found.hello.is_none());
    assert!(matches!(
        presence_payloads(&[ad.clone(), other]),
        Err(ParseError::MissingChild { child: "load", .. })
    ));
    assert!(matches!(
        presence_payloads(&[load.clone(), load]),
        Err(ParseError::DuplicateChild { child: "load", .. })
    ));
}

/// (document, what the error must mention)
const INVALID: &[(&str, &str)] = &[
    // wrong element / namespace / version
    ("<job xmlns='urn:other' id='a' capability='c' attempt='1'/>", "expected <a Spine payload xmlns='urn:spine:1'>, found <job xmlns='urn:other'>"),
    ("<job xmlns='urn:spine:2' id='a' capability='c' attempt='1'/>", "unsupported protocol version"),
    // attributes
    ("<job xmlns='urn:spine:1' capability='c' attempt='1'/>", "missing the required attribute 'id'"),
    ("<job xmlns='urn:spine:1' id='a' capability='c' attempt='1' color='red'/>", "unknown attribute 'color'"),
    ("<job xmlns='urn:spine:1' id='a' capability='Image' attempt='1'/>", "'capability'='Image' is invalid"),
    ("<job xmlns='urn:spine:1' id='a b' capability='c' attempt='1'/>", "'id'='a b' is invalid"),
    ("<job xmlns='urn:spine:1' id='a' capability='c' attempt='0'/>", "attempts count from 1"),
    ("<job xmlns='urn:spine:1' id='a' capability='c' attempt='-1'/>", "unsigned decimal"),
    ("<job xmlns='urn:spine:1' id='a' capability='c' attempt='18446744073709551616'/>", "64 bits"),
    ("<job xmlns='urn:spine:1' id='a' capability='c' attempt='1' progress='yes'/>", "'true', 'false'"),
    // children and content
    ("<job xmlns='urn:spine:1' id='a' capability='c' attempt='1'><args>[1,2]</args></job>", "found an array"),
    ("<job xmlns='urn:spine:1' id='a' capability='c' attempt='1'><args>{nope}</args></job>", "JSON object"),
    ("<job xmlns='urn:spine:1' id='a' capability='c' attempt='1'><args>{}</args><args>{}</args></job>", "more than one <args>"),
    ("<job xmlns='urn:spine:1' id='a' capability='c' attempt='1'><extra/></job>", "unexpected child <extra"),
    ("<job xmlns='urn:spine:1' id='a' capability='c' attempt='1'><x xmlns='urn:other'/></job>", "unexpected child <x"),
    ("<job xmlns='urn:spine:1' id='a' capability='c' attempt='1'>text</job>", "must not contain text"),
    ("<job xmlns='urn:spine:1' id='a' capability='c' attempt='1'><input>!!!</input></job>", "invalid base64"),
    ("<job xmlns='urn:spine:1' id='a' capability='c' attempt='1'><input size='4'>aGVsbG8=</input></job>", "declared 4 bytes"),
    ("<job xmlns='urn:spine:1' id='a' capability='c' attempt='1'><input type='png'>aGVsbG8=</input></job>", "MIME"),
    ("<job xmlns='urn:spine:1' id='a' capability='c' attempt='1'><input blob='b' size='1'/></job>", "'sha256'"),
    ("<job xmlns='urn:spine:1' id='a' capability='c' attempt='1'><input blob='b' size='1' sha256='xyz'/></job>", "64 hexadecimal"),
    ("<job xmlns='urn:spine:1' id='a' capability='c' attempt='1'><input blob='b' size='1' sha256='aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'>aGk=</input></job>", "must not contain text"),
    // advertise / load
    ("<advertise xmlns='urn:spine:1' protocol='1.0' instance='i' gen='1' slots='1' heartbeat-ms='1000'/>", "at least one <capability>"),
    ("<advertise xmlns='urn:spine:1' protocol='2.0' instance='i' gen='1' slots='1' heartbeat-ms='1000'><capability name='a'/></advertise>", "major version 2"),
    ("<advertise xmlns='urn:spine:1' protocol='1.0' instance='i' gen='1' slots='0' heartbeat-ms='1000'><capability name='a'/></advertise>", "at least 1"),
    ("<advertise xmlns='urn:spine:1' protocol='1.0' instance='i' gen='1' slots='1' heartbeat-ms='5'><capability name='a'/></advertise>", "at least 100"),
    ("<advertise xmlns='urn:spine:1' protocol='1.0' instance='i' gen='1' slots='1' heartbeat-ms='1000'><capability name='a'/><capability name='a'/></advertise>", "listed twice"),
    ("<advertise xmlns='urn:spine:1' protocol='1.0' instance='i' gen='1' slots='1' heartbeat-ms='1000'><attr name='x' value='1'/><attr name='x' value='2'/><capability name='a'/></advertise>", "given twice"),
    ("<advertise xmlns='urn:spine:1' protocol='1.0' instance='i' gen='1' slots='1' heartbeat-ms='1000'><capability name='a'><attr name='1x' value='1'/></capability></advertise>", "'name'='1x'"),
    ("<load xmlns='urn:spine:1' seq='1' gen='1' state='busy' in-flight='0' yours='0' slots='1'/>", "'ready' or 'draining'"),
    ("<load xmlns='urn:spine:1' seq='1' gen='1' state='ready' in-flight='1' yours='2' slots='1'/>", "cannot exceed in-flight"),
    ("<load xmlns='urn:spine:1' seq='1' gen='1' state='ready' in-flight='0' yours='0' slots='1' loadavg='NaN'/>", "finite non-negative"),
    ("<load xmlns='urn:spine:1' seq='1' gen='1' state='ready' in-flight='0' yours='0' slots='1' loadavg='-1'/>", "finite non-negative"),
    ("<load xmlns='urn:spine:1' seq='1' gen='1' state='ready' in-flight='0' yours='0' slots='1'><cap name='a' in-flight='1'/><cap name='a' in-flight='1'/></load>", "reported twice"),
    ("<dispatcher xmlns='urn:spine:1'/>", "'protocol'"),
    // messages, chunk
    ("<progress xmlns='urn:spine:1' job='a' attempt='1' percent='101'/>", "0 to 100"),
    ("<partial xmlns='urn:spine:1' job='a' attempt='1'>aGk=</partial>", "'seq'"),
    ("<chunk xmlns='urn:spine:1' blob='b' offset='4' total='5'>aGVsbG8=</chunk>", "runs past total"),
    ("<chunk xmlns='urn:spine:1' blob='b' offset='18446744073709551615' total='5'>aGVsbG8=</chunk>", "runs past total"),
    ("<chunk xmlns='urn:spine:1' blob='b' offset='0' total='5'></chunk>", "empty chunk"),
    // submit and friends
    ("<submit xmlns='urn:spine:1' capability='c' strategy='fastest'/>", "unknown strategy 'fastest'"),
    ("<submit xmlns='urn:spine:1' capability='c' strategy='affinity'/>", "'affinity-key'"),
    ("<submit xmlns='urn:spine:1' capability='c' affinity-key='k'/>", "only the affinity strategy"),
    ("<submit xmlns='urn:spine:1' capability='c' filter='gpu='/>", "expected a value"),
    ("<submit xmlns='urn:spine:1' capability='c' max-attempts='0'/>", "at least 1"),
    ("<submit xmlns='urn:spine:1' capability='c' limit='5'/>", "only the all strategy takes a limit"),
    ("<submit xmlns='urn:spine:1' capability='c' strategy='all' limit='0'/>", "a number of agents"),
    ("<submit xmlns='urn:spine:1' capability='c' strategy='all' limit='101%'/>", "a percentage"),
    ("<submit xmlns='urn:spine:1' capability='c' strategy='all' batch='0'/>", "at least 1"),
    ("<submit xmlns='urn:spine:1' capability='c' idempotency-key=''/>", "1 to 256"),
    ("<submit xmlns='urn:spine:1' capability='c' split='s'/>", "only a map/reduce job (with reduce) takes split"),
    ("<submit xmlns='urn:spine:1' capability='c' fan-in='4'/>", "only a map/reduce job (with reduce) takes fan-in"),
    ("<submit xmlns='urn:spine:1' capability='c' reduce='r' fan-in='1'/>", "must be 2 to 4096"),
    ("<submit xmlns='urn:spine:1' capability='c' reduce='r' fan-in='4097'/>", "must be 2 to 4096"),
    ("<submit xmlns='urn:spine:1' capability='c' reduce='R'/>", "attribute 'reduce'='R' is invalid: segment 'R' must start"),
    ("<submit xmlns='urn:spine:1' capability='c' strategy='all' reduce='r'/>", "the all strategy cannot be a map/reduce"),
    ("<submit xmlns='urn:spine:1' capability='c' priority='high'/>", "decimal integer"),
    ("<submit xmlns='urn:spine:1' capability='c' wait-for-agent='yes'/>", "attribute 'wait-for-agent'='yes' is invalid"),
    ("<accepted xmlns='urn:spine:1' job='a' state='done'/>", "unknown job state"),
    ("<job-status xmlns='urn:spine:1' job='a' capability='c' state='running' attempts='1'><failure condition='failed'/></job-status>", "does not go with a <failure>"),
    ("<job-status xmlns='urn:spine:1' job='a' capability='c' state='failed' attempts='1'><result job='a' attempt='1'/></job-status>", "does not go with a <result>"),
    ("<job-status xmlns='urn:spine:1' job='a' capability='c' state='failed' attempts='1'><failure condition='oops'/></job-status>", "not a Spine error condition"),
    ("<job-status xmlns='urn:spine:1' job='a' capability='c' state='failed' attempts='1'><failure condition='bad-arguments' argument='size'/></job-status>", "unknown attribute 'argument'"),
    ("<job-status xmlns='urn:spine:1' job='a' capability='c' state='queued' attempts='1' agent='@@'/>", "not a valid JID"),
    ("<discover xmlns='urn:spine:1' capability='c' limit='ten'/>", "unsigned decimal"),
    ("<agents xmlns='urn:spine:1' capability='c'><agent jid='a@b/c' state='ready' in-flight='0' slots='1'/></agents>", "'load'"),
    ("<status xmlns='urn:spine:1'/>", "'job'"),
    ("<cancel xmlns='urn:spine:1' job='a'><x/></cancel>", "unexpected child"),
    ("<drain xmlns='urn:spine:1' why='rack 4'/>", "unknown attribute 'why'"),
    ("<drain xmlns='urn:spine:1'>rack 4</drain>", "must not contain text"),
    ("<undrain xmlns='urn:spine:1' reason='done'/>", "unknown attribute 'reason'"),
    ("<undrain xmlns='urn:spine:1'><drain/></undrain>", "unexpected child"),
];

#[test]
fn invalid_documents_get_specific_errors() {
    let mut wrong = Vec::new();
    for (doc, needle) in INVALID {
        match parse_payload(el(doc)) {
            Ok(p) => wrong.push(format!("accepted invalid document {doc}\n  -> {p:?}")),
            Err(e) => {
                let msg = e.to_string();
                if !msg.contains(needle) {
                    wrong.push(format!(
                        "error for {doc}\n  was:      {msg}\n  expected: …{needle}…"
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn oversized_inline_data_is_too_large() {
    use base64::Engine as _;
    let big = base64::engine::general_purpose::STANDARD.encode(vec![7u8; INLINE_LIMIT + 1]);
    let doc = format!(
        "<job xmlns='urn:spine:1' id='a' capability='c' attempt='1'><input>{big}</input></job>"
    );
    let err = Job::try_from(el(&doc)).unwrap_err();
    assert!(
        matches!(err, ParseError::TooLarge { limit: 65536, .. }),
        "{err}"
    );
    let se = err.to_spine_error();
    assert_eq!((se.condition, se.max), (Condition::TooLarge, Some(65536)));
    // exactly at the limit is fine
    let ok = base64::engine::general_purpose::STANDARD.encode(vec![7u8; INLINE_LIMIT]);
    let doc = format!(
        "<job xmlns='urn:spine:1' id='a' capability='c' attempt='1'><input>{ok}</input></job>"
    );
    assert_eq!(
        Job::try_from(el(&doc)).unwrap().input.map(|d| d.len()),
        Some(INLINE_LIMIT as u64)
    );
}

#[test]
fn parse_errors_map_to_conditions() {
    let e = parse_payload(el(
        "<job xmlns='urn:spine:1' id='a' capability='c' attempt='1'><args>3</args></job>",
    ))
    .unwrap_err();
    let se = e.to_spine_error();
    assert_eq!(
        (se.condition, se.field.as_deref()),
        (Condition::BadArguments, Some("args"))
    );
    let e = parse_payload(el("<job xmlns='urn:spine:7' id='a'/>")).unwrap_err();
    let se = e.to_spine_error();
    assert_eq!(
        (se.condition, se.supported.as_deref()),
        (Condition::UnsupportedVersion, Some("1"))
    );
    let e = parse_payload(el("<job xmlns='urn:spine:1'/>")).unwrap_err();
    assert_eq!(e.to_spine_error().condition, Condition::Malformed);
    let se: xmpp_parsers::stanza_error::StanzaError = e.to_spine_error().into();
    assert_eq!(
        se.defined_condition,
        xmpp_parsers::stanza_error::DefinedCondition::BadRequest
    );
}

#[test]
fn whitespace_in_base64_is_ignored() {
    let d = Data::try_from_input("<input xmlns='urn:spine:1'>aGVs\n  bG8=\n</input>");
    assert_eq!(d, Data::inline(b"hello".to_vec()));
}

trait TryFromInput {
    fn try_from_input(xml: &str) -> Data;
}
impl TryFromInput for Data {
    fn try_from_input(xml: &str) -> Data {
        let job = format!(
            "<job xmlns='urn:spine:1' id='a' capability='c' attempt='1'>{}</job>",
            xml.replace(" xmlns='urn:spine:1'", "")
        );
        Job::try_from(el(&job)).unwrap().input.unwrap()
    }
}

#[test]
fn all_strategy_limit_and_batch() {
    let s = Submit::try_from(el(
        "<submit xmlns='urn:spine:1' capability='c' strategy='all' limit='50%' batch='2'/>",
    ))
    .unwrap();
    assert_eq!(
        (s.strategy, s.limit, s.batch),
        (Strategy::All, Some(Limit::Percent(50)), Some(2))
    );
    assert_eq!(Limit::Percent(50).of(5), 3, "rounded up");
    assert_eq!(Limit::Percent(1).of(5), 1, "at least one");
    assert_eq!(Limit::Count(10).of(4), 4);
    assert_eq!(Limit::Count(2).of(4), 2);
    assert_eq!("7".parse::<Limit>(), Ok(Limit::Count(7)));
}

#[test]
fn map_reduce_attributes() {
    let s = Submit::try_from(el(
        "<submit xmlns='urn:spine:1' capability='wordcount.map' reduce='wordcount.reduce' split='wordcount.split' fan-in='8'/>",
    ))
    .unwrap();
    let m = s.mapreduce.unwrap();
    assert_eq!(m.reduce.as_str(), "wordcount.reduce");
    assert_eq!(m.split.unwrap().as_str(), "wordcount.split");
    assert_eq!(m.fan_in, 8);
    let s = Submit::try_from(el(
        "<submit xmlns='urn:spine:1' capability='wordcount.map' reduce='wordcount.reduce'/>",
    ))
    .unwrap();
    assert_eq!(s.mapreduce.unwrap().fan_in, DEFAULT_FAN_IN);
}

#[test]
fn a_submitters_bad_attribute_is_a_named_bad_argument() {
    let e = Submit::try_from(el(
        "<submit xmlns='urn:spine:1' capability='c' filter='gpu='/>",
    ))
    .unwrap_err()
    .to_spine_error();
    assert_eq!(
        (e.condition, e.field.as_deref()),
        (Condition::BadArguments, Some("filter"))
    );
    let e = Discover::try_from(el("<discover xmlns='urn:spine:1'/>"))
        .unwrap_err()
        .to_spine_error();
    assert_eq!(
        (e.condition, e.field.as_deref()),
        (Condition::BadArguments, Some("capability"))
    );
    // A dispatcher's <job> with a bad attribute is a malformed payload (PROTOCOL.md §7.3).
    let e = Job::try_from(el(
        "<job xmlns='urn:spine:1' id='a' capability='c' attempt='0'/>",
    ))
    .unwrap_err()
    .to_spine_error();
    assert_eq!(e.condition, Condition::Malformed);
}

/// The reference form of PROTOCOL.md §13.4.
const REF_HASH: &str = "zVLYHiXzcub6TbLA3861mGLBlpyrFwlto1KzSVDJc8w=";
const REF_HEX: &str = "cd52d81e25f372e6fa4db2c0dfceb59862c1969cab17096da352b34950c973cc";

fn ref_job(input_children: &str, input_attrs: &str) -> Result<Job, ParseError> {
    Job::try_from(el(&format!(
        "<job xmlns='urn:spine:1' id='{JOB_ID}' capability='image.thumbnail' attempt='2'>
           <input {input_attrs}>{input_children}</input>
         </job>"
    )))
}

fn sources(n: usize) -> String {
    let urls: String = (0..n)
        .map(|i| format!("<url-data xmlns='http://jabber.org/protocol/url-data' target='https://d{i}.example.com:8443/v1/blobs/{REF_HEX}?job=j&amp;sig=x'/>"))
        .collect();
    format!("<sources>{urls}</sources>")
}

fn hash(algo: &str, value: &str) -> String {
    format!("<hash xmlns='urn:xmpp:hashes:2' algo='{algo}'>{value}</hash>")
}

#[test]
fn input_reference_literal() {
    let j = ref_job(
        &format!(
            "{}{}{}",
            hash("sha-512", "AAAA"),
            hash("sha-256", REF_HASH),
            sources(2)
        ),
        "size='20971520' type='image/png'",
    )
    .unwrap();
    let Some(Data::Ref(r)) = j.input else {
        panic!("not a reference: {:?}", j.input)
    };
    assert_eq!(r.size, 20_971_520);
    assert_eq!(r.mime.as_deref(), Some("image/png"));
    assert_eq!(data::hex(&r.sha256), REF_HEX);
    assert_eq!(r.sources.len(), 2);
    assert_eq!(
        r.sources[1],
        format!("https://d1.example.com:8443/v1/blobs/{REF_HEX}?job=j&sig=x")
    );
}

#[test]
fn output_reference_literal_has_no_source_or_the_agents_own() {
    let res = JobResult::try_from(el(&format!(
        "<result xmlns='urn:spine:1' job='{JOB_ID}' attempt='1'><output size='1048576'>{}</output></result>",
        hash("sha-256", REF_HASH)
    )))
    .unwrap();
    let Some(Data::Ref(r)) = res.output else {
        panic!("not a reference")
    };
    assert_eq!((r.size, r.sources.len(), r.mime), (1_048_576, 0, None));
    // One source: the agent keeps the output and serves it there (§13.5).
    let res = JobResult::try_from(el(&format!(
        "<result xmlns='urn:spine:1' job='{JOB_ID}' attempt='1'><output size='1'>{}{}</output></result>",
        hash("sha-256", REF_HASH),
        sources(1)
    )))
    .unwrap();
    let Some(Data::Ref(r)) = res.output else {
        panic!("not a reference")
    };
    assert_eq!(r.sources.len(), 1);
    // Two are refused.
    let e = JobResult::try_from(el(&format!(
        "<result xmlns='urn:spine:1' job='{JOB_ID}' attempt='1'><output size='1'>{}{}</output></result>",
        hash("sha-256", REF_HASH),
        sources(2)
    )))
    .unwrap_err();
    assert!(e.to_string().contains("<sources>"), "{e}");
}

#[test]
fn invalid_references_are_refused() {
    let h = hash("sha-256", REF_HASH);
    let s1 = sources(1);
    let cases: Vec<(String, &str, &str)> = vec![
        // A job's reference needs sources.
        (h.clone(), "size='1'", "sources"),
        // size is required; blob/sha256 attributes belong to the chunked form.
        (format!("{h}{s1}"), "", "size"),
        (format!("{h}{s1}"), "size='1' blob='b1'", "blob"),
        (format!("{h}{s1}"), "size='1' sha256='00'", "sha256"),
        // No sha-256 hash, two of them, a wrong length, not base64.
        (format!("{}{s1}", hash("sha-512", "AAAA")), "size='1'", "hash"),
        (format!("{h}{h}{s1}"), "size='1'", "more than one"),
        (format!("{}{s1}", hash("sha-256", "AAAA")), "size='1'", "32 bytes"),
        (format!("{}{s1}", hash("sha-256", "!!")), "size='1'", "base64"),
        // Sources: 1 to 8, http(s) only, nothing else inside.
        (format!("{h}<sources/>"), "size='1'", "url-data"),
        (format!("{h}{}", sources(9)), "size='1'", "more than 8"),
        (
            format!("{h}<sources><url-data xmlns='http://jabber.org/protocol/url-data' target='ftp://x/y'/></sources>"),
            "size='1'",
            "http",
        ),
        (
            format!("{h}<sources><url-data xmlns='http://jabber.org/protocol/url-data' target='https://x/{}'/></sources>", "a".repeat(4100)),
            "size='1'",
            "4096",
        ),
        (
            format!("{h}<sources><url-data xmlns='http://jabber.org/protocol/url-data' target='https://x/' sid='1'/></sources>"),
            "size='1'",
            "sid",
        ),
        (format!("{h}{s1}{s1}"), "size='1'", "sources"),
        (format!("{h}{s1}<extra/>"), "size='1'", "extra"),
        (format!("{h}{s1}text"), "size='1'", "text"),
    ];
    for (children, attrs, needle) in cases {
        let e = ref_job(&children, attrs).expect_err(&children);
        assert!(
            e.to_string().contains(needle),
            "expected '{needle}' in: {e}\n{children} {attrs}"
        );
        assert_eq!(e.to_spine_error().condition, Condition::Malformed);
    }
    // A submitter cannot hand the dispatcher a reference.
    let e = Submit::try_from(el(&format!(
        "<submit xmlns='urn:spine:1' capability='c'><input size='1'>{h}{s1}</input></submit>"
    )))
    .unwrap_err();
    assert!(e.to_string().contains("reference"), "{e}");
}

#[test]
fn request_slot_and_slot_literals() {
    let r = RequestSlot::try_from(el(&format!(
        "<request-slot xmlns='urn:spine:1' job='{JOB_ID}' attempt='1' size='1048576' sha256='{REF_HEX}' type='image/png'/>"
    )))
    .unwrap();
    assert_eq!((r.job.as_str(), r.attempt, r.size), (JOB_ID, 1, 1_048_576));
    assert_eq!(data::hex(&r.sha256), REF_HEX);
    assert_eq!(r.mime.as_deref(), Some("image/png"));
    let s = Slot::try_from(el(&format!(
        "<slot xmlns='urn:spine:1' job='{JOB_ID}' put='https://d.example.com:8443/v1/uploads/{JOB_ID}?attempt=1&amp;sig=x' expires-ms='300000'/>"
    )))
    .unwrap();
    assert_eq!(s.expires_ms, 300_000);
    assert_eq!(
        s.put,
        format!("https://d.example.com:8443/v1/uploads/{JOB_ID}?attempt=1&sig=x")
    );
    for bad in [
        format!("<request-slot xmlns='urn:spine:1' job='{JOB_ID}' attempt='0' size='1' sha256='{REF_HEX}'/>"),
        format!("<request-slot xmlns='urn:spine:1' job='{JOB_ID}' attempt='1' sha256='{REF_HEX}'/>"),
        format!("<request-slot xmlns='urn:spine:1' job='{JOB_ID}' attempt='1' size='1' sha256='abc'/>"),
        format!("<request-slot xmlns='urn:spine:1' job='{JOB_ID}' attempt='1' size='1' sha256='{REF_HEX}' x='1'/>"),
    ] {
        assert!(RequestSlot::try_from(el(&bad)).is_err(), "{bad}");
    }
    for bad in [
        format!(
            "<slot xmlns='urn:spine:1' job='{JOB_ID}' put='file:///etc/passwd' expires-ms='1'/>"
        ),
        format!("<slot xmlns='urn:spine:1' job='{JOB_ID}' put='https://d/x'/>"),
        format!(
            "<slot xmlns='urn:spine:1' job='{JOB_ID}' put='https://d/x' expires-ms='1'><x/></slot>"
        ),
    ] {
        assert!(Slot::try_from(el(&bad)).is_err(), "{bad}");
    }
}

#[test]
fn fetch_failed_and_storage_full_travel_as_wait() {
    use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType};
    assert_eq!(
        Condition::FetchFailed.xmpp(),
        (DefinedCondition::RecipientUnavailable, ErrorType::Wait)
    );
    assert_eq!(
        Condition::StorageFull.xmpp(),
        (DefinedCondition::ResourceConstraint, ErrorType::Wait)
    );
    assert_eq!("fetch-failed".parse(), Ok(Condition::FetchFailed));
    assert_eq!("storage-full".parse(), Ok(Condition::StorageFull));
}

#[test]
fn drain_and_undrain_literals() {
    let p = parse_payload(el(
        "<drain xmlns='urn:spine:1' reason='kernel upgrade on rack 4 &amp; reboot'/>",
    ))
    .unwrap();
    assert_eq!(
        p,
        Payload::Drain(Drain {
            reason: Some("kernel upgrade on rack 4 & reboot".into())
        })
    );
    assert_eq!(
        parse_payload(el("<drain xmlns='urn:spine:1'/>")).unwrap(),
        Payload::Drain(Drain { reason: None })
    );
    assert_eq!(
        parse_payload(el("<undrain xmlns='urn:spine:1'/>")).unwrap(),
        Payload::Undrain(Undrain)
    );
    // A reason is a line, not a document.
    let long = format!(
        "<drain xmlns='urn:spine:1' reason='{}'/>",
        "x".repeat(operator::MAX_REASON + 1)
    );
    let e = parse_payload(el(&long)).unwrap_err();
    assert!(e.to_string().contains("at most 1024 characters"), "{e}");
    assert_eq!(e.to_spine_error().condition, Condition::Malformed);
    // What an agent that predates drain answers (PROTOCOL.md §2.1): malformed, naming it.
    let old = e.to_spine_error();
    assert!(old.text.is_some());
}
