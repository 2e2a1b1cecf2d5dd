//! Connectors for tokio-xmpp: plain TCP and STARTTLS, both with `TCP_NODELAY`, both reading
//! through the nesting limit of [`crate::guard`].

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::guard::DepthFiltered;
use futures::{SinkExt, StreamExt};
use rustls_pki_types::ServerName;
use sasl::common::ChannelBinding;
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, ClientConfig};
use tokio_rustls::TlsConnector;
use tokio_xmpp::connect::ServerConnector;
use tokio_xmpp::jid::Jid;
use tokio_xmpp::parsers::starttls;
use tokio_xmpp::xmlstream::{
    initiate_stream, PendingFeaturesRecv, ReadError, StreamHeader, Timeouts, XmlStream,
    XmppStreamElement,
};

pub use spine_tls::Trust;

fn io_err(e: impl std::fmt::Display) -> tokio_xmpp::Error {
    tokio_xmpp::Error::Io(std::io::Error::other(e.to_string()))
}

async fn tcp(addr: SocketAddr) -> Result<TcpStream, tokio_xmpp::Error> {
    let s = TcpStream::connect(addr).await?;
    // Nagle plus delayed ACK costs ~40 ms per request/response on loopback.
    s.set_nodelay(true)?;
    Ok(s)
}

fn header(jid: &Jid) -> StreamHeader<'static> {
    StreamHeader {
        to: Some(Cow::Owned(jid.domain().as_str().to_owned())),
        from: None,
        id: None,
    }
}

/// Plain TCP (loopback, or explicitly insecure).
#[derive(Debug, Clone)]
pub struct PlainConnector {
    /// Server address.
    pub addr: SocketAddr,
}

impl ServerConnector for PlainConnector {
    type Stream = BufStream<DepthFiltered<TcpStream>>;
    async fn connect(
        &self,
        jid: &Jid,
        ns: &'static str,
        timeouts: Timeouts,
    ) -> Result<(PendingFeaturesRecv<Self::Stream>, ChannelBinding), tokio_xmpp::Error> {
        let s = DepthFiltered::new(tcp(self.addr).await?);
        let pending = initiate_stream(BufStream::new(s), ns, header(jid), timeouts).await?;
        Ok((pending, ChannelBinding::None))
    }
}

/// STARTTLS with a rustls configuration of our own (ring provider, explicit trust store).
#[derive(Clone)]
pub struct StartTlsConnector {
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    channel_binding: bool,
}

impl std::fmt::Debug for StartTlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StartTlsConnector({})", self.addr)
    }
}

impl StartTlsConnector {
    /// A connector trusting `trust`. `channel_binding`: offer tls-exporter binding to SASL, so
    /// that SCRAM-*-PLUS is used (without it tokio-xmpp picks plain SCRAM).
    pub fn new(addr: SocketAddr, trust: &Trust, channel_binding: bool) -> Result<Self, String> {
        // The shared set-up (ring, explicit trust store): `ca_file` means the same here as
        // for the HTTP clients.
        let config = spine_tls::client_config(trust).map_err(|e| match e {
            spine_tls::TlsError::SystemStore { .. } => format!("{e} (tls.ca_file)"),
            e => e.to_string(),
        })?;
        Ok(StartTlsConnector {
            addr,
            config: Arc::new(config),
            channel_binding,
        })
    }
}

impl ServerConnector for StartTlsConnector {
    type Stream = BufStream<DepthFiltered<TlsStream<TcpStream>>>;
    async fn connect(
        &self,
        jid: &Jid,
        ns: &'static str,
        timeouts: Timeouts,
    ) -> Result<(PendingFeaturesRecv<Self::Stream>, ChannelBinding), tokio_xmpp::Error> {
        let s = DepthFiltered::new(tcp(self.addr).await?);
        let pending = initiate_stream(BufStream::new(s), ns, header(jid), timeouts).await?;
        let (features, mut xs): (_, XmlStream<_, XmppStreamElement>) =
            pending.recv_features().await?;
        if !features.can_starttls() {
            return Err(tokio_xmpp::Error::Protocol(
                tokio_xmpp::error::ProtocolError::NoTls,
            ));
        }
        xs.send(&XmppStreamElement::Starttls(starttls::Nonza::Request(
            starttls::Request,
        )))
        .await?;
        loop {
            match xs.next().await {
                Some(Ok(XmppStreamElement::Starttls(starttls::Nonza::Proceed(_)))) => break,
                Some(Ok(other)) => {
                    return Err(io_err(format!("expected <proceed/>, got {other:?}")))
                }
                Some(Err(ReadError::SoftTimeout)) => {}
                Some(Err(e)) => return Err(io_err(e)),
                None => return Err(tokio_xmpp::Error::Disconnected),
            }
        }
        // The server sends nothing after <proceed/> until the TLS handshake: buffer is empty.
        let s = xs.into_inner().into_inner().into_inner();
        let name = ServerName::try_from(jid.domain().as_str().to_owned()).map_err(io_err)?;
        let tls = TlsConnector::from(self.config.clone())
            .connect(name, s)
            .await?;
        let binding = match tls.get_ref().1.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) if self.channel_binding => {
                let data = tls
                    .get_ref()
                    .1
                    .export_keying_material(vec![0u8; 32], b"EXPORTER-Channel-Binding", None)
                    .map_err(io_err)?;
                ChannelBinding::TlsExporter(data)
            }
            // Without binding tokio-xmpp's SASL client picks plain SCRAM (XMPP-NOTES trap 10).
            _ => ChannelBinding::None,
        };
        let pending = initiate_stream(
            BufStream::new(DepthFiltered::new(tls)),
            ns,
            header(jid),
            timeouts,
        )
        .await?;
        Ok((pending, binding))
    }
}
