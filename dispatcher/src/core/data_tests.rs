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
        vec![(Jid::from(a.clone()), "1.2".to_owned())],
        "one hello, to the agent's full JID, with the dispatcher's version (1.2 builds on 1.1)"
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

/// Ends a map step as an agent that keeps its output would (`data_listen`, §13.5): the
/// result names the agent's own URL of the bytes.
fn succeed_kept(w: &mut World, sent: &tests::SentJob, n: usize, bytes: &[u8]) -> Stored {
    use sha2::Digest as _;
    let blob = Stored {
        sha256: sha2::Sha256::digest(bytes).into(),
        size: bytes.len() as u64,
    };
    let r = JobResult {
        job: sent.job.id.clone(),
        attempt: sent.job.attempt,
        elapsed_ms: Some(1),
        meta: Default::default(),
        output: Some(Data::Ref(DataRef {
            size: blob.size,
            sha256: blob.sha256,
            mime: None,
            sources: vec![format!("{}/v1/blobs/{}", tests::serves_url(n), blob.hex())],
        })),
    };
    let iq = Iq::from_result(sent.iq.clone(), Some(r)).with_from(Jid::from(sent.to.clone()));
    w.core.stanza(iq.into(), w.now);
    blob
}

/// A map/reduce job over two fragments in the store, submitted: (the job, the fragments).
fn mapreduce_of_two(w: &mut World) -> (JobId, Vec<Stored>) {
    use spine_protocol::fragments::{self, Fragment};
    let f: Vec<Stored> = (0..2u8)
        .map(|i| w.core.blob_store.put(&vec![i; 100_000]).unwrap())
        .collect();
    let list: Vec<Fragment> = f
        .iter()
        .map(|b| Fragment::reference(b.sha256, b.size))
        .collect();
    let mut s = spec("wc.map");
    s.input = fragments::encode(&list).into();
    s.input_mime = Some(spine_protocol::FRAGMENTS_MIME.into());
    s.mapreduce = Some(spine_protocol::MapReduce::new("wc.reduce".parse().unwrap()));
    let (parent, _) = w.submit(s).unwrap();
    (parent, f)
}

fn key() -> UrlKey {
    UrlKey::from_bytes([3; 32])
}

/// Map steps sent to agents that serve kept outputs carry `<keep/>` with each agent's own
/// key; their outputs stay with them (nothing enters the blob store); the reduce step's list
/// names them by URLs to the holders, signed with the holder's key for the reduce's agent.
/// When the reduce cannot fetch them, the map steps run again with their outputs uploaded,
/// and a new reduce step takes those.
#[test]
fn kept_map_outputs_go_to_the_reduce_by_holder_urls_and_are_made_again_when_lost() {
    use spine_protocol::fragments;
    use spine_protocol::signing::BlobGrant;
    let mut w = world();
    w.serves = true;
    let a1 = w.agent_with(1, 4, &["wc.map", "wc.reduce"]);
    w.agent_with(2, 4, &["wc.map", "wc.reduce"]);
    w.ready();
    let (parent, _) = mapreduce_of_two(&mut w);
    let maps = jobs_sent(&w.ready().stanzas);
    assert_eq!(maps.len(), 2);
    let mut holders = Vec::new();
    for (i, m) in maps.iter().enumerate() {
        assert_eq!(m.job.id.as_str(), format!("{parent}.m{i}"));
        let k = m
            .job
            .keep
            .as_ref()
            .expect("a map step to a serving agent carries <keep/>");
        assert_eq!(k.key, key().for_holder(&m.to.to_bare()).to_bytes());
        holders.push(if m.to == a1 { 1 } else { 2 });
    }
    assert_ne!(holders[0], holders[1], "least-loaded: one map step each");
    let outputs: Vec<Stored> = maps
        .iter()
        .zip(&holders)
        .enumerate()
        .map(|(i, (m, n))| succeed_kept(&mut w, m, *n, &vec![20 + i as u8; 90_000]))
        .collect();
    for o in &outputs {
        assert!(!w.core.blob_store.contains(o), "nothing uploaded");
    }
    let m0: JobId = format!("{parent}.m0").parse().unwrap();
    let Some(crate::jobs::Recorded::Succeeded { output, .. }) =
        &w.core.record(&m0).unwrap().outcome
    else {
        panic!("map step 0 succeeded");
    };
    assert!(
        matches!(output, crate::jobs::Body::Kept(k) if k.blob == outputs[0]),
        "{output:?}"
    );

    let reduce = jobs_sent(&w.ready().stanzas).remove(0);
    assert_eq!(reduce.job.id.as_str(), format!("{parent}.r1.0"));
    assert!(
        reduce.job.keep.is_none(),
        "reduce outputs go to the dispatcher"
    );
    let Some(Data::Inline { bytes, .. }) = &reduce.job.input else {
        panic!("an inline list: {:?}", reduce.job.input)
    };
    let list = fragments::decode(bytes).unwrap();
    for ((g, out), n) in list.iter().zip(&outputs).zip(&holders) {
        let r = g.source.as_ref().expect("by reference");
        assert_eq!((r.sha256, r.size), (out.sha256, out.size));
        let url = r.url.as_deref().expect("a URL");
        let prefix = format!("{}/v1/blobs/", tests::serves_url(*n));
        let rest = url.strip_prefix(&prefix).unwrap_or_else(|| panic!("{url}"));
        let (seg, query) = rest.split_once('?').unwrap();
        let signed = BlobGrant::parse(seg, query).unwrap();
        assert_eq!(signed.grant.job, reduce.job.id);
        assert_eq!(signed.grant.agent, reduce.to.to_bare());
        let holder = tests::agent(*n).to_bare();
        let now_s = w.now.ms / 1000;
        assert!(
            signed.verify(&key().for_holder(&holder), now_s).is_ok(),
            "the holder's key"
        );
        assert!(
            signed.verify(&key(), now_s).is_err(),
            "not the dispatcher's own"
        );
    }

    // The reduce's agent cannot fetch them: the map steps run again, outputs uploaded.
    w.refuse(
        &reduce,
        SpineError::new(Condition::FetchFailed).with_text("agent1.test: connection refused"),
    );
    assert_eq!(w.state(&reduce.job.id), JobState::Cancelled);
    let again = jobs_sent(&w.ready().stanzas);
    let ids: Vec<String> = again.iter().map(|s| s.job.id.to_string()).collect();
    assert_eq!(ids, [format!("{parent}.m0.x1"), format!("{parent}.m1.x2")]);
    assert!(again.iter().all(|s| s.job.keep.is_none()), "not kept again");
    for (i, s) in again.iter().enumerate() {
        succeed_stored(&mut w, s, &vec![20 + i as u8; 90_000]);
    }
    let reduce = jobs_sent(&w.ready().stanzas).remove(0);
    assert_eq!(reduce.job.id.as_str(), format!("{parent}.r1.0.x3"));
    let Some(Data::Inline { bytes, .. }) = &reduce.job.input else {
        panic!("an inline list: {:?}", reduce.job.input)
    };
    for g in fragments::decode(bytes).unwrap() {
        let url = g.source.and_then(|r| r.url).expect("a URL");
        assert!(
            url.starts_with("http://127.0.0.1:8080/v1/blobs/"),
            "from the store: {url}"
        );
    }
    w.succeed(&reduce, &reduce.to.clone());
    w.ready();
    assert_eq!(w.state(&parent), JobState::Succeeded);
}

/// The locality rule: a reduce step goes to the agent keeping its input when that agent is
/// at most one slot busier than the least-loaded one, and elsewhere when it is busier.
#[test]
fn a_reduce_goes_where_its_input_is_kept_when_that_agent_is_about_as_loaded() {
    for (busy, near) in [(0, true), (1, true), (2, false)] {
        let mut w = world();
        w.serves = true;
        let a1 = w.agent_with(1, 4, &["wc.map", "wc.reduce", CAP]);
        let a2 = w.agent_with(2, 4, &["wc.reduce"]);
        w.ready();
        let (_, _) = mapreduce_of_two(&mut w);
        let maps = jobs_sent(&w.ready().stanzas);
        assert!(maps.iter().all(|m| m.to == a1), "only agent1 maps");
        // Other work keeps agent1 busy (never answered).
        for _ in 0..busy {
            w.submit(spec(CAP)).unwrap();
        }
        w.ready();
        for (i, m) in maps.iter().enumerate() {
            succeed_kept(&mut w, m, 1, &vec![30 + i as u8; 80_000]);
        }
        let reduce = jobs_sent(&w.ready().stanzas).remove(0);
        let want = if near { &a1 } else { &a2 };
        assert_eq!(&reduce.to, want, "{busy} other jobs on the holder");
    }
}

/// A result may name the agent's own URL only when its job asked to keep the output, and
/// only under the `serves` URL it advertised.
#[test]
fn a_kept_output_is_refused_unless_asked_for_and_under_the_agents_url() {
    let mut w = world();
    w.serves = true;
    w.agent_with(1, 1, &["wc.map", "wc.reduce", CAP]);
    w.ready();
    // A plain job did not ask to keep anything.
    let (id, _) = w.submit(spec(CAP)).unwrap();
    let sent = jobs_sent(&w.ready().stanzas).remove(0);
    assert!(sent.job.keep.is_none());
    succeed_kept(&mut w, &sent, 1, &[1u8; 90_000]);
    let rec = w.core.record(&id).unwrap();
    assert_ne!(rec.state, JobState::Succeeded, "refused: {:?}", rec.outcome);
    // A map step asked, but the URL is another host's.
    w.ready();
    let (parent, _) = mapreduce_of_two(&mut w);
    let m = jobs_sent(&w.ready().stanzas)
        .into_iter()
        .find(|s| s.job.id.as_str() == format!("{parent}.m0"))
        .expect("map step 0 sent");
    succeed_kept(&mut w, &m, 2, &[2u8; 90_000]);
    assert_ne!(w.state(&m.job.id), JobState::Succeeded);
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
