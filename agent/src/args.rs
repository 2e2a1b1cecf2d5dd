//! Argument declarations: which job arguments a capability accepts, of which type and with
//! which values — `args` of an `exec` or `http` capability in a `[[capability]]`, or the names
//! a capability written in Rust declares ([`crate::AgentBuilder::capability_args`]).
//!
//! A job's arguments come from the network. The exec wrapper puts them into a program's argv
//! and the http wrapper into a query string, so an argument the operator did not foresee —
//! `-o /some/path` or a file name where `sort` expects `-n`, a second `mode=` after the one in
//! the configured URL — changes what the program or service does. The declarations say what is
//! allowed; [`ArgRules::check`] holds every job to them before anything runs, and refuses the
//! rest with `bad-arguments` naming the argument. Configuration validation compiles the same
//! rules ([`ArgRules::compile`]), so a bad declaration stops the agent at start with its key.
//!
//! A Rust handler reads the arguments it knows and checks their values itself; what the same
//! rules add for it is the refusal of every other name ([`ArgRules::accepting`]), so that a
//! misspelt or misremembered argument (`width` where the capability reads `size`) fails the
//! job with its name and the accepted ones instead of being silently ignored.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::handler::{Handler, HandlerFuture, JobContext, JobError, SharedHandler};

/// The JSON type a declared argument must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArgType {
    /// A string; a number or a boolean is taken as its JSON text (`128`, `true`).
    #[default]
    String,
    /// A JSON integer, within `min`..=`max` when given.
    Integer,
    /// `true` or `false`.
    Boolean,
    /// Any JSON value, checked by the handler: the declared names of a capability written in
    /// Rust ([`ArgRules::accepting`]). Not a configuration type (`type = "any"` is refused):
    /// an exec or http argument becomes text, so it must say which.
    #[serde(skip)]
    Any,
}

/// One allowed value in a declaration's `values`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Literal {
    /// A boolean.
    Boolean(bool),
    /// An integer.
    Integer(i64),
    /// A string.
    String(String),
}

impl std::fmt::Display for Literal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Literal::Boolean(b) => write!(f, "{b}"),
            Literal::Integer(n) => write!(f, "{n}"),
            Literal::String(s) => write!(f, "{s:?}"),
        }
    }
}

/// One declared argument, `[capability.args.NAME]`: what a job may pass as `NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgSpec {
    /// The JSON type (default `"string"`).
    #[serde(rename = "type", default)]
    pub kind: ArgType,
    /// The only values allowed. A value listed here is allowed even if it starts with `-`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<Literal>>,
    /// A regular expression the whole value must match (strings only; anchored at both ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// Smallest integer allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    /// Largest integer allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<i64>,
    /// Exec only: the value may start with `-`, i.e. it may be a command-line option. Without
    /// it such values are refused unless listed in `values`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub option: bool,
    /// Http only: `false` lets a job leave the argument out (an exec argument fills its place
    /// in argv and is always required).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub required: bool,
}

fn yes() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}
fn is_false(b: &bool) -> bool {
    !*b
}

impl ArgSpec {
    /// An optional argument of any JSON value, which the handler checks: what a capability
    /// written in Rust declares by name ([`ArgRules::accepting`]).
    pub fn any() -> Self {
        ArgSpec {
            kind: ArgType::Any,
            required: false,
            ..ArgSpec::default()
        }
    }
}

impl Default for ArgSpec {
    /// A required string that does not start with `-`: what an undeclared `{arg.NAME}` is.
    fn default() -> Self {
        ArgSpec {
            kind: ArgType::String,
            values: None,
            pattern: None,
            min: None,
            max: None,
            option: false,
            required: true,
        }
    }
}

/// Where a capability's arguments go; the rules differ a little.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Into a program's argv: a leading `-` makes an option, so it is refused unless declared.
    Exec,
    /// Into a query string: every argument is required unless declared otherwise.
    Http,
    /// To a handler written in Rust, as JSON values: like `Http`, and arguments may be of
    /// [`ArgType::Any`].
    Native,
}

/// A bad declaration or template: the key below the capability (`args.mode.pattern`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclError {
    /// The key, relative to the capability: `argv`, `args.mode`, `args.mode.pattern`.
    pub key: String,
    /// What is wrong.
    pub why: String,
}

impl DeclError {
    pub(crate) fn new(key: impl Into<String>, why: impl Into<String>) -> Self {
        DeclError {
            key: key.into(),
            why: why.into(),
        }
    }
}

/// Whether `name` can be an argument name: letters, digits, `_` and `-`.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// One compiled declaration.
#[derive(Debug, Clone)]
struct Rule {
    spec: ArgSpec,
    pattern: Option<Regex>,
    /// What is allowed, in words, for refusals: `must be one of "-n", "-r"`.
    allowed: String,
}

/// The compiled declarations of one capability, checked against every job.
#[derive(Debug, Clone)]
pub struct ArgRules {
    rules: BTreeMap<String, Rule>,
    target: Target,
}

impl ArgRules {
    /// Compiles declarations, refusing contradictory or malformed ones with their key.
    pub fn compile(specs: &BTreeMap<String, ArgSpec>, target: Target) -> Result<Self, DeclError> {
        let mut rules = BTreeMap::new();
        for (name, spec) in specs {
            let rule = compile_one(name, spec, target)?;
            rules.insert(name.clone(), rule);
        }
        Ok(ArgRules { rules, target })
    }

    /// The rules of a capability written in Rust that accepts exactly the arguments `names`,
    /// each optional and of any JSON value ([`ArgSpec::any`]): its handler checks the values,
    /// [`ArgRules::check`] refuses every other name. An invalid or repeated name is an error
    /// with its key (`args.NAME`).
    pub fn accepting<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, DeclError> {
        let mut specs = BTreeMap::new();
        for name in names {
            if specs.insert(name.to_owned(), ArgSpec::any()).is_some() {
                return Err(DeclError::new(format!("args.{name}"), "is declared twice"));
            }
        }
        Self::compile(&specs, Target::Native)
    }

    /// The declared names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.rules.keys().map(String::as_str)
    }

    /// Holds a job's arguments to the declarations. Returns each given argument as the text
    /// that goes into argv or the query string; refuses an undeclared argument, a missing
    /// required one and a value that is not allowed, with `bad-arguments` naming it and a
    /// message saying what is allowed.
    pub fn check(&self, args: &Map<String, Value>) -> Result<BTreeMap<String, String>, JobError> {
        if let Some(name) = args.keys().find(|k| !self.rules.contains_key(k.as_str())) {
            let accepted = if self.rules.is_empty() {
                "this capability takes no arguments".to_owned()
            } else {
                format!(
                    "this capability accepts only {}",
                    self.names().collect::<Vec<_>>().join(", ")
                )
            };
            return Err(JobError::bad_argument(
                name,
                format!("is not an argument of this capability: {accepted}"),
            ));
        }
        let mut texts = BTreeMap::new();
        for (name, rule) in &self.rules {
            match args.get(name) {
                None if rule.spec.required => {
                    return Err(JobError::bad_argument(
                        name,
                        format!("is required by this capability; it {}", rule.allowed),
                    ))
                }
                None => {}
                Some(v) => {
                    let text = self.check_one(name, rule, v)?;
                    texts.insert(name.clone(), text);
                }
            }
        }
        Ok(texts)
    }

    fn check_one(&self, name: &str, rule: &Rule, v: &Value) -> Result<String, JobError> {
        let refuse = || JobError::bad_argument(name, rule.allowed.clone());
        let spec = &rule.spec;
        let (text, listed) = match spec.kind {
            ArgType::String => {
                let text = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return Err(refuse()),
                };
                let listed = spec.values.as_ref().map(|vs| {
                    vs.iter()
                        .any(|l| matches!(l, Literal::String(s) if *s == text))
                });
                (text, listed)
            }
            ArgType::Integer => {
                let n = match v {
                    Value::Number(n) => n
                        .as_i64()
                        .map(i128::from)
                        .or_else(|| n.as_u64().map(i128::from))
                        .ok_or_else(refuse)?,
                    _ => return Err(refuse()),
                };
                if spec.min.is_some_and(|m| n < i128::from(m))
                    || spec.max.is_some_and(|m| n > i128::from(m))
                {
                    return Err(refuse());
                }
                let listed = spec.values.as_ref().map(|vs| {
                    vs.iter()
                        .any(|l| matches!(l, Literal::Integer(i) if i128::from(*i) == n))
                });
                (n.to_string(), listed)
            }
            ArgType::Boolean => {
                let b = v.as_bool().ok_or_else(refuse)?;
                let listed = spec.values.as_ref().map(|vs| {
                    vs.iter()
                        .any(|l| matches!(l, Literal::Boolean(x) if *x == b))
                });
                (b.to_string(), listed)
            }
            // The handler checks the value; only the name had to be known.
            ArgType::Any => return Ok(v.to_string()),
        };
        match listed {
            Some(false) => return Err(refuse()),
            // An explicit value is allowed as it is, `-` or not.
            Some(true) => {}
            None => {
                if rule.pattern.as_ref().is_some_and(|re| !re.is_match(&text)) {
                    return Err(refuse());
                }
                if self.target == Target::Exec && !spec.option && text.starts_with('-') {
                    return Err(refuse());
                }
            }
        }
        if self.target == Target::Exec && text.contains('\0') {
            return Err(JobError::bad_argument(name, "must not contain NUL"));
        }
        Ok(text)
    }
}

/// A handler held to declared arguments: a job whose arguments the rules refuse fails with
/// their `bad-arguments` before the handler is called.
struct Declared {
    rules: ArgRules,
    handler: SharedHandler,
}

impl Handler for Declared {
    fn call(&self, ctx: JobContext) -> HandlerFuture {
        match self.rules.check(&ctx.args) {
            Ok(_) => self.handler.call(ctx),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }
}

/// `handler`, called only for jobs whose arguments `rules` accept.
pub(crate) fn declared(rules: ArgRules, handler: SharedHandler) -> SharedHandler {
    std::sync::Arc::new(Declared { rules, handler })
}

fn compile_one(name: &str, spec: &ArgSpec, target: Target) -> Result<Rule, DeclError> {
    let key = format!("args.{name}");
    let at = |field: &str| format!("{key}.{field}");
    if !valid_name(name) {
        return Err(DeclError::new(
            &key,
            "an argument name has only letters, digits, '_' and '-'",
        ));
    }
    let exec = target == Target::Exec;
    if spec.kind == ArgType::Any && target != Target::Native {
        return Err(DeclError::new(
            at("type"),
            "only capabilities written in Rust take arguments of any type",
        ));
    }
    if spec.option && !exec {
        return Err(DeclError::new(
            at("option"),
            "only exec capabilities pass arguments as command-line options",
        ));
    }
    if !spec.required && exec {
        return Err(DeclError::new(
            at("required"),
            "an exec argument fills its place in argv and cannot be left out",
        ));
    }
    if let Some(values) = &spec.values {
        if values.is_empty() {
            return Err(DeclError::new(at("values"), "an empty list allows nothing"));
        }
        for (i, l) in values.iter().enumerate() {
            let fits = matches!(
                (spec.kind, l),
                (ArgType::String, Literal::String(_))
                    | (ArgType::Integer, Literal::Integer(_))
                    | (ArgType::Boolean, Literal::Boolean(_))
            );
            if !fits {
                return Err(DeclError::new(
                    format!("{key}.values[{i}]"),
                    format!(
                        "{l} is not of the argument's type ({})",
                        type_name(spec.kind)
                    ),
                ));
            }
            if matches!(l, Literal::String(s) if s.contains('\0')) {
                return Err(DeclError::new(format!("{key}.values[{i}]"), "contains NUL"));
            }
        }
        for field in ["pattern", "min", "max"] {
            let given = match field {
                "pattern" => spec.pattern.is_some(),
                "min" => spec.min.is_some(),
                _ => spec.max.is_some(),
            };
            if given {
                return Err(DeclError::new(
                    at(field),
                    "give values or pattern/min/max, not both",
                ));
            }
        }
    }
    if spec.pattern.is_some() && spec.kind != ArgType::String {
        return Err(DeclError::new(
            at("pattern"),
            "only string arguments take a pattern",
        ));
    }
    for (field, given) in [("min", spec.min), ("max", spec.max)] {
        if given.is_some() && spec.kind != ArgType::Integer {
            return Err(DeclError::new(
                at(field),
                "only integer arguments take min and max",
            ));
        }
    }
    if let (Some(lo), Some(hi)) = (spec.min, spec.max) {
        if lo > hi {
            return Err(DeclError::new(
                at("max"),
                format!("{hi} is below min ({lo})"),
            ));
        }
    }
    if exec && !spec.option && spec.min.is_some_and(|m| m < 0) {
        return Err(DeclError::new(
            at("min"),
            "negative integers start with '-', which an exec argument refuses unless option = true",
        ));
    }
    let pattern = match &spec.pattern {
        None => None,
        Some(p) => {
            // Compiled as written first, so an error is about the operator's own text.
            let invalid = |e: regex::Error| DeclError::new(at("pattern"), regex_error(p, &e));
            Regex::new(p).map_err(invalid)?;
            Some(Regex::new(&format!("^(?:{p})$")).map_err(invalid)?)
        }
    };
    Ok(Rule {
        allowed: allowed(spec, exec),
        spec: spec.clone(),
        pattern,
    })
}

/// A regex error on one line (the syntax error's own text spans several, with a caret).
fn regex_error(pattern: &str, e: &regex::Error) -> String {
    let why = match e {
        regex::Error::Syntax(text) => text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("error: "))
            .unwrap_or("syntax error")
            .to_owned(),
        other => other.to_string(),
    };
    format!("{pattern:?} is not a valid regular expression: {why}")
}

fn type_name(t: ArgType) -> &'static str {
    match t {
        ArgType::String => "string",
        ArgType::Integer => "integer",
        ArgType::Boolean => "boolean",
        ArgType::Any => "any",
    }
}

/// What a declaration allows, in words: the message of every refusal.
fn allowed(spec: &ArgSpec, exec: bool) -> String {
    if let Some(values) = &spec.values {
        let list: Vec<String> = values.iter().map(Literal::to_string).collect();
        return match list.as_slice() {
            [one] => format!("must be {one}"),
            _ => format!("must be one of {}", list.join(", ")),
        };
    }
    let no_dash = exec && !spec.option;
    let mut s = String::new();
    match spec.kind {
        ArgType::String => {
            s.push_str("must be a string");
            if let Some(p) = &spec.pattern {
                let _ = write!(s, " matching {p}");
                if no_dash {
                    s.push_str(" and");
                }
            }
            if no_dash {
                s.push_str(" not starting with '-'");
            }
        }
        ArgType::Integer => {
            s.push_str("must be an integer");
            let lo = match spec.min {
                None if no_dash => Some(0),
                m => m,
            };
            match (lo, spec.max) {
                (Some(lo), Some(hi)) => {
                    let _ = write!(s, " in {lo}..={hi}");
                }
                (Some(lo), None) => {
                    let _ = write!(s, " of at least {lo}");
                }
                (None, Some(hi)) => {
                    let _ = write!(s, " of at most {hi}");
                }
                (None, None) => {}
            }
        }
        ArgType::Boolean => s.push_str("must be true or false"),
        ArgType::Any => s.push_str("may be any JSON value"),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn specs(toml_text: &str) -> BTreeMap<String, ArgSpec> {
        toml::from_str(toml_text).unwrap_or_else(|e| panic!("{e}\n{toml_text}"))
    }

    fn rules(toml_text: &str, target: Target) -> ArgRules {
        ArgRules::compile(&specs(toml_text), target).unwrap()
    }

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    /// The field and message of a refusal.
    fn refusal(r: &ArgRules, v: Value) -> (String, String) {
        match r.check(&args(v)) {
            Err(JobError::BadArguments { field, message }) => (field, message),
            other => panic!("expected bad-arguments, got {other:?}"),
        }
    }

    #[test]
    fn values_allow_exactly_the_listed_options() {
        let r = rules(r#"mode = { values = ["-n", "-r"] }"#, Target::Exec);
        let ok = r.check(&args(json!({"mode": "-n"}))).unwrap();
        assert_eq!(ok.get("mode").map(String::as_str), Some("-n"));
        // The attack of finding 7: a file name, and an option that writes a file.
        for hostile in ["/etc/hostname", "-o/tmp/INJECTED", "-n -o x", "-nr", ""] {
            assert_eq!(
                refusal(&r, json!({ "mode": hostile })),
                (
                    "mode".to_owned(),
                    "must be one of \"-n\", \"-r\"".to_owned()
                ),
                "{hostile:?}"
            );
        }
    }

    #[test]
    fn a_leading_dash_is_refused_unless_declared_an_option() {
        let plain = rules("name = {}", Target::Exec);
        let (field, message) = refusal(&plain, json!({"name": "-o/tmp/x"}));
        assert_eq!(field, "name");
        assert_eq!(message, "must be a string not starting with '-'");
        assert!(plain.check(&args(json!({"name": "a-b"}))).is_ok());
        // A pattern that would allow it does not lift the rule; option = true does.
        let pat = rules(r#"flag = { pattern = "-?[a-z]" }"#, Target::Exec);
        assert_eq!(
            refusal(&pat, json!({"flag": "-x"})).1,
            "must be a string matching -?[a-z] and not starting with '-'"
        );
        let opt = rules(
            r#"flag = { pattern = "-[a-z]", option = true }"#,
            Target::Exec,
        );
        assert!(opt.check(&args(json!({"flag": "-x"}))).is_ok());
        assert_eq!(
            refusal(&opt, json!({"flag": "-xo"})).1,
            "must be a string matching -[a-z]"
        );
        // Negative integers start with '-' too.
        let n = rules(r#"n = { type = "integer" }"#, Target::Exec);
        assert_eq!(
            refusal(&n, json!({"n": -5})).1,
            "must be an integer of at least 0"
        );
        // Over HTTP a leading '-' is just text in a query value.
        let h = rules("q = {}", Target::Http);
        assert!(h.check(&args(json!({"q": "-x"}))).is_ok());
    }

    #[test]
    fn patterns_match_the_whole_value() {
        let r = rules(r#"word = { pattern = "[a-z]+" }"#, Target::Exec);
        assert!(r.check(&args(json!({"word": "abc"}))).is_ok());
        for bad in ["abc/../etc", "ABC", "", "abc\n"] {
            assert_eq!(refusal(&r, json!({ "word": bad })).0, "word", "{bad:?}");
        }
        let alt = rules(r#"w = { pattern = "a|ab" }"#, Target::Exec);
        assert!(alt.check(&args(json!({"w": "ab"}))).is_ok());
        // Anchors written out change nothing.
        let anchored = rules(r#"w = { pattern = "^[a-z]+$" }"#, Target::Exec);
        assert!(anchored.check(&args(json!({"w": "abc"}))).is_ok());
        assert_eq!(refusal(&anchored, json!({"w": "abc\n"})).0, "w");
    }

    #[test]
    fn types_and_ranges() {
        let r = rules(
            r#"
            level = { type = "integer", min = 1, max = 9 }
            fast = { type = "boolean" }
            label = {}
            "#,
            Target::Exec,
        );
        let ok = r
            .check(&args(json!({"level": 9, "fast": true, "label": 12})))
            .unwrap();
        assert_eq!(ok["level"], "9");
        assert_eq!(ok["fast"], "true");
        assert_eq!(ok["label"], "12", "a number is taken as its text");
        let base = json!({"level": 5, "fast": false, "label": "x"});
        let with = |k: &str, v: Value| {
            let mut a = base.clone();
            a[k] = v;
            a
        };
        for (k, v, msg) in [
            ("level", json!(0), "must be an integer in 1..=9"),
            ("level", json!(10), "must be an integer in 1..=9"),
            ("level", json!("9"), "must be an integer in 1..=9"),
            ("level", json!(9.5), "must be an integer in 1..=9"),
            ("level", json!(u64::MAX), "must be an integer in 1..=9"),
            ("fast", json!("yes"), "must be true or false"),
            (
                "label",
                json!([1]),
                "must be a string not starting with '-'",
            ),
            (
                "label",
                json!(null),
                "must be a string not starting with '-'",
            ),
            ("label", json!("a\0b"), "must not contain NUL"),
        ] {
            assert_eq!(
                refusal(&r, with(k, v.clone())),
                (k.to_owned(), msg.to_owned()),
                "{k} = {v}"
            );
        }
        let ints = rules(r#"n = { type = "integer", values = [1, 2] }"#, Target::Exec);
        assert!(ints.check(&args(json!({"n": 2}))).is_ok());
        assert_eq!(refusal(&ints, json!({"n": 3})).1, "must be one of 1, 2");
    }

    #[test]
    fn undeclared_and_missing_arguments_are_named() {
        let r = rules(r#"mode = { values = ["safe"] }"#, Target::Http);
        let (field, message) = refusal(&r, json!({"mode": "safe", "admin": true}));
        assert_eq!(field, "admin");
        assert_eq!(
            message,
            "is not an argument of this capability: this capability accepts only mode"
        );
        let (field, message) = refusal(&r, json!({}));
        assert_eq!(field, "mode");
        assert_eq!(
            message,
            "is required by this capability; it must be \"safe\""
        );
        let none = ArgRules::compile(&BTreeMap::new(), Target::Http).unwrap();
        assert_eq!(
            refusal(&none, json!({"mode": "x"})).1,
            "is not an argument of this capability: this capability takes no arguments"
        );
        assert!(none.check(&Map::new()).unwrap().is_empty());
        let optional = rules("page = { required = false }", Target::Http);
        assert!(optional.check(&Map::new()).unwrap().is_empty());
    }

    #[test]
    fn declared_names_of_a_rust_capability_refuse_every_other() {
        let r = ArgRules::accepting(["size", "format"]).unwrap();
        // Values are the handler's to check: any JSON passes, and nothing is required.
        assert!(r.check(&args(json!({"size": -5, "format": [1]}))).is_ok());
        assert!(r.check(&Map::new()).is_ok());
        // The defect of issue 15, item 6: `width` where the capability reads `size`.
        assert_eq!(
            refusal(&r, json!({"width": 64})),
            (
                "width".to_owned(),
                "is not an argument of this capability: this capability accepts only format, size"
                    .to_owned()
            )
        );
        let none = ArgRules::accepting([]).unwrap();
        assert_eq!(
            refusal(&none, json!({"times": 2})).1,
            "is not an argument of this capability: this capability takes no arguments"
        );
        assert_eq!(
            ArgRules::accepting(["a b"]).unwrap_err().key,
            "args.a b",
            "names are checked as in a configuration"
        );
        assert_eq!(
            ArgRules::accepting(["size", "size"]).unwrap_err().key,
            "args.size"
        );
        // `any` is not a configuration type, and a wrapper cannot be given it in code either.
        assert!(toml::from_str::<BTreeMap<String, ArgSpec>>("m = { type = \"any\" }").is_err());
        let any: BTreeMap<String, ArgSpec> = [("m".to_owned(), ArgSpec::any())].into();
        for target in [Target::Exec, Target::Http] {
            assert_eq!(
                ArgRules::compile(&any, target).unwrap_err().key,
                "args.m.type"
            );
        }
    }

    #[tokio::test]
    async fn a_declared_handler_is_not_called_for_refused_arguments() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = std::sync::Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let h = declared(
            ArgRules::accepting(["size"]).unwrap(),
            std::sync::Arc::new(move |_ctx: JobContext| {
                counted.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, JobError>(crate::Output::bytes("ok")) }
            }),
        );
        let ctx = |a: Value| JobContext::for_test("image.thumbnail", args(a), Vec::new());
        assert!(h.call(ctx(json!({"size": 64}))).await.is_ok());
        let e = h.call(ctx(json!({"width": 64}))).await.unwrap_err();
        assert!(matches!(e, JobError::BadArguments { ref field, .. } if field == "width"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn bad_declarations_name_their_key() {
        let cases = [
            (r#""a b" = {}"#, Target::Exec, "args.a b"),
            (r#"m = { values = [] }"#, Target::Exec, "args.m.values"),
            (
                r#"m = { values = ["-n", 2] }"#,
                Target::Exec,
                "args.m.values[1]",
            ),
            (
                r#"m = { type = "integer", values = ["1"] }"#,
                Target::Exec,
                "args.m.values[0]",
            ),
            (
                r#"m = { values = ["a"], pattern = "a" }"#,
                Target::Exec,
                "args.m.pattern",
            ),
            (r#"m = { pattern = "(" }"#, Target::Exec, "args.m.pattern"),
            (
                r#"m = { type = "integer", pattern = "1" }"#,
                Target::Exec,
                "args.m.pattern",
            ),
            (r#"m = { min = 1 }"#, Target::Exec, "args.m.min"),
            (
                r#"m = { type = "integer", min = 5, max = 1 }"#,
                Target::Exec,
                "args.m.max",
            ),
            (
                r#"m = { type = "integer", min = -5 }"#,
                Target::Exec,
                "args.m.min",
            ),
            (r#"m = { option = true }"#, Target::Http, "args.m.option"),
            (
                r#"m = { required = false }"#,
                Target::Exec,
                "args.m.required",
            ),
        ];
        for (text, target, key) in cases {
            let e = ArgRules::compile(&specs(text), target).unwrap_err();
            assert_eq!(e.key, key, "{text}: {}", e.why);
        }
        // A negative minimum is fine for an option, or over HTTP.
        assert!(ArgRules::compile(
            &specs(r#"m = { type = "integer", min = -5, option = true }"#),
            Target::Exec
        )
        .is_ok());
        assert!(ArgRules::compile(
            &specs(r#"m = { type = "integer", min = -5 }"#),
            Target::Http
        )
        .is_ok());
        // Unknown keys and types are refused by the parser.
        assert!(toml::from_str::<BTreeMap<String, ArgSpec>>("m = { patern = \"x\" }").is_err());
        assert!(toml::from_str::<BTreeMap<String, ArgSpec>>("m = { type = \"float\" }").is_err());
    }
}
