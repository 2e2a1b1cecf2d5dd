//! Test support for Spine's end-to-end tests: real servers on loopback port 0, real clients.
//!
//! [`TestServer`] runs the embedded XMPP server in the test's runtime and shuts it down on
//! `Drop`. [`RawClient`] speaks XMPP by hand over plain TCP (loopback only), for the tests that
//! must send what no well-behaved library sends: spoofed `from`, garbage bytes, oversized
//! stanzas, or a socket dropped without a stream close.

pub mod bench;
pub mod browser;
pub mod dispatcher;
pub mod ejabberd;
pub mod farm;
pub mod pki;
pub mod postgres;
pub mod prosody;
pub mod servers;
pub mod swarm;

use std::net::SocketAddr;
use std::time::Duration;

use spine_server::{Server, ServerConfig};
use spine_xmpp::{ConnectOptions, Connection, Security, Trust};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_xmpp::stanzastream::Event;
use tokio_xmpp::Stanza;

/// How long a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// The embedded server on 127.0.0.1:0, running until dropped.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its self-signed certificate.
    pub cert_pem: String,
    /// Its domain.
    pub domain: String,
    /// Its counters of refused connections and logins.
    pub admission: std::sync::Arc<spine_server::AdmissionStats>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server with these accounts (user, password).
    pub async fn start(accounts: &[(&str, &str)]) -> TestServer {
        Self::start_with(accounts, |_| {}).await
    }

    /// Starts a server with these accounts, after `tune` adjusted the configuration.
    pub async fn start_with(
        accounts: &[(&str, &str)],
        tune: impl FnOnce(&mut ServerConfig),
    ) -> TestServer {
        init_tracing();
        let mut toml = String::from("listen = \"127.0.0.1:0\"\ndomain = \"localhost\"\n");
        for (u, p) in accounts {
            toml.push_str(&format!(
                "[[account]]\nuser = \"{u}\"\npassword = \"{p}\"\n"
            ));
        }
        let mut cfg = ServerConfig::from_toml(&toml).expect("test config");
        tune(&mut cfg);
        let server = Server::bind(cfg).await.expect("bind test server");
        let (tx, rx) = oneshot::channel::<()>();
        let addr = server.local_addr();
        let cert_pem = server.cert_pem().to_owned();
        let domain = server.domain().to_owned();
        let admission = server.admission_stats();
        let task = tokio::spawn(async move {
            if let Err(e) = server
                .run(async {
                    let _ = rx.await;
                })
                .await
            {
                panic!("test server failed: {e}");
            }
        });
        TestServer {
            addr,
            cert_pem,
            domain,
            admission,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Options for `user` over STARTTLS trusting this server's certificate.
    pub fn tls_options(&self, user: &str, password: &str) -> ConnectOptions {
        ConnectOptions::new(
            format!("{user}@{}", self.domain).parse().expect("jid"),
            password,
            self.addr,
            Security::StartTls {
                trust: Trust::Pem(self.cert_pem.clone()),
                channel_binding: false,
            },
        )
    }

    /// Logs `user` in over STARTTLS + SCRAM and sends initial presence.
    pub async fn client(&self, user: &str, password: &str) -> Connection {
        let c = spine_xmpp::connect(self.tls_options(user, password))
            .await
            .expect("client login");
        c.send(xmpp_parsers::presence::Presence::available()).await;
        c
    }

    /// Stops the server and waits for it to finish closing every stream.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(PATIENCE, t).await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Waits for the first stanza on `conn` that `pick` accepts (other events are skipped).
pub async fn expect_stanza<T>(
    conn: &mut Connection,
    what: &str,
    mut pick: impl FnMut(Stanza) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, conn.next()).await {
            Ok(Some(Event::Stanza(st))) => {
                if let Some(v) = pick(st) {
                    return v;
                }
            }
            Ok(Some(Event::Stream(_))) => {}
            Ok(None) => panic!("connection closed while waiting for {what}"),
            Err(_) => panic!("no {what} within {PATIENCE:?}"),
        }
    }
}

/// A hand-driven XMPP client over plain TCP on loopback.
pub struct RawClient {
    /// The socket.
    pub tcp: TcpStream,
    /// Bytes received and not yet consumed by [`RawClient::read_until`].
    pub buf: String,
    /// The bound full JID.
    pub jid: String,
}

impl RawClient {
    /// Opens a stream and reads the features, without logging in.
    pub async fn open(addr: SocketAddr, domain: &str) -> RawClient {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        Self::open_on(tcp, domain).await
    }

    /// [`RawClient::open`] from the loopback address `from` (127.0.0.2, 127.0.0.3, …), so
    /// that a test can be several clients' addresses at once.
    pub async fn open_from(addr: SocketAddr, domain: &str, from: std::net::IpAddr) -> RawClient {
        Self::open_on(connect_from(addr, from).await.expect("connect"), domain).await
    }

    async fn open_on(tcp: TcpStream, domain: &str) -> RawClient {
        tcp.set_nodelay(true).expect("nodelay");
        let mut c = RawClient {
            tcp,
            buf: String::new(),
            jid: String::new(),
        };
        c.send(&format!("<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='{domain}' version='1.0'>")).await;
        c.read_until("</stream:features>").await;
        c
    }

    /// Logs in with SASL PLAIN (allowed on loopback without TLS), binds `resource` and sends
    /// initial presence.
    pub async fn login(
        addr: SocketAddr,
        domain: &str,
        user: &str,
        password: &str,
        resource: &str,
    ) -> RawClient {
        Self::login_sending(addr, domain, user, password, resource, "").await
    }

    /// [`RawClient::login`], with `early` written in the same write as the bind request and the
    /// initial presence, before the bind's answer (a client that pipelines).
    pub async fn login_sending(
        addr: SocketAddr,
        domain: &str,
        user: &str,
        password: &str,
        resource: &str,
        early: &str,
    ) -> RawClient {
        use base64::Engine as _;
        let mut c = Self::open(addr, domain).await;
        let creds =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        c.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{creds}</auth>"
        ))
        .await;
        c.read_until("<success").await;
        c.restart_and_bind_sending(domain, user, resource, early)
            .await;
        c
    }

    /// Logs in with SASL SCRAM-SHA-1 (what every server offers on plain loopback TCP, where
    /// Prosody and ejabberd may not offer PLAIN), binds `resource` and sends initial presence.
    pub async fn login_scram(
        addr: SocketAddr,
        domain: &str,
        user: &str,
        password: &str,
        resource: &str,
    ) -> RawClient {
        use base64::Engine as _;
        use sasl::client::Mechanism as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut c = Self::open(addr, domain).await;
        let creds = sasl::common::Credentials::default()
            .with_username(user)
            .with_password(password)
            .with_channel_binding(sasl::common::ChannelBinding::None);
        let mut scram =
            sasl::client::mechanisms::Scram::<sasl::common::scram::Sha1>::from_credentials(creds)
                .expect("SCRAM client");
        c.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>{}</auth>",
            b64.encode(scram.initial())
        ))
        .await;
        c.read_until("<challenge").await;
        let challenge = c.read_until("</challenge>").await;
        let data = challenge
            .trim_end_matches("</challenge>")
            .rsplit('>')
            .next()
            .unwrap_or_default()
            .to_owned();
        let response = scram
            .response(&b64.decode(data.trim()).expect("challenge base64"))
            .expect("SCRAM response");
        c.send(&format!(
            "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
            b64.encode(response)
        ))
        .await;
        c.read_until("<success").await;
        c.read_until(">").await;
        c.restart_and_bind(domain, user, resource).await;
        c
    }

    async fn restart_and_bind(&mut self, domain: &str, user: &str, resource: &str) {
        self.restart_and_bind_sending(domain, user, resource, "")
            .await
    }

    async fn restart_and_bind_sending(
        &mut self,
        domain: &str,
        user: &str,
        resource: &str,
        early: &str,
    ) {
        self.send(&format!("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='{domain}' version='1.0'>")).await;
        self.read_until("</stream:features>").await;
        let bind = format!("<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>");
        if early.is_empty() {
            self.send(&bind).await;
        } else {
            self.send(&format!("{bind}<presence/>{early}")).await;
        }
        let got = self.read_until("</iq>").await;
        assert!(
            got.contains("type='result'") || got.contains("type=\"result\""),
            "bind failed: {got}"
        );
        self.jid = format!("{user}@{domain}/{resource}");
        if early.is_empty() {
            self.send("<presence/>").await;
        }
    }

    /// Writes raw bytes.
    pub async fn send(&mut self, data: &str) {
        self.tcp
            .write_all(data.as_bytes())
            .await
            .expect("raw write");
    }

    /// Reads until `needle` appears; returns everything up to and including it.
    pub async fn read_until(&mut self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(i) = self.buf.find(needle) {
                let rest = self.buf.split_off(i + needle.len());
                return std::mem::replace(&mut self.buf, rest);
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk)).await {
                Ok(Ok(0)) => panic!(
                    "connection closed before {needle:?}; received: {}",
                    self.buf
                ),
                Ok(Ok(n)) => self.buf.push_str(&String::from_utf8_lossy(&chunk[..n])),
                Ok(Err(e)) => panic!("read error before {needle:?}: {e}; received: {}", self.buf),
                Err(_) => panic!("no {needle:?} within {PATIENCE:?}; received: {}", self.buf),
            }
        }
    }

    /// Reads up to the end of the IQ whose id is `id` (written `<iq …/>` or `<iq …>…</iq>`,
    /// either quote); returns everything up to it.
    pub async fn read_iq(&mut self, id: &str) -> String {
        let marks = [format!("id='{id}'"), format!("id=\"{id}\"")];
        loop {
            let head = marks.iter().filter_map(|m| self.buf.find(m.as_str())).min();
            if let Some(at) = head {
                let end = self.buf[at..].find('>').map(|gt| at + gt);
                let close = match end {
                    Some(gt) if self.buf[..gt].ends_with('/') => Some(gt + 1),
                    Some(gt) => self.buf[gt..].find("</iq>").map(|c| gt + c + "</iq>".len()),
                    None => None,
                };
                if let Some(close) = close {
                    let rest = self.buf.split_off(close);
                    return std::mem::replace(&mut self.buf, rest);
                }
            }
            self.read_more(&format!("the end of IQ {id}")).await;
        }
    }

    /// Reads what arrives next into the buffer; panics after [`PATIENCE`] without any.
    async fn read_more(&mut self, what: &str) {
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(PATIENCE, self.tcp.read(&mut chunk)).await {
            Ok(Ok(0)) => panic!("connection closed before {what}; received: {}", self.buf),
            Ok(Ok(n)) => self.buf.push_str(&String::from_utf8_lossy(&chunk[..n])),
            Ok(Err(e)) => panic!("read error before {what}: {e}; received: {}", self.buf),
            Err(_) => panic!("no {what} within {PATIENCE:?}; received: {}", self.buf),
        }
    }

    /// Reads for at most `within` or until the server closes the connection; returns what
    /// was received.
    pub async fn read_to_close_or(&mut self, within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.push_str(&String::from_utf8_lossy(&chunk[..n])),
                _ => return std::mem::take(&mut self.buf),
            }
        }
    }

    /// Reads until the server closes the connection; returns everything received.
    pub async fn read_to_close(&mut self) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return std::mem::take(&mut self.buf),
                Ok(Ok(n)) => self.buf.push_str(&String::from_utf8_lossy(&chunk[..n])),
                Err(_) => panic!(
                    "server did not close within {PATIENCE:?}; received: {}",
                    self.buf
                ),
            }
        }
    }
}

/// A TCP connection to `addr` from the local address `from` (a loopback address other than
/// 127.0.0.1, to be another client machine as far as the server can tell).
pub async fn connect_from(addr: SocketAddr, from: std::net::IpAddr) -> std::io::Result<TcpStream> {
    let socket = match from {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(addr).await
}

/// The `X-Hub-Signature-256` value of `body` under a webhook's `secret`: `sha256=` and the
/// hex HMAC-SHA256, as GitHub signs.
pub fn webhook_signature(secret: &str, body: &[u8]) -> String {
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

/// A free loopback port: bind port 0, read the port, release it. For servers that cannot
/// report the port they bound (Prosody, ejabberd); the window before they bind it is small.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The repository's root directory.
pub fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A Python interpreter that can import slixmpp — `SPINE_PYTHON`, or `.venv/bin/python` at the
/// repository root (`.ci/run` creates it) — or why there is none.
pub fn python() -> Result<std::path::PathBuf, String> {
    let candidates: Vec<std::path::PathBuf> = match std::env::var_os("SPINE_PYTHON") {
        Some(p) => vec![std::path::PathBuf::from(p)],
        None => vec![repo_root().join(".venv/bin/python")],
    };
    for p in &candidates {
        let ok = std::process::Command::new(p)
            .args(["-c", "import slixmpp"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(p.clone());
        }
    }
    Err(format!(
        "no Python with slixmpp at {candidates:?} (set SPINE_PYTHON or run .ci/run once)"
    ))
}

/// Waits until a server child process accepts TCP connections on `addr`; the error says
/// whether it exited or was too slow, with its log.
pub fn wait_listening(
    name: &str,
    addr: std::net::SocketAddr,
    child: &mut std::process::Child,
    within: Duration,
    log: impl Fn() -> String,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + within;
    while std::net::TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{name} exited at start ({status}); log: {}", log()));
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "{name} did not listen on {addr} within {within:?}; log: {}",
                log()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
