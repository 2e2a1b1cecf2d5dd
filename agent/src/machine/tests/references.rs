//! Protocol 1.1 in the core: inputs fetched by reference, outputs uploaded to a slot, and the
//! fallbacks to chunks, at fixed times (the transfers are the driver's; here their ends are
//! fed in by hand).

use super::*;
use spine_protocol::{RequestSlot, Slot};

fn data_ref(bytes: &[u8]) -> DataRef {
    DataRef {
        size: bytes.len() as u64,
        sha256: Sha256::digest(bytes).into(),
        mime: Some("image/png".into()),
        sources: vec!["http://127.0.0.1:9/v1/blobs/x?sig=s".into()],
    }
}

fn ref_job(id: &str, bytes: &[u8]) -> Job {
    let mut j = job(id, "test.echo");
    j.input = Some(Data::Ref(data_ref(bytes)));
    j.progress = true;
    j
}

fn hello(c: &mut Core, minor: u32, now: Instant) {
    let p = Presence::available()
        .with_from(jid(DISPATCHER))
        .with_payload(spine_protocol::DispatcherHello {
            protocol: ProtocolVersion { major: 1, minor },
        });
    c.stanza(p.into(), now);
    c.take_ready();
}

fn advertised_version(r: &Ready) -> Vec<ProtocolVersion> {
    r.out
        .iter()
        .filter_map(|o| match o {
            Out::Load {
                advertise: Some(a), ..
            } => Some(a.protocol),
            _ => None,
        })
        .collect()
}

fn request_slots(r: &Ready) -> Vec<(String, RequestSlot)> {
    iqs(r)
        .into_iter()
        .filter_map(|iq| match iq {
            Iq::Get { id, payload, .. } => {
                Some((id.clone(), RequestSlot::try_from(payload.clone()).ok()?))
            }
            _ => None,
        })
        .collect()
}

fn chunk_count(r: &Ready) -> usize {
    iqs(r)
        .into_iter()
        .filter(|iq| matches!(iq, Iq::Set { payload, .. } if payload.name() == "chunk"))
        .count()
}

#[test]
fn http_data_decides_the_announced_version() {
    let t0 = Instant::now();
    let caps = BTreeMap::from([(cap("test.echo"), CapabilityAd::new(cap("test.echo")))]);
    // 1.2 (`<recall/>`) builds on 1.1 (HTTP transfers).
    for (http_data, minor) in [(true, 2), (false, 0)] {
        let config = AgentConfig {
            http_data,
            ..AgentConfig::default()
        };
        let mut c = Core::new(
            &config,
            vec![jid(DISPATCHER).to_bare()],
            caps.clone(),
            Attributes::new(),
            7,
            t0,
        );
        c.session_started(t0);
        let r = c.take_ready();
        assert_eq!(
            advertised_version(&r),
            [ProtocolVersion { major: 1, minor }]
        );
    }
}

#[test]
fn a_reference_input_is_fetched_then_the_handler_starts_with_its_bytes() {
    let t0 = Instant::now();
    let mut c = core(1, t0);
    let mut j = ref_job("j1", b"input bytes");
    j.deadline_ms = Some(20_000);
    let r = send_job(&mut c, DISPATCHER, "d1", j, t0);
    assert!(r.starts.is_empty() && iqs(&r).is_empty(), "{r:?}");
    let [f] = &r.fetches[..] else {
        panic!("one fetch: {r:?}")
    };
    assert_eq!(f.source, Source::Ref(data_ref(b"input bytes")));
    assert_eq!(f.deadline, t0 + Duration::from_secs(20));
    // The fetching job holds the agent's one slot.
    let r = send_job(&mut c, DISPATCHER, "d2", job("j2", "test.echo"), t0);
    assert_eq!(condition_of(&r, "d2"), Condition::Busy);

    c.fetched(
        f.key,
        Ok(Fetched::Bytes(b"input bytes".to_vec())),
        t0 + 5 * MS,
    );
    let r = c.take_ready();
    let [s] = &r.starts[..] else {
        panic!("one start: {r:?}")
    };
    assert_eq!(
        (s.input.as_slice(), s.input_mime.as_deref()),
        (&b"input bytes"[..], Some("image/png"))
    );
    assert_eq!(s.deadline, Some(t0 + Duration::from_secs(20)));
    // The start notification is held back from the start, not from the job's arrival.
    assert!(r.out.is_empty(), "{r:?}");
    c.tick(t0 + 4 * MS + START_NOTICE_HOLD);
    assert!(c.take_ready().out.is_empty());
    c.tick(t0 + 5 * MS + START_NOTICE_HOLD);
    assert_eq!(start_notices(&c.take_ready()).len(), 1);
    c.job_done(done("j1", Ok(Output::bytes("ok"))), t0 + 20 * MS);
    let r = c.take_ready();
    assert_eq!(
        result_of(&r, "d1").output,
        Some(Data::Inline {
            mime: None,
            bytes: b"ok".to_vec()
        })
    );
}

#[test]
fn a_failed_fetch_answers_fetch_failed_and_the_same_attempt_in_chunks_runs() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    let r = send_job(&mut c, DISPATCHER, "d1", ref_job("j1", b"abc"), t0);
    let key = r.fetches[0].key;
    c.fetched(
        key,
        Err("127.0.0.1:9: HTTP status 403 Forbidden".into()),
        t0,
    );
    let r = c.take_ready();
    let e = answer(&r, "d1").expect("answer").expect_err("an error");
    assert_eq!(e.condition, Condition::FetchFailed);
    assert_eq!(
        e.text.as_deref(),
        Some("127.0.0.1:9: HTTP status 403 Forbidden")
    );
    assert!(r.starts.is_empty());
    assert_eq!(c.running(), 0);
    // A late end of the same transfer changes nothing.
    c.fetched(key, Ok(Fetched::Bytes(b"abc".to_vec())), t0);
    assert!(c.take_ready().starts.is_empty());
    // The dispatcher resends the same id and attempt, inline this time: it runs.
    let mut again = job("j1", "test.echo");
    again.input = Some(Data::inline(b"abc".to_vec()));
    let r = send_job(&mut c, DISPATCHER, "d2", again, t0 + MS);
    assert_eq!(r.starts.len(), 1);
    assert_eq!(r.starts[0].input, b"abc");
}

#[test]
fn a_cancel_while_fetching_aborts_the_transfer_and_answers_cancelled() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    let r = send_job(&mut c, DISPATCHER, "d1", ref_job("j1", b"abc"), t0);
    let key = r.fetches[0].key;
    let r = send_set(&mut c, "c1", Cancel { job: job_id("j1") }, t0);
    assert_eq!(r.aborts, [key]);
    assert_eq!(condition_of(&r, "d1"), Condition::Cancelled);
    assert!(matches!(answer(&r, "c1"), Some(Ok(None))));
    assert_eq!(c.running(), 0);
}

/// A started core of one dispatcher offering `test.echo`, configured by `config`.
fn echo_core(config: &AgentConfig, t0: Instant) -> Core {
    let caps = BTreeMap::from([(cap("test.echo"), CapabilityAd::new(cap("test.echo")))]);
    let mut c = Core::new(
        config,
        vec![jid(DISPATCHER).to_bare()],
        caps,
        Attributes::new(),
        7,
        t0,
    );
    c.session_started(t0);
    c.take_ready();
    c
}

#[test]
fn with_http_data_off_a_reference_is_refused_with_fetch_failed() {
    let t0 = Instant::now();
    let config = AgentConfig {
        http_data: false,
        ..AgentConfig::default()
    };
    let mut c = echo_core(&config, t0);
    let r = send_job(&mut c, DISPATCHER, "d1", ref_job("j1", b"abc"), t0);
    assert!(r.fetches.is_empty());
    assert_eq!(condition_of(&r, "d1"), Condition::FetchFailed);
    let r = send_job(&mut c, DISPATCHER, "d2", list_job("j2", true), t0);
    assert!(r.fetches.is_empty());
    assert_eq!(condition_of(&r, "d2"), Condition::FetchFailed);
}

/// An inline fragment list whose fragments name blobs by URL (a reduce step's map outputs).
fn list_job(id: &str, with_urls: bool) -> Job {
    let mut named = spine_protocol::Fragment::reference([7; 32], 5).with_name("m0");
    if let Some(r) = named.source.as_mut().filter(|_| with_urls) {
        r.url = Some("http://127.0.0.1:9/v1/blobs/07?sig=s".into());
    }
    let list = vec![named, spine_protocol::Fragment::new(b"inline".to_vec())];
    let mut j = job(id, "test.echo");
    j.input = Some(Data::Inline {
        mime: Some(spine_protocol::FRAGMENTS_MIME.into()),
        bytes: spine_protocol::fragments::encode(&list),
    });
    j
}

#[test]
fn a_fragment_list_naming_blobs_is_fetched_before_the_handler_starts() {
    let t0 = Instant::now();
    let mut c = core(1, t0);
    let r = send_job(&mut c, DISPATCHER, "d1", list_job("j1", true), t0);
    assert!(r.starts.is_empty(), "{r:?}");
    let [f] = &r.fetches[..] else {
        panic!("one fetch: {r:?}")
    };
    let Source::Fragments(list) = &f.source else {
        panic!("the list's references: {f:?}")
    };
    assert_eq!(list.len(), 2);
    assert_eq!(f.source.size(), 5 + 6, "what the fetch brings in, at most");
    // The data plane hands back the list with every fragment inline.
    let resolved = spine_protocol::fragments::encode(&[
        spine_protocol::Fragment::new(b"fetch".to_vec()).with_name("m0"),
        spine_protocol::Fragment::new(b"inline".to_vec()),
    ]);
    c.fetched(f.key, Ok(Fetched::Bytes(resolved.clone())), t0 + 5 * MS);
    let r = c.take_ready();
    let [s] = &r.starts[..] else {
        panic!("one start: {r:?}")
    };
    assert_eq!(s.input, resolved);
    assert_eq!(
        s.input_mime.as_deref(),
        Some(spine_protocol::FRAGMENTS_MIME)
    );

    // A list whose references carry no URL goes to the handler as it came.
    let mut c = core(1, t0);
    let r = send_job(&mut c, DISPATCHER, "d1", list_job("j2", false), t0);
    assert!(r.fetches.is_empty());
    assert_eq!(r.starts.len(), 1);

    // Over max_input_size: too-large, nothing fetched.
    let config = AgentConfig {
        max_input_size: bytesize::ByteSize::b(10),
        ..AgentConfig::default()
    };
    let mut c = echo_core(&config, t0);
    let r = send_job(&mut c, DISPATCHER, "d1", list_job("j3", true), t0);
    assert!(r.fetches.is_empty());
    assert_eq!(condition_of(&r, "d1"), Condition::TooLarge);
}

#[test]
fn a_fragment_list_in_chunks_naming_blobs_is_fetched_too() {
    let t0 = Instant::now();
    let mut c = core(1, t0);
    let named = |i: usize| {
        let mut f =
            spine_protocol::Fragment::reference([i as u8; 32], 5).with_name("l".repeat(40_000));
        if let Some(r) = f.source.as_mut() {
            r.url = Some(format!("http://127.0.0.1:9/v1/blobs/{i}?sig=s"));
        }
        f
    };
    let list = spine_protocol::fragments::encode(&[named(1), named(2)]);
    assert!(list.len() > INLINE_LIMIT);
    let blob: BlobId = "in-7".parse().expect("blob id");
    for (i, ch) in spine_protocol::chunks(&blob, &list).into_iter().enumerate() {
        let iq = format!("c{i}");
        let r = send_set(&mut c, &iq, ch, t0);
        assert_eq!(answer(&r, &iq), Some(Ok(None)));
    }
    let mut j = job("a", "test.echo");
    j.input = Some(Data::Blob(spine_protocol::BlobRef {
        blob,
        size: list.len() as u64,
        sha256: Sha256::digest(&list).into(),
        mime: Some(spine_protocol::FRAGMENTS_MIME.into()),
    }));
    let r = send_job(&mut c, DISPATCHER, "j1", j, t0);
    assert!(r.starts.is_empty(), "{r:?}");
    let [f] = &r.fetches[..] else {
        panic!("one fetch: {r:?}")
    };
    assert_eq!(f.source, Source::Fragments(vec![named(1), named(2)]));
}

/// The chunks of [`big`] (all within the window).
const BIG_CHUNKS: usize = 200_000usize.div_ceil(INLINE_LIMIT);

fn big() -> Vec<u8> {
    (0..200_000u32).map(|i| (i % 251) as u8).collect()
}

/// A 1.1 dispatcher's job whose handler returned a large output: the slot request sent.
fn large_output(c: &mut Core, t0: Instant) -> (String, RequestSlot) {
    hello(c, 1, t0);
    send_job(c, DISPATCHER, "d1", job("j1", "test.echo"), t0);
    c.job_done(
        done("j1", Ok(Output::bytes(big()).with_mime("image/png"))),
        t0 + MS,
    );
    let r = c.take_ready();
    assert_eq!(chunk_count(&r), 0);
    let mut slots = request_slots(&r);
    assert_eq!(slots.len(), 1, "{r:?}");
    slots.remove(0)
}

fn slot_answer(iq: &str, job: &str) -> Stanza {
    Iq::from_result(
        iq,
        Some(Slot {
            job: job_id(job),
            put: "http://127.0.0.1:9/v1/uploads/j1?sig=s".into(),
            expires_ms: 300_000,
        }),
    )
    .with_from(jid(DISPATCHER))
    .into()
}

#[test]
fn a_large_output_goes_to_an_upload_slot_and_the_result_refers_to_it() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    let (iq, req) = large_output(&mut c, t0);
    let sha: [u8; 32] = Sha256::digest(big()).into();
    assert_eq!(
        (
            req.job.as_str(),
            req.attempt,
            req.size,
            req.sha256,
            req.mime.as_deref()
        ),
        ("j1", 1, 200_000, sha, Some("image/png"))
    );
    c.stanza(slot_answer(&iq, "j1"), t0 + 2 * MS);
    let r = c.take_ready();
    let [p] = &r.puts[..] else {
        panic!("one PUT: {r:?}")
    };
    assert_eq!(p.url, "http://127.0.0.1:9/v1/uploads/j1?sig=s");
    assert_eq!(p.bytes.as_slice(), big().as_slice());
    assert_eq!(p.mime.as_deref(), Some("image/png"));
    c.put_done(p.key, Ok(()), t0 + 3 * MS);
    let r = c.take_ready();
    assert_eq!(
        result_of(&r, "d1").output,
        Some(Data::Ref(DataRef {
            size: 200_000,
            sha256: sha,
            mime: Some("image/png".into()),
            sources: vec![],
        }))
    );
}

#[test]
fn a_refused_slot_a_failed_put_or_no_answer_sends_the_output_in_chunks() {
    let t0 = Instant::now();
    // Refused.
    let mut c = core(4, t0);
    let (iq, _) = large_output(&mut c, t0);
    let refusal = Iq::from_error(
        iq,
        StanzaError::from(SpineError::new(Condition::StorageFull)),
    )
    .with_from(jid(DISPATCHER));
    c.stanza(refusal.into(), t0 + 2 * MS);
    assert_eq!(chunk_count(&c.take_ready()), BIG_CHUNKS);
    // The PUT failed.
    let mut c = core(4, t0);
    let (iq, _) = large_output(&mut c, t0);
    c.stanza(slot_answer(&iq, "j1"), t0 + 2 * MS);
    let key = c.take_ready().puts[0].key;
    c.put_done(key, Err("127.0.0.1:9: HTTP status 507".into()), t0 + 3 * MS);
    assert_eq!(chunk_count(&c.take_ready()), BIG_CHUNKS);
    // A slot for another job is not used.
    let mut c = core(4, t0);
    let (iq, _) = large_output(&mut c, t0);
    c.stanza(slot_answer(&iq, "other"), t0 + 2 * MS);
    let r = c.take_ready();
    assert!(r.puts.is_empty());
    assert_eq!(chunk_count(&r), BIG_CHUNKS);
    // No answer: the core wakes at the slot timeout and sends chunks.
    let mut c = core(4, t0);
    large_output(&mut c, t0);
    let at = t0 + MS + refs::SLOT_TIMEOUT;
    assert!(c.poll_timeout() <= at);
    c.tick(at);
    assert_eq!(chunk_count(&c.take_ready()), BIG_CHUNKS);
}

#[test]
fn a_dispatcher_is_known_to_speak_1_1_from_its_hello_or_a_reference() {
    let t0 = Instant::now();
    // A 1.0 hello: chunks.
    let mut c = core(4, t0);
    hello(&mut c, 0, t0);
    send_job(&mut c, DISPATCHER, "d1", job("j1", "test.echo"), t0);
    c.job_done(done("j1", Ok(Output::bytes(big()))), t0 + MS);
    let r = c.take_ready();
    assert!(request_slots(&r).is_empty());
    assert_eq!(chunk_count(&r), BIG_CHUNKS);
    // No hello, but a job with a reference: a slot.
    let mut c = core(4, t0);
    let r = send_job(&mut c, DISPATCHER, "d1", ref_job("j1", b"abc"), t0);
    c.fetched(r.fetches[0].key, Ok(Fetched::Bytes(b"abc".to_vec())), t0);
    c.take_ready();
    c.job_done(done("j1", Ok(Output::bytes(big()))), t0 + MS);
    assert_eq!(request_slots(&c.take_ready()).len(), 1);
}

/// An agent that serves kept outputs (`data_listen`): it advertises its URL; a job with
/// `<keep/>` and a large output has it written to the keep directory (by the driver) and
/// answered with the agent's own URL; when keeping fails the output goes to a slot; a job
/// without `<keep/>` uploads as before.
#[test]
fn a_kept_output_is_answered_with_the_agents_url_and_falls_back_to_a_slot() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    c.set_serves("http://127.0.0.1:7443/".into());
    c.session_started(t0);
    let r = c.take_ready();
    let serves: Vec<Option<String>> = r
        .out
        .iter()
        .filter_map(|o| match o {
            Out::Load {
                advertise: Some(a), ..
            } => Some(a.serves.clone()),
            _ => None,
        })
        .collect();
    assert!(!serves.is_empty());
    assert!(serves
        .iter()
        .all(|s| s.as_deref() == Some("http://127.0.0.1:7443")));
    hello(&mut c, 1, t0);
    let sha: [u8; 32] = Sha256::digest(big()).into();
    for (n, fails) in [(1, false), (2, true)] {
        let id = format!("m{n}");
        let mut j = job(&id, "test.echo");
        j.keep = Some(spine_protocol::Keep { key: [n; 32] });
        send_job(&mut c, DISPATCHER, &format!("d{n}"), j, t0);
        c.job_done(done(&id, Ok(Output::bytes(big()))), t0 + MS);
        let r = c.take_ready();
        let [k] = &r.keeps[..] else {
            panic!("one output to keep: {r:?}")
        };
        assert_eq!((k.sha256, k.holder_key), (sha, [n; 32]));
        assert_eq!(k.bytes.as_slice(), big().as_slice());
        assert!(request_slots(&r).is_empty() && chunk_count(&r) == 0);
        let key = k.key;
        if fails {
            c.kept(key, Err("disk full".into()), t0 + 2 * MS);
            let r = c.take_ready();
            assert_eq!(request_slots(&r).len(), 1, "uploaded instead");
        } else {
            c.kept(key, Ok(()), t0 + 2 * MS);
            let r = c.take_ready();
            let Some(Data::Ref(d)) = result_of(&r, &format!("d{n}")).output else {
                panic!("a reference")
            };
            assert_eq!(
                d.sources,
                vec![format!(
                    "http://127.0.0.1:7443/v1/blobs/{}",
                    spine_protocol::data::hex(&sha)
                )]
            );
        }
    }
    // Without <keep/>: a slot, as without data_listen.
    send_job(&mut c, DISPATCHER, "d3", job("j3", "test.echo"), t0);
    c.job_done(done("j3", Ok(Output::bytes(big()))), t0 + MS);
    let r = c.take_ready();
    assert!(r.keeps.is_empty());
    assert_eq!(request_slots(&r).len(), 1);
}
