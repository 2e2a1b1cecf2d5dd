//! The swarm benchmark's parts: simulated agents (real XMPP sessions, many per process) and
//! the server and dispatcher run as child processes so that each one's memory can be read.
//!
//! A simulated agent speaks the agent side of the protocol (docs/PROTOCOL.md §4–§7) with
//! nothing behind it: it advertises `bench.noop` (answered at once) and `bench.hold` (held
//! until the agent stops), answers hellos, and sends a heartbeat load. It does not send a
//! load on every job change (§5.1 says it should; the dispatcher's own in-flight accounting
//! makes placement right without it), which keeps a fleet of thousands light. Heartbeats are
//! spread evenly over the interval (agent `i` at its own phase), as in a fleet whose agents
//! started at different times: a fleet that logged in within seconds would otherwise send
//! every load in one wave a heartbeat after the logins, and whichever phase the benchmark
//! is in then pays for all of them.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jid::{BareJid, Jid};
use spine_protocol::{
    Advertise, AgentState, CapabilityAd, DispatcherHello, Job, JobResult, Load, ProtocolVersion,
};
use spine_xmpp::{ConnectOptions, Connection, Security};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;
use tokio_xmpp::stanzastream::Event;
use tokio_xmpp::Stanza;
use xmpp_parsers::iq::Iq;
use xmpp_parsers::presence::Presence;

/// The development secret every account of the swarm's server logs in with.
pub const SECRET: &str = "swarm-secret";

/// Slots of each simulated agent.
pub const SLOTS: u64 = 2;

/// Counters shared by a fleet of simulated agents.
#[derive(Debug, Default)]
pub struct FleetCounters {
    /// Sessions logged in.
    pub connected: AtomicUsize,
    /// `bench.hold` jobs being held.
    pub held: AtomicUsize,
    /// Jobs answered with a result.
    pub answered: AtomicUsize,
    /// Sessions that failed or ended early.
    pub failed: AtomicUsize,
}

/// One simulated agent: `agent<i>@<domain>/w` on the server at `addr`, registering with the
/// dispatcher bare JID `dispatcher`. Runs until `stop` turns true or the session ends.
pub async fn sim_agent(
    i: usize,
    addr: std::net::SocketAddr,
    dispatcher: BareJid,
    heartbeat: Duration,
    counters: Arc<FleetCounters>,
    login: Arc<tokio::sync::Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let opts = ConnectOptions::new(
        match format!("agent{i}@localhost/w").parse() {
            Ok(j) => j,
            Err(_) => return,
        },
        SECRET,
        addr,
        Security::Plain { insecure: false },
    );
    let mut conn = {
        // Logins are rationed: thousands of simultaneous SASL exchanges would only measure
        // the login timeout.
        let _permit = login.acquire().await;
        match spine_xmpp::connect(opts).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(agent = i, error = %e, "simulated agent could not log in");
                counters.failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    };
    counters.connected.fetch_add(1, Ordering::Relaxed);
    let mut agent = Sim {
        instance: format!("sim{i}"),
        seq: 0,
        held: 0,
        heartbeat,
    };
    conn.send(Presence::available()).await;
    agent.advertise(&conn, dispatcher.clone().into()).await;
    let mut beat = tokio::time::interval_at(
        tokio::time::Instant::now() + heartbeat.mul_f64(heartbeat_phase(i)),
        heartbeat,
    );
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = beat.tick() => {
                let load = agent.load();
                conn.send(Presence::available().with_to(dispatcher.clone()).with_payload(load)).await;
            }
            ev = conn.next() => match ev {
                Some(Event::Stanza(s)) => agent.on_stanza(&conn, &dispatcher, s, &counters).await,
                Some(_) => {}
                None => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            },
        }
    }
    counters
        .held
        .fetch_sub(agent.held as usize, Ordering::Relaxed);
    conn.close().await;
}

/// Where in the heartbeat interval agent `i` sends its loads, in [0, 1): the fractional
/// parts of multiples of the golden ratio, which spread any number of agents evenly.
pub fn heartbeat_phase(i: usize) -> f64 {
    (i as f64 * 0.618_033_988_749_895).fract()
}

struct Sim {
    instance: String,
    seq: u64,
    /// `bench.hold` jobs held: never answered (the benchmark ends with them running).
    held: u64,
    heartbeat: Duration,
}

impl Sim {
    fn load(&mut self) -> Load {
        self.seq += 1;
        Load {
            seq: self.seq,
            gen: 1,
            state: AgentState::Ready,
            in_flight: self.held,
            yours: self.held,
            slots: SLOTS,
            queue: 0,
            loadavg: None,
            mem_used: None,
            mem_total: None,
            caps: vec![],
        }
    }

    async fn advertise(&mut self, conn: &Connection, to: Jid) {
        let ad = Advertise {
            protocol: ProtocolVersion::CURRENT,
            instance: self.instance.clone(),
            gen: 1,
            slots: SLOTS,
            heartbeat_ms: self.heartbeat.as_millis() as u64,
            attrs: Default::default(),
            serves: None,
            capabilities: ["bench.noop", "bench.hold"]
                .iter()
                .filter_map(|c| c.parse().ok())
                .map(CapabilityAd::new)
                .collect(),
        };
        let load = self.load();
        conn.send(
            Presence::available()
                .with_to(to)
                .with_payload(ad)
                .with_payload(load),
        )
        .await;
    }

    async fn on_stanza(
        &mut self,
        conn: &Connection,
        dispatcher: &BareJid,
        s: Stanza,
        counters: &FleetCounters,
    ) {
        match s {
            Stanza::Presence(p) => {
                let from_dispatcher = p.from.as_ref().is_some_and(|f| f.to_bare() == *dispatcher);
                if from_dispatcher
                    && p.payloads
                        .iter()
                        .any(|e| DispatcherHello::try_from(e.clone()).is_ok())
                {
                    if let Some(from) = p.from.clone() {
                        self.advertise(conn, from).await;
                    }
                }
            }
            Stanza::Iq(Iq::Set {
                id,
                from: Some(from),
                payload,
                ..
            }) => {
                let Ok(job) = Job::try_from(payload) else {
                    return;
                };
                if from.to_bare() != *dispatcher {
                    return;
                }
                if job.capability.as_str() == "bench.hold" {
                    counters.held.fetch_add(1, Ordering::Relaxed);
                    self.held += 1;
                    return;
                }
                let result = JobResult {
                    job: job.id,
                    attempt: job.attempt,
                    elapsed_ms: Some(0),
                    meta: Default::default(),
                    output: None,
                };
                conn.send(Iq::from_result(id, Some(result)).with_to(from))
                    .await;
                counters.answered.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// A child process of the benchmark (the server or the dispatcher): it stops when its
/// standard input closes, so it cannot outlive the benchmark.
pub struct Child {
    child: tokio::process::Child,
    /// What it printed on its first line (its address).
    pub addr: std::net::SocketAddr,
}

impl Child {
    /// Starts `exe args…` and reads the address it prints as its first line.
    pub async fn spawn(exe: &Path, args: &[String]) -> Result<Child, String> {
        let mut child = tokio::process::Command::new(exe)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", exe.display()))?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(30),
            BufReader::new(out).read_line(&mut line),
        )
        .await
        .map_err(|_| format!("{args:?} printed no address within 30 s"))?
        .map_err(|e| e.to_string())?;
        let addr = line
            .trim()
            .parse()
            .map_err(|_| format!("{args:?} printed {line:?}, not an address"))?;
        Ok(Child { child, addr })
    }

    /// Its resident memory in bytes (VmRSS from /proc).
    pub fn rss(&self) -> Option<u64> {
        let pid = self.child.id()?;
        rss_of(pid)
    }

    /// The CPU time it has used so far.
    pub fn cpu(&self) -> Option<Duration> {
        cpu_of(self.child.id()?)
    }

    /// Closes its standard input and waits (up to 30 s) for it to exit.
    pub async fn stop(mut self) {
        drop(self.child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Resident memory of a process in bytes, from /proc/PID/status.
pub fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU time a process has used (user and system, every thread), from /proc/PID/stat.
pub fn cpu_of(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on: utime and
    // stime are fields 14 and 15, in clock ticks of USER_HZ, which Linux fixes at 100.
    let rest = stat.rsplit_once(')')?.1;
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Resolves when standard input closes (the parent ended or let go).
pub async fn stdin_closed() {
    let mut buf = String::new();
    let mut r = BufReader::new(tokio::io::stdin());
    while matches!(r.read_line(&mut buf).await, Ok(n) if n > 0) {
        buf.clear();
    }
}

/// Raises this process's open-file limit to at least `need` (children inherit it): the soft
/// limit up to the hard one, and the hard one too where the process may (root). Returns the
/// limit now in force.
pub fn raise_fd_limit(need: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft >= need {
        return soft;
    }
    if hard < need && setrlimit(Resource::RLIMIT_NOFILE, need, need).is_ok() {
        return need;
    }
    let new = need.min(hard);
    if setrlimit(Resource::RLIMIT_NOFILE, new, hard).is_ok() {
        new
    } else {
        soft
    }
}

/// How many connections one client address can open to one server address: the size of the
/// kernel's ephemeral port range.
pub fn ephemeral_ports() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<u64>());
    let (Some(Ok(lo)), Some(Ok(hi))) = (it.next(), it.next()) else {
        return None;
    };
    Some(hi.saturating_sub(lo) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_phases_spread_a_fleet_evenly() {
        // 10,000 agents: every tenth of the interval holds close to a tenth of them, so the
        // loads arrive at a steady ~333/s with a 30 s heartbeat instead of in one wave.
        let mut tenths = [0usize; 10];
        for i in 0..10_000 {
            let p = heartbeat_phase(i);
            assert!((0.0..1.0).contains(&p), "phase {p} of agent {i}");
            tenths[(p * 10.0) as usize] += 1;
        }
        for (k, n) in tenths.iter().enumerate() {
            assert!((990..=1010).contains(n), "tenth {k} holds {n} agents");
        }
    }

    #[test]
    fn cpu_of_reads_this_process_and_grows_with_work() {
        let before = cpu_of(std::process::id()).expect("/proc/self/stat");
        // Work until 50 ms of CPU more are counted (a loaded machine may take longer).
        let t = std::time::Instant::now();
        let mut x = 0u64;
        let mut now = before;
        while now < before + Duration::from_millis(50) && t.elapsed() < Duration::from_secs(20) {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            now = cpu_of(std::process::id()).expect("/proc/self/stat");
        }
        assert!(
            now >= before + Duration::from_millis(50),
            "{before:?} → {now:?}"
        );
        assert_eq!(cpu_of(u32::MAX), None, "no such process");
    }
}
