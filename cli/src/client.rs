//! Client commands that talk to a dispatcher's HTTP API: `spine submit`, `spine agents`,
//! `spine jobs`.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use clap::Args;
use serde_json::{json, Map, Value};

/// Where the API is and how to authenticate.
#[derive(Args, Debug, Clone)]
pub struct Api {
    /// Base URL of the dispatcher's HTTP API.
    #[arg(long, env = "SPINE_API", default_value = "http://127.0.0.1:8480")]
    api: String,
    /// Bearer token (or SPINE_TOKEN).
    #[arg(long, env = "SPINE_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl Api {
    fn client(&self) -> Result<reqwest::Client> {
        // Talks to the configured URL only: no proxy from the environment.
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .context("building the HTTP client")
    }

    fn req(
        &self,
        c: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let r = c.request(
            method,
            format!("{}{}", self.api.trim_end_matches('/'), path),
        );
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }
}

/// Turns an error response into a message: "400 bad-request (field 'x'): ...".
async fn check(resp: reqwest::Response) -> Result<Value> {
    let status = resp.status();
    let text = resp.text().await.context("reading the response")?;
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if status.is_success() {
        return Ok(body);
    }
    let field = body["field"]
        .as_str()
        .map(|f| format!(" (field '{f}')"))
        .unwrap_or_default();
    bail!(
        "{} {}{field}: {}",
        status.as_u16(),
        body["error"].as_str().unwrap_or("error"),
        body["message"].as_str().unwrap_or(&body.to_string())
    )
}

/// Arguments of `spine submit`.
#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// Capability to run, e.g. image.thumbnail.
    capability: String,
    /// Argument NAME=VALUE (VALUE read as JSON when it is valid JSON: 128, true, "text").
    #[arg(long = "arg", value_name = "NAME=VALUE")]
    args: Vec<String>,
    /// File whose bytes are the job's input.
    #[arg(long)]
    input: Option<PathBuf>,
    /// MIME type of the input.
    #[arg(long)]
    input_type: Option<String>,
    /// Placement: least-loaded, random, round-robin, power-of-two, affinity, all.
    #[arg(long)]
    strategy: Option<String>,
    /// Key for --strategy affinity.
    #[arg(long)]
    affinity_key: Option<String>,
    /// Attribute filter, e.g. "gpu, zone in (eu-1,eu-2)".
    #[arg(long = "where")]
    filter: Option<String>,
    /// Prefer agents with the lowest value of this numeric attribute.
    #[arg(long)]
    sort: Option<String>,
    /// Deadline, e.g. 30s or 5m.
    #[arg(long)]
    deadline: Option<String>,
    /// Priority (higher first).
    #[arg(long)]
    priority: Option<i64>,
    /// With --strategy all: how many agents ("5" or "50%").
    #[arg(long)]
    limit: Option<String>,
    /// With --strategy all: how many agents run it at once.
    #[arg(long)]
    batch: Option<u64>,
    /// Attempts before the job fails (default: the dispatcher's max_attempts).
    #[arg(long)]
    max_attempts: Option<u64>,
    /// Idempotency key: submitting twice with it yields one job.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Wait for the outcome (with a progress bar) and print the output.
    #[arg(long)]
    wait: bool,
    /// With --wait: write the output to this file instead of standard output.
    #[arg(long)]
    output: Option<PathBuf>,
    #[command(flatten)]
    api: Api,
}

fn parse_args(list: &[String]) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    for a in list {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| anyhow!("--arg '{a}': expected NAME=VALUE"))?;
        if k.is_empty() {
            bail!("--arg '{a}': the name is empty");
        }
        let value =
            serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.to_owned()));
        m.insert(k.to_owned(), value);
    }
    Ok(m)
}

pub fn submit(a: SubmitArgs) -> Result<bool> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let c = a.api.client()?;
        let mut body =
            json!({ "capability": a.capability, "args": parse_args(&a.args)?, "progress": a.wait });
        if let Some(p) = &a.input {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            body["input"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
        for (k, v) in [
            ("input_type", &a.input_type),
            ("strategy", &a.strategy),
            ("affinity_key", &a.affinity_key),
            ("filter", &a.filter),
            ("sort", &a.sort),
            ("deadline", &a.deadline),
            ("idempotency_key", &a.idempotency_key),
        ] {
            if let Some(v) = v {
                body[k] = json!(v);
            }
        }
        if let Some(p) = a.priority {
            body["priority"] = json!(p);
        }
        if let Some(n) = a.max_attempts {
            body["max_attempts"] = json!(n);
        }
        if let Some(l) = &a.limit {
            body["limit"] = json!(l);
        }
        if let Some(b) = a.batch {
            body["batch"] = json!(b);
        }
        let resp = a
            .api
            .req(&c, reqwest::Method::POST, "/v1/jobs")
            .json_body(&body)
            .send()
            .await
            .context("submitting")?;
        let accepted = check(resp).await?;
        let id = accepted["id"]
            .as_str()
            .ok_or_else(|| anyhow!("no job id in {accepted}"))?
            .to_owned();
        if !a.wait {
            println!("{id}");
            return Ok(true);
        }
        eprintln!("job {id} accepted");
        let job = follow(&a.api, &c, &id).await?;
        match job["state"].as_str() {
            Some("succeeded") => {
                let out = base64::engine::general_purpose::STANDARD
                    .decode(job["result"]["output"].as_str().unwrap_or(""))
                    .context("decoding the output")?;
                match &a.output {
                    Some(p) => std::fs::write(p, &out)
                        .with_context(|| format!("writing {}", p.display()))?,
                    None => std::io::stdout().write_all(&out)?,
                }
                Ok(true)
            }
            other => {
                eprintln!(
                    "job {id} {}: {} ({})",
                    other.unwrap_or("ended"),
                    job["error"]["message"].as_str().unwrap_or(""),
                    job["error"]["condition"].as_str().unwrap_or("")
                );
                Ok(false)
            }
        }
    })
}

trait JsonBody {
    fn json_body(self, v: &Value) -> Self;
}
impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, v: &Value) -> Self {
        self.header("content-type", "application/json")
            .body(v.to_string())
    }
}

/// Follows a job's event stream with a progress bar until it ends; returns the final job.
async fn follow(api: &Api, c: &reqwest::Client, id: &str) -> Result<Value> {
    let bar = indicatif::ProgressBar::new(100);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos:>3}% {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut resp = api
        .req(c, reqwest::Method::GET, &format!("/v1/jobs/{id}/events"))
        .send()
        .await
        .context("following the job")?;
    if !resp.status().is_success() {
        check(resp).await?;
        bail!("unreachable");
    }
    let mut buf = String::new();
    let mut event = String::new();
    while let Some(chunk) = resp.chunk().await.context("reading events")? {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = buf.find('\n') {
            let line = buf[..i].trim_end_matches('\r').to_owned();
            buf.drain(..=i);
            if let Some(e) = line.strip_prefix("event:") {
                event = e.trim().to_owned();
            } else if let Some(d) = line.strip_prefix("data:") {
                let data: Value = serde_json::from_str(d.trim()).unwrap_or(Value::Null);
                match event.as_str() {
                    "progress" => {
                        if let Some(p) = data["percent"].as_u64() {
                            bar.set_position(p);
                        }
                        bar.set_message(data["message"].as_str().unwrap_or("").to_owned());
                    }
                    "state" => bar.set_message(data["state"].as_str().unwrap_or("").to_owned()),
                    "final" => {
                        bar.finish_and_clear();
                        // The final event carries the job; fetch it whole (outputs included).
                        let resp = api
                            .req(c, reqwest::Method::GET, &format!("/v1/jobs/{id}"))
                            .send()
                            .await?;
                        return check(resp).await;
                    }
                    _ => {}
                }
            }
        }
    }
    bar.abandon();
    bail!("the event stream ended before the job did")
}

/// Arguments of `spine agents`.
#[derive(Args, Debug)]
pub struct AgentsArgs {
    /// Capability.
    #[arg(long)]
    capability: String,
    /// Attribute filter.
    #[arg(long = "where")]
    filter: Option<String>,
    /// Sort by this numeric attribute first.
    #[arg(long)]
    sort: Option<String>,
    /// At most this many.
    #[arg(long)]
    limit: Option<usize>,
    #[command(flatten)]
    api: Api,
}

pub fn agents(a: AgentsArgs) -> Result<bool> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let c = a.api.client()?;
        let mut q = vec![("capability", a.capability.clone())];
        if let Some(f) = a.filter {
            q.push(("filter", f));
        }
        if let Some(s) = a.sort {
            q.push(("sort", s));
        }
        if let Some(l) = a.limit {
            q.push(("limit", l.to_string()));
        }
        let resp = a
            .api
            .req(&c, reqwest::Method::GET, "/v1/agents")
            .query(&q)
            .send()
            .await
            .context("asking for agents")?;
        let body = check(resp).await?;
        println!(
            "{:<40} {:>8} {:>6} {:>9} {:>8}  attributes",
            "agent", "state", "load", "in-flight", "loadavg"
        );
        for ag in body["agents"].as_array().into_iter().flatten() {
            let attrs: Vec<String> = ag["attributes"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect();
            // serde_json values ignore width flags: format them as strings first.
            let in_flight = format!("{}/{}", ag["in_flight"], ag["slots"]);
            println!(
                "{:<40} {:>8} {:>6.2} {:>9} {:>8}  {}",
                ag["jid"].as_str().unwrap_or(""),
                ag["state"].as_str().unwrap_or(""),
                ag["load"].as_f64().unwrap_or(0.0),
                in_flight,
                ag["loadavg"]
                    .as_f64()
                    .map(|l| format!("{l:.2}"))
                    .unwrap_or_else(|| "-".into()),
                attrs.join(" ")
            );
        }
        Ok(true)
    })
}

/// Arguments of `spine jobs`.
#[derive(Args, Debug)]
pub struct JobsArgs {
    /// A job id: show it (with its output). Without: list recent jobs.
    id: Option<String>,
    /// List only jobs in this state.
    #[arg(long)]
    state: Option<String>,
    /// List at most this many.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    #[command(flatten)]
    api: Api,
}

pub fn jobs(a: JobsArgs) -> Result<bool> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let c = a.api.client()?;
        if let Some(id) = a.id {
            let resp = a
                .api
                .req(&c, reqwest::Method::GET, &format!("/v1/jobs/{id}"))
                .send()
                .await?;
            println!("{}", serde_json::to_string_pretty(&check(resp).await?)?);
            return Ok(true);
        }
        let mut q = vec![("limit", a.limit.to_string())];
        if let Some(s) = a.state {
            q.push(("state", s));
        }
        let resp = a
            .api
            .req(&c, reqwest::Method::GET, "/v1/jobs")
            .query(&q)
            .send()
            .await?;
        let body = check(resp).await?;
        println!(
            "{:<38} {:<24} {:<10} {:>3}  agent",
            "job", "capability", "state", "try"
        );
        for j in body["jobs"].as_array().into_iter().flatten() {
            println!(
                "{:<38} {:<24} {:<10} {:>3}  {}",
                j["id"].as_str().unwrap_or(""),
                j["capability"].as_str().unwrap_or(""),
                j["state"].as_str().unwrap_or(""),
                j["attempts"].as_u64().unwrap_or(0),
                j["agent"].as_str().unwrap_or("-")
            );
        }
        Ok(true)
    })
}
