//! The fast path for large payloads, decided by the core (PROTOCOL.md §13.4): references to
//! 1.1 agents, chunks to 1.0 agents and after a failed fetch, upload slots and the results
//! that refer to them.

use std::sync::Arc;
use std::time::Duration;

use jid::Jid;
use spine_protocol::{
    Condition, Data, DataRef, JobResult, JobState, ProtocolVersion, RequestSlot, Slot, SpineError,
    INLINE_LIMIT,
};
use tokio_xmpp::Stanza;
use xmpp_parsers::iq::Iq;

use super::data::DataPlane;
use super::tests::{jobs_sent, spec, World};
use super::*;
use crate::blobs::Stored;
use crate::jobs::JobSpec;
use crate::signing::UrlKey;

const CAP: &str = "c.work";

fn world() -> World {
    let mut w = World::new();
    w.core.set_data_plane(DataPlane {
        base: "http://127.0.0.1:8080".into(),
        key: Arc::new(UrlKey::from_bytes([3; 32])),
        ttl: Duration::from_secs(300),
    });
    w.protocol = ProtocolVersion::V1_1;
    w
}

fn large() -> JobSpec {
    let mut s = spec(CAP);
    s.input = vec![5u8; INLINE_LIMIT * 3].into();
    s.input_mime = Some("image/png".into());
    s
}

fn hellos(stanzas: &[Stanza]) -> Vec<(Jid, String)> {
    stanzas
        .iter()
        .filter_map(|s| match s {
            Stanza::Presence(p) => {
                let e = p.payloads.iter().find(|e| e.name() == "dispatcher")?;
                Some((p.to.clone()?, e.attr("protocol")?.to_owned()))
            }
            _ => None,
        })
        .collect()
}

fn chunk_count(stanzas: &[Stanza]) -> usize {
    stanzas
        .iter()
        .filter(|s| matches!(s, Stanza::Iq(Iq::Set { payload, .. }) if payload.name() == "chunk"))
        .count()
}

#[test]
fn a_new_1_1_agent_is_told_the_dispatchers_version_and_gets_large_inputs_by_reference() {
    let mut w = world();
    let a = w.agent(1, 1);
    let r = w.ready();
    assert_eq!(
        hellos(&r.stanzas),
        vec![(Jid::from(a.clone()), "1.1".to_owned())],
        "one hello, to the agent's full JID"
    );
    let (id, _) = w.submit(large()).unwrap();
    let blob = w.core.record(&id).unwrap().spec.input.stored().unwrap();
    let r = w.ready();
    assert_eq!(
        chunk_count(&r.stanzas),
        0,
        "no chunks to an agent that fetches"
    );
    let sent = jobs_sent(&r.stanzas).remove(0);
    let Some(Data::Ref(DataRef {
        size,
        sha256,
        mime,
        sources,
    })) = sent.job.input
    else {
        panic!("not a reference: {:?}", sent.job.input);
    };
    assert_eq!((size, sha256), (blob.size, blob.sha256));
    assert_eq!(mime.as_deref(), Some("image/png"));
    let [url] = <[String; 1]>::try_from(sources).unwrap();
    let prefix = format!("http://127.0.0.1:8080/v1/blobs/{}?job={id}", blob.hex());
    assert!(url.starts_with(&prefix), "{url}");
    assert!(url.contains("agent=agent1%40localhost&"), "{url}");
    assert!(url.contains("&exp=1700000300&sig="), "{url}");
}

#[test]
fn a_1_0_agent_gets_chunks_and_no_hello() {
    let mut w = world();
    w.protocol = ProtocolVersion::CURRENT;
    w.agent(1, 1);
    assert!(hellos(&w.ready().stanzas).is_empty());
    w.submit(large()).unwrap();
    let r = w.ready();
    assert_eq!(chunk_count(&r.stanzas), 3);
    assert!(
        jobs_sent(&r.stanzas).is_empty(),
        "the job follows its chunks"
    );
}

#[test]
fn without_a_public_url_even_a_1_1_agent_gets_chunks() {
    let mut w = World::new();
    w.protocol = ProtocolVersion::V1_1;
    w.agent(1, 1);
    assert!(hellos(&w.ready().stanzas).is_empty());
    w.submit(large()).unwrap();
    assert_eq!(chunk_count(&w.ready().stanzas), 3);
}

#[test]
fn after_a_failed_fetch_the_same_attempt_goes_again_in_chunks_and_the_agent_gets_chunks() {
    let mut w = world();
    w.agent(1, 2);
    w.ready();
    let (id, _) = w.submit(large()).unwrap();
    let sent = jobs_sent(&w.ready().stanzas).remove(0);
    w.refuse(
        &sent,
        SpineError::new(Condition::FetchFailed).with_text("127.0.0.1: connection refused"),
    );
    let r = w.ready();
    assert_eq!(chunk_count(&r.stanzas), 3, "the input in chunks");
    let rec = w.core.record(&id).unwrap();
    assert_eq!(
        (rec.state, rec.attempts),
        (JobState::Dispatched, 1),
        "the same attempt, still on its agent"
    );
    // The next job to that agent goes in chunks too.
    w.submit(large()).unwrap();
    let r = w.ready();
    assert!(jobs_sent(&r.stanzas).is_empty());
    assert_eq!(chunk_count(&r.stanzas), 3);
}

/// An output of 1 MiB, put in the core's store as the HTTP side would.
fn output(w: &mut World) -> Stored {
    w.core.blob_store.put(&vec![7u8; 1 << 20]).unwrap()
}

fn request_slot(
    w: &mut World,
    from: &jid::FullJid,
    job: &JobId,
    attempt: u64,
    blob: Stored,
) -> Result<Slot, SpineError> {
    let r = RequestSlot {
        job: job.clone(),
        attempt,
        size: blob.size,
        sha256: blob.sha256,
        mime: Some("image/png".into()),
    };
    let iq = Iq::from_get("s1", r).with_from(Jid::from(from.clone()));
    w.core.stanza(iq.into(), w.now);
    let r = w.ready();
    for s in r.stanzas {
        match s {
            Stanza::Iq(Iq::Result {
                id,
                payload: Some(p),
                ..
            }) if id == "s1" => return Ok(Slot::try_from(p).unwrap()),
            Stanza::Iq(Iq::Error { id, error, .. }) if id == "s1" => {
                return Err(SpineError::from_stanza_error(&error).unwrap().unwrap())
            }
            _ => {}
        }
    }
    panic!("no answer to the slot request");
}

fn result_by_reference(w: &mut World, sent: &tests::SentJob, from: &jid::FullJid, blob: Stored) {
    let r = JobResult {
        job: sent.job.id.clone(),
        attempt: sent.job.attempt,
        elapsed_ms: Some(1),
        meta: Default::default(),
        output: Some(Data::Ref(DataRef {
            size: blob.size,
            sha256: blob.sha256,
            mime: Some("image/png".into()),
            sources: vec![],
        })),
    };
    let iq = Iq::from_result(sent.iq.clone(), Some(r)).with_from(Jid::from(from.clone()));
    w.core.stanza(iq.into(), w.now);
}

#[test]
fn an_output_uploaded_to_its_slot_becomes_the_jobs_stored_output() {
    let mut w = world();
    let a = w.agent(1, 1);
    let (id, _) = w.submit(spec(CAP)).unwrap();
    let sent = jobs_sent(&w.ready().stanzas).remove(0);
    let blob = output(&mut w);
    let slot = request_slot(&mut w, &a, &id, 1, blob).unwrap();
    assert_eq!(slot.job, id);
    assert_eq!(slot.expires_ms, 300_000);
    assert!(
        slot.put.starts_with(&format!(
            "http://127.0.0.1:8080/v1/uploads/{id}?attempt=1&agent=agent1%40localhost&size=1048576&sha256={}&exp=",
            blob.hex()
        )),
        "{}",
        slot.put
    );
    // The HTTP side stored the bytes (`output` above) and says so.
    w.core.api(
        99,
        ApiRequest::SlotFilled {
            job: id.clone(),
            attempt: 1,
            agent: "agent1@localhost".into(),
            blob,
        },
        w.now,
    );
    assert_eq!(w.ready().replies, vec![(99, ApiReply::SlotFilled(Ok(())))]);
    result_by_reference(&mut w, &sent, &a, blob);
    w.ready();
    let rec = w.core.record(&id).unwrap();
    assert_eq!(rec.state, JobState::Succeeded);
    match &rec.outcome {
        Some(crate::jobs::Recorded::Succeeded { output, mime, .. }) => {
            assert_eq!(output.stored(), Some(blob));
            assert_eq!(mime.as_deref(), Some("image/png"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(w.core.blob_refs(&blob), 1);
}

#[test]
fn a_slot_is_granted_only_to_the_agent_running_that_attempt_and_a_result_needs_the_upload() {
    let mut w = world();
    let a = w.agent(1, 1);
    let b = w.agent(2, 1);
    let (id, _) = w.submit(spec(CAP)).unwrap();
    let sent = jobs_sent(&w.ready().stanzas).remove(0);
    let runner = sent.to.clone();
    let other = if runner == a { b } else { a };
    let blob = output(&mut w);
    assert_eq!(
        request_slot(&mut w, &other, &id, 1, blob)
            .unwrap_err()
            .condition,
        Condition::UnknownJob
    );
    assert_eq!(
        request_slot(&mut w, &runner, &id, 2, blob)
            .unwrap_err()
            .condition,
        Condition::UnknownJob,
        "another attempt"
    );
    request_slot(&mut w, &runner, &id, 1, blob).unwrap();
    // The filled report must come from the slot's agent.
    assert!(w
        .core
        .slot_filled(&id, 1, other.to_bare().as_str(), blob)
        .is_err());
    // A result referring to an upload that never came: the attempt fails (retried).
    result_by_reference(&mut w, &sent, &runner, blob);
    w.ready();
    let rec = w.core.record(&id).unwrap();
    assert_ne!(rec.state, JobState::Succeeded);
    assert_eq!(rec.attempts, 1);
    assert!(rec.not_before_ms > 0 || rec.state == JobState::Queued);
}

#[test]
fn a_submitter_that_asked_for_references_gets_a_large_output_as_a_signed_url() {
    let mut w = world();
    let a = w.agent(1, 1);
    let watcher: Jid = "webapp@localhost/app".parse().unwrap();
    let mut s = spec(CAP);
    s.watch = Some(watcher.clone());
    s.output_refs = true;
    let (id, _) = w.submit(s).unwrap();
    let sent = jobs_sent(&w.ready().stanzas).remove(0);
    let blob = output(&mut w);
    request_slot(&mut w, &a, &id, 1, blob).unwrap();
    w.core.api(
        7,
        ApiRequest::SlotFilled {
            job: id.clone(),
            attempt: 1,
            agent: "agent1@localhost".into(),
            blob,
        },
        w.now,
    );
    w.ready();
    result_by_reference(&mut w, &sent, &a, blob);
    let r = w.ready();
    let status = r
        .stanzas
        .iter()
        .find_map(|s| match s {
            Stanza::Message(m) if m.to.as_ref() == Some(&watcher) => m
                .payloads
                .iter()
                .find(|p| p.name() == "job-status")
                .map(|p| spine_protocol::JobStatus::try_from(p.clone()).unwrap()),
            _ => None,
        })
        .expect("a final status to the watcher");
    assert_eq!(chunk_count(&r.stanzas), 0, "no chunks to the submitter");
    let Some(spine_protocol::Outcome::Result(res)) = status.outcome else {
        panic!("{:?}", status.outcome);
    };
    let Some(Data::Ref(d)) = res.output else {
        panic!("not a reference: {:?}", res.output);
    };
    assert_eq!((d.size, d.sha256), (blob.size, blob.sha256));
    let [url] = <[String; 1]>::try_from(d.sources).unwrap();
    assert!(
        url.starts_with(&format!(
            "http://127.0.0.1:8080/v1/blobs/{}?job={id}&agent=webapp%40localhost&exp=",
            blob.hex()
        )),
        "signed for the submitter: {url}"
    );
}

/// Ends a job as an agent that uploaded `bytes` to a slot would: slot, upload, result.
fn succeed_stored(w: &mut World, sent: &tests::SentJob, bytes: &[u8]) -> Stored {
    let blob = w.core.blob_store.put(bytes).unwrap();
    request_slot(w, &sent.to, &sent.job.id, sent.job.attempt, blob).unwrap();
    w.core.api(
        98,
        ApiRequest::SlotFilled {
            job: sent.job.id.clone(),
            attempt: sent.job.attempt,
            agent: sent.to.to_bare().to_string(),
            blob,
        },
        w.now,
    );
    result_by_reference(w, sent, &sent.to, blob);
    blob
}

/// A map/reduce job over two fragments in the store (labelled `label`), its map steps run
/// with outputs uploaded to slots: (the job, the fragments, the map outputs).
fn map_phase(w: &mut World, label: &str) -> (JobId, Vec<Stored>, Vec<Stored>) {
    use spine_protocol::fragments::{self, Fragment};
    w.agent_with(1, 1, &["wc.map", "wc.reduce"]);
    w.ready();
    // Two fragments already in the store (PUT /v1/blobs), named by the job.
    let f: Vec<Stored> = (0..2u8)
        .map(|i| w.core.blob_store.put(&vec![i; 100_000]).unwrap())
        .collect();
    let list: Vec<Fragment> = f
        .iter()
        .map(|b| Fragment::reference(b.sha256, b.size).with_name(label))
        .collect();
    let mut s = spec("wc.map");
    s.input = fragments::encode(&list).into();
    s.input_mime = Some(spine_protocol::FRAGMENTS_MIME.into());
    s.mapreduce = Some(spine_protocol::MapReduce::new("wc.reduce".parse().unwrap()));
    let (parent, _) = w.submit(s).unwrap();
    assert_eq!(w.core.blob_refs(&f[0]), 1, "held by its map step only");

    // Each map step's input is its fragment's blob, as stored: no copy.
    let mut outputs = Vec::new();
    for (i, fragment) in f.iter().enumerate() {
        let sent = jobs_sent(&w.ready().stanzas).remove(0);
        assert_eq!(sent.job.id.as_str(), format!("{parent}.m{i}"));
        let Some(Data::Ref(r)) = &sent.job.input else {
            panic!("map input by reference: {:?}", sent.job.input)
        };
        assert_eq!((r.sha256, r.size), (fragment.sha256, fragment.size));
        outputs.push(succeed_stored(w, &sent, &vec![10 + i as u8; 90_000]));
    }
    (parent, f, outputs)
}

#[test]
fn fragments_by_reference_are_map_inputs_as_stored_and_reduce_inputs_by_url_or_inline() {
    use spine_protocol::fragments::{self, Fragment};
    let mut w = world();
    let (parent, _, outputs) = map_phase(&mut w, "part");

    // The reduce step's list names the two outputs, each with a URL for this job and agent.
    let sent = jobs_sent(&w.ready().stanzas).remove(0);
    assert_eq!(sent.job.id.as_str(), format!("{parent}.r1.0"));
    let Some(Data::Inline { bytes, mime }) = &sent.job.input else {
        panic!("a small inline list: {:?}", sent.job.input)
    };
    assert_eq!(mime.as_deref(), Some(spine_protocol::FRAGMENTS_MIME));
    let got = fragments::decode(bytes).unwrap();
    assert_eq!(got.len(), 2);
    for (g, out) in got.iter().zip(&outputs) {
        let r = g.source.as_ref().expect("by reference");
        assert_eq!((r.sha256, r.size), (out.sha256, out.size));
        let url = r.url.as_deref().expect("a signed URL");
        let want = format!(
            "http://127.0.0.1:8080/v1/blobs/{}?job={parent}.r1.0&agent=agent1%40localhost&",
            out.hex()
        );
        assert!(url.starts_with(&want), "{url}");
    }
    assert_eq!(
        w.core.blob_refs(&outputs[0]),
        2,
        "its map step and the reduce"
    );

    // The agent cannot fetch them: the same attempt goes again with the bytes, in chunks.
    w.refuse(
        &sent,
        SpineError::new(Condition::FetchFailed).with_text("127.0.0.1: connection refused"),
    );
    let r = w.ready();
    assert!(
        jobs_sent(&r.stanzas).is_empty(),
        "the job follows its chunks"
    );
    let inline = fragments::encode(&[
        Fragment::new(vec![10u8; 90_000]),
        Fragment::new(vec![11u8; 90_000]),
    ]);
    assert_eq!(
        chunk_count(&r.stanzas),
        inline.len().div_ceil(INLINE_LIMIT),
        "the list with both outputs inline"
    );
}

/// A reduce step's list too long for the job stanza (long labels here; a wide fan-in in
/// practice) is kept in the blob store like any large step input, and still goes with a URL
/// per named output, in chunks.
#[test]
fn a_long_list_of_references_goes_in_chunks_with_its_urls() {
    use spine_protocol::fragments;
    let mut w = world();
    let label = "l".repeat(40_000);
    let (parent, _, outputs) = map_phase(&mut w, &label);
    let reduce: JobId = format!("{parent}.r1.0").parse().unwrap();
    assert!(
        w.core
            .record(&reduce)
            .unwrap()
            .spec
            .input
            .stored()
            .is_some(),
        "the list of {} bytes is in the blob store",
        2 * label.len()
    );
    let r = w.ready();
    assert!(
        jobs_sent(&r.stanzas).is_empty(),
        "the job follows its chunks"
    );
    let mut chunks: Vec<spine_protocol::Chunk> = r
        .stanzas
        .iter()
        .filter_map(|s| match s {
            Stanza::Iq(Iq::Set { payload, .. }) if payload.name() == "chunk" => {
                spine_protocol::Chunk::try_from(payload.clone()).ok()
            }
            _ => None,
        })
        .collect();
    chunks.sort_by_key(|c| c.offset);
    let list: Vec<u8> = chunks.into_iter().flat_map(|c| c.bytes).collect();
    let got = fragments::decode(&list).unwrap();
    for (g, out) in got.iter().zip(&outputs) {
        let r = g.source.as_ref().expect("by reference");
        assert_eq!((r.sha256, r.size), (out.sha256, out.size));
        assert!(
            r.url
                .as_deref()
                .is_some_and(|u| u.contains(&format!("job={reduce}&"))),
            "{:?}",
            r.url
        );
        assert_eq!(g.name.as_deref(), Some(label.as_str()));
    }
}

/// A split step uploads each fragment file to a slot of its own: one attempt holds several
/// slots, one per SHA-256, each filled and resolved on its own.
#[test]
fn an_attempt_holds_a_slot_per_blob() {
    let mut w = world();
    let a = w.agent(1, 1);
    let (id, _) = w.submit(spec(CAP)).unwrap();
    let sent = jobs_sent(&w.ready().stanzas).remove(0);
    let blobs: Vec<Stored> = (0..3u8)
        .map(|i| w.core.blob_store.put(&vec![i; 70_000]).unwrap())
        .collect();
    let urls: Vec<String> = blobs
        .iter()
        .map(|b| request_slot(&mut w, &a, &id, 1, *b).unwrap().put)
        .collect();
    for (u, b) in urls.iter().zip(&blobs) {
        assert!(u.contains(&format!("sha256={}", b.hex())), "{u}");
    }
    for b in &blobs {
        assert_eq!(w.core.slot_filled(&id, 1, "agent1@localhost", *b), Ok(()));
    }
    // Each resolves to its own bytes, once.
    let r = DataRef {
        size: blobs[1].size,
        sha256: blobs[1].sha256,
        mime: None,
        sources: vec![],
    };
    assert_eq!(w.core.slot_output(&id, 1, &r), Ok(blobs[1]));
    assert!(w.core.slot_output(&id, 1, &r).is_err());
    result_by_reference(&mut w, &sent, &a, blobs[2]);
    w.ready();
    assert_eq!(w.core.record(&id).unwrap().state, JobState::Succeeded);
    // The job settled: its other slots are forgotten.
    assert!(w
        .core
        .slot_filled(&id, 1, "agent1@localhost", blobs[0])
        .is_err());
}
