//! ejabberd as a child process for tests and benchmarks: its own temporary directory,
//! configuration, Mnesia spool and logs (never the system service, /etc/ejabberd or
//! /var/lib/ejabberd), a loopback port chosen free at start, accounts registered through
//! ejabberd's own `ejabberd_ctl` module (what `ejabberdctl register` runs), stopped on `Drop`.
//!
//! It runs the Erlang VM directly rather than through `ejabberdctl`, which insists on
//! switching to the `ejabberd` user and its cookie: this works for any user. A single node's
//! Erlang distribution (for the control commands) listens on a free loopback port without
//! epmd; a cluster ([`start_cluster`]) gets its own epmd on a free loopback port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The project's ejabberd configuration template (`@PORT@` and `@DIR@` are filled in).
pub const CONFIG_TEMPLATE: &str = include_str!("../servers/ejabberd.yml");

/// Where Debian installs ejabberd's Erlang applications.
const ERL_LIBS: &str = "/usr/lib/x86_64-linux-gnu";

/// A running ejabberd node.
pub struct Ejabberd {
    /// Where it listens for clients.
    pub addr: SocketAddr,
    /// Its domain.
    pub domain: String,
    /// Its self-signed certificate (PEM), for clients to trust.
    pub cert_pem: String,
    /// The Erlang node name (`spine-ej-<port>@localhost`).
    pub node: String,
    dist: Dist,
    cookie: String,
    dir: tempfile::TempDir,
    child: Child,
}

/// Whether ejabberd and the Erlang runtime are installed.
pub fn available() -> bool {
    Path::new("/usr/bin/erl").exists()
        && std::fs::read_dir(ERL_LIBS)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("ejabberd-"))
            })
            .unwrap_or(false)
}

/// How a node finds its peers and its control commands find it.
#[derive(Clone, Copy)]
enum Dist {
    /// No epmd: the node listens for distribution on this port (a lone node).
    Fixed(u16),
    /// Our own epmd on this loopback port (a cluster).
    Epmd(u16),
}

impl Dist {
    /// Arguments and environment of `erl` for this mode.
    fn apply(self, cmd: &mut Command) {
        cmd.args(["-start_epmd", "false"]);
        match self {
            Dist::Fixed(port) => {
                cmd.args(["-erl_epmd_port", &port.to_string()]);
            }
            Dist::Epmd(port) => {
                cmd.env("ERL_EPMD_PORT", port.to_string())
                    .env("ERL_EPMD_ADDRESS", "127.0.0.1");
            }
        }
    }
}

/// An epmd of our own, on a free loopback port, stopped on `Drop`.
pub struct Epmd {
    /// Its port.
    pub port: u16,
    child: Child,
}

impl Drop for Epmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cluster of ejabberd nodes sharing one Mnesia database (`join_cluster`). Nodes stop
/// before their epmd.
pub struct EjabberdCluster {
    /// The nodes; the first is the one the others joined.
    pub nodes: Vec<Ejabberd>,
    _epmd: Epmd,
}

/// Starts `n` ejabberd nodes on this machine, joins them into one cluster (as
/// `ejabberdctl join_cluster` does) and registers the accounts, which every node then knows.
pub fn start_cluster(n: usize, accounts: &[(&str, &str)]) -> Result<EjabberdCluster, String> {
    if !available() {
        return Err("ejabberd is not installed (apt-get install ejabberd)".into());
    }
    let port = crate::free_port().map_err(|e| e.to_string())?;
    let child = Command::new("epmd")
        .args(["-port", &port.to_string(), "-address", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting epmd: {e}"))?;
    let epmd = Epmd { port, child };
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("epmd did not listen on port {port}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let cookie = format!("spine-cluster-{}-{port}", std::process::id());
    let mut nodes = Vec::with_capacity(n);
    for _ in 0..n {
        nodes.push(Ejabberd::launch(Dist::Epmd(port), &cookie)?);
    }
    for node in &nodes[1..] {
        node.ctl(&["join_cluster", &nodes[0].node])?;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let members = nodes[0].ctl(&["list_cluster"])?;
        if nodes.iter().all(|x| members.contains(&x.node)) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("the cluster did not form: {members}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for (user, pw) in accounts {
        nodes[0].register(user, pw)?;
    }
    Ok(EjabberdCluster { nodes, _epmd: epmd })
}

impl Ejabberd {
    /// Starts ejabberd with these accounts; waits until it accepts connections.
    pub fn start(accounts: &[(&str, &str)]) -> Result<Ejabberd, String> {
        if !available() {
            return Err("ejabberd is not installed (apt-get install ejabberd)".into());
        }
        let dist_port = crate::free_port().map_err(|e| e.to_string())?;
        let cookie = format!("spine-{}-{dist_port}", std::process::id());
        let e = Ejabberd::launch(Dist::Fixed(dist_port), &cookie)?;
        for (user, pw) in accounts {
            e.register(user, pw)?;
        }
        Ok(e)
    }

    /// Starts one node and waits until it accepts client connections.
    fn launch(dist: Dist, cookie: &str) -> Result<Ejabberd, String> {
        let dir = tempfile::Builder::new()
            .prefix("spine-ejabberd-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let d = dir.path();
        for sub in ["spool", "logs"] {
            std::fs::create_dir_all(d.join(sub)).map_err(|e| e.to_string())?;
        }
        let port = crate::free_port().map_err(|e| e.to_string())?;
        let (cert_pem, key_pem) =
            spine_server::tls::generate("localhost").map_err(|e| e.to_string())?;
        std::fs::write(d.join("cert.pem"), format!("{cert_pem}{key_pem}"))
            .map_err(|e| e.to_string())?;
        let cfg_path = d.join("ejabberd.yml");
        std::fs::write(
            &cfg_path,
            CONFIG_TEMPLATE
                .replace("@PORT@", &port.to_string())
                .replace("@DIR@", &d.display().to_string()),
        )
        .map_err(|e| e.to_string())?;
        let node = format!("spine-ej-{port}@localhost");
        let mut cmd = Command::new("erl");
        cmd.args(["-sname", &node, "-setcookie", cookie, "-noinput"]);
        dist.apply(&mut cmd);
        let child = cmd
            // Distribution on loopback only.
            .args(["-kernel", "inet_dist_use_interface", "{127,0,0,1}"])
            .args(["-mnesia", "dir"])
            .arg(format!("\"{}\"", d.join("spool").display()))
            .args(["-s", "ejabberd"])
            .env("ERL_LIBS", ERL_LIBS)
            .env("EJABBERD_CONFIG_PATH", &cfg_path)
            .env("EJABBERD_LOG_PATH", d.join("logs/ejabberd.log"))
            .env("ERL_CRASH_DUMP", d.join("logs/erl_crash.dump"))
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting erl: {e}"))?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut e = Ejabberd {
            addr,
            domain: "localhost".into(),
            cert_pem,
            node,
            dist,
            cookie: cookie.to_owned(),
            dir,
            child,
        };
        let log_path = e.log_path();
        crate::wait_listening(
            "ejabberd",
            addr,
            &mut e.child,
            Duration::from_secs(30),
            || std::fs::read_to_string(&log_path).unwrap_or_default(),
        )?;
        Ok(e)
    }

    /// Registers an account. A node that accepts connections may still be creating its Mnesia
    /// tables (`{aborted,{no_exists,passwd,…}}`, seen once on a loaded machine): tried again
    /// for up to 10 s.
    fn register(&self, user: &str, pw: &str) -> Result<String, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.ctl(&["register", user, "localhost", pw]) {
                Err(e) if e.contains("no_exists") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                r => return r,
            }
        }
    }

    /// Runs an `ejabberdctl` command against this node (through its `ejabberd_ctl` module);
    /// returns what it printed.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new("erl");
        cmd.args([
            "-sname",
            &format!("ctl-{}-{}", std::process::id(), rand_suffix()),
            "-setcookie",
            &self.cookie,
            "-noinput",
            "-hidden",
        ]);
        self.dist.apply(&mut cmd);
        if let Dist::Fixed(_) = self.dist {
            // With no epmd the control node cannot listen on the node's port too.
            cmd.args(["-dist_listen", "false"]);
        }
        let out = cmd
            .args(["-s", "ejabberd_ctl", "-extra", &self.node])
            .args(args)
            .env("ERL_LIBS", ERL_LIBS)
            .current_dir(self.dir.path())
            .output()
            .map_err(|e| format!("erl (ejabberd_ctl): {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "ejabberdctl {} failed ({}): {text}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// ejabberd's log, for error messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("logs/ejabberd.log")
    }

    /// The temporary directory.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

impl Drop for Ejabberd {
    fn drop(&mut self) {
        // `stop` lets ejabberd close its sessions and Mnesia; SIGKILL if it does not exit.
        let _ = self.ctl(&["stop"]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
