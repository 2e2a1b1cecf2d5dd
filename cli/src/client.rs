//! Client commands that talk to a dispatcher's HTTP API: `spine submit`, `spine agents`,
//! `spine jobs`.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::{json, Map, Value};

use spine_client::ApiArgs as Api;

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
    /// Map/reduce: the reduce capability (the positional capability is the map step).
    #[arg(long)]
    reduce: Option<String>,
    /// Map/reduce: a capability that splits --input into fragments.
    #[arg(long, requires = "reduce")]
    split: Option<String>,
    /// Map/reduce: outputs per reduce step (default 16).
    #[arg(long, requires = "reduce")]
    fan_in: Option<u64>,
    /// Map/reduce: a file that is one fragment (repeatable).
    #[arg(long = "fragment", value_name = "FILE", requires = "reduce")]
    fragments: Vec<PathBuf>,
    /// Map/reduce: every file of this folder is one fragment (in name order).
    #[arg(long, value_name = "DIR", requires = "reduce")]
    fragments_dir: Option<PathBuf>,
    /// Map/reduce: split the text file --input into fragments of about this size, cut at
    /// line ends, here (the file is read a fragment at a time and each is uploaded to the
    /// blob store), instead of by a --split capability. E.g. "4MiB".
    #[arg(
        long,
        value_name = "SIZE",
        requires = "reduce",
        conflicts_with = "split"
    )]
    split_lines: Option<bytesize::ByteSize>,
    /// Attempts before the job fails (default: the dispatcher's max_attempts).
    #[arg(long)]
    max_attempts: Option<u64>,
    /// Idempotency key: submitting twice with it yields one job.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Queue the job even if no agent has ever offered the capability (by default such a
    /// submission is refused at once with unknown-capability).
    #[arg(long)]
    wait_for_agent: bool,
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
        if a.reduce.is_some() && a.split.is_none() {
            let fragments = match (&a.input, a.split_lines) {
                (Some(p), Some(size)) => {
                    let size = usize::try_from(size.as_u64()).unwrap_or(usize::MAX);
                    c.put_file_split(p, size).await?
                }
                (Some(_), None) => bail!("--input with --reduce needs --split CAPABILITY or --split-lines SIZE (or give the fragments with --fragment / --fragments-dir)"),
                (None, Some(_)) => bail!("--split-lines splits the file given with --input"),
                (None, None) => {
                    let mut files = Vec::new();
                    if let Some(d) = &a.fragments_dir {
                        files = spine_client::files_in_dir(d, |_| true)?;
                    }
                    files.extend(a.fragments.iter().cloned());
                    fragments_of(&c, &files).await?
                }
            };
            body["fragments"] = json!(fragments);
        }
        for (k, v) in [
            ("input_type", &a.input_type),
            ("strategy", &a.strategy),
            ("affinity_key", &a.affinity_key),
            ("filter", &a.filter),
            ("sort", &a.sort),
            ("deadline", &a.deadline),
            ("idempotency_key", &a.idempotency_key),
            ("limit", &a.limit),
            ("reduce", &a.reduce),
            ("split", &a.split),
        ] {
            if let Some(v) = v {
                body[k] = json!(v);
            }
        }
        for (k, v) in [
            ("max_attempts", a.max_attempts),
            ("batch", a.batch),
            ("fan_in", a.fan_in),
        ] {
            if let Some(v) = v {
                body[k] = json!(v);
            }
        }
        if let Some(p) = a.priority {
            body["priority"] = json!(p);
        }
        if a.wait_for_agent {
            body["wait_for_agent"] = json!(true);
        }
        // A file goes as a raw upload, streamed: the dispatcher keeps it in its blob store.
        let input = a.input.as_ref().filter(|_| a.split_lines.is_none());
        let id = match input {
            Some(p) => {
                let mime = body
                    .as_object_mut()
                    .and_then(|m| m.remove("input_type"))
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| "application/octet-stream".to_owned());
                c.submit_file(&body, p, &mime).await?
            }
            None => c.submit(&body).await?,
        };
        if !a.wait {
            println!("{id}");
            return Ok(true);
        }
        eprintln!("job {id} accepted");
        let job = tokio::select! {
            job = c.follow_with_bar(&id, "") => job?,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("\nstopped waiting: job {id} goes on; `spine jobs {id} --follow` follows it again, `spine cancel {id}` cancels it");
                return Ok(false);
            }
        };
        match c.output(&job).await {
            Ok(out) => {
                match &a.output {
                    Some(p) => std::fs::write(p, &out)
                        .with_context(|| format!("writing {}", p.display()))?,
                    None => std::io::stdout().write_all(&out)?,
                }
                Ok(true)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(false)
            }
        }
    })
}

/// The fragments of a map/reduce job over these files: each uploaded to the dispatcher's blob
/// store, streamed, and named by reference (stored once, fetched by the agent that maps it);
/// inline, read here, when the dispatcher has no blob endpoints (no `public_url`).
async fn fragments_of(
    c: &spine_client::Client,
    files: &[PathBuf],
) -> Result<Vec<spine_protocol::Fragment>> {
    let mut out = Vec::with_capacity(files.len());
    for p in files {
        match c.put_file(p).await {
            Ok(f) => out.push(f),
            Err(spine_client::ClientError::Api { status: 404, .. }) if out.is_empty() => {
                eprintln!("the dispatcher has no blob store endpoints (no public_url): the fragments go inline in the request");
                return files
                    .iter()
                    .map(|p| {
                        let data =
                            std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                        let mut f = spine_protocol::Fragment::new(data);
                        f.name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                        Ok(f)
                    })
                    .collect();
            }
            Err(e) => return Err(e).with_context(|| format!("uploading {}", p.display())),
        }
    }
    Ok(out)
}

/// Arguments of `spine agents`.
#[derive(Args, Debug)]
pub struct AgentsArgs {
    /// Capability. Without: every agent of every capability this token may run, with the
    /// capabilities each offers.
    #[arg(long)]
    capability: Option<String>,
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
        let Some(capability) = a.capability.clone() else {
            return all_agents(&c, a.filter.as_deref()).await;
        };
        let mut q = vec![("capability", capability)];
        if let Some(f) = a.filter {
            q.push(("filter", f));
        }
        if let Some(s) = a.sort {
            q.push(("sort", s));
        }
        if let Some(l) = a.limit {
            q.push(("limit", l.to_string()));
        }
        let body = c
            .call(
                c.request(reqwest::Method::GET, "/v1/agents").query(&q),
                "asking for agents",
            )
            .await?;
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

/// `spine agents` without a capability: each capability's agents (`--where` applied),
/// merged by agent, with the capabilities each offers.
async fn all_agents(c: &spine_client::Client, filter: Option<&str>) -> Result<bool> {
    let caps = c
        .call(
            c.request(reqwest::Method::GET, "/v1/capabilities"),
            "listing capabilities",
        )
        .await?;
    let mut agents: std::collections::BTreeMap<String, (Value, Vec<String>)> = Default::default();
    for cap in caps["capabilities"].as_array().into_iter().flatten() {
        let Some(name) = cap["name"].as_str() else {
            continue;
        };
        let mut q = vec![("capability", name.to_owned())];
        if let Some(f) = filter {
            q.push(("filter", f.to_owned()));
        }
        let body = c
            .call(
                c.request(reqwest::Method::GET, "/v1/agents").query(&q),
                "asking for agents",
            )
            .await?;
        for ag in body["agents"].as_array().into_iter().flatten() {
            let jid = ag["jid"].as_str().unwrap_or("").to_owned();
            agents
                .entry(jid)
                .or_insert_with(|| (ag.clone(), Vec::new()))
                .1
                .push(name.to_owned());
        }
    }
    println!(
        "{:<40} {:>8} {:>9} {:>8}  capabilities",
        "agent", "state", "in-flight", "loadavg"
    );
    for (jid, (ag, caps)) in &agents {
        let in_flight = format!("{}/{}", ag["in_flight"], ag["slots"]);
        println!(
            "{:<40} {:>8} {:>9} {:>8}  {}",
            jid,
            ag["state"].as_str().unwrap_or(""),
            in_flight,
            ag["loadavg"]
                .as_f64()
                .map(|l| format!("{l:.2}"))
                .unwrap_or_else(|| "-".into()),
            caps.join(" ")
        );
    }
    Ok(true)
}

/// Arguments of `spine cancel`.
#[derive(Args, Debug)]
pub struct CancelArgs {
    /// The jobs to cancel.
    #[arg(required = true)]
    ids: Vec<String>,
    #[command(flatten)]
    api: Api,
}

/// `spine cancel ID…`: each job's state after the cancel; exit 1 if any could not be
/// cancelled (unknown, not the caller's).
pub fn cancel(a: CancelArgs) -> Result<bool> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let c = a.api.client()?;
        let mut ok = true;
        for id in &a.ids {
            if let Err(e) = id.parse::<spine_protocol::JobId>() {
                eprintln!("{id}: not a job id: {e}");
                ok = false;
                continue;
            }
            let path = format!("/v1/jobs/{id}");
            match c
                .call(c.request(reqwest::Method::DELETE, &path), "cancelling")
                .await
            {
                Ok(v) => println!("{id} {}", v["state"].as_str().unwrap_or("?")),
                Err(e) => {
                    eprintln!("{id}: {e}");
                    ok = false;
                }
            }
        }
        Ok(ok)
    })
}

/// Arguments of `spine capabilities`.
#[derive(Args, Debug)]
pub struct CapabilitiesArgs {
    #[command(flatten)]
    api: Api,
}

/// `spine capabilities`: each capability with its agents and queued jobs.
pub fn capabilities(a: CapabilitiesArgs) -> Result<bool> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let c = a.api.client()?;
        let body = c
            .call(
                c.request(reqwest::Method::GET, "/v1/capabilities"),
                "listing capabilities",
            )
            .await?;
        println!("{:<40} {:>7} {:>7}", "capability", "agents", "queued");
        for cap in body["capabilities"].as_array().into_iter().flatten() {
            println!(
                "{:<40} {:>7} {:>7}",
                cap["name"].as_str().unwrap_or(""),
                cap["agents"],
                cap["queued"]
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
    /// With an id: follow the job to its end (a progress bar), then show it.
    #[arg(long, requires = "id")]
    follow: bool,
    /// With an id: write the job's output to this file (once it succeeded).
    #[arg(long, requires = "id")]
    output: Option<PathBuf>,
    #[command(flatten)]
    api: Api,
}

pub fn jobs(a: JobsArgs) -> Result<bool> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let c = a.api.client()?;
        if let Some(id) = a.id {
            let job = if a.follow {
                tokio::select! {
                    job = c.follow_with_bar(&id, "") => job?,
                    _ = tokio::signal::ctrl_c() => {
                        eprintln!("\nstopped following: job {id} goes on");
                        return Ok(false);
                    }
                }
            } else {
                c.job(&id).await?
            };
            if let Some(p) = &a.output {
                return match c.output(&job).await {
                    Ok(out) => {
                        std::fs::write(p, &out)
                            .with_context(|| format!("writing {}", p.display()))?;
                        eprintln!("{} bytes written to {}", out.len(), p.display());
                        Ok(true)
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        Ok(false)
                    }
                };
            }
            println!("{}", serde_json::to_string_pretty(&job)?);
            return Ok(job["state"] != "failed" && job["state"] != "timed-out");
        }
        let mut q = vec![("limit", a.limit.to_string())];
        if let Some(s) = a.state {
            q.push(("state", s));
        }
        let body = c
            .call(
                c.request(reqwest::Method::GET, "/v1/jobs").query(&q),
                "listing jobs",
            )
            .await?;
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
