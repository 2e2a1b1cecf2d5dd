//! `spine`: the one binary of Spine.
//!
//! Thin by design: it parses arguments, sets up logging and calls into the library crates:
//! `server` (embedded XMPP server), `agent`, `dispatcher`, the HTTP API clients `submit`,
//! `agents` and `jobs`, and `check` (validates Spine stanzas against the wire protocol).

mod agent;
mod bench;
mod client;
mod demo;
mod dispatcher;
mod logging;
mod server;
mod up;

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use spine_protocol::{parse_payload, Element, Payload, NS_PREFIX};

#[derive(Parser)]
#[command(
    name = "spine",
    version,
    about = "Spine: an XMPP agent bus with least-loaded dispatch"
)]
struct Cli {
    /// How log lines are written: "text" (coloured only on a terminal, never with NO_COLOR
    /// set) or "json" (one object per line, for log shippers).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "SPINE_LOG_FORMAT"
    )]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole bus on this machine: XMPP server, dispatcher and local agents.
    Up(up::UpArgs),
    /// Run the embedded XMPP server (for one machine, a demo, or tests).
    Server(server::ServerArgs),
    /// Run an agent: join the XMPP server, advertise capabilities, run jobs.
    Agent(agent::AgentArgs),
    /// Run a dispatcher: keep the agent registry, place jobs on the least-loaded agents.
    Dispatcher(dispatcher::DispatcherArgs),
    /// Submit a job to a dispatcher's HTTP API (--wait to follow it and print the output).
    Submit(Box<client::SubmitArgs>),
    /// List the agents offering a capability, least loaded first (without one: every agent).
    Agents(client::AgentsArgs),
    /// List the capabilities offered, with their agents and queued jobs.
    Capabilities(client::CapabilitiesArgs),
    /// Cancel jobs.
    Cancel(client::CancelArgs),
    /// Show a job, or list recent jobs.
    Jobs(client::JobsArgs),
    /// Print a shell completion script: `spine completions bash > /etc/bash_completion.d/spine`.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (spine.1 and one per command, spine-submit.1, …) into a directory.
    Man {
        /// The directory (created if missing).
        dir: PathBuf,
    },
    /// Run a benchmark (BENCHMARKS.md); prints a table, --json writes the figures.
    Bench(bench::BenchArgs),
    /// Check that an XML stanza or payload follows the Spine wire protocol (docs/PROTOCOL.md).
    ///
    /// Reads one XML element from FILE (or standard input with `-`): a stanza (`<iq>`,
    /// `<message>`, `<presence>`, default namespace jabber:client implied) or a bare Spine
    /// payload. Prints what each Spine payload means, or the exact error a Spine peer would
    /// answer with. Exits 1 if any payload is invalid.
    Check {
        /// File to read, or `-` for standard input.
        file: PathBuf,
    },
}

/// jemalloc, with its background threads purging freed pages, instead of the system's
/// allocator: after a soak (BENCHMARKS.md, "Soak") the dispatcher with nothing held kept
/// 172 MiB resident with glibc's malloc and 96 MiB with jemalloc, from the same 240–257 MiB
/// peak; glibc keeps freed memory of its per-thread arenas (before the blob store, 1.8 GiB of
/// 2.2 GiB until a `malloc_trim`). Every `spine` process gets it: one binary runs them all.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::set_format(cli.log_format);
    let result = match cli.command {
        Command::Check { file } => check(&file),
        Command::Up(args) => up::run(args).map(|()| true),
        Command::Server(args) => server::run(args).map(|()| true),
        Command::Agent(args) => agent::main(args),
        Command::Dispatcher(args) => dispatcher::run(args).map(|()| true),
        Command::Submit(args) => client::submit(*args),
        Command::Agents(args) => client::agents(args),
        Command::Capabilities(args) => client::capabilities(args),
        Command::Cancel(args) => client::cancel(args),
        Command::Jobs(args) => client::jobs(args),
        Command::Bench(args) => bench::run(args),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "spine", &mut std::io::stdout());
            Ok(true)
        }
        Command::Man { dir } => man_pages(&dir),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("spine: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Writes `spine.1` and a page per command (`spine-submit.1`, …) into `dir`.
fn man_pages(dir: &std::path::Path) -> Result<bool> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = <Cli as clap::CommandFactory>::command();
    let write = |name: &str, page: clap::Command| -> Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(page)
            .render(&mut out)
            .with_context(|| format!("rendering {name}.1"))?;
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("spine-{}", sub.get_name());
        write(&name, sub.clone().name(name.clone()))?;
    }
    write("spine", cmd)?;
    println!("man pages written to {}", dir.display());
    Ok(true)
}

/// Validates the document in `file`; `Ok(false)` when a payload is invalid.
fn check(file: &PathBuf) -> Result<bool> {
    let mut text = String::new();
    if file.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading standard input")?;
    } else {
        text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    }
    let root = parse_document(&text)?;
    let payloads: Vec<Element> = if root.ns().starts_with(NS_PREFIX) {
        vec![root]
    } else {
        root.children()
            .filter(|c| c.ns().starts_with(NS_PREFIX))
            .cloned()
            .collect()
    };
    if payloads.is_empty() {
        println!("no Spine payload (namespace {NS_PREFIX}…) in this document");
        return Ok(false);
    }
    let mut all_ok = true;
    for p in payloads {
        let name = p.name().to_owned();
        match parse_payload(p) {
            Ok(payload) => println!("ok: <{name}> {}", describe(&payload)),
            Err(e) => {
                all_ok = false;
                let se = e.to_spine_error();
                println!("invalid: {e}");
                println!(
                    "  a Spine peer answers: <{}/> ({:?}, type {:?})",
                    se.condition,
                    se.condition.xmpp().0,
                    se.condition.xmpp().1
                );
            }
        }
    }
    Ok(all_ok)
}

/// Parses the text as XML, giving stanzas without a namespace the `jabber:client` default.
fn parse_document(text: &str) -> Result<Element> {
    let t = text.trim();
    let is_stanza = ["<iq", "<message", "<presence"]
        .iter()
        .any(|p| t.starts_with(p))
        && !t.split('>').next().unwrap_or_default().contains("xmlns=");
    let doc = if is_stanza {
        let end = t[1..]
            .find([' ', '>', '/', '\n', '\t'])
            .map_or(t.len(), |i| i + 1);
        format!("{} xmlns='jabber:client'{}", &t[..end], &t[end..])
    } else {
        t.to_owned()
    };
    doc.parse::<Element>().context("not well-formed XML")
}

fn describe(p: &Payload) -> String {
    match p {
        Payload::Advertise(a) => format!(
            "agent instance {} offers {} capabilities with {} slots",
            a.instance,
            a.capabilities.len(),
            a.slots
        ),
        Payload::Load(l) => format!(
            "{} of {} slots busy ({} from the recipient), {}",
            l.in_flight, l.slots, l.yours, l.state
        ),
        Payload::DispatcherHello(h) => format!("dispatcher hello, protocol {}", h.protocol),
        Payload::Job(j) => format!("job {} for {} (attempt {})", j.id, j.capability, j.attempt),
        Payload::Result(r) => format!("result of job {} (attempt {})", r.job, r.attempt),
        Payload::Cancel(c) => format!("cancel job {}", c.job),
        Payload::Progress(p) => format!("progress of job {}: {:?}%", p.job, p.percent),
        Payload::Partial(p) => format!("partial result {} of job {}", p.seq, p.job),
        Payload::Chunk(c) => format!(
            "bytes {}..{} of blob {} ({} in all)",
            c.offset,
            c.offset + c.bytes.len() as u64,
            c.blob,
            c.total
        ),
        Payload::Submit(s) => format!("submit {} ({})", s.capability, s.strategy),
        Payload::Accepted(a) => format!("job {} accepted, {}", a.job, a.state),
        Payload::Status(s) => format!("status of job {}", s.job),
        Payload::JobStatus(s) => format!("job {} is {}", s.job, s.state),
        Payload::Discover(d) => format!("discover agents for {}", d.capability),
        Payload::Agents(a) => format!("{} agents for {}", a.agents.len(), a.capability),
        Payload::RequestSlot(r) => format!(
            "upload slot request for {} bytes of job {} (attempt {})",
            r.size, r.job, r.attempt
        ),
        Payload::Slot(s) => format!("upload slot for job {}, valid {} ms", s.job, s.expires_ms),
        Payload::Drain(d) => match &d.reason {
            Some(r) => format!("drain the agent (take no new jobs): {r}"),
            None => "drain the agent (take no new jobs)".to_owned(),
        },
        Payload::Undrain(_) => "undrain the agent (take jobs again)".to_owned(),
        Payload::Event(e) => format!("event {} of type {} from {}", e.id, e.ty, e.source),
        Payload::Fired(f) => format!("event {} made {} jobs", f.event, f.jobs.len()),
        Payload::RequestEventSlot(r) => format!("an upload URL for {} bytes of an event", r.size),
        Payload::EventSlot(s) => format!("an event's upload URL, valid {} ms", s.expires_ms),
        Payload::Recall(_) => "which of our jobs the agent has (a new leader asks)".to_owned(),
        Payload::Recalled(r) => format!("the agent has {} of our jobs", r.jobs.len()),
    }
}
