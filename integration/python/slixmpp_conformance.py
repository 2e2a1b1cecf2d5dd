#!/usr/bin/env python3
"""Third-party-client conformance check for Spine's embedded XMPP server.

Logs in to the server with slixmpp (a widely used Python XMPP client library)
over STARTTLS + SASL SCRAM and runs six checks against the server and a peer
client (the "target", a Rust responder connected to the same server):

  1. iq-roundtrip       jabber:iq:version get to the target, answered by it
  2. iq-offline         ping to an unconnected full JID -> service-unavailable
  3. server-ping        XEP-0199 ping to the server domain
  4. server-disco       XEP-0030 disco#info to the server domain
  5. message            chat message to the target, echoed back with "echo: "
  6. directed-presence  directed presence to the target, answered with "seen"

Every check prints exactly one line, `CHECK <name>: ok` or
`CHECK <name>: FAIL <reason>`. Informational lines start with `INFO `. The last
line is `conformance: all checks passed` or `conformance: N of 6 checks failed`.
The exit code is 0 only when every check passed. slixmpp's own logging goes to
stderr (warnings only, unless --verbose is given).

Usage:
  slixmpp_conformance.py --addr 127.0.0.1:PORT --jid USER@localhost/RES \
      --password PW --ca CERT.pem --target FULL_JID [--timeout 10]
"""

import argparse
import asyncio
import logging
import ssl
import sys
from pathlib import Path
from typing import Awaitable, Callable, Optional

import slixmpp
from slixmpp import JID
from slixmpp.exceptions import IqError, IqTimeout

# The checks, in the order they run. The summary line counts against this list.
CHECKS = [
    "iq-roundtrip",
    "iq-offline",
    "server-ping",
    "server-disco",
    "message",
    "directed-presence",
]

# What the peer (the Rust responder) is expected to answer with.
RESPONDER_NAME = "spine-responder"
MESSAGE_BODY = "conformance"
ECHO_BODY = "echo: " + MESSAGE_BODY
PRESENCE_STATUS = "seen"

# A full JID on the server's domain that no client is connected as.
OFFLINE_LOCALPART, OFFLINE_RESOURCE = "nobody", "gone"

# Only SCRAM is acceptable for this check. The -PLUS variants are listed so that
# slixmpp may use channel binding where it can (it cannot over TLS 1.3, where
# Python's ssl module offers no tls-exporter binding; slixmpp then falls back).
SCRAM_MECHANISMS = {
    "SCRAM-SHA-1",
    "SCRAM-SHA-1-PLUS",
    "SCRAM-SHA-256",
    "SCRAM-SHA-256-PLUS",
    "SCRAM-SHA-512",
    "SCRAM-SHA-512-PLUS",
}

VERSION_NS = "jabber:iq:version"


def out(line: str) -> None:
    """Print one line of the report, flushed at once (stdout is usually a pipe)."""
    print(line, flush=True)


class CheckFailed(Exception):
    """Raised inside a check with the human-readable reason for the failure."""


class ConformanceClient(slixmpp.ClientXMPP):
    """A slixmpp client that records how login went and queues what it receives."""

    def __init__(self, jid: str, password: str, ca: Path):
        # SASL: SCRAM only, and never over an unencrypted stream (slixmpp's
        # default already refuses unencrypted SCRAM; it is spelled out here).
        # The SASL plugin is loaded by ClientXMPP itself, so its configuration
        # has to be handed over at construction time.
        sasl_config = {"use_mechs": set(SCRAM_MECHANISMS), "unencrypted_scram": False}
        super().__init__(jid, password, plugin_config={"feature_mechanisms": sasl_config})

        # Connection policy: plain TCP to the given address, then STARTTLS.
        # Direct TLS (XEP-0368) and unencrypted streams are never attempted.
        self.enable_direct_tls = False
        self.enable_starttls = True
        self.enable_plaintext = False

        # Trust only the server's certificate, not the system CA store, and check
        # the name in it against the JID's domain (slixmpp's server_hostname).
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ssl_context = context
        self.ca_certs = ca

        self.register_plugin("xep_0030")  # service discovery
        self.register_plugin("xep_0199")  # ping (also answers pings sent to us)

        # Login outcome: resolved with None on session start, or with a reason.
        self.login: asyncio.Future = self.loop.create_future()
        # Resolved with a reason once the stream is gone (for any cause).
        self.closed: asyncio.Future = self.loop.create_future()
        self.sasl_mechanism: Optional[str] = None
        self.stream_error: Optional[str] = None

        # Stanzas that arrive unsolicited; the checks read them from these queues.
        self.messages: asyncio.Queue = asyncio.Queue()
        self.presences: asyncio.Queue = asyncio.Queue()

        self.add_event_handler("auth_success", self._on_auth_success)
        self.add_event_handler("failed_auth", self._on_failed_auth)
        self.add_event_handler("failed_all_auth", self._on_failed_all_auth)
        self.add_event_handler("connection_failed", self._on_connection_failed)
        self.add_event_handler("ssl_invalid_chain", self._on_invalid_chain)
        self.add_event_handler("stream_error", self._on_stream_error)
        self.add_event_handler("disconnected", self._on_disconnected)
        self.add_event_handler("session_start", self._on_session_start)
        self.add_event_handler("message", self.messages.put_nowait)
        self.add_event_handler("message_error", self.messages.put_nowait)
        self.add_event_handler("presence", self.presences.put_nowait)

    # -- login bookkeeping --------------------------------------------------

    def _fail_login(self, reason: str) -> None:
        if not self.login.done():
            self.login.set_result(reason)

    def _on_auth_success(self, _stanza) -> None:
        mech = self.plugin["feature_mechanisms"].mech
        self.sasl_mechanism = getattr(mech, "name", None)

    def _on_failed_auth(self, stanza) -> None:
        # slixmpp tries the next acceptable mechanism after a failure; only the
        # last failure (failed_all_auth) ends the login.
        mech = self.plugin["feature_mechanisms"].mech
        out(f"INFO sasl: {getattr(mech, 'name', '?')} rejected: "
            f"{stanza['condition'] or 'no condition'}")

    def _on_failed_all_auth(self, _event) -> None:
        offered = sorted(self.plugin["feature_mechanisms"].mech_list)
        tls = "yes" if self._tls_object() is not None else "no"
        self._fail_login(
            f"SASL authentication failed or no acceptable mechanism "
            f"(server offered {offered or 'none'}; TLS active: {tls})")
        self.abort()

    def _on_connection_failed(self, error) -> None:
        # slixmpp would retry forever; a conformance check gives up at once.
        self._fail_login(f"connection failed: {error}")
        self.cancel_connection_attempt()

    def _on_invalid_chain(self, error) -> None:
        self._fail_login(f"TLS certificate verification failed: {error}")
        self.abort()

    def _on_stream_error(self, error) -> None:
        self.stream_error = f"{error['condition']} {error['text']}".strip()
        self._fail_login(f"stream error: {self.stream_error}")

    def _on_disconnected(self, reason) -> None:
        detail = self.stream_error or reason or "connection closed"
        self._fail_login(f"disconnected before the session started: {detail}")
        if not self.closed.done():
            self.closed.set_result(f"stream closed: {detail}")

    def _on_session_start(self, _event) -> None:
        if "starttls" not in self.features or self._tls_object() is None:
            # Cannot happen with SCRAM refused over plain streams, but a
            # conformance check states what it relies on.
            self._fail_login("session started without STARTTLS")
            self.abort()
            return
        if not self.login.done():
            self.login.set_result(None)

    def _tls_object(self) -> Optional[ssl.SSLObject]:
        sock = getattr(self, "socket", None)
        return sock if isinstance(sock, (ssl.SSLObject, ssl.SSLSocket)) else None

    def tls_description(self) -> str:
        tls = self._tls_object()
        if tls is None:
            return "unknown"
        cipher = tls.cipher()
        return f"{tls.version()} {cipher[0] if cipher else ''}".strip()


# -- the checks ---------------------------------------------------------------
#
# Each check is a coroutine that returns on success and raises CheckFailed (or
# an IqError / IqTimeout, which run_check turns into a reason) on failure.


def expect_from(stanza, expected: JID, what: str) -> None:
    """Fail unless `stanza` came from exactly `expected` (full JID comparison)."""
    if stanza["from"] != expected:
        raise CheckFailed(f"{what} came from '{stanza['from']}', expected '{expected}'")


async def check_iq_roundtrip(xmpp: ConformanceClient, target: JID, timeout: float) -> None:
    iq = xmpp.make_iq_get(queryxmlns=VERSION_NS, ito=target)
    result = await iq.send(timeout=timeout)
    expect_from(result, target, "version result")
    if result["type"] != "result":
        raise CheckFailed(f"expected a result IQ, got type '{result['type']}'")
    name = result.xml.find(f"{{{VERSION_NS}}}query/{{{VERSION_NS}}}name")
    if name is None:
        raise CheckFailed("version result has no <name/>")
    if (name.text or "") != RESPONDER_NAME:
        raise CheckFailed(f"version name is '{name.text}', expected '{RESPONDER_NAME}'")


async def check_iq_offline(xmpp: ConformanceClient, offline: JID, timeout: float) -> None:
    try:
        await xmpp.plugin["xep_0199"].send_ping(offline, timeout=timeout)
    except IqError as err:
        condition = err.iq["error"]["condition"]
        if condition != "service-unavailable":
            raise CheckFailed(f"error condition is '{condition}', "
                              f"expected 'service-unavailable'")
        # Not failures, but worth seeing: the usual error type, and the error
        # coming from the address the request was sent to.
        if err.iq["error"]["type"] != "cancel":
            out(f"INFO iq-offline: error type is '{err.iq['error']['type']}' "
                f"(RFC 6120 pairs service-unavailable with 'cancel')")
        if err.iq["from"] != offline:
            out(f"INFO iq-offline: error came from '{err.iq['from']}', not '{offline}'")
        return
    raise CheckFailed(f"ping to unconnected {offline} got a result, expected an error")


async def check_server_ping(xmpp: ConformanceClient, server: JID, timeout: float) -> None:
    # send_ping raises on an error reply; slixmpp's ping() would accept an error
    # from the user's own server as a pong, which would hide a missing feature.
    result = await xmpp.plugin["xep_0199"].send_ping(server, timeout=timeout)
    expect_from(result, server, "ping result")


async def check_server_disco(xmpp: ConformanceClient, server: JID, timeout: float) -> None:
    result = await xmpp.plugin["xep_0030"].get_info(
        jid=server, local=False, cached=False, timeout=timeout)
    expect_from(result, server, "disco#info result")
    info = result["disco_info"]
    categories = {identity[0] for identity in info["identities"]}
    features = set(info["features"])
    missing = []
    if "server" not in categories:
        missing.append(f"identity category 'server' (got {sorted(categories)})")
    if "urn:xmpp:ping" not in features:
        missing.append(f"feature 'urn:xmpp:ping' (got {sorted(features)})")
    if missing:
        raise CheckFailed("missing " + " and ".join(missing))


def drain(queue: asyncio.Queue) -> None:
    """Drop anything that arrived before the check started."""
    while not queue.empty():
        queue.get_nowait()


async def next_from(xmpp: ConformanceClient, queue: asyncio.Queue, peer: JID,
                    what: str, timeout: float):
    """The next stanza in `queue` sent by (any resource of) `peer`, within `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            stanza = await asyncio.wait_for(queue.get(), deadline - loop.time())
        except asyncio.TimeoutError:
            raise CheckFailed(f"no {what} from {peer} within {timeout:g}s") from None
        # Skip anything else, e.g. a notice from the server or our own presence
        # reflected back to us (which matters if the target shares our account).
        if stanza["from"].bare == peer.bare and stanza["from"] != xmpp.boundjid:
            return stanza


async def check_message(xmpp: ConformanceClient, target: JID, timeout: float) -> None:
    drain(xmpp.messages)
    xmpp.send_message(mto=target, mbody=MESSAGE_BODY, mtype="chat")
    msg = await next_from(xmpp, xmpp.messages, target, "echo", timeout)
    expect_from(msg, target, "echo")
    if msg["type"] == "error":
        raise CheckFailed(f"got a message error: {msg['error']['condition']}")
    if msg["type"] != "chat":
        raise CheckFailed(f"echo has type '{msg['type']}', expected 'chat'")
    if msg["body"] != ECHO_BODY:
        raise CheckFailed(f"echo body is '{msg['body']}', expected '{ECHO_BODY}'")


async def check_directed_presence(xmpp: ConformanceClient, target: JID, timeout: float) -> None:
    drain(xmpp.presences)
    xmpp.send_presence(pto=target)
    pres = await next_from(xmpp, xmpp.presences, target, "presence", timeout)
    expect_from(pres, target, "presence")
    if pres["type"] == "error":
        raise CheckFailed(f"got a presence error: {pres['error']['condition']}")
    # slixmpp reports an available presence's type as 'available' or as its <show/>.
    if pres["type"] != "available" and pres["type"] not in pres.showtypes:
        raise CheckFailed(f"presence has type '{pres['type']}', expected available")
    if pres["status"] != PRESENCE_STATUS:
        raise CheckFailed(f"presence status is '{pres['status']}', "
                          f"expected '{PRESENCE_STATUS}'")


async def run_check(name: str, check: Callable[..., Awaitable[None]],
                    xmpp: ConformanceClient, peer: JID, timeout: float) -> bool:
    """Run `check(xmpp, peer, timeout)`; print its line and return whether it passed."""
    reason: Optional[str] = None
    if xmpp.closed.done():
        reason = f"not run: {xmpp.closed.result()}"
    else:
        task = asyncio.ensure_future(check(xmpp, peer, timeout))
        # Race the check against the stream closing. The checks enforce `timeout`
        # themselves (and so give the precise reason); the extra second here is
        # only a backstop so that nothing can hang.
        done, _ = await asyncio.wait({task, xmpp.closed}, timeout=timeout + 1,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            try:
                task.result()
            except CheckFailed as err:
                reason = str(err)
            except IqError as err:
                error = err.iq["error"]
                reason = (f"error reply from '{err.iq['from']}': {error['condition']}"
                          f" ({error['type']}) {error['text']}").rstrip()
            except IqTimeout:
                reason = f"no reply within {timeout:g}s"
            except Exception as err:  # a bug in the check or in slixmpp
                reason = f"{type(err).__name__}: {err}"
        else:
            task.cancel()
            reason = (xmpp.closed.result() if xmpp.closed.done()
                      else f"no reply within {timeout:g}s")
    out(f"CHECK {name}: ok" if reason is None else f"CHECK {name}: FAIL {reason}")
    return reason is None


# -- driver -------------------------------------------------------------------


def parse_addr(addr: str) -> tuple:
    """'127.0.0.1:5222' or '[::1]:5222' -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got '{addr}'")
    return host.strip("[]"), int(port)


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="slixmpp conformance check against a Spine XMPP server")
    parser.add_argument("--addr", required=True, type=parse_addr,
                        help="HOST:PORT to connect to (no DNS/SRV lookup)")
    parser.add_argument("--jid", required=True, help="full JID to log in as")
    parser.add_argument("--password", required=True, help="password for --jid")
    parser.add_argument("--ca", required=True, type=Path,
                        help="PEM certificate to trust for the server")
    parser.add_argument("--target", required=True,
                        help="full JID of the responder client")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds allowed for login and for each check (default 10)")
    parser.add_argument("--verbose", action="store_true",
                        help="log slixmpp's debug output (including the XML) to stderr")
    args = parser.parse_args(argv)
    for name in ("jid", "target"):
        jid = JID(getattr(args, name))
        if not jid.resource:
            parser.error(f"--{name} must be a full JID (with a resource)")
    if not args.ca.is_file():
        parser.error(f"--ca {args.ca}: no such file")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return args


def print_summary(failed: int) -> int:
    if failed == 0:
        out("conformance: all checks passed")
        return 0
    out(f"conformance: {failed} of {len(CHECKS)} checks failed")
    return 1


async def run(args: argparse.Namespace) -> int:
    host, port = args.addr
    timeout = args.timeout
    xmpp = ConformanceClient(args.jid, args.password, args.ca)
    out(f"INFO slixmpp {slixmpp.__version__}, connecting to {host}:{port} as {args.jid}")

    # -- login: TCP, STARTTLS, SASL, bind; bounded by --timeout --
    xmpp.connect(host, port)
    try:
        failure = await asyncio.wait_for(asyncio.shield(xmpp.login), timeout)
    except asyncio.TimeoutError:
        failure = f"no session within {timeout:g}s"
    if failure is not None:
        out(f"CHECK login: FAIL {failure}")
        xmpp.abort()
        for name in CHECKS:
            out(f"CHECK {name}: FAIL not run: login failed")
        return print_summary(len(CHECKS))

    out(f"INFO tls: {xmpp.tls_description()}")
    out(f"INFO sasl: {xmpp.sasl_mechanism or 'unknown'} "
        f"(offered: {' '.join(sorted(xmpp.plugin['feature_mechanisms'].mech_list))})")
    out(f"INFO bound jid: {xmpp.boundjid.full}")

    # Initial presence, as a client does before using the session.
    xmpp.send_presence()

    target = JID(args.target)
    server = JID(xmpp.boundjid.domain)
    offline = JID(f"{OFFLINE_LOCALPART}@{server.domain}/{OFFLINE_RESOURCE}")
    plan = [
        ("iq-roundtrip", check_iq_roundtrip, target),
        ("iq-offline", check_iq_offline, offline),
        ("server-ping", check_server_ping, server),
        ("server-disco", check_server_disco, server),
        ("message", check_message, target),
        ("directed-presence", check_directed_presence, target),
    ]
    assert [name for name, _, _ in plan] == CHECKS
    results = [await run_check(name, check, xmpp, peer, timeout)
               for name, check, peer in plan]

    # Close the stream politely, but never wait for longer than --timeout.
    if not xmpp.closed.done():
        try:
            await asyncio.wait_for(xmpp.disconnect(wait=timeout / 2), timeout)
        except asyncio.TimeoutError:
            xmpp.abort()
    return print_summary(results.count(False))


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr,
                        level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
