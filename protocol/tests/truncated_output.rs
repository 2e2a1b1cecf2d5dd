//! `<output truncated='true'>` in a `<job-status>`'s `<result>` (PROTOCOL.md §11.3): the
//! status of a job whose large output the submitter did not take in chunks says how much was
//! left out, instead of carrying a result that silently lacks it. Literal, round trip,
//! refusals and a property test, as for every payload.

use proptest::option;
use proptest::prelude::*;
use spine_protocol::client::TruncatedOutput;
use spine_protocol::*;

const JOB_ID: &str = "0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44";
const SHA: &str = "30e14955ebf1352266dc2ff8067e68104607e750abb9d3b36582b8af909fcb58";

fn el(xml: &str) -> Element {
    xml.parse()
        .unwrap_or_else(|e| panic!("test document is not XML: {e}\n{xml}"))
}

fn status(result_children: &str) -> String {
    format!(
        "<job-status xmlns='urn:spine:1' job='{JOB_ID}' capability='text.big' state='succeeded' attempts='1'><result job='{JOB_ID}' attempt='1'>{result_children}</result></job-status>"
    )
}

#[test]
fn truncated_output_literal() {
    let st = JobStatus::try_from(el(&status(&format!(
        "<meta>{{\"lines\":5000}}</meta><output type='text/plain' size='307200' sha256='{SHA}' truncated='true'/>"
    ))))
    .unwrap();
    let Some(Outcome::Truncated(r, left_out)) = st.outcome else {
        panic!("not a truncated outcome: {:?}", st.outcome)
    };
    assert_eq!(r.output, None);
    assert_eq!(r.meta.0["lines"], 5000);
    assert_eq!(left_out.size, 307_200);
    assert_eq!(data::hex(&left_out.sha256), SHA);
    assert_eq!(left_out.mime.as_deref(), Some("text/plain"));
    // Without a type, and before <meta>: children come in any order.
    let st = JobStatus::try_from(el(&status(&format!(
        "<output size='70000' sha256='{SHA}' truncated='1'/><meta>{{}}</meta>"
    ))))
    .unwrap();
    assert!(
        matches!(&st.outcome, Some(Outcome::Truncated(_, t)) if t.size == 70_000 && t.mime.is_none()),
        "{st:?}"
    );
}

#[test]
fn truncated_output_round_trip_leaves_a_stray_output_out() {
    let left_out = TruncatedOutput {
        size: 307_200,
        sha256: [7; 32],
        mime: Some("application/octet-stream".into()),
    };
    let mut r = JobResult {
        job: JOB_ID.parse().unwrap(),
        attempt: 2,
        elapsed_ms: Some(12),
        meta: Args::default(),
        output: None,
    };
    let st = JobStatus {
        job: JOB_ID.parse().unwrap(),
        capability: "text.big".parse().unwrap(),
        state: JobState::Succeeded,
        attempts: 2,
        agent: None,
        percent: Some(100),
        outcome: Some(Outcome::Truncated(r.clone(), left_out.clone())),
    };
    let text = String::from(&Element::from(st.clone()));
    assert!(text.contains("truncated='true'"), "{text}");
    assert_eq!(JobStatus::try_from(el(&text)).unwrap(), st);
    // An output given with the result is not sent beside the marker.
    r.output = Some(Data::inline(b"x".to_vec()));
    let mut with_output = st.clone();
    with_output.outcome = Some(Outcome::Truncated(r, left_out));
    let text = String::from(&Element::from(with_output));
    assert_eq!(text.matches("<output").count(), 1, "{text}");
    assert_eq!(JobStatus::try_from(el(&text)).unwrap(), st);
}

#[test]
fn truncated_output_refusals() {
    let cases = [
        (
            format!("<output size='1' sha256='{SHA}' truncated='false'/>"),
            "truncated='true'",
        ),
        (
            format!("<output size='1' sha256='{SHA}' truncated='yes'/>"),
            "'truncated'='yes' is invalid",
        ),
        ("<output size='1' truncated='true'/>".to_owned(), "'sha256'"),
        (
            format!("<output sha256='{SHA}' truncated='true'/>"),
            "'size'",
        ),
        (
            format!("<output size='1' sha256='{SHA}' truncated='true'>aGk=</output>"),
            "text",
        ),
        (
            format!("<output size='1' sha256='{SHA}' truncated='true' blob='b1'/>"),
            "unknown attribute 'blob'",
        ),
        (
            format!("<output size='1' sha256='{SHA}' truncated='true'/><output>aGk=</output>"),
            "more than one <output>",
        ),
    ];
    for (children, want) in cases {
        let doc = status(&children);
        let e = JobStatus::try_from(el(&doc))
            .map(|st| format!("accepted: {st:?}"))
            .unwrap_or_else(|e| e.to_string());
        assert!(e.contains(want), "{doc}\n  gave: {e}\n  expected: {want}");
    }
    // Only a succeeded job has a result, truncated or not.
    let failed = status(&format!(
        "<output size='1' sha256='{SHA}' truncated='true'/>"
    ))
    .replace("state='succeeded'", "state='failed'");
    let e = JobStatus::try_from(el(&failed)).unwrap_err().to_string();
    assert!(e.contains("does not go with a <result>"), "{e}");
    // An agent's result never carries it.
    let e = JobResult::try_from(el(&format!(
        "<result xmlns='urn:spine:1' job='a' attempt='1'><output size='1' sha256='{SHA}' truncated='true'/></result>"
    )))
    .unwrap_err()
    .to_string();
    assert!(e.contains("truncated") || e.contains("sha256"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn truncated_output_roundtrip(
        size in any::<u64>(),
        sha256 in any::<[u8; 32]>(),
        mime in option::of("[a-z]{1,8}/[a-z0-9.+-]{1,8}"),
        attempt in 1u64..,
        elapsed_ms in option::of(any::<u64>()),
        lines in option::of(any::<u64>()),
    ) {
        let meta = lines
            .map(|n| serde_json::json!({ "lines": n }).as_object().cloned().unwrap_or_default())
            .unwrap_or_default();
        let result = JobResult { job: JOB_ID.parse().unwrap(), attempt, elapsed_ms, meta: Args(meta), output: None };
        let st = JobStatus {
            job: JOB_ID.parse().unwrap(),
            capability: "text.big".parse().unwrap(),
            state: JobState::Succeeded,
            attempts: attempt,
            agent: None,
            percent: None,
            outcome: Some(Outcome::Truncated(result, TruncatedOutput { size, sha256, mime })),
        };
        let text = String::from(&Element::from(st.clone()));
        let back = parse_payload(el(&text)).unwrap_or_else(|e| panic!("{e}: {text}"));
        prop_assert_eq!(back, Payload::JobStatus(st));
    }
}
