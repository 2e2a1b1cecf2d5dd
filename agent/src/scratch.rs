//! Where an agent's temporary directories go, and how the ones a killed agent left are found.
//!
//! An agent makes temporary directories for its jobs (an `exec` capability's files, a
//! file-input capability's work directory) and one for the outputs it keeps to serve
//! (without `data_keep_dir`). Each deletes itself when the job ends or the agent stops. An
//! agent killed meanwhile (`kill -9`, the OOM killer, a power loss) deletes nothing, and its
//! directories, with the inputs and outputs in them, stayed in the system's temporary
//! directory for good: hundreds of them after a day of fault tests.
//!
//! So they go under one directory per process, `spine-agent-XXXXXX` in the system's temporary
//! directory (`TMPDIR`), which the process holds an exclusive `flock` on while it lives. The
//! kernel lets go of that lock when the process ends, however it ends. When an agent starts,
//! it deletes every such directory of its user that nobody holds: what agents that died
//! left. An agent that is alive holds its lock, whatever its process id or PID namespace
//! (a container sharing the temporary directory), so it is never swept. The directory
//! itself is deleted when the last agent of its process stops and its last job directory is
//! gone.
//!
//! A program an `exec` job runs is in a process group of its own, so it outlives an agent
//! killed with SIGKILL. Its job directory names the group ([`JobDir::record_group`]), and the
//! sweep kills each group so named before deleting the directory: a group still there is the
//! program's (Linux does not give a process group's number to a new process while the group
//! exists), and a number whose group is gone is killed only if its process is the one
//! recorded (its start time), not another that got the number since.
//!
//! [`held_temp_dir`] is the same for any other prefix: `spine up` keeps its temporary data
//! directory (`spine-up-data-XXXXXX`, a job store and TLS keys) that way.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use nix::fcntl::{Flock, FlockArg};

/// The name every process's scratch directory starts with.
const PREFIX: &str = "spine-agent-";

/// This process's scratch directory, while something uses it.
static CURRENT: Mutex<Weak<HeldDir>> = Mutex::new(Weak::new());

/// A temporary directory this process holds (an exclusive `flock`) while it lives; deleted,
/// with anything left in it, when dropped. Job directories hold the agent's, and so does a
/// running agent.
#[derive(Debug)]
pub struct HeldDir {
    dir: tempfile::TempDir,
    /// The open directory, holding the lock (released when closed).
    _lock: Flock<File>,
}

impl HeldDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A new directory `<prefix>XXXXXX` in the system's temporary directory (`TMPDIR`), held by
/// this process while the returned value lives, made after deleting the `<prefix>*`
/// directories there of this user that no process holds (what processes that died left);
/// with how many those were. `prefix` must be one only directories made here start with.
pub fn held_temp_dir(prefix: &str) -> io::Result<(HeldDir, usize)> {
    held_dir_in(&std::env::temp_dir(), prefix)
}

/// [`held_temp_dir`] under `base`.
fn held_dir_in(base: &Path, prefix: &str) -> io::Result<(HeldDir, usize)> {
    let made = create(base, prefix)?;
    let swept = sweep(base, prefix, made.path())?;
    Ok((made, swept))
}

/// The process's scratch directory: the one in use, or a new one (after deleting what dead
/// agents left, see the module's documentation).
pub(crate) fn root() -> Result<Arc<HeldDir>, String> {
    shared(&CURRENT, &std::env::temp_dir())
}

/// [`root`], kept in `current`, under `base`.
fn shared(current: &Mutex<Weak<HeldDir>>, base: &Path) -> Result<Arc<HeldDir>, String> {
    let mut current = current.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(r) = current.upgrade() {
        return Ok(r);
    }
    let made = create(base, PREFIX).map_err(|e| {
        format!(
            "cannot create the agent's scratch directory under {}: {e} (set TMPDIR to a writable directory)",
            base.display()
        )
    })?;
    let root = Arc::new(made);
    match sweep(base, PREFIX, root.path()) {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            "deleted {n} scratch {} left under {} by agents that did not stop cleanly",
            if n == 1 { "directory" } else { "directories" },
            base.display()
        ),
        Err(e) => tracing::warn!(
            "cannot look for scratch directories stopped agents left under {}: {e}",
            base.display()
        ),
    }
    *current = Arc::downgrade(&root);
    Ok(root)
}

/// A new directory `<prefix>XXXXXX` under `base`, held.
fn create(base: &Path, prefix: &str) -> io::Result<HeldDir> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(base)?;
    let lock = lock(File::open(dir.path())?).map_err(io::Error::from)?;
    Ok(HeldDir { dir, _lock: lock })
}

/// Deletes the `<prefix>*` directories under `base` that belong to this process's user and
/// that no process holds, except `mine`; returns how many.
fn sweep(base: &Path, prefix: &str, mine: &Path) -> io::Result<usize> {
    let uid = std::fs::metadata(mine)?.uid();
    let mut deleted = 0;
    for entry in std::fs::read_dir(base)? {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        if path == mine || !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        // Not followed: a symbolic link, or another user's directory, is not ours to delete.
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() && m.uid() == uid => {}
            _ => continue,
        }
        if delete_if_free(&path) {
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// An exclusive `flock` on `f`, or the error at once if another open file holds one.
fn lock(f: File) -> Result<Flock<File>, nix::errno::Errno> {
    Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e)
}

/// Deletes `path` if no process holds its lock (while holding it, so that it cannot be taken
/// meanwhile); whether it did.
fn delete_if_free(path: &PathBuf) -> bool {
    let Ok(dir) = File::open(path) else {
        return false;
    };
    let Ok(_held) = lock(dir) else {
        // A live agent's (or gone since).
        return false;
    };
    stop_groups(path);
    match std::fs::remove_dir_all(path) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                "cannot delete {}, left by a stopped agent: {e}",
                path.display()
            );
            false
        }
    }
}

/// The file in a job directory that names the process group of the program it runs.
const GROUP_FILE: &str = ".spine-group";

/// Kills the process groups the job directories in `root` name (see the module's
/// documentation).
fn stop_groups(root: &Path) {
    let Ok(jobs) = std::fs::read_dir(root) else {
        return;
    };
    for job in jobs.flatten() {
        let Ok(text) = std::fs::read_to_string(job.path().join(GROUP_FILE)) else {
            continue;
        };
        let mut words = text.split_whitespace().map(str::parse::<u64>);
        let (Some(Ok(pgid)), Some(Ok(started))) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(pgid) = i32::try_from(pgid) else {
            continue;
        };
        if pgid <= 1 {
            continue;
        }
        // The leader alive under that number but started at another time: the group is gone
        // and the number is another process's now.
        if start_time(pgid).is_some_and(|t| t != started) {
            continue;
        }
        if nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .is_ok()
        {
            tracing::info!(
                pgid,
                "killed the program of a job whose agent did not stop cleanly"
            );
        }
    }
}

/// When process `pid` started (clock ticks after boot: field 22 of `/proc/PID/stat`), if it
/// exists.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid …": the fields after the last ')' start at the third.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// A temporary directory for one job (`prefix` then random characters) under the process's
/// scratch directory; deleted with everything in it when dropped.
#[derive(Debug)]
pub(crate) struct JobDir {
    dir: tempfile::TempDir,
    /// Kept until the directory is gone (fields drop in order).
    _root: Arc<HeldDir>,
}

impl JobDir {
    pub(crate) fn create(prefix: &str) -> Result<JobDir, String> {
        JobDir::under(root()?, prefix)
    }

    fn under(root: Arc<HeldDir>, prefix: &str) -> Result<JobDir, String> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(root.path())
            .map_err(|e| {
                format!(
                    "cannot create a job directory under {}: {e}",
                    root.path().display()
                )
            })?;
        Ok(JobDir { dir, _root: root })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Names the process group of the program this job runs (its leader `pgid`), for the
    /// next agent to kill if this one is killed first. Best effort: without it the program
    /// is only not stopped then.
    pub(crate) fn record_group(&self, pgid: i32) {
        let Some(started) = start_time(pgid) else {
            return;
        };
        if let Err(e) = std::fs::write(self.path().join(GROUP_FILE), format!("{pgid} {started}\n"))
        {
            tracing::debug!("cannot record a job's process group: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_deletes_the_directories_nobody_holds_and_only_those() {
        let base = tempfile::tempdir().unwrap();
        let mine = create(base.path(), PREFIX).unwrap();
        // A live agent's, held by its lock (another open file: flock locks conflict between
        // them even within one process).
        let live = create(base.path(), PREFIX).unwrap();
        // A dead agent's, with a job directory and a file in it.
        let dead = tempfile::Builder::new()
            .prefix(PREFIX)
            .tempdir_in(base.path())
            .unwrap()
            .keep();
        std::fs::create_dir(dead.join("spine-exec-x")).unwrap();
        std::fs::write(dead.join("spine-exec-x").join("input"), b"left").unwrap();
        // Not a scratch directory, and a symbolic link to one: left alone.
        let other = base.path().join("spine-exec-old");
        std::fs::create_dir(&other).unwrap();
        let target = tempfile::tempdir().unwrap();
        let link = base.path().join(format!("{PREFIX}link"));
        std::os::unix::fs::symlink(target.path(), &link).unwrap();

        assert_eq!(sweep(base.path(), PREFIX, mine.path()).unwrap(), 1);
        assert!(!dead.exists(), "the dead agent's directory is deleted");
        assert!(mine.path().is_dir() && live.path().is_dir());
        assert!(other.is_dir() && target.path().is_dir() && link.exists());

        // Once its process lets go, the live one's goes too.
        let live_path = live.path().to_owned();
        let kept = live_path.join("kept");
        std::fs::write(&kept, b"x").unwrap();
        let HeldDir { dir, _lock } = live;
        let _ = dir.keep();
        drop(_lock);
        assert_eq!(sweep(base.path(), PREFIX, mine.path()).unwrap(), 1);
        assert!(!live_path.exists());

        // Another prefix sweeps its own only.
        let dead_up = base.path().join("spine-up-data-abc123");
        std::fs::create_dir(&dead_up).unwrap();
        let (up, swept) = held_dir_in(base.path(), "spine-up-data-").unwrap();
        assert_eq!(swept, 1);
        assert!(!dead_up.exists() && up.path().is_dir() && mine.path().is_dir());
        assert!(other.is_dir());
    }

    #[test]
    fn a_recorded_group_is_killed_only_while_its_leader_is_the_process_recorded() {
        use std::os::unix::process::CommandExt as _;
        let root = tempfile::tempdir().unwrap();
        let job = root.path().join("spine-exec-x");
        std::fs::create_dir(&job).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let started = start_time(pid).unwrap();
        // Another start time: the number is another process's now; left alone.
        std::fs::write(job.join(GROUP_FILE), format!("{pid} {}\n", started + 1)).unwrap();
        stop_groups(root.path());
        assert!(child.try_wait().unwrap().is_none(), "left alone");
        // Unreadable: left alone too.
        std::fs::write(job.join(GROUP_FILE), "garbage").unwrap();
        stop_groups(root.path());
        assert!(child.try_wait().unwrap().is_none(), "left alone");
        // The process recorded: killed.
        std::fs::write(job.join(GROUP_FILE), format!("{pid} {started}\n")).unwrap();
        stop_groups(root.path());
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
    }

    #[test]
    fn job_directories_share_the_process_root_which_goes_with_the_last() {
        let base = tempfile::tempdir().unwrap();
        let current = Mutex::new(Weak::new());
        let a = JobDir::under(shared(&current, base.path()).unwrap(), "spine-exec-").unwrap();
        let b = JobDir::under(shared(&current, base.path()).unwrap(), "spine-job-").unwrap();
        let root = a.path().parent().unwrap().to_owned();
        assert_eq!(root.parent(), Some(base.path()));
        assert_eq!(b.path().parent(), Some(root.as_path()));
        assert!(root
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(PREFIX));
        // Held: another look does not take it.
        assert!(!delete_if_free(&root));
        drop(a);
        assert!(root.is_dir());
        drop(b);
        assert!(
            !root.exists(),
            "the last job directory takes the root with it"
        );
    }
}
