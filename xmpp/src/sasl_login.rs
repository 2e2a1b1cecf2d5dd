//! SASL authentication of a client, with the checks tokio-xmpp's `client_login` leaves out.
//!
//! tokio-xmpp 6 (`client::login::auth`) tries SCRAM, then PLAIN, then ANONYMOUS, whichever the
//! server lists, over any transport, and on `<success/>` returns without looking at the
//! server's final SCRAM message. A fake server on a loopback address therefore got an agent's
//! password through PLAIN on plain TCP, and a bogus `<success/>` was accepted. Here:
//!
//! - PLAIN is used only over TLS, or on plain TCP when the operator explicitly allowed
//!   credentials in clear (`tls.mode = "insecure-plain"`); ANONYMOUS never;
//! - SCRAM's server signature (`v=` in `<success/>`) is verified: a server that does not know
//!   the password cannot complete the login;
//! - SCRAM-*-PLUS with `tls-exporter` channel binding is used when the TLS session is 1.3 and
//!   the server both offers -PLUS and lists `tls-exporter` among its channel-binding types
//!   (XEP-0440), so a man in the middle with a trusted certificate still cannot relay the login.

use std::str::FromStr;

use futures::{SinkExt, StreamExt};
use sasl::client::mechanisms::{Plain, Scram};
use sasl::client::Mechanism;
use sasl::common::scram::{Sha1, Sha256};
use sasl::common::{ChannelBinding, Credentials};
use tokio::io::{AsyncBufRead, AsyncWrite};
use tokio_xmpp::parsers::sasl::{Auth, Mechanism as XmppMechanism, Nonza, Response};
use tokio_xmpp::parsers::stream_features::StreamFeatures;
use tokio_xmpp::xmlstream::{InitiatingStream, ReadError, XmppStream, XmppStreamElement};

/// What the transport under the login is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// TLS with a verified server certificate.
    Tls,
    /// Plain TCP; PLAIN allowed only if the operator said so.
    Clear {
        /// Credentials in clear were explicitly allowed.
        allow_plain: bool,
    },
}

/// Why the login failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SaslError {
    /// The server refused the credentials.
    #[error("the server refused the credentials ({0})")]
    Refused(String),
    /// Our side of the exchange failed, or the server's proof was wrong.
    #[error("{0}")]
    Mechanism(String),
    /// Nothing the server offers is acceptable on this transport.
    #[error("{0}")]
    NoMechanism(String),
    /// The stream failed.
    #[error("{0}")]
    Stream(String),
}

impl SaslError {
    /// Whether retrying with the same settings is unlikely to help.
    pub(crate) fn is_auth(&self) -> bool {
        !matches!(self, SaslError::Stream(_))
    }
}

fn mech_error(e: sasl::client::MechanismError) -> SaslError {
    use sasl::client::MechanismError as E;
    match e {
        E::InvalidSignatureInSuccessResponse | E::NoSignatureInSuccessResponse => {
            SaslError::Mechanism(format!(
                "the server's SCRAM proof is missing or wrong ({e}): it does not know this \
                 account's password, so it is not the server this account belongs to"
            ))
        }
        other => SaslError::Mechanism(format!("SASL: {other}")),
    }
}

/// The mechanisms to try, best first, for what the server offers on this transport.
fn choose(
    features: &StreamFeatures,
    transport: Transport,
    exporter: Option<&[u8]>,
    user: &str,
    password: &str,
) -> Result<Vec<Box<dyn Mechanism + Send>>, SaslError> {
    let offered = &features.sasl_mechanisms;
    let server_binds_exporter = features.sasl_cb.as_ref().is_some_and(|cb| {
        cb.types
            .iter()
            .any(|t| matches!(t, tokio_xmpp::parsers::sasl_cb::Type::TlsExporter))
    });
    let creds = |binding: ChannelBinding| {
        Credentials::default()
            .with_username(user)
            .with_password(password)
            .with_channel_binding(binding)
    };
    let scram_err = |e: sasl::client::MechanismError| mech_error(e);
    let mut out: Vec<Box<dyn Mechanism + Send>> = Vec::new();
    if let (Some(data), true) = (exporter, server_binds_exporter) {
        let binding = ChannelBinding::TlsExporter(data.to_vec());
        if offered.contains("SCRAM-SHA-256-PLUS") {
            out.push(Box::new(
                Scram::<Sha256>::from_credentials(creds(binding.clone())).map_err(scram_err)?,
            ));
        }
        if offered.contains("SCRAM-SHA-1-PLUS") {
            out.push(Box::new(
                Scram::<Sha1>::from_credentials(creds(binding)).map_err(scram_err)?,
            ));
        }
    }
    if offered.contains("SCRAM-SHA-256") {
        out.push(Box::new(
            Scram::<Sha256>::from_credentials(creds(ChannelBinding::None)).map_err(scram_err)?,
        ));
    }
    if offered.contains("SCRAM-SHA-1") {
        out.push(Box::new(
            Scram::<Sha1>::from_credentials(creds(ChannelBinding::None)).map_err(scram_err)?,
        ));
    }
    let plain_ok = match transport {
        Transport::Tls => true,
        Transport::Clear { allow_plain } => allow_plain,
    };
    if offered.contains("PLAIN") && plain_ok {
        out.push(Box::new(
            Plain::from_credentials(creds(ChannelBinding::None)).map_err(scram_err)?,
        ));
    }
    if out.is_empty() {
        let list: Vec<&str> = offered.iter().map(String::as_str).collect();
        let why = if offered.contains("PLAIN") && !plain_ok {
            "the server offers only PLAIN on an unencrypted connection, which would send the \
             password in clear: use TLS (tls.mode = \"required\"), or allow it explicitly with \
             tls.mode = \"insecure-plain\""
                .to_owned()
        } else {
            "none of SCRAM-SHA-256, SCRAM-SHA-1 or (over TLS) PLAIN is offered".to_owned()
        };
        return Err(SaslError::NoMechanism(format!(
            "no acceptable SASL mechanism (server offers: {}): {why}",
            if list.is_empty() {
                "none".to_owned()
            } else {
                list.join(", ")
            }
        )));
    }
    Ok(out)
}

/// Authenticates on `stream` with the first acceptable mechanism the server offers. On
/// success the stream is returned for the restart that follows SASL.
pub(crate) async fn login<S: AsyncBufRead + AsyncWrite + Unpin>(
    mut stream: XmppStream<S>,
    features: &StreamFeatures,
    transport: Transport,
    exporter: Option<&[u8]>,
    user: &str,
    password: &str,
) -> Result<InitiatingStream<S>, SaslError> {
    let stream_err = |e: std::io::Error| SaslError::Stream(e.to_string());
    // The first acceptable mechanism is the one used: trying the next after a refusal would
    // only give a guesser more attempts.
    let mut mechanism = choose(features, transport, exporter, user, password)?
        .into_iter()
        .next()
        .ok_or_else(|| SaslError::NoMechanism("no mechanism".into()))?;
    let name = XmppMechanism::from_str(mechanism.name())
        .map_err(|e| SaslError::Mechanism(format!("mechanism {}: {e}", mechanism.name())))?;
    stream
        .send(&XmppStreamElement::Sasl(Nonza::Auth(Auth {
            mechanism: name,
            data: mechanism.initial(),
        })))
        .await
        .map_err(stream_err)?;
    loop {
        let item = stream
            .next()
            .await
            .map(|v| v.and_then(|v| v.into_read_error()));
        match item {
            Some(Ok(XmppStreamElement::Sasl(Nonza::Challenge(c)))) => {
                let data = mechanism.response(&c.data).map_err(mech_error)?;
                stream
                    .send(&XmppStreamElement::Sasl(Nonza::Response(Response { data })))
                    .await
                    .map_err(stream_err)?;
            }
            Some(Ok(XmppStreamElement::Sasl(Nonza::Success(s)))) => {
                // SCRAM checks the server's signature here; PLAIN has nothing to check.
                mechanism.success(&s.data).map_err(mech_error)?;
                return Ok(stream.initiate_reset());
            }
            Some(Ok(XmppStreamElement::Sasl(Nonza::Failure(f)))) => {
                let mut why = format!("{:?}", f.defined_condition);
                if let Some(text) = f.texts.values().next() {
                    why = format!("{why}: {text}");
                }
                return Err(SaslError::Refused(why));
            }
            Some(Ok(other)) => {
                return Err(SaslError::Stream(format!(
                    "unexpected element during SASL negotiation: {other:?}"
                )))
            }
            Some(Err(ReadError::SoftTimeout)) => {}
            Some(Err(ReadError::HardError(e))) => return Err(stream_err(e)),
            Some(Err(ReadError::ParseError(e))) => return Err(SaslError::Stream(e.to_string())),
            Some(Err(ReadError::StreamFooterReceived)) | None => {
                return Err(SaslError::Stream(
                    "the server closed the stream during authentication".into(),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offering(mechs: &[&str], exporter_cb: bool) -> StreamFeatures {
        StreamFeatures {
            sasl_mechanisms: mechs.iter().map(|m| (*m).to_owned()).collect(),
            sasl_cb: exporter_cb.then(|| tokio_xmpp::parsers::sasl_cb::SaslChannelBinding {
                types: vec![tokio_xmpp::parsers::sasl_cb::Type::TlsExporter],
            }),
            ..Default::default()
        }
    }

    fn names(f: &StreamFeatures, t: Transport, exporter: Option<&[u8]>) -> Vec<String> {
        match choose(f, t, exporter, "u", "p") {
            Ok(v) => v.iter().map(|m| m.name().to_owned()).collect(),
            Err(e) => vec![format!("error: {e}")],
        }
    }

    #[test]
    fn plain_only_over_tls_or_when_allowed_and_never_anonymous() {
        let clear = Transport::Clear { allow_plain: false };
        let only_plain = offering(&["PLAIN", "ANONYMOUS"], false);
        let e = names(&only_plain, clear, None);
        assert!(
            e[0].contains("only PLAIN on an unencrypted connection"),
            "{e:?}"
        );
        assert_eq!(names(&only_plain, Transport::Tls, None), ["PLAIN"]);
        assert_eq!(
            names(&only_plain, Transport::Clear { allow_plain: true }, None),
            ["PLAIN"]
        );
        let anon = offering(&["ANONYMOUS"], false);
        assert!(names(&anon, Transport::Tls, None)[0].starts_with("error"));
        let all = offering(&["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256"], false);
        assert_eq!(names(&all, clear, None), ["SCRAM-SHA-256", "SCRAM-SHA-1"]);
    }

    #[test]
    fn plus_only_with_an_exporter_the_server_lists() {
        let plus = ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "PLAIN"];
        let x = [7u8; 32];
        assert_eq!(
            names(&offering(&plus, true), Transport::Tls, Some(&x)),
            ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "PLAIN"]
        );
        // Offered -PLUS without tls-exporter listed (tls-unique only, say): plain SCRAM.
        assert_eq!(
            names(&offering(&plus, false), Transport::Tls, Some(&x)),
            ["SCRAM-SHA-256", "PLAIN"]
        );
        // No exporter (TLS 1.2, or binding off): plain SCRAM.
        assert_eq!(
            names(&offering(&plus, true), Transport::Tls, None),
            ["SCRAM-SHA-256", "PLAIN"]
        );
    }
}
