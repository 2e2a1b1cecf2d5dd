//! Farms whose parts are separate child processes of this executable, for the benchmarks that
//! measure each part on its own (`spine bench soak`: memory per process; `spine bench cost`:
//! CPU per process). [`start`] writes the configurations of `spine up`'s farm
//! ([`crate::up::FarmAccounts`]) to files, picks free loopback ports and starts `spine server`,
//! `spine dispatcher` and the `spine agent --builtin`s in that order, each waited for before
//! the next; [`Children::stop`] ends them in the reverse order.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::process::{Child, Command};

use super::wait_for_agents;

/// How long a child may take to start (the server to listen, the dispatcher to answer, the
/// agents to register) and to stop after SIGTERM.
pub(super) const START_PATIENCE: Duration = Duration::from_secs(30);

/// The child processes, in start order; stopped in the reverse order (the agents drain first).
pub(super) struct Children {
    procs: Vec<(String, Child)>,
    logs: PathBuf,
}

impl Children {
    /// No children yet; their logs will go to `logs/<name>.log`.
    pub(super) fn new(logs: &Path) -> Self {
        Children {
            procs: Vec::new(),
            logs: logs.to_path_buf(),
        }
    }

    /// Starts `spine <args>` as the part `name`, its output in `logs/<name>.log`.
    pub(super) fn spawn(&mut self, name: &str, args: &[&str], config: &Path) -> Result<()> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let log = self.logs.join(format!("{name}.log"));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("sharing the log file")?;
        let child = Command::new(exe)
            .args(args)
            .arg("--config")
            .arg(config)
            .args(["--log", "warn"])
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            // A last resort only (an early `?` in the caller): `stop` ends them with SIGTERM.
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        self.procs.push((name.to_owned(), child));
        Ok(())
    }

    /// Each part's name and process id (none once it has been waited for).
    pub(super) fn pids(&self) -> Vec<(String, Option<u32>)> {
        self.procs
            .iter()
            .map(|(n, c)| (n.clone(), c.id()))
            .collect()
    }

    /// An error if a child has exited, with the end of its log.
    pub(super) fn check_alive(&mut self) -> Result<()> {
        for (name, child) in &mut self.procs {
            if let Some(status) = child.try_wait().context("polling a child")? {
                let log = std::fs::read_to_string(self.logs.join(format!("{name}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                anyhow::bail!(
                    "the {name} exited ({status}); the end of its log:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        Ok(())
    }

    /// SIGKILL to the part `name` (a crash), waited for; it leaves the list, so that the
    /// part can be started again under the same name.
    pub(super) async fn kill9(&mut self, name: &str) -> Result<()> {
        let i = self
            .procs
            .iter()
            .position(|(n, _)| n == name)
            .with_context(|| format!("no {name} to kill"))?;
        let (_, mut child) = self.procs.remove(i);
        child
            .start_kill()
            .with_context(|| format!("SIGKILL to the {name}"))?;
        child
            .wait()
            .await
            .with_context(|| format!("waiting for the {name}"))?;
        Ok(())
    }

    /// SIGTERM to each child, last started first, and a wait for its exit (SIGKILL after
    /// [`START_PATIENCE`]).
    pub(super) async fn stop(mut self) {
        while let Some((name, mut child)) = self.procs.pop() {
            if let Some(pid) = child.id() {
                let pid = nix::unistd::Pid::from_raw(pid as i32);
                if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
                    eprintln!("bench: SIGTERM to the {name}: {e}");
                }
            }
            match tokio::time::timeout(START_PATIENCE, child.wait()).await {
                Ok(Ok(s)) if !s.success() => eprintln!("bench: the {name} stopped with {s}"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => eprintln!("bench: waiting for the {name}: {e}"),
                Err(_) => {
                    eprintln!("bench: the {name} did not stop within 30 s after SIGTERM: killed");
                    if let Err(e) = child.kill().await {
                        eprintln!("bench: killing the {name}: {e}");
                    }
                }
            }
        }
    }
}

/// Writes a configuration file (TOML `text`) readable by this user only (it holds a password).
pub(super) fn write_config(path: &Path, text: Result<String, toml::ser::Error>) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let text = text.with_context(|| format!("writing {}", path.display()))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

/// A free loopback address for a child to listen on: a port found free and released, which
/// the child binds a moment later. Taken below the kernel's ephemeral range when there is
/// room: a port of that range (what binding port 0 gives) may be taken meanwhile by any
/// outgoing connection of the machine, which made a farm's start fail with "Address already
/// in use" once in some thirty runs. Never the same port twice in one process.
pub(super) fn free_loopback() -> Result<SocketAddr> {
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    const FLOOR: u32 = 10_000;
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768)
        .min(65_536);
    if low > FLOOR + 1_000 {
        let span = low - FLOOR;
        // A start that differs between processes (several benchmarks at once), then a prime
        // stride through the span.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let start = (std::process::id() ^ nanos) % span;
        for i in 0..512u32 {
            let port = (FLOOR + (start + i * 7_919) % span) as u16;
            if given.contains(&port) {
                continue;
            }
            if let Ok(addr) =
                std::net::TcpListener::bind(("127.0.0.1", port)).and_then(|l| l.local_addr())
            {
                given.push(port);
                return Ok(addr);
            }
        }
    }
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free loopback port")?;
    given.push(addr.port());
    Ok(addr)
}

/// Polls `ready` until it holds, failing if a child exits or after [`START_PATIENCE`].
pub(super) async fn wait_until<F: std::future::Future<Output = bool>>(
    children: &mut Children,
    what: &str,
    ready: impl Fn() -> F,
) -> Result<()> {
    let deadline = Instant::now() + START_PATIENCE;
    while !ready().await {
        children.check_alive()?;
        anyhow::ensure!(Instant::now() < deadline, "waited 30 s for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// What a child-process farm is made of.
pub(super) struct Plan<'a> {
    /// `spine agent --builtin` processes (named `agent1`, `agent2`, …).
    pub(super) agents: usize,
    /// Slots of each agent.
    pub(super) slots: u64,
    /// The start is over when every agent offers this capability.
    pub(super) capability: &'a str,
    /// `spine dispatcher` processes (`dispatcher`, `dispatcher2`, …): more than one share a
    /// PostgreSQL store (the configuration's `store`), each with its own resource, port and
    /// data directory.
    pub(super) dispatchers: usize,
}

/// A running child-process farm.
pub(super) struct ProcFarm {
    /// The parts, in start order: `server`, `dispatcher`, `agent1`, ….
    pub(super) children: Children,
    /// A client of the dispatcher's HTTP API (the loopback caller, no token).
    pub(super) api: spine_client::Client,
    /// Every dispatcher's HTTP API, the first's first.
    pub(super) https: Vec<SocketAddr>,
    /// The dispatcher's data directory (job store, blob store).
    pub(super) data: PathBuf,
}

/// Starts a farm under `dir` (configurations in `dir/config`, logs and data in `dir`), the
/// dispatcher's configuration changed by `change`; every part is stopped again if one fails
/// to start.
pub(super) async fn start(
    dir: &Path,
    plan: Plan<'_>,
    change: impl FnOnce(&mut spine_dispatcher::DispatcherConfig),
) -> Result<ProcFarm> {
    let (xmpp, http) = (free_loopback()?, free_loopback()?);
    let accounts = crate::up::FarmAccounts::new(plan.agents);
    let mut dcfg = accounts.dispatcher_config(xmpp, http, dir);
    change(&mut dcfg);
    let data = dcfg.data_dir.clone();
    let configs = dir.join("config");
    std::fs::create_dir(&configs).context("creating the configuration directory")?;
    let server_toml = configs.join("server.toml");
    write_config(
        &server_toml,
        toml::to_string_pretty(&accounts.server_config(xmpp, dir)),
    )?;
    let dispatcher_toml = configs.join("dispatcher.toml");
    write_config(&dispatcher_toml, toml::to_string_pretty(&dcfg))?;
    let mut https = vec![http];
    let mut more = Vec::new();
    for k in 2..=plan.dispatchers {
        let mut c = dcfg.clone();
        let h = free_loopback()?;
        c.jid = format!("dispatcher@localhost/up{k}");
        c.http_listen = Some(h);
        c.data_dir = dir.join(format!("dispatcher{k}"));
        let path = configs.join(format!("dispatcher{k}.toml"));
        write_config(&path, toml::to_string_pretty(&c))?;
        https.push(h);
        more.push((format!("dispatcher{k}"), path, h));
    }
    let mut agent_tomls = Vec::new();
    for i in 1..=plan.agents {
        let path = configs.join(format!("agent{i}.toml"));
        write_config(
            &path,
            toml::to_string_pretty(&accounts.agent_config(i, xmpp, plan.slots)),
        )?;
        agent_tomls.push(path);
    }
    let mut children = Children::new(dir);
    let api = spine_client::Client::new(&format!("http://{http}"), None)?;
    let started = async {
        children.spawn("server", &["server"], &server_toml)?;
        wait_until(&mut children, "the XMPP server to listen", || async {
            tokio::net::TcpStream::connect(xmpp).await.is_ok()
        })
        .await?;
        children.spawn("dispatcher", &["dispatcher"], &dispatcher_toml)?;
        wait_until(&mut children, "the dispatcher's HTTP API", || async {
            api.request(reqwest::Method::GET, "/healthz")
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await?;
        for (name, path, h) in &more {
            children.spawn(name, &["dispatcher"], path)?;
            let api = spine_client::Client::new(&format!("http://{h}"), None)?;
            wait_until(&mut children, "another dispatcher's HTTP API", || async {
                api.request(reqwest::Method::GET, "/healthz")
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            })
            .await?;
        }
        for (i, path) in agent_tomls.iter().enumerate() {
            children.spawn(&format!("agent{}", i + 1), &["agent", "--builtin"], path)?;
        }
        wait_for_agents(&api, plan.capability, plan.agents).await?;
        children.check_alive()
    }
    .await;
    match started {
        Ok(()) => Ok(ProcFarm {
            children,
            api,
            https,
            data,
        }),
        Err(e) => {
            children.stop().await;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_loopback_distinct_bindable_and_below_the_ephemeral_range() {
        let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse().ok())
            .unwrap_or(32_768);
        let addrs: Vec<SocketAddr> = (0..50).map(|_| free_loopback().unwrap()).collect();
        let mut ports: Vec<u16> = addrs.iter().map(SocketAddr::port).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 50, "never the same port twice");
        for a in &addrs {
            assert!(a.ip().is_loopback(), "{a}");
            if low > 11_000 {
                assert!((10_000..low).contains(&a.port()), "{a} below {low}");
            }
        }
        // What a child does with one: bind it.
        let l = std::net::TcpListener::bind(addrs[0]).unwrap();
        assert_eq!(l.local_addr().unwrap(), addrs[0]);
    }
}
