//! ejabberd as a child process for tests and benchmarks: its own temporary directory,
//! configuration, Mnesia spool and logs (never the system service, /etc/ejabberd or
//! /var/lib/ejabberd), a loopback port chosen free at start, accounts registered through
//! ejabberd's own `ejabberd_ctl` module (what `ejabberdctl register` runs), stopped on `Drop`.
//!
//! It runs the Erlang VM directly rather than through `ejabberdctl`, which insists on
//! switching to the `ejabberd` user and its cookie: this works for any user. Erlang
//! distribution (for the control commands) listens on a free loopback port without epmd.

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
    node: String,
    dist_port: u16,
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

impl Ejabberd {
    /// Starts ejabberd with these accounts; waits until it accepts connections.
    pub fn start(accounts: &[(&str, &str)]) -> Result<Ejabberd, String> {
        if !available() {
            return Err("ejabberd is not installed (apt-get install ejabberd)".into());
        }
        let dir = tempfile::Builder::new()
            .prefix("spine-ejabberd-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let d = dir.path();
        for sub in ["spool", "logs"] {
            std::fs::create_dir_all(d.join(sub)).map_err(|e| e.to_string())?;
        }
        let port = crate::free_port().map_err(|e| e.to_string())?;
        let dist_port = crate::free_port().map_err(|e| e.to_string())?;
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
        let cookie = format!("spine-{}-{port}", std::process::id());
        let child = Command::new("erl")
            .args(["-sname", &node, "-setcookie", &cookie, "-noinput"])
            .args(dist_args(dist_port))
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
            dist_port,
            cookie,
            dir,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = e.child.try_wait() {
                return Err(format!(
                    "ejabberd exited at start ({status}); log: {}",
                    e.log()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "ejabberd did not listen on {addr} within 30 s; log: {}",
                    e.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for (user, pw) in accounts {
            e.ctl(&["register", user, "localhost", pw])?;
        }
        Ok(e)
    }

    /// Runs an `ejabberdctl` command against this node (through its `ejabberd_ctl` module);
    /// returns what it printed.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("erl")
            .args([
                "-sname",
                &format!("ctl-{}-{}", self.dist_port, rand_suffix()),
                "-setcookie",
                &self.cookie,
                "-noinput",
                "-hidden",
            ])
            .args(dist_args(self.dist_port))
            .args([
                "-dist_listen",
                "false",
                "-s",
                "ejabberd_ctl",
                "-extra",
                &self.node,
            ])
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
        std::fs::read_to_string(self.dir.path().join("logs/ejabberd.log")).unwrap_or_default()
    }

    /// The temporary directory.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

/// Erlang distribution on one fixed port with no epmd (OTP 23+): nothing shared with other
/// nodes on the machine.
fn dist_args(port: u16) -> [String; 4] {
    [
        "-start_epmd".into(),
        "false".into(),
        "-erl_epmd_port".into(),
        port.to_string(),
    ]
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
