//! The output transfers as a state machine: requests and replies in at fixed times, chunks
//! and statuses out.

use super::*;
use spine_protocol::blob::BlobStore;
use spine_protocol::{JobResult, JobState};

const KIB: u64 = 1024;

fn output(n: u64) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

fn job(n: u64) -> JobId {
    format!("job-{n}").parse().unwrap()
}

fn request(to: &str, via: Via, job_id: JobId, bytes: &[u8]) -> Request {
    let status = JobStatus {
        job: job_id.clone(),
        capability: "work.big".parse().unwrap(),
        state: JobState::Succeeded,
        attempts: 1,
        agent: None,
        percent: Some(100),
        outcome: Some(Outcome::Result(JobResult {
            job: job_id.clone(),
            attempt: 1,
            elapsed_ms: None,
            meta: Default::default(),
            output: None,
        })),
    };
    Request {
        to: to.parse().unwrap(),
        via,
        status,
        job: job_id,
        size: bytes.len() as u64,
        sha256: Sha256::digest(bytes).into(),
        mime: Some("text/plain".into()),
    }
}

fn chunks(out: &[Out]) -> Vec<(String, Chunk)> {
    out.iter()
        .filter_map(|o| match o {
            Out::Chunk { id, chunk, .. } => Some((id.clone(), chunk.clone())),
            _ => None,
        })
        .collect()
}

fn statuses(out: Vec<Out>) -> Vec<(Jid, Via, JobStatus)> {
    out.into_iter()
        .filter_map(|o| match o {
            Out::Status { to, via, status } => Some((to, via, *status)),
            _ => None,
        })
        .collect()
}

/// Reads of `bytes` as the output of `only` (of any job if `None`).
fn reader<'a>(
    only: Option<&'a JobId>,
    bytes: &'a [u8],
) -> impl Fn(&JobId, u64, u64) -> Result<Vec<u8>, String> + 'a {
    move |id, start, end| {
        if only.is_some_and(|j| j != id) {
            return Err("not held".into());
        }
        bytes
            .get(start as usize..end as usize)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| "out of range".into())
    }
}

/// The whole transfer: chunks within the window, acknowledged one by one, then the status
/// referencing a blob that a receiver's BlobStore assembles to the same bytes.
#[test]
fn an_output_goes_in_windowed_chunks_then_the_status_references_it() {
    let bytes = output(1024 * KIB + 5);
    let j = job(1);
    let to: Jid = "webapp@localhost/app".parse().unwrap();
    let mut d = Deliveries::new("5eed0001".into());
    let t0 = Instant::now();
    d.offer(
        request("webapp@localhost/app", Via::Message, j.clone(), &bytes),
        t0,
    )
    .unwrap();
    let held = reader(Some(&j), &bytes);
    let mut sent = chunks(&d.poll(&held, t0));
    assert_eq!(sent.len(), WINDOW, "a window of 8 unacknowledged chunks");
    let mut store = BlobStore::new(1 << 30, Duration::from_secs(60));
    let mut done = Vec::new();
    let mut n = 0;
    while let Some((id, c)) = sent.pop() {
        n += 1;
        store.put("dispatcher@localhost", c, t0).unwrap();
        assert!(d.on_reply(&id, Some(&to), None, t0));
        let out = d.poll(&held, t0);
        sent.extend(chunks(&out));
        done.extend(statuses(out));
        assert!(sent.len() <= WINDOW);
    }
    assert_eq!(n, 17, "1 MiB + 5 bytes is 17 chunks");
    let [(got_to, via, st)] = <[_; 1]>::try_from(done).unwrap();
    assert_eq!((got_to, via), (to, Via::Message));
    let Some(Outcome::Result(r)) = st.outcome else {
        panic!("{:?}", st.outcome)
    };
    let Some(Data::Blob(b)) = r.output else {
        panic!("{:?}", r.output)
    };
    assert_eq!(b.mime.as_deref(), Some("text/plain"));
    assert_eq!(store.take("dispatcher@localhost", &b).unwrap(), bytes);
    assert_eq!(d.pending(), (0, 0));
}

/// A refused chunk, a silent recipient or an output no longer held: the status still goes
/// out, its output marked truncated with the size and digest.
#[test]
fn a_transfer_that_cannot_finish_marks_the_output_truncated() {
    let bytes = output(300 * KIB);
    let to: Jid = "py@localhost/slix".parse().unwrap();
    let t0 = Instant::now();
    let truncated = |st: &JobStatus| match &st.outcome {
        Some(Outcome::Truncated(r, t)) => {
            r.output.is_none()
                && t.size == 300 * KIB
                && t.sha256 == <[u8; 32]>::from(Sha256::digest(output(300 * KIB)))
        }
        _ => false,
    };

    // Refused: the first error ends it.
    let mut d = Deliveries::new("5eed0001".into());
    let j = job(1);
    let held = reader(Some(&j), &bytes);
    d.offer(
        request(
            "py@localhost/slix",
            Via::Reply("q1".into()),
            j.clone(),
            &bytes,
        ),
        t0,
    )
    .unwrap();
    let sent = chunks(&d.poll(&held, t0));
    assert_eq!(sent.len(), 5);
    // A reply from someone else is not the recipient's.
    let stranger: Jid = "eve@localhost/x".parse().unwrap();
    assert!(!d.on_reply(&sent[0].0, Some(&stranger), None, t0));
    let refusal = StanzaError::new(
        xmpp_parsers::stanza_error::ErrorType::Cancel,
        xmpp_parsers::stanza_error::DefinedCondition::ServiceUnavailable,
        "en",
        "no handler",
    );
    assert!(d.on_reply(&sent[0].0, Some(&to), Some(&refusal), t0));
    let [(_, via, st)] = <[_; 1]>::try_from(statuses(d.poll(&held, t0))).unwrap();
    assert_eq!(via, Via::Reply("q1".into()));
    assert!(truncated(&st), "{st:?}");
    // Late replies to the other chunks are not ours any more.
    assert!(!d.on_reply(&sent[1].0, Some(&to), None, t0));

    // Silent: given up after IDLE without an acknowledgement.
    let mut d = Deliveries::new("5eed0001".into());
    d.offer(
        request("py@localhost/slix", Via::Message, j.clone(), &bytes),
        t0,
    )
    .unwrap();
    assert_eq!(chunks(&d.poll(&held, t0)).len(), 5);
    assert!(statuses(d.poll(&held, t0 + IDLE - Duration::from_secs(2))).is_empty());
    let [(_, _, st)] = <[_; 1]>::try_from(statuses(d.poll(&held, t0 + IDLE))).unwrap();
    assert!(truncated(&st), "{st:?}");

    // Gone from the job table (retention) before the transfer could start.
    let mut d = Deliveries::new("5eed0001".into());
    d.offer(
        request("py@localhost/slix", Via::Message, j.clone(), &bytes),
        t0,
    )
    .unwrap();
    let [(_, _, st)] = <[_; 1]>::try_from(statuses(
        d.poll(|_: &JobId, _, _| Err("gone".to_owned()), t0),
    ))
    .unwrap();
    assert!(truncated(&st), "{st:?}");
}

#[test]
fn transfers_to_one_recipient_are_bounded_and_queued_in_order() {
    let bytes = output(70 * KIB);
    let to: Jid = "webapp@localhost/app".parse().unwrap();
    let t0 = Instant::now();
    let mut d = Deliveries::new("5eed0001".into());
    let held = reader(None, &bytes);
    for i in 0..ACTIVE_PER_RECIPIENT + QUEUED_REPLIES {
        d.offer(
            request(
                "webapp@localhost/app",
                Via::Reply(format!("q{i}")),
                job(1),
                &bytes,
            ),
            t0,
        )
        .unwrap();
    }
    let e = d
        .offer(
            request(
                "webapp@localhost/app",
                Via::Reply("q-over".into()),
                job(1),
                &bytes,
            ),
            t0,
        )
        .unwrap_err();
    assert_eq!(e.condition, Condition::Busy);
    // Watch messages are never refused, and another recipient has its own share.
    d.offer(
        request("webapp@localhost/app", Via::Message, job(2), &bytes),
        t0,
    )
    .unwrap();
    d.offer(
        request(
            "other@localhost/app",
            Via::Reply("o1".into()),
            job(3),
            &bytes,
        ),
        t0,
    )
    .unwrap();
    assert_eq!(d.pending(), (ACTIVE_PER_RECIPIENT + 1, QUEUED_REPLIES + 1));
    // Two chunks (70 KiB) per transfer; acknowledging everything as it comes drains every
    // queue, in order.
    let mut order = Vec::new();
    let mut sent: VecDeque<_> = chunks(&d.poll(&held, t0)).into();
    assert_eq!(sent.len(), 2 * (ACTIVE_PER_RECIPIENT + 1));
    while let Some((id, c)) = sent.pop_front() {
        assert_eq!(c.total, 70 * KIB);
        if !d.on_reply(&id, Some(&to), None, t0) {
            let other: Jid = "other@localhost/app".parse().unwrap();
            assert!(d.on_reply(&id, Some(&other), None, t0));
        }
        let out = d.poll(&held, t0);
        sent.extend(chunks(&out));
        order.extend(
            statuses(out)
                .into_iter()
                .filter(|(t, _, _)| *t == to)
                .map(|(_, via, _)| via),
        );
    }
    assert_eq!(d.pending(), (0, 0));
    let mut want: Vec<Via> = (0..ACTIVE_PER_RECIPIENT + QUEUED_REPLIES)
        .map(|i| Via::Reply(format!("q{i}")))
        .collect();
    want.push(Via::Message);
    assert_eq!(order, want);
}

/// Our own session ended: the chunks in flight are sent again in the new one.
#[test]
fn chunks_in_flight_are_sent_again_after_our_reconnect() {
    let bytes = output(200 * KIB);
    let to: Jid = "webapp@localhost/app".parse().unwrap();
    let t0 = Instant::now();
    let mut d = Deliveries::new("5eed0001".into());
    let held = reader(None, &bytes);
    d.offer(
        request("webapp@localhost/app", Via::Message, job(1), &bytes),
        t0,
    )
    .unwrap();
    let first = chunks(&d.poll(&held, t0));
    assert_eq!(first.len(), 4);
    assert!(d.on_reply(&first[0].0, Some(&to), None, t0));
    let _ = d.poll(&held, t0);
    d.on_session_reset(t0);
    let again = chunks(&d.poll(&held, t0));
    let mut offsets: Vec<u64> = again.iter().map(|(_, c)| c.offset).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, vec![64 * KIB, 128 * KIB, 192 * KIB]);
    // Replies to the lost requests no longer count.
    assert!(!d.on_reply(&first[1].0, Some(&to), None, t0));
    let mut store = BlobStore::new(1 << 30, Duration::from_secs(60));
    store.put("d", first[0].1.clone(), t0).unwrap();
    let mut done = Vec::new();
    for (id, c) in again {
        store.put("d", c, t0).unwrap();
        assert!(d.on_reply(&id, Some(&to), None, t0));
        done.extend(statuses(d.poll(&held, t0)));
    }
    let [(_, _, st)] = <[_; 1]>::try_from(done).unwrap();
    let Some(Outcome::Result(JobResult {
        output: Some(Data::Blob(b)),
        ..
    })) = st.outcome
    else {
        panic!("{:?}", st.outcome)
    };
    assert_eq!(store.take("d", &b).unwrap(), bytes);
}

#[test]
fn a_digest_is_computed_once_per_job() {
    let mut d = Deliveries::new("5eed0001".into());
    let a = d.digest(&job(1), b"abc");
    assert_eq!(d.digest(&job(1), b"ignored: remembered"), a);
    assert_ne!(d.digest(&job(2), b"abd"), a);
}
