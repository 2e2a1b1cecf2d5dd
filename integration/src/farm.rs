//! A real dispatcher and real agents in the test process, on a [`crate::TestServer`].

use std::time::Duration;

use spine_dispatcher::DispatcherConfig;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A component running in a task of the test: stop it cleanly or kill it.
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    /// Runs `run(shutdown)` in a task; `stop` completes `shutdown`.
    pub fn spawn<F>(run: impl FnOnce(oneshot::Receiver<()>) -> F) -> Running
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<()>();
        Running {
            stop: Some(tx),
            task: tokio::spawn(run(rx)),
        }
    }

    /// Asks it to stop (agents drain, the dispatcher says goodbye).
    pub fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Drops it without ceremony: its connection goes away mid-job.
    pub fn kill(self) {
        self.task.abort();
    }
}

/// A dispatcher of `server`'s domain (`dispatcher@localhost/d1`, password `pw-d`) with its HTTP
/// API on a free loopback port; `extra` is more TOML. Returns it and the API's base URL.
pub async fn start_http_dispatcher(
    server: &impl crate::servers::Endpoint,
    dir: &std::path::Path,
    extra: &str,
) -> (Running, String) {
    let cfg = DispatcherConfig::from_toml(&format!(
        "jid = \"dispatcher@localhost/d1\"\npassword = \"pw-d\"\nserver = \"{}\"\ndata_dir = \"{}\"\nhttp_listen = \"127.0.0.1:0\"\nno_agent_wait = \"2s\"\n{extra}",
        server.endpoint(),
        dir.display()
    ))
    .expect("test dispatcher configuration");
    let d = spine_dispatcher::Dispatcher::bind(cfg)
        .await
        .expect("dispatcher binds");
    let addr = d.http_addr().expect("HTTP API address");
    let running = Running::spawn(|rx| async move {
        if let Err(e) = d
            .run(async move {
                let _ = rx.await;
            })
            .await
        {
            panic!("dispatcher failed: {e}");
        }
    });
    (running, format!("http://{addr}"))
}

/// Waits until the dispatcher at `base` lists at least `n` agents offering `capability`.
pub async fn wait_for_agents(base: &str, capability: &str, n: u64) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("HTTP client");
    let deadline = tokio::time::Instant::now() + crate::PATIENCE;
    loop {
        let body: serde_json::Value = match client
            .get(format!("{base}/v1/agents?capability={capability}"))
            .send()
            .await
        {
            Ok(r) => serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        };
        if body["agents"].as_array().map_or(0, Vec::len) as u64 >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "fewer than {n} agents for {capability}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A plain single-process word count, written apart from the example's code so that the two
/// check each other: maximal runs of Unicode letters and digits, lower-cased, as `(word,
/// count)` sorted by count (highest first) then word.
pub fn plain_word_count<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<(String, u64)> {
    let mut m: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for t in texts {
        let mut word = String::new();
        for c in t.chars().chain(std::iter::once(' ')) {
            if c.is_alphanumeric() {
                word.push(c);
            } else if !word.is_empty() {
                *m.entry(word.to_lowercase()).or_default() += 1;
                word.clear();
            }
        }
    }
    let mut v: Vec<(String, u64)> = m.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// The configuration of the test agent `agent<n>@localhost/w` (password `pw`) on `server`,
/// serving `dispatcher@localhost` with a 1 s heartbeat; `extra` is more TOML (`slots = 2`).
pub fn agent_config(
    server: &impl crate::servers::Endpoint,
    n: usize,
    extra: &str,
) -> spine_agent::AgentConfig {
    spine_agent::AgentConfig::from_toml(&format!(
        "jid = \"agent{n}@localhost/w\"\npassword = \"pw\"\nserver = \"{}\"\ndispatchers = [\"dispatcher@localhost\"]\nheartbeat = \"1s\"\n{extra}",
        server.endpoint()
    ))
    .expect("test agent configuration")
}

/// Runs an agent in a task of the test until it is stopped (it drains) or killed.
pub fn run_agent(agent: spine_agent::Agent) -> Running {
    Running::spawn(|rx| async move {
        let _ = agent
            .run(async move {
                let _ = rx.await;
            })
            .await;
    })
}

/// A loopback TCP relay in front of a server, whose connections can be cut at once: the
/// server then sees the connection drop without a stream close, as when a machine dies or
/// its network goes (a killed task or process closes its stream cleanly, or at least its
/// socket). After [`Relay::cut`] it accepts no new connection either.
pub struct Relay {
    addr: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
}

impl Relay {
    /// A relay on a free loopback port to `target`.
    pub async fn start(target: std::net::SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay");
        let addr = listener.local_addr().expect("relay address");
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = token.cancelled() => return,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => return },
                };
                let token = token.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {
                            // Reset, not a graceful close: nothing more reaches either side.
                            // (Deprecated because a non-zero linger blocks on drop; a zero
                            // linger resets at once and never blocks.)
                            #[allow(deprecated)]
                            let _ = outbound.set_linger(Some(Duration::ZERO));
                        }
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Relay { addr, stop }
    }

    /// Drops every connection through the relay and stops accepting new ones.
    pub fn cut(&self) {
        self.stop.cancel();
    }
}

impl crate::servers::Endpoint for Relay {
    fn endpoint(&self) -> std::net::SocketAddr {
        self.addr
    }
}
