//! The core's output uploads and load reports, at fixed times.

use super::*;

/// The chunk IQs sent: (IQ id, recipient, chunk).
fn chunk_sets(r: &Ready) -> Vec<(String, Jid, Chunk)> {
    iqs(r)
        .into_iter()
        .filter_map(|iq| match iq {
            Iq::Set {
                id, to, payload, ..
            } => Some((
                id.clone(),
                to.clone().expect("addressed"),
                Chunk::try_from(payload.clone()).ok()?,
            )),
            _ => None,
        })
        .collect()
}

fn ack(c: &mut Core, iq: &str, from: &str, now: Instant) -> Ready {
    c.stanza(
        Iq::empty_result(jid("agent@localhost/a"), iq.to_owned())
            .with_from(jid(from))
            .into(),
        now,
    );
    c.take_ready()
}

#[test]
fn output_over_the_inline_limit_goes_as_windowed_chunks_then_the_result() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    send_job(&mut c, DISPATCHER, "j1", job("a", "test.echo"), t0);
    let bytes: Vec<u8> = (0..20 * INLINE_LIMIT).map(|i| (i % 249) as u8).collect();
    let out = Output::bytes(bytes.clone()).with_mime("application/x-test");
    c.job_done(done("a", Ok(out)), t0 + MS);
    let r = c.take_ready();
    let mut in_flight: Vec<(String, Jid, Chunk)> = chunk_sets(&r);
    assert_eq!(in_flight.len(), CHUNK_WINDOW);
    assert!(
        answer(&r, "j1").is_none(),
        "the result waits for the chunks"
    );
    assert!(in_flight.iter().all(|(_, to, _)| *to == jid(DISPATCHER)));
    // A second request for the job while its output uploads is attached to it.
    assert!(
        send_job(&mut c, DISPATCHER, "j2", job("a", "test.echo"), t0 + MS)
            .starts
            .is_empty()
    );

    // An acknowledgement from someone else does not count.
    let r = ack(&mut c, &in_flight[0].0, "intruder@localhost/x", t0 + 2 * MS);
    assert!(r.out.is_empty());

    let mut got: Vec<Chunk> = Vec::new();
    let mut last = None;
    while !in_flight.is_empty() {
        let (iq, _, ch) = in_flight.remove(0);
        got.push(ch);
        let r = ack(&mut c, &iq, DISPATCHER, t0 + 3 * MS);
        in_flight.extend(chunk_sets(&r));
        assert!(in_flight.len() <= CHUNK_WINDOW);
        last = Some(r);
    }
    assert_eq!(got.len(), 20);
    let assembled: Vec<u8> = got.iter().flat_map(|c| c.bytes.clone()).collect();
    assert_eq!(assembled, bytes);
    let r = last.expect("acknowledgements");
    for iq in ["j1", "j2"] {
        match result_of(&r, iq).output {
            Some(Data::Blob(b)) => {
                assert_eq!(b.blob, got[0].blob);
                assert_eq!(b.size, bytes.len() as u64);
                assert_eq!(b.sha256, <[u8; 32]>::from(Sha256::digest(&bytes)));
                assert_eq!(b.mime.as_deref(), Some("application/x-test"));
            }
            other => panic!("expected a blob reference, got {other:?}"),
        }
    }
    // And the outcome is cached like any other.
    let r = send_job(&mut c, DISPATCHER, "j3", job("a", "test.echo"), t0 + 4 * MS);
    assert!(matches!(result_of(&r, "j3").output, Some(Data::Blob(_))));
}

#[test]
fn a_refused_chunk_fails_the_job_retryably_and_a_reconnect_restarts_the_upload() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    send_job(&mut c, DISPATCHER, "j1", job("a", "test.echo"), t0);
    send_job(&mut c, DISPATCHER, "j2", job("b", "test.echo"), t0);
    let big = || Output::bytes(vec![7u8; 10 * INLINE_LIMIT]);
    c.job_done(done("a", Ok(big())), t0);
    let first_a = chunk_sets(&c.take_ready());
    c.job_done(done("b", Ok(big())), t0);
    let first_b = chunk_sets(&c.take_ready());

    // The session ends and comes back: both uploads start over from their first chunk.
    c.session_started(t0 + MS);
    let r = c.take_ready();
    let again = chunk_sets(&r);
    assert_eq!(again.len(), 2 * CHUNK_WINDOW);
    assert_eq!(
        again.iter().filter(|(_, _, ch)| ch.offset == 0).count(),
        2,
        "{again:?}"
    );
    // Acknowledgements of the old session are stale.
    assert!(ack(&mut c, &first_a[0].0, DISPATCHER, t0 + 2 * MS)
        .out
        .is_empty());
    let (b_iq, _, _) = again
        .iter()
        .find(|(_, _, ch)| ch.blob == first_b[0].2.blob)
        .expect("b's chunks");

    // A refusal ends that upload with a retryable error.
    let refusal = Iq::from_error(
        b_iq.clone(),
        StanzaError::new(
            xmpp_parsers::stanza_error::ErrorType::Wait,
            xmpp_parsers::stanza_error::DefinedCondition::ResourceConstraint,
            "en",
            "full",
        ),
    )
    .with_from(jid(DISPATCHER));
    c.stanza(refusal.into(), t0 + 3 * MS);
    let r = c.take_ready();
    assert_eq!(condition_of(&r, "j2"), Condition::Retryable);
    // ...and is not cached: the job runs again.
    let r = send_job(&mut c, DISPATCHER, "j3", job("b", "test.echo"), t0 + 4 * MS);
    assert_eq!(r.starts.len(), 1);
}

#[test]
fn load_reports_carry_increasing_sequence_numbers_on_a_doubling_heartbeat() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    let mut seqs = vec![];
    let mut beats = vec![];
    for _ in 0..7 {
        let at = c.poll_timeout();
        beats.push(at.duration_since(t0).as_millis());
        c.tick(at);
        let r = c.take_ready();
        let l = loads(&r);
        assert_eq!(l.len(), 2, "one report per dispatcher");
        seqs.extend(l.iter().map(|(_, l, _)| l.seq));
    }
    // 0.5 s, then doubling up to the 10 s heartbeat.
    assert_eq!(beats, [500, 1500, 3500, 7500, 15500, 25500, 35500]);
    assert_eq!(seqs, (3..=16).collect::<Vec<u64>>());
    // A hello is answered with the advertisement, next in the same sequence.
    let hello = Presence::available()
        .with_from(jid(DISPATCHER))
        .with_payload(spine_protocol::DispatcherHello {
            protocol: ProtocolVersion::CURRENT,
        });
    c.stanza(hello.into(), t0 + Duration::from_secs(40));
    let r = c.take_ready();
    let l = loads(&r);
    assert_eq!(l.len(), 1);
    assert!(l[0].2, "with the advertisement");
    assert_eq!(l[0].1.seq, 17);
}

#[test]
fn job_changes_within_the_debounce_are_reported_when_it_ends() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    let debounce = AgentConfig::default().load_debounce;
    let t1 = t0 + Duration::from_millis(100);
    assert_eq!(
        loads(&send_job(
            &mut c,
            DISPATCHER,
            "j1",
            job("a", "test.echo"),
            t1
        ))
        .len(),
        2
    );
    let r = send_job(&mut c, DISPATCHER, "j2", job("b", "test.echo"), t1 + MS);
    assert!(loads(&r).is_empty(), "within the debounce");
    assert_eq!(c.poll_timeout(), t1 + debounce);
    c.tick(t1 + debounce);
    let r = c.take_ready();
    let l = loads(&r);
    assert_eq!(l.len(), 2);
    assert_eq!(l[0].1.in_flight, 2);
}
