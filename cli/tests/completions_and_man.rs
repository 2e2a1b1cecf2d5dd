//! `spine completions SHELL` and `spine man DIR`, generated from the command definitions: the
//! bash script is valid bash and completes the commands; every command gets a man page.

use std::process::Command;

fn spine(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(args)
        .output()
        .expect("run spine")
}

#[test]
fn the_bash_completion_is_valid_bash_and_knows_the_commands() {
    let out = spine(&["completions", "bash"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = String::from_utf8(out.stdout).unwrap();
    for word in [
        "_spine()",
        "submit",
        "cancel",
        "capabilities",
        "--fragments-dir",
    ] {
        assert!(script.contains(word), "{word} missing from the completion");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spine.bash");
    std::fs::write(&path, &script).unwrap();
    let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    for shell in ["zsh", "fish"] {
        let out = spine(&["completions", shell]);
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
    }
    let out = spine(&["completions", "tcsh"]);
    assert!(!out.status.success(), "an unknown shell is refused");
}

#[test]
fn every_command_gets_a_man_page() {
    let dir = tempfile::tempdir().unwrap();
    let man = dir.path().join("man1");
    let out = spine(&["man", man.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "spine",
        "spine-submit",
        "spine-agent",
        "spine-cancel",
        "spine-up",
    ] {
        let text = std::fs::read_to_string(man.join(format!("{page}.1")))
            .unwrap_or_else(|e| panic!("{page}.1: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}.1 is roff"
        );
        assert!(
            text.contains(&format!(".TH {page} 1")),
            "{page}.1 names itself"
        );
    }
    let main = std::fs::read_to_string(man.join("spine.1")).unwrap();
    assert!(
        main.contains("submit") && main.contains("dispatcher"),
        "the commands are listed"
    );
}
