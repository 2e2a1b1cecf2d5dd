//! `spine check` run as a real process: valid stanzas exit 0, invalid ones exit 1 naming the
//! fault, unreadable input exits 2.

use std::io::Write as _;
use std::process::{Command, Stdio};

fn check(input: &str) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["check", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn spine");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait spine");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn valid_stanza_exits_zero() {
    let (code, out) = check(
        "<iq type='set' id='d1-77' to='agent1@example.com/worker'>\
         <job xmlns='urn:spine:1' id='j-1' capability='image.thumbnail' attempt='2'/></iq>",
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ok: <job> job j-1 for image.thumbnail (attempt 2)"),
        "{out}"
    );
}

#[test]
fn invalid_payload_exits_one_with_the_peer_error() {
    let (code, out) = check(
        "<presence><load xmlns='urn:spine:1' seq='1' gen='1' state='ready' in-flight='1' yours='5' slots='2'/></presence>",
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("'yours'='5' is invalid: cannot exceed in-flight"),
        "{out}"
    );
    assert!(out.contains("<malformed/>"), "{out}");
}

#[test]
fn not_xml_exits_two() {
    let (code, out) = check("<iq type='set'><unclosed></iq>");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not well-formed XML"), "{out}");
}
