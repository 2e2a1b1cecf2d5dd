//! Prosody as a child process for tests and benchmarks: its own temporary directory and
//! configuration (never the system service or /etc/prosody), a loopback port chosen free at
//! start, accounts registered with `prosodyctl`, stopped on `Drop`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The project's Prosody configuration template (`@DIR@`, `@PORT@` are filled in).
pub const CONFIG_TEMPLATE: &str = include_str!("../servers/prosody.cfg.lua");

/// A running Prosody.
pub struct Prosody {
    /// Where it listens for clients.
    pub addr: SocketAddr,
    /// Its domain.
    pub domain: String,
    /// Its self-signed certificate (PEM), for clients to trust.
    pub cert_pem: String,
    dir: tempfile::TempDir,
    child: Child,
}

/// Whether the prosody binaries are installed.
pub fn available() -> bool {
    Path::new("/usr/bin/prosody").exists() && Path::new("/usr/bin/prosodyctl").exists()
}

/// Runs a Prosody tool as the `prosody` user when we are root (Prosody refuses to run as
/// root and its files must belong to that user).
fn as_prosody(program: &str) -> Command {
    let root = std::env::var("USER").as_deref() == Ok("root") || unsafe_is_root();
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "prosody", "--", program]);
        c
    } else {
        Command::new(program)
    }
}

pub(crate) fn unsafe_is_root() -> bool {
    // Without libc: /proc tells the effective uid.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

impl Prosody {
    /// Starts Prosody with these accounts; waits until it accepts connections.
    pub fn start(accounts: &[(&str, &str)]) -> Result<Prosody, String> {
        if !available() {
            return Err("prosody is not installed (apt-get install prosody)".into());
        }
        let dir = tempfile::Builder::new()
            .prefix("spine-prosody-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let port = crate::free_port().map_err(|e| e.to_string())?;
        let d = dir.path();
        std::fs::create_dir_all(d.join("data")).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(d.join("certs")).map_err(|e| e.to_string())?;
        let cfg = CONFIG_TEMPLATE
            .replace("@DIR@", &d.display().to_string())
            .replace("@PORT@", &port.to_string());
        let (cert_pem, key_pem) =
            spine_server::tls::generate("localhost").map_err(|e| e.to_string())?;
        std::fs::write(d.join("certs/localhost.crt"), &cert_pem).map_err(|e| e.to_string())?;
        std::fs::write(d.join("certs/localhost.key"), key_pem).map_err(|e| e.to_string())?;
        let cfg_path = d.join("prosody.cfg.lua");
        std::fs::write(&cfg_path, cfg).map_err(|e| e.to_string())?;
        if unsafe_is_root() {
            let st = Command::new("chown")
                .args(["-R", "prosody:prosody"])
                .arg(d)
                .status()
                .map_err(|e| e.to_string())?;
            if !st.success() {
                return Err(format!("chown of {} to prosody failed", d.display()));
            }
        }
        for (user, pw) in accounts {
            let out = as_prosody("prosodyctl")
                .arg("--config")
                .arg(&cfg_path)
                .args(["register", user, "localhost", pw])
                .output()
                .map_err(|e| format!("prosodyctl: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "prosodyctl register {user} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        let child = spawn(&cfg_path)?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut p = Prosody {
            addr,
            domain: "localhost".into(),
            cert_pem,
            dir,
            child,
        };
        p.wait_ready()?;
        Ok(p)
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let log_path = self.log_path();
        crate::wait_listening(
            "prosody",
            self.addr,
            &mut self.child,
            Duration::from_secs(15),
            || std::fs::read_to_string(&log_path).unwrap_or_default(),
        )
    }

    /// Stops Prosody (SIGTERM: it closes every session) and starts it again on the same
    /// port, configuration and data; waits until it accepts connections.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        self.child = spawn(&self.dir.path().join("prosody.cfg.lua"))?;
        self.wait_ready()
    }

    fn stop(&mut self) {
        // runuser forwards SIGTERM; kill() sends SIGKILL to runuser, so ask politely first.
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
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

    /// Prosody's log, for error messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("prosody.log")
    }

    /// The temporary directory.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(cfg_path: &Path) -> Result<Child, String> {
    as_prosody("prosody")
        .arg("--config")
        .arg(cfg_path)
        .arg("-F")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting prosody: {e}"))
}
