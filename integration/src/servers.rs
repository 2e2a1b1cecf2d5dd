//! The same scenarios on every XMPP server Spine supports: the embedded server, Prosody and
//! ejabberd, behind one type. A test asks for [`Kind::ALL`] and runs its scenario on each
//! server that is installed; a missing Prosody or ejabberd is skipped with a printed reason,
//! or fails the test when `SPINE_REQUIRE_SERVERS=1` (as `.ci/run` sets).

use std::net::SocketAddr;

use spine_xmpp::{ConnectOptions, Connection, Security, Trust};

use crate::ejabberd::Ejabberd;
use crate::prosody::Prosody;
use crate::TestServer;

/// Which XMPP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Spine's own server, in the test process.
    Embedded,
    /// Prosody (Debian package), a child process.
    Prosody,
    /// ejabberd (Debian package), a child process.
    Ejabberd,
}

impl Kind {
    /// Every server.
    pub const ALL: [Kind; 3] = [Kind::Embedded, Kind::Prosody, Kind::Ejabberd];

    /// Its name, for test output.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Embedded => "embedded",
            Kind::Prosody => "prosody",
            Kind::Ejabberd => "ejabberd",
        }
    }
}

enum Inner {
    Embedded(TestServer),
    Prosody(Prosody),
    Ejabberd(Ejabberd),
}

/// A running XMPP server of any kind, stopped when dropped.
pub struct AnyServer {
    /// Which server.
    pub kind: Kind,
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Its domain (`localhost` for all three).
    pub domain: String,
    inner: Inner,
}

/// Whether missing servers fail tests instead of skipping them.
pub fn required() -> bool {
    std::env::var("SPINE_REQUIRE_SERVERS").as_deref() == Ok("1")
}

impl AnyServer {
    /// Starts a server of `kind` with these accounts (user, password). `None` when Prosody or
    /// ejabberd is not installed and not required: the reason is printed. Panics when it is
    /// required, or installed but does not start.
    pub async fn start(kind: Kind, accounts: &[(&str, &str)]) -> Option<AnyServer> {
        let owned: Vec<(String, String)> = accounts
            .iter()
            .map(|(u, p)| (u.to_string(), p.to_string()))
            .collect();
        let missing = |why: &str| {
            if required() {
                panic!("SPINE_REQUIRE_SERVERS=1 but {why}");
            }
            eprintln!("skipping the {} run: {why}", kind.name());
        };
        let inner = match kind {
            Kind::Embedded => Inner::Embedded(TestServer::start(accounts).await),
            Kind::Prosody => {
                if !crate::prosody::available() {
                    missing("prosody is not installed (apt-get install prosody)");
                    return None;
                }
                let p = tokio::task::spawn_blocking(move || {
                    let a: Vec<(&str, &str)> = owned
                        .iter()
                        .map(|(u, p)| (u.as_str(), p.as_str()))
                        .collect();
                    Prosody::start(&a)
                })
                .await
                .expect("prosody start task");
                Inner::Prosody(p.unwrap_or_else(|e| panic!("prosody did not start: {e}")))
            }
            Kind::Ejabberd => {
                if !crate::ejabberd::available() {
                    missing("ejabberd is not installed (apt-get install ejabberd)");
                    return None;
                }
                let e = tokio::task::spawn_blocking(move || {
                    let a: Vec<(&str, &str)> = owned
                        .iter()
                        .map(|(u, p)| (u.as_str(), p.as_str()))
                        .collect();
                    Ejabberd::start(&a)
                })
                .await
                .expect("ejabberd start task");
                Inner::Ejabberd(e.unwrap_or_else(|e| panic!("ejabberd did not start: {e}")))
            }
        };
        let (addr, domain) = match &inner {
            Inner::Embedded(s) => (s.addr, s.domain.clone()),
            Inner::Prosody(p) => (p.addr, p.domain.clone()),
            Inner::Ejabberd(e) => (e.addr, e.domain.clone()),
        };
        Some(AnyServer {
            kind,
            addr,
            domain,
            inner,
        })
    }

    /// The server's self-signed certificate (PEM): every test server has one.
    pub fn cert_pem(&self) -> &str {
        match &self.inner {
            Inner::Embedded(s) => &s.cert_pem,
            Inner::Prosody(p) => &p.cert_pem,
            Inner::Ejabberd(e) => &e.cert_pem,
        }
    }

    /// Connection options for `user`: STARTTLS, trusting the server's certificate.
    pub fn options(&self, user: &str, password: &str) -> ConnectOptions {
        ConnectOptions::new(
            format!("{user}@{}", self.domain).parse().expect("jid"),
            password,
            self.addr,
            Security::StartTls {
                trust: Trust::Pem(self.cert_pem().to_owned()),
                channel_binding: false,
            },
        )
    }

    /// Logs `user` in and sends initial presence.
    pub async fn client(&self, user: &str, password: &str) -> Connection {
        let c = spine_xmpp::connect(self.options(user, password))
            .await
            .unwrap_or_else(|e| panic!("{} login of {user}: {e}", self.kind.name()));
        c.send(xmpp_parsers::presence::Presence::available()).await;
        c
    }

    /// The server's log (Prosody and ejabberd), for failure messages.
    pub fn log(&self) -> String {
        match &self.inner {
            Inner::Embedded(_) => String::new(),
            Inner::Prosody(p) => p.log(),
            Inner::Ejabberd(e) => e.log(),
        }
    }
}

/// Something Spine components connect to: its client address.
pub trait Endpoint {
    /// Where clients connect.
    fn endpoint(&self) -> SocketAddr;
}

impl Endpoint for TestServer {
    fn endpoint(&self) -> SocketAddr {
        self.addr
    }
}

impl Endpoint for AnyServer {
    fn endpoint(&self) -> SocketAddr {
        self.addr
    }
}

impl Endpoint for Ejabberd {
    fn endpoint(&self) -> SocketAddr {
        self.addr
    }
}
