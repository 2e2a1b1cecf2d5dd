//! A real browser for the console's tests: Debian's headless Chromium driven over WebDriver.
//! A test starts [`Browser`] (a `chromedriver` child on a free loopback port, a fantoccini
//! session on it), points it at a dispatcher's `/ui`, and reads the page as a person would see
//! it — through the DOM hooks of the console's contract — while the farm runs real jobs; each
//! step can save a screenshot under `target/console-screenshots/`, the test's artefacts.
//!
//! Chromium and chromedriver come from Debian (`chromium`, `chromium-driver`; `.ci/run`
//! installs both). Where either is missing the test is skipped with a printed reason, unless
//! `SPINE_REQUIRE_SERVERS=1` (CI), where it fails, as for Prosody and ejabberd.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::elements::Element;
use fantoccini::{ClientBuilder, Locator};
use serde_json::Value;

/// How long a page may take to show what a test waits for (a live update comes within a
/// second or two; the generous bound is for a loaded 2-core CI machine).
pub const PAGE_PATIENCE: Duration = Duration::from_secs(20);

/// The Chromium binary (`SPINE_CHROMIUM` overrides it).
fn chromium_path() -> PathBuf {
    std::env::var_os("SPINE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// The chromedriver binary (`SPINE_CHROMEDRIVER` overrides it).
fn chromedriver_path() -> PathBuf {
    std::env::var_os("SPINE_CHROMEDRIVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromedriver"))
}

/// Why no browser can run here, or `None` when both binaries are present.
pub fn missing() -> Option<String> {
    let (chromium, driver) = (chromium_path(), chromedriver_path());
    if !chromium.is_file() {
        return Some(format!(
            "no Chromium at {} (apt-get install chromium, or set SPINE_CHROMIUM)",
            chromium.display()
        ));
    }
    if !driver.is_file() {
        return Some(format!(
            "no chromedriver at {} (apt-get install chromium-driver, or set SPINE_CHROMEDRIVER)",
            driver.display()
        ));
    }
    None
}

/// Where screenshots go: `console-screenshots/` in the build's target directory
/// (`CARGO_TARGET_DIR`, else the one holding this test binary, else the workspace's `target/`).
pub fn screenshot_dir() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => {
            let t = PathBuf::from(t);
            if t.is_absolute() {
                t
            } else {
                crate::repo_root().join(t)
            }
        }
        // target/debug/deps/console-0123abcd: three levels up.
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
            .filter(|t| t.join("debug").is_dir() || t.join("release").is_dir())
            .unwrap_or_else(|| crate::repo_root().join("target")),
    };
    target.join("console-screenshots")
}

/// A headless Chromium session through a chromedriver child process. Dropping it kills
/// chromedriver's process group (chromedriver and the Chromium it started) by its id, and
/// removes the browser profile; [`Browser::close`] ends the session politely first.
pub struct Browser {
    client: Option<fantoccini::Client>,
    driver: Child,
    _profile: tempfile::TempDir,
    log: PathBuf,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium at 1280×800. `None` (with the reason
    /// printed) when Chromium or chromedriver is not installed and `SPINE_REQUIRE_SERVERS` is
    /// not `1`; panics when they are required, or installed but do not start.
    pub async fn start() -> Option<Browser> {
        if let Some(why) = missing() {
            if crate::servers::required() {
                panic!("SPINE_REQUIRE_SERVERS=1 but {why}");
            }
            eprintln!("skipping the browser test: {why}");
            return None;
        }
        Some(Self::launch().await)
    }

    async fn launch() -> Browser {
        let profile = tempfile::Builder::new()
            .prefix("spine-chromium-")
            .tempdir()
            .expect("a temporary browser profile");
        let log = profile.path().join("chromedriver.log");
        // Chromium's own temporary directories (its singleton socket, scoped directories) go
        // inside the profile, so that they go with it: under /tmp a killed browser left them.
        let tmp = profile.path().join("tmp");
        std::fs::create_dir(&tmp).expect("a temporary directory inside the browser profile");
        let port = crate::free_port().expect("a free loopback port for chromedriver");
        let mut cmd = Command::new(chromedriver_path());
        cmd.env("TMPDIR", &tmp)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // A group of its own, so that Drop can stop chromedriver and the browser it started
        // together, by chromedriver's id, without touching anything else.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut driver = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} failed: {e}", chromedriver_path().display()));
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        if let Err(e) = crate::wait_listening(
            "chromedriver",
            addr,
            &mut driver,
            Duration::from_secs(20),
            read_log,
        ) {
            kill_group(&mut driver);
            panic!("{e}");
        }
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), Value::from("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium_path(),
                "args": [
                    "--headless=new",
                    // As root (CI) Chromium refuses to start with its sandbox.
                    "--no-sandbox",
                    "--disable-gpu",
                    // Containers give /dev/shm 64 MiB, too little for a renderer.
                    "--disable-dev-shm-usage",
                    "--window-size=1280,800",
                    format!("--user-data-dir={}", profile.path().join("profile").display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = match ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://{addr}"))
            .await
        {
            Ok(c) => c,
            Err(e) => {
                let log = read_log();
                kill_group(&mut driver);
                panic!("no Chromium session through chromedriver: {e}; chromedriver log:\n{log}");
            }
        };
        Browser {
            client: Some(client),
            driver,
            _profile: profile,
            log,
        }
    }

    /// The WebDriver session.
    pub fn client(&self) -> &fantoccini::Client {
        self.client.as_ref().expect("a session until close")
    }

    /// The page's current URL (for error messages: "unknown" if the browser cannot say).
    pub async fn url(&self) -> String {
        match self.client().current_url().await {
            Ok(u) => u.to_string(),
            Err(e) => format!("unknown ({e})"),
        }
    }

    /// Opens `url` and waits for the document to load.
    pub async fn goto(&self, url: &str) {
        if let Err(e) = self.client().goto(url).await {
            panic!("the browser could not open {url}: {e}");
        }
    }

    /// The first element matching the CSS `selector`, waiting for it at most `within`; the
    /// panic names the selector and the page's URL.
    pub async fn wait_for(&self, selector: &str, within: Duration) -> Element {
        match self.try_wait_for(selector, within).await {
            Some(e) => e,
            None => panic!(
                "no element matching {selector:?} within {within:?} on {}",
                self.url().await
            ),
        }
    }

    /// The first element matching `selector` within `within`, or `None`.
    pub async fn try_wait_for(&self, selector: &str, within: Duration) -> Option<Element> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(e) = self.client().find(Locator::Css(selector)).await {
                return Some(e);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every element matching `selector` now (none is not an error).
    pub async fn all(&self, selector: &str) -> Vec<Element> {
        match self.client().find_all(Locator::Css(selector)).await {
            Ok(v) => v,
            Err(e) => panic!("finding {selector:?} on {}: {e}", self.url().await),
        }
    }

    /// The rendered text of the first element matching `selector` (waited for).
    pub async fn text(&self, selector: &str) -> String {
        let e = self.wait_for(selector, PAGE_PATIENCE).await;
        match e.text().await {
            Ok(t) => t,
            Err(e) => panic!(
                "reading the text of {selector:?} on {}: {e}",
                self.url().await
            ),
        }
    }

    /// An attribute of the first element matching `selector` (waited for).
    pub async fn attr(&self, selector: &str, name: &str) -> Option<String> {
        let e = self.wait_for(selector, PAGE_PATIENCE).await;
        match e.attr(name).await {
            Ok(v) => v,
            Err(e) => panic!(
                "reading {name:?} of {selector:?} on {}: {e}",
                self.url().await
            ),
        }
    }

    /// Clicks the first element matching `selector` (waited for).
    pub async fn click(&self, selector: &str) {
        let e = self.wait_for(selector, PAGE_PATIENCE).await;
        if let Err(e) = e.click().await {
            panic!("clicking {selector:?} on {}: {e}", self.url().await);
        }
    }

    /// Replaces the value of the input matching `selector` (waited for) with `text`, typed.
    pub async fn fill(&self, selector: &str, text: &str) {
        let e = self.wait_for(selector, PAGE_PATIENCE).await;
        if let Err(err) = e.clear().await {
            panic!("clearing {selector:?} on {}: {err}", self.url().await);
        }
        if let Err(err) = e.send_keys(text).await {
            panic!("typing into {selector:?} on {}: {err}", self.url().await);
        }
    }

    /// Resizes the window (the layout viewport follows in headless Chromium).
    pub async fn set_window_size(&self, width: u32, height: u32) {
        if let Err(e) = self.client().set_window_size(width, height).await {
            panic!("resizing the window to {width}×{height}: {e}");
        }
    }

    /// Presses and releases `key` on whatever has the focus (as a person at the keyboard).
    pub async fn press(&self, key: fantoccini::key::Key) {
        use fantoccini::actions::{InputSource as _, KeyAction, KeyActions};
        let value: char = key.into();
        let keys = KeyActions::new("keyboard".into())
            .then(KeyAction::Down { value })
            .then(KeyAction::Up { value });
        if let Err(e) = self.client().perform_actions(keys).await {
            panic!("pressing {key:?} on {}: {e}", self.url().await);
        }
    }

    /// Runs `script` (a function body: `return …`) in the page with `args` (`arguments[i]`).
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        match self.client().execute(script, args).await {
            Ok(v) => v,
            Err(e) => panic!("running a script on {}: {e}\n{script}", self.url().await),
        }
    }

    /// Waits until `script` (a function body) returns something truthy, at most `within`;
    /// returns that value. The panic says `what` was awaited, the page's URL and the last value.
    pub async fn wait_until(&self, what: &str, script: &str, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let last = match self.client().execute(script, vec![]).await {
                Ok(v) if truthy(&v) => return v,
                Ok(v) => v,
                // The page may be between documents (a form post, a redirect): try again.
                Err(e) => Value::String(format!("error: {e}")),
            };
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "{what}: not within {within:?} on {} (last value {last})",
                    self.url().await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a PNG of the viewport as `NAME.png` in [`screenshot_dir`]; returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = match self.client().screenshot().await {
            Ok(b) => b,
            Err(e) => panic!("a screenshot of {}: {e}", self.url().await),
        };
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, &png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// chromedriver's log so far (its errors say why a session or a command failed).
    pub fn driver_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ends the session (Chromium quits), then stops chromedriver.
    pub async fn close(mut self) {
        if let Some(c) = self.client.take() {
            // Best effort: Drop kills what is left either way.
            let _ = tokio::time::timeout(Duration::from_secs(10), c.close()).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.driver);
    }
}

/// Kills the process group led by `child` (chromedriver and the Chromium it started), then
/// reaps `child`.
fn kill_group(child: &mut Child) {
    // Before any wait: until chromedriver is reaped its id cannot be reused, so the group
    // signalled is ours even if chromedriver itself has exited.
    if let Ok(id) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(id),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.wait();
}

/// JavaScript's truthiness of a WebDriver answer.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}
