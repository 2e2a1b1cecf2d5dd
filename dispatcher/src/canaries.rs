//! Canary jobs (`[[canary]]`, docs/events.md "Canaries"): per capability, a fixture input and
//! arguments with the output it must give, run on every agent that offers the capability at
//! an interval; an agent that fails `quarantine_after` canaries in a row stops receiving real
//! jobs of that capability until `release_after` pass. Pure: the configuration and each
//! (agent, capability)'s [`Health`]; the core runs the jobs and feeds the outcomes.

use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use spine_protocol::CapabilityName;

/// `[[canary]]` as written in the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    /// The capability it proves.
    pub capability: String,
    /// Arguments of the canary job.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub args: Map<String, Value>,
    /// Its input as text; or `input_base64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// Its input as base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_base64: Option<String>,
    /// The output it must give, as text; or `expect_sha256`; neither: success is enough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<String>,
    /// A JSON assertion: the output must be JSON holding this value (every field of an object
    /// given, recursively, with an equal value; anything else equal), e.g. `{ count = 3 }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_json: Option<Value>,
    /// The SHA-256 (hex) of the output it must give.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_sha256: Option<String>,
    /// How often it runs on each agent.
    #[serde(default = "default_interval", with = "spine_protocol::units::duration")]
    pub interval: Duration,
    /// How long a canary may run; one still waiting for a slot when it is up did not run
    /// (the agent was busy with real work), which is neither a pass nor a failure.
    #[serde(default = "default_timeout", with = "spine_protocol::units::duration")]
    pub timeout: Duration,
    /// Failures in a row that quarantine an agent for the capability.
    #[serde(default = "default_quarantine_after")]
    pub quarantine_after: u32,
    /// Passes in a row that release it.
    #[serde(default = "default_release_after")]
    pub release_after: u32,
}

fn default_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_quarantine_after() -> u32 {
    3
}
fn default_release_after() -> u32 {
    2
}

/// A canary, checked.
#[derive(Debug, Clone)]
pub struct Canary {
    /// As configured.
    pub config: CanaryConfig,
    /// Its capability.
    pub capability: CapabilityName,
    /// Its input.
    pub input: Vec<u8>,
    /// The SHA-256 its output must have, when it says.
    pub expect: Option<[u8; 32]>,
}

impl Canary {
    /// Checks `c` (the `i`th canary); errors name the key.
    pub fn new(i: usize, c: &CanaryConfig) -> Result<Canary, String> {
        let key = |k: &str| format!("canary[{i}].{k}");
        let capability = c
            .capability
            .parse::<CapabilityName>()
            .map_err(|e| format!("{}: {e}", key("capability")))?;
        let input = match (&c.input, &c.input_base64) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "{}: give input or input_base64, not both",
                    key("input")
                ))
            }
            (Some(t), None) => t.clone().into_bytes(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b.as_bytes())
                .map_err(|e| format!("{}: not base64: {e}", key("input_base64")))?,
            (None, None) => Vec::new(),
        };
        if input.len() > spine_protocol::INLINE_LIMIT {
            return Err(format!(
                "{}: at most {} bytes (a canary's input travels inline)",
                key("input"),
                spine_protocol::INLINE_LIMIT
            ));
        }
        let given = [
            c.expect.is_some(),
            c.expect_sha256.is_some(),
            c.expect_json.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(format!(
                "{}: give one of expect, expect_sha256 and expect_json",
                key("expect")
            ));
        }
        let expect =
            match (&c.expect, &c.expect_sha256) {
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "{}: give expect or expect_sha256, not both",
                        key("expect")
                    ))
                }
                (Some(t), None) => Some(Sha256::digest(t.as_bytes()).into()),
                (None, Some(h)) => Some(parse_sha256(h).ok_or_else(|| {
                    format!("{}: '{h}' is not 64 hex digits", key("expect_sha256"))
                })?),
                (None, None) => None,
            };
        if c.interval < Duration::from_secs(1) {
            return Err(format!("{}: at least 1s", key("interval")));
        }
        if c.timeout < Duration::from_millis(100) {
            return Err(format!("{}: at least 100ms", key("timeout")));
        }
        if c.quarantine_after == 0 || c.release_after == 0 {
            return Err(format!(
                "{}: quarantine_after and release_after must be at least 1",
                key("quarantine_after")
            ));
        }
        Ok(Canary {
            config: c.clone(),
            capability,
            input,
            expect,
        })
    }

    /// Whether an output whose SHA-256 is `sha256` is the expected one.
    pub fn output_ok(&self, sha256: &[u8; 32]) -> bool {
        self.expect.is_none_or(|e| &e == sha256)
    }

    /// Whether `output` passes the JSON assertion (`expect_json`); `Err` says where it differs.
    pub fn json_ok(&self, output: &[u8]) -> Result<(), String> {
        let Some(want) = &self.config.expect_json else {
            return Ok(());
        };
        let got: Value =
            serde_json::from_slice(output).map_err(|e| format!("its output is not JSON ({e})"))?;
        holds(&got, want, "output")
    }
}

/// Whether `got` holds `want`: every field of a `want` object present in `got` and holding
/// its value, recursively; numbers equal as numbers; anything else equal.
fn holds(got: &Value, want: &Value, path: &str) -> Result<(), String> {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            for (k, wv) in w {
                let p = format!("{path}.{k}");
                match g.get(k) {
                    Some(gv) => holds(gv, wv, &p)?,
                    None => return Err(format!("{p} is missing")),
                }
            }
            Ok(())
        }
        (Value::Number(g), Value::Number(w)) if g.as_f64() == w.as_f64() => Ok(()),
        (g, w) if g == w => Ok(()),
        (g, w) => Err(format!("{path} is {g}, not {w}")),
    }
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Checks every `[[canary]]`; one per capability.
pub fn canaries(configs: &[CanaryConfig]) -> Result<Vec<Canary>, String> {
    let mut out: Vec<Canary> = Vec::with_capacity(configs.len());
    for (i, c) in configs.iter().enumerate() {
        let k = Canary::new(i, c)?;
        if out.iter().any(|o| o.capability == k.capability) {
            return Err(format!(
                "canary[{i}].capability: {} has a canary already",
                k.capability
            ));
        }
        out.push(k);
    }
    Ok(out)
}

/// What a canary's outcome changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The agent is quarantined for the capability.
    Quarantined,
    /// It is released.
    Released,
}

/// One agent's health for one capability, from its canaries.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Health {
    /// Failures in a row.
    pub failures: u32,
    /// Passes in a row.
    pub passes: u32,
    /// Receives no real jobs of the capability.
    pub quarantined: bool,
    /// The last canary passed (none yet: not known).
    pub last_ok: Option<bool>,
    /// Why the last one failed.
    pub last_error: Option<String>,
    /// When the last one passed (ms since the UNIX epoch).
    pub last_success_ms: Option<u64>,
    /// How long the last one ran, ms.
    pub last_duration_ms: Option<u64>,
    /// Canaries passed and failed since the dispatcher started.
    pub passed: u64,
    pub failed: u64,
}

impl Health {
    /// A canary passed (`Ok`) or failed (`Err(why)`) at `now_ms`.
    pub fn record(
        &mut self,
        outcome: Result<(), String>,
        duration_ms: Option<u64>,
        now_ms: u64,
        canary: &CanaryConfig,
    ) -> Option<Transition> {
        self.last_duration_ms = duration_ms;
        match outcome {
            Ok(()) => {
                self.passed += 1;
                self.passes += 1;
                self.failures = 0;
                self.last_ok = Some(true);
                self.last_error = None;
                self.last_success_ms = Some(now_ms);
                if self.quarantined && self.passes >= canary.release_after {
                    self.quarantined = false;
                    return Some(Transition::Released);
                }
            }
            Err(why) => {
                self.failed += 1;
                self.failures += 1;
                self.passes = 0;
                self.last_ok = Some(false);
                self.last_error = Some(why);
                if !self.quarantined && self.failures >= canary.quarantine_after {
                    self.quarantined = true;
                    return Some(Transition::Quarantined);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml_text: &str) -> CanaryConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn quarantine_after_failures_in_a_row_and_release_after_passes() {
        let c = config("capability = \"text.upper\"\nquarantine_after = 2\nrelease_after = 2");
        let mut h = Health::default();
        assert_eq!(h.record(Err("x".into()), None, 1, &c), None);
        assert_eq!(
            h.record(Ok(()), Some(3), 2, &c),
            None,
            "a pass resets the count"
        );
        assert_eq!(h.record(Err("x".into()), None, 3, &c), None);
        assert_eq!(
            h.record(Err("y".into()), None, 4, &c),
            Some(Transition::Quarantined)
        );
        assert!(h.quarantined);
        assert_eq!(h.last_error.as_deref(), Some("y"));
        assert_eq!(h.record(Err("z".into()), None, 5, &c), None, "once");
        assert_eq!(h.record(Ok(()), Some(2), 6, &c), None);
        assert_eq!(h.record(Ok(()), Some(2), 7, &c), Some(Transition::Released));
        assert!(!h.quarantined);
        assert_eq!((h.passed, h.failed, h.last_success_ms), (3, 4, Some(7)));
    }

    #[test]
    fn a_canary_checks_its_output_by_hash_and_bad_ones_name_the_key() {
        let k = Canary::new(
            0,
            &config("capability = \"text.upper\"\ninput = \"hello\"\nexpect = \"HELLO\""),
        )
        .unwrap();
        assert!(k.output_ok(&Sha256::digest(b"HELLO").into()));
        assert!(!k.output_ok(&Sha256::digest(b"hello").into()));
        assert_eq!(k.input, b"hello");
        let any = Canary::new(0, &config("capability = \"text.upper\"")).unwrap();
        assert!(any.output_ok(&[0; 32]), "no expectation: success is enough");
        let json = Canary::new(
            0,
            &config("capability = \"wordcount.map\"\ninput = \"a b a\"\nexpect_json = { a = 2, counts = { b = 1 } }"),
        )
        .unwrap();
        assert_eq!(
            json.json_ok(br#"{"a": 2.0, "counts": {"b": 1, "c": 9}, "x": 1}"#),
            Ok(())
        );
        assert_eq!(
            json.json_ok(br#"{"a": 2, "counts": {"b": 2}}"#),
            Err("output.counts.b is 2, not 1".into())
        );
        assert_eq!(
            json.json_ok(br#"{"counts": {}}"#),
            Err("output.a is missing".into())
        );
        assert!(json
            .json_ok(b"garbage")
            .unwrap_err()
            .starts_with("its output is not JSON"));
        let cases = [
            ("capability = \"Bad Cap\"", "canary[0].capability"),
            (
                "capability = \"a.b\"\nexpect = \"x\"\nexpect_sha256 = \"00\"",
                "canary[0].expect: give one of expect, expect_sha256 and expect_json",
            ),
            (
                "capability = \"a.b\"\nexpect_sha256 = \"zz\"",
                "canary[0].expect_sha256: 'zz' is not 64 hex digits",
            ),
            (
                "capability = \"a.b\"\ninterval = \"10ms\"",
                "canary[0].interval: at least 1s",
            ),
            (
                "capability = \"a.b\"\nquarantine_after = 0",
                "canary[0].quarantine_after",
            ),
            (
                "capability = \"a.b\"\ninput_base64 = \"!!\"",
                "canary[0].input_base64: not base64",
            ),
        ];
        for (text, want) in cases {
            let e = Canary::new(0, &config(text)).unwrap_err();
            assert!(e.starts_with(want), "{text}: {e}");
        }
        let c = config("capability = \"a.b\"");
        assert_eq!(
            canaries(&[c.clone(), c]).unwrap_err(),
            "canary[1].capability: a.b has a canary already"
        );
    }
}
