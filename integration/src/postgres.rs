//! PostgreSQL as a child process for tests and benchmarks: the Debian package's binaries
//! (`/usr/lib/postgresql/<version>/bin`), a cluster made by `initdb` in a temporary directory,
//! listening on a free loopback port and a socket in that directory, stopped on `Drop`
//! (fast shutdown). Never the system service. PostgreSQL refuses to run as
//! root, so as root the cluster belongs to, and runs as, the package's `postgres` user.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running PostgreSQL.
pub struct Postgres {
    /// Its loopback port.
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// The directory of the newest installed PostgreSQL's programs, if any.
pub fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

/// Whether PostgreSQL's server programs are installed.
pub fn available() -> bool {
    bin_dir().is_some()
}

fn is_root() -> bool {
    crate::prosody::unsafe_is_root()
}

/// A PostgreSQL program, as the `postgres` user when we are root.
fn program(bin: &Path, name: &str) -> Command {
    let path = bin.join(name);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

impl Postgres {
    /// Makes a cluster with a `spine` superuser (trust authentication: loopback and the
    /// private socket only) and a `spine` database, and starts it; waits until it accepts
    /// connections.
    pub fn start() -> Result<Postgres, String> {
        let bin = bin_dir().ok_or("PostgreSQL is not installed (apt-get install postgresql)")?;
        let dir = tempfile::Builder::new()
            .prefix("spine-postgres-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        if is_root() {
            let st = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !st.success() {
                return Err(format!("chown postgres {}: {st}", dir.path().display()));
            }
        }
        let data = dir.path().join("data");
        let out = program(&bin, "initdb")
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "spine",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ])
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut pg = Postgres {
            port: 0,
            bin,
            dir,
            child: None,
        };
        pg.launch()?;
        pg.psql("postgres", "CREATE DATABASE spine")?;
        Ok(pg)
    }

    /// [`Postgres::start`] for a test: none, with the reason printed, when PostgreSQL is not
    /// installed — unless `SPINE_REQUIRE_SERVERS=1` (as in CI), when the test fails instead.
    pub fn start_or_skip() -> Option<Postgres> {
        match Postgres::start() {
            Ok(pg) => Some(pg),
            Err(e) if !crate::servers::required() => {
                println!("skipped: {e}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// Starts the server on a new free port (after [`Postgres::start`], or again after
    /// [`Postgres::stop`]); waits until it accepts connections.
    pub fn launch(&mut self) -> Result<(), String> {
        if self.port == 0 {
            self.port = crate::free_port().map_err(|e| e.to_string())?;
        }
        let log = std::fs::File::create(self.dir.path().join("postgres.log"))
            .map_err(|e| e.to_string())?;
        let child = program(&self.bin, "postgres")
            .args(["-D"])
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                // Durable as in production: the tests' promises are about commits on disk.
                "-c",
                "fsync=on",
                "-c",
                "max_connections=50",
                "-c",
                "shared_buffers=32MB",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("postgres: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = program(&self.bin, "pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "PostgreSQL did not accept connections within 30 s: {}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `postgres://spine@127.0.0.1:PORT/spine`.
    pub fn url(&self) -> String {
        format!("postgres://spine@127.0.0.1:{}/spine", self.port)
    }

    /// Runs SQL with psql in `db`; its output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = self
            .psql_command(db)
            .args(["-c", sql])
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "psql {sql}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// A `psql` that reads SQL from its standard input, on `db`, for a test that holds a
    /// transaction open (a row lock) while dispatchers run: the caller pipes its input and
    /// output.
    pub fn psql_command(&self, db: &str) -> Command {
        let mut c = program(&self.bin, "psql");
        c.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "spine",
            ])
            .args(["-d", db]);
        c
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Stops the server (fast shutdown: sessions are ended, what was committed stays); a
    /// later [`Postgres::launch`] starts it again on the same port.
    pub fn stop(&mut self) {
        self.stop_by_pid_file(nix::sys::signal::Signal::SIGINT);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Signals the postmaster (by its pid file: as root it runs under `runuser`) and waits
    /// up to 10 s for it to remove that file on its way out.
    fn stop_by_pid_file(&self, sig: nix::sys::signal::Signal) {
        let pid_file = self.dir.path().join("data/postmaster.pid");
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
            let deadline = Instant::now() + Duration::from_secs(10);
            while pid_file.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
