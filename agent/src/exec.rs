//! The `exec` wrapper: a capability that runs an existing program, configured in TOML.
//!
//! Never through a shell: the program is started directly with an argv built from the
//! template, and each `{arg.NAME}` substitution stays inside the one argv element it appears
//! in, so `; rm -rf /` or `$(id)` reach the program as literal text. No shell is not enough:
//! the program still reads its argv, so an argument standing alone could be an option
//! (`-o /path`) or a file name. Before anything runs, a job's arguments are held to the
//! capability's declarations ([`crate::args`]): undeclared ones, values not allowed, and
//! values starting with `-` unless declared an option are refused with `bad-arguments`.
//!
//! The environment is cleared except PATH, LANG and what the configuration names (the agent's
//! own environment may hold its password). The program runs in its own process group, which is
//! killed as a whole on timeout, deadline or cancel.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::args::{ArgRules, ArgSpec, DeclError, Target};
use crate::config::{InputMode, OutputMode, Verdict};
use crate::handler::{HandlerFuture, JobContext, JobError, Output};

/// Bytes of stderr kept for error messages.
const STDERR_TAIL: usize = 2048;

/// One piece of an argv element template.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Arg(String),
    Input,
    Output,
}

fn parse_element(s: &str) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find('{') {
        if start > 0 {
            out.push(Piece::Text(rest[..start].to_owned()));
        }
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in '{s}'"))?
            + start;
        let name = &rest[start + 1..end];
        out.push(match name {
            "input" => Piece::Input,
            "output" => Piece::Output,
            n if n.starts_with("arg.") && n.len() > 4 => {
                let a = &n[4..];
                if !crate::args::valid_name(a) {
                    return Err(format!("bad argument name '{a}' in '{s}'"));
                }
                Piece::Arg(a.to_owned())
            }
            other => return Err(format!("unknown placeholder '{{{other}}}' in '{s}' (use {{arg.NAME}}, {{input}}, {{output}})")),
        });
        rest = &rest[end + 1..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest.to_owned()));
    }
    Ok(out)
}

/// The arguments of an exec capability, from its template and its `args` declarations (used
/// by configuration validation and by [`ExecWrapper::with_args`]).
///
/// Without declarations each `{arg.NAME}` of argv is a required string that does not start
/// with `-` ([`ArgSpec::default`]). With them, every placeholder must be declared and every
/// declaration used, and an argument declared `option = true` must not come after a literal
/// `--` element, where the program would take it as an operand.
pub fn arg_rules(
    argv: &[String],
    declared: Option<&BTreeMap<String, ArgSpec>>,
) -> Result<ArgRules, DeclError> {
    let template = parse_template(argv).map_err(|e| DeclError::new("argv", e))?;
    rules_for(&template, declared)
}

fn parse_template(argv: &[String]) -> Result<Vec<Vec<Piece>>, String> {
    argv.iter().map(|e| parse_element(e)).collect()
}

fn rules_for(
    template: &[Vec<Piece>],
    declared: Option<&BTreeMap<String, ArgSpec>>,
) -> Result<ArgRules, DeclError> {
    // Each placeholder, and whether it is used after the end-of-options marker.
    let mut used: BTreeMap<&str, bool> = BTreeMap::new();
    let mut after_dashes = false;
    for pieces in template {
        if matches!(pieces.as_slice(), [Piece::Text(t)] if t == "--") {
            after_dashes = true;
        }
        for p in pieces {
            if let Piece::Arg(a) = p {
                *used.entry(a.as_str()).or_insert(false) |= after_dashes;
            }
        }
    }
    let specs = match declared {
        None => used
            .keys()
            .map(|a| ((*a).to_owned(), ArgSpec::default()))
            .collect(),
        Some(d) => {
            if let Some(a) = used.keys().find(|a| !d.contains_key(**a)) {
                return Err(DeclError::new(
                    "argv",
                    format!(
                        "{{arg.{a}}} is not declared in args (a capability that declares \
                         arguments declares each of its placeholders)"
                    ),
                ));
            }
            for (name, spec) in d {
                match used.get(name.as_str()) {
                    None => {
                        return Err(DeclError::new(
                            format!("args.{name}"),
                            format!("declared but argv has no {{arg.{name}}}"),
                        ))
                    }
                    Some(true) if spec.option => {
                        return Err(DeclError::new(
                            format!("args.{name}.option"),
                            format!(
                                "{{arg.{name}}} comes after \"--\" in argv, where the program \
                                 takes it as an operand, not an option"
                            ),
                        ))
                    }
                    Some(_) => {}
                }
            }
            d.clone()
        }
    };
    ArgRules::compile(&specs, Target::Exec)
}

/// Builds the argv for one job: one output element per template element. `args` are the
/// job's arguments as checked by the capability's [`ArgRules`].
fn build_argv(
    template: &[Vec<Piece>],
    args: &BTreeMap<String, String>,
    input: Option<&Path>,
    output: Option<&Path>,
) -> Result<Vec<String>, JobError> {
    template
        .iter()
        .map(|pieces| {
            let mut s = String::new();
            for p in pieces {
                match p {
                    Piece::Text(t) => s.push_str(t),
                    Piece::Arg(a) => s.push_str(args.get(a).ok_or_else(|| {
                        JobError::bad_argument(a, "is required by this capability")
                    })?),
                    Piece::Input => {
                        s.push_str(&input.map(|p| p.display().to_string()).unwrap_or_default())
                    }
                    Piece::Output => {
                        s.push_str(&output.map(|p| p.display().to_string()).unwrap_or_default())
                    }
                }
            }
            Ok(s)
        })
        .collect()
}

/// A configured exec capability.
pub struct ExecWrapper {
    template: Vec<Vec<Piece>>,
    rules: ArgRules,
    input: InputMode,
    output: OutputMode,
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
    timeout: Duration,
    max_output: u64,
    exit_codes: BTreeMap<i32, Verdict>,
}

impl ExecWrapper {
    /// From configuration values (already validated). Its arguments are the placeholders of
    /// `argv`, each a string that does not start with `-`; [`ExecWrapper::with_args`] declares
    /// them.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        argv: &[String],
        input: InputMode,
        output: OutputMode,
        env: BTreeMap<String, String>,
        cwd: Option<PathBuf>,
        timeout: Duration,
        max_output: u64,
        exit_codes: &BTreeMap<String, Verdict>,
    ) -> Result<Self, String> {
        let template = parse_template(argv)?;
        let rules = rules_for(&template, None).map_err(|e| format!("{}: {}", e.key, e.why))?;
        let exit_codes = exit_codes
            .iter()
            .map(|(k, v)| {
                k.parse::<i32>()
                    .map(|c| (c, *v))
                    .map_err(|_| format!("'{k}' is not an exit code"))
            })
            .collect::<Result<_, _>>()?;
        Ok(ExecWrapper {
            template,
            rules,
            input,
            output,
            env,
            cwd,
            timeout,
            max_output,
            exit_codes,
        })
    }

    /// The same wrapper with its arguments declared (`args` of the capability; `None`: the
    /// placeholders of argv as plain strings). Errors name the key below the capability.
    pub fn with_args(
        mut self,
        declared: Option<&BTreeMap<String, ArgSpec>>,
    ) -> Result<Self, String> {
        self.rules =
            rules_for(&self.template, declared).map_err(|e| format!("{}: {}", e.key, e.why))?;
        Ok(self)
    }

    /// The handler running this wrapper.
    pub fn into_handler(self) -> crate::handler::SharedHandler {
        let me = Arc::new(self);
        Arc::new(move |ctx: JobContext| -> HandlerFuture {
            let me = me.clone();
            Box::pin(async move { me.run(ctx).await })
        })
    }

    async fn run(&self, ctx: JobContext) -> Result<Output, JobError> {
        // Before anything runs or is written: a refused argument costs nothing.
        let args = self.rules.check(&ctx.args)?;
        let dir = tempfile::Builder::new()
            .prefix("spine-exec-")
            .tempdir()
            .map_err(|e| {
                JobError::Retryable(format!("cannot create a temporary directory: {e}"))
            })?;
        let input_path = (self.input == InputMode::File).then(|| dir.path().join("input"));
        let output_path = (self.output == OutputMode::File).then(|| dir.path().join("output"));
        if let Some(p) = &input_path {
            tokio::fs::write(p, &ctx.input)
                .await
                .map_err(|e| JobError::Retryable(format!("writing the input file: {e}")))?;
        }
        let argv = build_argv(
            &self.template,
            &args,
            input_path.as_deref(),
            output_path.as_deref(),
        )?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .stdin(if self.input == InputMode::Stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Own process group, so the whole tree can be killed.
            .process_group(0);
        for key in ["PATH", "LANG"] {
            if let Ok(v) = std::env::var(key) {
                cmd.env(key, v);
            }
        }
        cmd.envs(&self.env);
        cmd.env("SPINE_JOB_ID", ctx.id.as_str())
            .env("SPINE_ATTEMPT", ctx.attempt.to_string());
        if let Some(d) = &self.cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| JobError::Failed(format!("cannot start '{}': {e}", argv[0])))?;
        let group = child.id().map(|pid| nix::unistd::Pid::from_raw(pid as i32));
        // Kills the whole group when this future ends early (timeout, cancel, drop).
        let _guard = GroupGuard(group);

        let stdin_task = match (child.stdin.take(), self.input == InputMode::Stdin) {
            (Some(mut stdin), true) => {
                let data = ctx.input.clone();
                Some(tokio::spawn(async move {
                    // A program that exits without reading all its input is not an error here.
                    let _ = stdin.write_all(&data).await;
                    let _ = stdin.shutdown().await;
                }))
            }
            _ => None,
        };
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| JobError::Retryable("no stdout pipe".into()))?;
        let mut stderr = child
            .stderr
            .take()
            .ok_or_else(|| JobError::Retryable("no stderr pipe".into()))?;
        let max = self.max_output;
        let read_out = async move {
            let mut buf = Vec::new();
            let n = (&mut stdout).take(max + 1).read_to_end(&mut buf).await;
            n.map(|_| buf)
        };
        // Keep only the tail of stderr: a chatty program must not fill the agent's memory.
        let read_err = async move {
            let mut tail = Vec::with_capacity(2 * STDERR_TAIL);
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&chunk[..n]);
                if tail.len() > 2 * STDERR_TAIL {
                    tail.drain(..tail.len() - STDERR_TAIL);
                }
            }
            tail
        };
        let work = async {
            let (out, err, status) = tokio::join!(read_out, read_err, child.wait());
            (out, err, status)
        };
        // The job's deadline and cancellation are enforced by the agent, which drops this
        // future (and so kills the process group); here only the capability's own limit.
        let timeout = self.timeout;
        let (out, err, status) = tokio::select! {
            r = work => r,
            _ = tokio::time::sleep(timeout) => {
                return Err(JobError::Retryable(format!("'{}' ran longer than {timeout:?} and was killed", argv[0])));
            }
        };
        if let Some(t) = stdin_task {
            t.abort();
        }
        let status =
            status.map_err(|e| JobError::Retryable(format!("waiting for '{}': {e}", argv[0])))?;
        let tail = stderr_tail(&err);
        let code = status.code();
        let verdict = match code {
            Some(c) => self.exit_codes.get(&c).copied().unwrap_or(if c == 0 {
                Verdict::Ok
            } else {
                Verdict::Failed
            }),
            None => Verdict::Failed,
        };
        let what = match code {
            Some(c) => format!("'{}' exited with {c}", argv[0]),
            None => format!("'{}' was killed by a signal", argv[0]),
        };
        let with_tail = |m: String| {
            if tail.is_empty() {
                m
            } else {
                format!("{m}: {tail}")
            }
        };
        match verdict {
            Verdict::Ok => {}
            Verdict::Retryable => return Err(JobError::Retryable(with_tail(what))),
            Verdict::Failed => return Err(JobError::Failed(with_tail(what))),
            Verdict::BadArguments => {
                return Err(JobError::BadArguments {
                    field: String::new(),
                    message: with_tail(what),
                })
            }
        }
        let bytes = match &output_path {
            Some(p) => {
                let meta = tokio::fs::metadata(p)
                    .await
                    .map_err(|e| JobError::Failed(format!("no output file: {e}")))?;
                if meta.len() > self.max_output {
                    return Err(JobError::Failed(format!(
                        "output of {} bytes is over the limit of {}",
                        meta.len(),
                        self.max_output
                    )));
                }
                tokio::fs::read(p)
                    .await
                    .map_err(|e| JobError::Failed(format!("reading the output file: {e}")))?
            }
            None => {
                let out = out.map_err(|e| JobError::Retryable(format!("reading stdout: {e}")))?;
                if out.len() as u64 > self.max_output {
                    return Err(JobError::Failed(format!(
                        "output is over the limit of {} bytes",
                        self.max_output
                    )));
                }
                out
            }
        };
        Ok(Output::bytes(bytes).with_meta("exit_code", code.unwrap_or(0)))
    }
}

fn stderr_tail(err: &[u8]) -> String {
    let start = err.len().saturating_sub(STDERR_TAIL);
    String::from_utf8_lossy(&err[start..]).trim().to_owned()
}

/// Kills a process group when dropped (no-op once the group is gone).
struct GroupGuard(Option<nix::unistd::Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // The group id equals the leader's pid (process_group(0)). ESRCH when it has
            // exited already: nothing to do.
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    fn declared(toml_text: &str) -> BTreeMap<String, ArgSpec> {
        toml::from_str(toml_text).unwrap_or_else(|e| panic!("{e}\n{toml_text}"))
    }

    /// The argv a job gets from `argv` with these declarations, or the refusal.
    fn render(argv: &[&str], decl: Option<&str>, args: Value) -> Result<Vec<String>, JobError> {
        let argv = strings(argv);
        let decl = decl.map(declared);
        let rules = arg_rules(&argv, decl.as_ref()).unwrap();
        let texts = rules.check(args.as_object().unwrap_or(&Default::default()))?;
        build_argv(
            &parse_template(&argv).unwrap(),
            &texts,
            Some(Path::new("/tmp/in")),
            None,
        )
    }

    #[test]
    fn placeholders_stay_inside_their_element() {
        let argv = render(
            &["prog", "--name={arg.name}", "{arg.n}", "{input}"],
            None,
            json!({"name": "; rm -rf / $(id) 'q' \"d\"\nnl", "n": 9007199254740993u64}),
        )
        .unwrap();
        assert_eq!(
            argv,
            vec![
                "prog",
                "--name=; rm -rf / $(id) 'q' \"d\"\nnl",
                "9007199254740993",
                "/tmp/in"
            ]
        );
    }

    #[test]
    fn bad_templates_and_arguments() {
        for t in [&["x", "{arg.}"][..], &["x", "{oops}"], &["x", "{arg.a"]] {
            assert_eq!(arg_rules(&strings(t), None).unwrap_err().key, "argv");
        }
        let e = render(&["{arg.a}"], None, json!({})).unwrap_err();
        assert_eq!(
            e,
            JobError::bad_argument(
                "a",
                "is required by this capability; it must be a string not starting with '-'"
            )
        );
        let e = render(&["{arg.a}"], None, json!({"a": [1]})).unwrap_err();
        assert!(matches!(e, JobError::BadArguments { ref field, .. } if field == "a"));
    }

    /// Finding 7 of the security review: `sort {arg.mode} {input}` read any file
    /// (`mode = "/etc/hostname"`) and wrote one (`mode = "-o/path"`).
    #[test]
    fn option_and_file_name_injection_is_refused() {
        let argv = ["sort", "{arg.mode}", "{input}"];
        // Undeclared: an option is refused by default.
        let e = render(&argv, None, json!({"mode": "-o/tmp/INJECTED"})).unwrap_err();
        assert_eq!(
            e,
            JobError::bad_argument("mode", "must be a string not starting with '-'")
        );
        // Declared: only the listed values, options included.
        let decl = Some(r#"mode = { values = ["-n", "-r"] }"#);
        for hostile in ["/etc/hostname", "-o/tmp/INJECTED"] {
            let e = render(&argv, decl, json!({ "mode": hostile })).unwrap_err();
            assert_eq!(
                e,
                JobError::bad_argument("mode", "must be one of \"-n\", \"-r\""),
                "{hostile}"
            );
        }
        assert_eq!(
            render(&argv, decl, json!({"mode": "-n"})).unwrap(),
            vec!["sort", "-n", "/tmp/in"]
        );
        // Arguments the template does not use are refused too, declared or not.
        let e = render(&argv, decl, json!({"mode": "-n", "o": "/x"})).unwrap_err();
        assert!(matches!(e, JobError::BadArguments { ref field, .. } if field == "o"));
        let e = render(&["sort"], None, json!({"o": "/x"})).unwrap_err();
        assert_eq!(
            e,
            JobError::bad_argument(
                "o",
                "is not an argument of this capability: this capability takes no arguments"
            )
        );
    }

    #[test]
    fn declarations_must_match_the_template() {
        let cases = [
            (
                &["sort", "{arg.mode}", "{arg.key}"][..],
                "mode = {}",
                "argv",
                "{arg.key} is not declared",
            ),
            (
                &["sort", "{arg.mode}"],
                "mode = {}\nextra = {}",
                "args.extra",
                "argv has no",
            ),
            (
                &["sort", "--", "{arg.mode}"],
                "mode = { values = [\"-n\"], option = true }",
                "args.mode.option",
                "after \"--\"",
            ),
            (
                &["sort", "{arg.mode}", "{input}"],
                "mode = { pattern = \"(\" }",
                "args.mode.pattern",
                "is not a valid regular expression",
            ),
        ];
        for (argv, decl, key, why) in cases {
            let e = arg_rules(&strings(argv), Some(&declared(decl))).unwrap_err();
            assert_eq!(e.key, key, "{argv:?} {decl}: {}", e.why);
            assert!(e.why.contains(why), "{}", e.why);
        }
        // An option before "--", a file name after it: the safe form.
        let argv = ["sort", "{arg.mode}", "-o", "{output}", "--", "{arg.file}"];
        let decl = "mode = { values = [\"-n\", \"-r\"] }\nfile = { pattern = \"[a-z]+\\\\.txt\" }";
        assert!(arg_rules(&strings(&argv), Some(&declared(decl))).is_ok());
        let e = render(&argv, Some(decl), json!({"mode": "-r", "file": "-x.txt"})).unwrap_err();
        assert!(matches!(e, JobError::BadArguments { ref field, .. } if field == "file"));
    }
}
