//! The `exec` wrapper: a capability that runs an existing program, configured in TOML.
//!
//! Never through a shell: the program is started directly with an argv built from the
//! template, and each `{arg.NAME}` substitution stays inside the one argv element it appears
//! in, so `; rm -rf /` or `$(id)` reach the program as literal text. The environment is
//! cleared except PATH, LANG and what the configuration names (the agent's own environment may
//! hold its password). The program runs in its own process group, which is killed as a whole
//! on timeout, deadline or cancel.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

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
                if !a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
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

/// Checks an argv template (used by config validation).
pub fn check_template(argv: &[String]) -> Result<(), String> {
    argv.iter().try_for_each(|e| parse_element(e).map(|_| ()))
}

/// Renders a JSON argument as argv text; only scalars are allowed.
fn arg_text(name: &str, v: Option<&Value>) -> Result<String, JobError> {
    match v {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::Bool(b)) => Ok(b.to_string()),
        Some(_) => Err(JobError::bad_argument(
            name,
            "must be a string, number or boolean",
        )),
        None => Err(JobError::bad_argument(
            name,
            "is required by this capability",
        )),
    }
}

/// Builds the argv for one job: one output element per template element.
fn build_argv(
    template: &[Vec<Piece>],
    args: &serde_json::Map<String, Value>,
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
                    Piece::Arg(a) => {
                        let v = arg_text(a, args.get(a))?;
                        if v.contains('\0') {
                            return Err(JobError::bad_argument(a, "must not contain NUL"));
                        }
                        s.push_str(&v);
                    }
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
    input: InputMode,
    output: OutputMode,
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
    timeout: Duration,
    max_output: u64,
    exit_codes: BTreeMap<i32, Verdict>,
}

impl ExecWrapper {
    /// From configuration values (already validated).
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
        let template = argv
            .iter()
            .map(|e| parse_element(e))
            .collect::<Result<Vec<_>, _>>()?;
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
            input,
            output,
            env,
            cwd,
            timeout,
            max_output,
            exit_codes,
        })
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
            &ctx.args,
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
    use serde_json::json;

    fn args(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn placeholders_stay_inside_their_element() {
        let t: Vec<Vec<Piece>> = ["prog", "--name={arg.name}", "{arg.n}", "{input}"]
            .iter()
            .map(|e| parse_element(e).unwrap())
            .collect();
        let a = args(json!({"name": "; rm -rf / $(id) 'q' \"d\"\nnl", "n": 9007199254740993u64}));
        let argv = build_argv(&t, &a, Some(Path::new("/tmp/in")), None).unwrap();
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
        assert!(check_template(&["x".into(), "{arg.}".into()]).is_err());
        assert!(check_template(&["x".into(), "{oops}".into()]).is_err());
        assert!(check_template(&["x".into(), "{arg.a".into()]).is_err());
        let t = vec![parse_element("{arg.a}").unwrap()];
        let e = build_argv(&t, &args(json!({})), None, None).unwrap_err();
        assert_eq!(
            e,
            JobError::bad_argument("a", "is required by this capability")
        );
        let e = build_argv(&t, &args(json!({"a": [1]})), None, None).unwrap_err();
        assert!(matches!(e, JobError::BadArguments { ref field, .. } if field == "a"));
    }
}
