#!/usr/bin/env python3
"""A Spine agent in Python with slixmpp, written from docs/PROTOCOL.md alone.

It offers `text.upper` (UTF-8 input, upper-cased output) and `text.lower`, and follows the
agent side of the protocol: advertisement and load by directed presence (§4, §5), heartbeats
that start short after each connect, answers to dispatcher hellos (§4.4), jobs with the checks
of §7.3 in order, the outcome cache and attachment of repeated job ids (§10), deadlines (§7.7),
cancel (§9), progress on request (§8), draining on SIGTERM, XEP-0030 and XEP-0199 (§14).
Blob inputs (§13) are refused with `too-large`: this agent takes inline inputs only (64 KiB).

    python3 agent.py --jid agent7@bus.example.com/py --server 127.0.0.1:5222 \\
        --dispatcher dispatcher@bus.example.com        # password from SPINE_AGENT_PASSWORD
"""

import argparse
import asyncio
import base64
import binascii
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import sys
import time
import xml.etree.ElementTree as ET
from collections import OrderedDict

import slixmpp
from slixmpp import JID
from slixmpp.xmlstream.handler import CoroutineCallback
from slixmpp.xmlstream.matcher import MatchXPath

NS = "urn:spine:1"
INLINE_LIMIT = 65536
CACHE_MAX, CACHE_TTL_S = 4096, 600
LOAD_DEBOUNCE_S = 0.05

# Spine condition -> (RFC 6120 defined condition, error type), PROTOCOL.md §7.5.
CONDITIONS = {
    "busy": ("resource-constraint", "wait"),
    "draining": ("service-unavailable", "wait"),
    "unknown-capability": ("item-not-found", "cancel"),
    "unknown-job": ("item-not-found", "cancel"),
    "bad-arguments": ("bad-request", "modify"),
    "malformed": ("bad-request", "modify"),
    "too-large": ("not-acceptable", "modify"),
    "not-authorized": ("forbidden", "auth"),
    "deadline-exceeded": ("remote-server-timeout", "cancel"),
    "cancelled": ("undefined-condition", "cancel"),
    "failed": ("undefined-condition", "cancel"),
    "retryable": ("internal-server-error", "wait"),
}


class JobError(Exception):
    """A handler's failure with its Spine condition (and `field` for bad-arguments)."""

    def __init__(self, condition, text, **attrs):
        super().__init__(text)
        self.condition, self.text, self.attrs = condition, text, attrs


def text_of(data):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JobError("bad-arguments", f"input is not UTF-8 (byte {e.start})", field="input")


# Handlers: (args, input bytes) -> (output bytes, MIME type, metadata dict).
CAPABILITIES = {
    "text.upper": lambda args, data: (text_of(data).upper().encode(), "text/plain", {}),
    "text.lower": lambda args, data: (text_of(data).lower().encode(), "text/plain", {}),
}


def spine_error(condition, text, attrs=None):
    """An outcome that is an error: (spine condition, text, attributes)."""
    return ("error", condition, text, attrs or {})


class Job:
    """A running job: its handler task and every job IQ attached to it (§10)."""

    def __init__(self, job_id, dispatcher, attempt):
        self.id, self.dispatcher, self.attempt = job_id, dispatcher, attempt
        self.iqs = []
        self.task = None
        self.cancelled = False


class Agent(slixmpp.ClientXMPP):
    def __init__(self, opts):
        # SCRAM never reveals the password, but slixmpp refuses it without TLS unless told:
        # allowed on loopback only (PLAIN never without TLS).
        mechs = {"unencrypted_scram": opts.loopback, "unencrypted_plain": False}
        super().__init__(opts.jid, opts.password, plugin_config={"feature_mechanisms": mechs})
        self.opts = opts
        self.dispatchers = {JID(d).bare for d in opts.dispatcher}
        # Where loads go: the configured bare JID, or the full JID of the hello answered.
        self.targets = {d: d for d in self.dispatchers}
        self.instance = secrets.token_hex(12)  # 96 random bits: new at every start
        self.gen, self.seq = 1, 0
        self.state = "ready"
        self.running = {}  # job id -> Job
        self.cache = OrderedDict()  # job id -> (time, outcome)
        self.load_pending = None
        self.heartbeat_handle = None
        self.register_plugin("xep_0030")
        self.register_plugin("xep_0199")
        ns = "{jabber:client}"
        for name, xpath, handler in [
            ("spine-job", f"{ns}iq/{{{NS}}}job", self.on_job),
            ("spine-cancel", f"{ns}iq/{{{NS}}}cancel", self.on_cancel),
            ("spine-hello", f"{ns}presence/{{{NS}}}dispatcher", self.on_hello),
        ]:
            self.register_handler(CoroutineCallback(name, MatchXPath(xpath), handler))
        self.add_event_handler("connected", self.on_connected)
        self.add_event_handler("session_start", self.on_session_start)
        self.add_event_handler("presence_unavailable", self.on_unavailable)
        self.add_event_handler("failed_all_auth", self.on_failed_auth)
        self.add_event_handler("connection_failed", self.on_connection_failed)
        self.add_event_handler("disconnected", self.on_disconnected)
        self.exit_code = 0
        self.gone = self.loop.create_future()  # resolved when the stream is closed
        # Plain TCP, then STARTTLS when offered (required off loopback); no direct TLS. The
        # server's certificate must be valid for the JID's domain, checked against --ca-file
        # (or the system's CAs).
        self.enable_direct_tls = False
        if opts.ca_file:
            self.ca_certs = opts.ca_file
            self.ssl_context = ssl.create_default_context(cafile=opts.ca_file)
        self.ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
        if not opts.loopback:
            self.enable_plaintext = False  # TLS off loopback: never credentials in clear

    # -- connection ----------------------------------------------------------------------

    def on_connected(self, _):
        # Nagle off: otherwise every request/response pair waits for a delayed ACK (~40 ms).
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_failed_auth(self, _):
        logging.error("login of %s failed: credentials refused or no acceptable SASL mechanism",
                      self.boundjid.bare)
        self.exit_code = 2
        self.disconnect()

    def on_connection_failed(self, error):
        # slixmpp tries again with a growing delay; say why meanwhile.
        logging.error("cannot connect to %s: %s (retrying)", self.opts.server, error)

    def on_disconnected(self, _):
        if not self.gone.done():
            self.gone.set_result(True)

    async def on_session_start(self, _):
        if not self.opts.loopback and self.transport.get_extra_info("sslcontext") is None:
            logging.error("refusing to run without TLS to a server off loopback")
            self.exit_code = 2
            self.disconnect()
            return
        disco = self.plugin["xep_0030"]
        disco.add_identity(category="automation", itype="spine-agent", name="spine python agent")
        disco.add_feature(NS)
        for cap in CAPABILITIES:
            disco.add_feature(f"{NS}:capability:{cap}")
        self.send_presence()
        self.targets = {d: d for d in self.dispatchers}
        for d in self.dispatchers:
            self.send_load(d, advertise=True)
        logging.info("agent connected as %s, offering %s", self.boundjid, ", ".join(CAPABILITIES))
        # Heartbeats: 0.5 s, then doubling up to the configured interval (§5.1).
        self.schedule_heartbeat(0.5)

    def schedule_heartbeat(self, interval):
        if self.heartbeat_handle:
            self.heartbeat_handle.cancel()

        def beat():
            for d in self.dispatchers:
                self.send_load(d)
            self.schedule_heartbeat(min(interval * 2, self.opts.heartbeat_ms / 1000))

        self.heartbeat_handle = self.loop.call_later(interval, beat)

    async def on_hello(self, pres):
        bare = pres["from"].bare
        if bare not in self.dispatchers or pres["type"] == "unavailable":
            return  # hellos from anyone else are ignored (§4.4)
        self.targets[bare] = str(pres["from"])
        self.send_load(bare, advertise=True)

    def on_unavailable(self, pres):
        bare = pres["from"].bare
        if bare in self.targets and self.targets[bare] == str(pres["from"]):
            self.targets[bare] = bare  # that dispatcher session ended: back to the bare JID

    # -- advertisement and load ----------------------------------------------------------

    def send_load(self, dispatcher, advertise=False):
        self.seq += 1
        pres = self.make_presence(pto=self.targets.get(dispatcher, dispatcher))
        if advertise:
            adv = ET.Element(f"{{{NS}}}advertise", {
                "protocol": "1.0", "instance": self.instance, "gen": str(self.gen),
                "slots": str(self.opts.slots), "heartbeat-ms": str(self.opts.heartbeat_ms)})
            ET.SubElement(adv, f"{{{NS}}}attr", {"name": "runtime", "value": "python"})
            for cap in CAPABILITIES:
                ET.SubElement(adv, f"{{{NS}}}capability", {"name": cap})
            pres.append(adv)
        yours = sum(1 for j in self.running.values() if j.dispatcher == dispatcher)
        load = {"seq": str(self.seq), "gen": str(self.gen), "state": self.state,
                "in-flight": str(len(self.running)), "yours": str(yours),
                "slots": str(self.opts.slots), "queue": "0"}
        try:
            load["loadavg"] = f"{os.getloadavg()[0]:.2f}"
        except OSError:
            pass
        pres.append(ET.Element(f"{{{NS}}}load", load))
        pres.send()

    def load_changed(self):
        """Debounced (§5.1): at most one load per 50 ms, the last change always sent."""
        if self.load_pending is None:
            def flush():
                self.load_pending = None
                for d in self.dispatchers:
                    self.send_load(d)
            self.load_pending = self.loop.call_later(LOAD_DEBOUNCE_S, flush)

    # -- replies -------------------------------------------------------------------------

    def reply_error(self, iq, condition, text, **attrs):
        xmpp_condition, etype = CONDITIONS[condition]
        reply = iq.reply(clear=True)
        reply["type"] = "error"
        reply["error"]["type"] = etype
        reply["error"]["condition"] = xmpp_condition
        if text:
            reply["error"]["text"] = text
        reply["error"].xml.append(
            ET.Element(f"{{{NS}}}{condition}", {k: str(v) for k, v in attrs.items()}))
        reply.send()

    def reply_outcome(self, iq, outcome):
        if outcome[0] == "error":
            _, condition, text, attrs = outcome
            self.reply_error(iq, condition, text, **attrs)
        else:
            reply = iq.reply(clear=True)
            reply.xml.append(outcome[1])
            reply.send()

    def cached(self, job_id):
        now = time.monotonic()
        while self.cache:
            oldest_id, (t, _) = next(iter(self.cache.items()))
            if now - t <= CACHE_TTL_S and len(self.cache) <= CACHE_MAX:
                break
            self.cache.pop(oldest_id)
        entry = self.cache.get(job_id)
        return entry[1] if entry else None

    # -- jobs ----------------------------------------------------------------------------

    async def on_job(self, iq):
        if iq["type"] in ("result", "error"):
            return  # never answer a reply
        if iq["type"] != "set":
            return self.reply_error(iq, "malformed", "a <job/> travels in an IQ set")
        dispatcher = iq["from"].bare
        if dispatcher not in self.dispatchers:  # §7.3 rule 1
            return self.reply_error(iq, "not-authorized", f"{dispatcher} is not a dispatcher of this agent")
        job = iq.xml.find(f"{{{NS}}}job")
        try:  # rule 2: a payload that follows §7.1
            job_id, capability = job.attrib["id"], job.attrib["capability"]
            attempt = int(job.attrib["attempt"])
            if attempt < 1 or not job_id or len(job_id) > 128:
                raise ValueError("attempt must be at least 1 and the id 1 to 128 characters")
            deadline_ms = job.get("deadline-ms")
            deadline_s = int(deadline_ms) / 1000 if deadline_ms is not None else None
            progress = job.get("progress", "false") in ("true", "1")
            args_el = job.find(f"{{{NS}}}args")
            args = json.loads(args_el.text or "{}") if args_el is not None else {}
            if not isinstance(args, dict):
                raise ValueError("<args> must hold a JSON object")
            input_el = job.find(f"{{{NS}}}input")
            data = b""
            if input_el is not None:
                if input_el.get("blob") is not None:
                    return self.reply_error(iq, "too-large", "this agent takes inline inputs only",
                                            max=INLINE_LIMIT)
                data = base64.b64decode((input_el.text or "").strip(), validate=True)
                if len(data) > INLINE_LIMIT:
                    return self.reply_error(iq, "too-large", "inline input over the limit",
                                            max=INLINE_LIMIT)
                if input_el.get("size") is not None and int(input_el.get("size")) != len(data):
                    raise ValueError("<input size> does not match the data")
        except (KeyError, ValueError, binascii.Error, json.JSONDecodeError) as e:
            return self.reply_error(iq, "malformed", f"invalid <job/>: {e}")
        if capability not in CAPABILITIES:
            return self.reply_error(iq, "unknown-capability", f"this agent does not offer {capability}")
        if job_id in self.running:  # rule 3: attach (§10)
            self.running[job_id].iqs.append(iq)
            return
        outcome = self.cached(job_id)
        if outcome is not None:  # rule 4: the stored outcome
            return self.reply_outcome(iq, outcome)
        if self.state == "draining":  # rule 5
            return self.reply_error(iq, "draining", "this agent is shutting down")
        if len(self.running) >= self.opts.slots:  # rule 6
            return self.reply_error(iq, "busy", f"all {self.opts.slots} slots are busy")
        run = Job(job_id, dispatcher, attempt)
        run.iqs.append(iq)
        self.running[job_id] = run
        self.load_changed()
        if progress:  # rule 7: the start notification
            self.send_progress(iq["from"], job_id, attempt, 0)
        run.task = asyncio.ensure_future(
            self.execute(run, CAPABILITIES[capability], args, data, deadline_s))

    def send_progress(self, to, job_id, attempt, percent, text=None):
        msg = self.make_message(mto=to, mtype="headline")
        el = ET.Element(f"{{{NS}}}progress",
                        {"job": job_id, "attempt": str(attempt), "percent": str(percent)})
        el.text = text
        msg.append(el)
        msg.send()

    async def execute(self, run, handler, args, data, deadline_s):
        started = time.monotonic()
        try:
            work = asyncio.to_thread(handler, args, data)
            out, mime, meta = await asyncio.wait_for(work, deadline_s)
            result = ET.Element(f"{{{NS}}}result", {
                "job": run.id, "attempt": str(run.attempt),
                "elapsed-ms": str(int((time.monotonic() - started) * 1000))})
            if meta:
                ET.SubElement(result, f"{{{NS}}}meta").text = json.dumps(meta)
            output = ET.SubElement(result, f"{{{NS}}}output",
                                   {"type": mime, "size": str(len(out))})
            output.text = base64.b64encode(out).decode()
            outcome = ("result", result)
        except asyncio.TimeoutError:
            outcome = spine_error("deadline-exceeded", "the deadline passed")
        except asyncio.CancelledError:
            outcome = spine_error("cancelled", "cancelled by the dispatcher")
        except JobError as e:
            outcome = spine_error(e.condition, e.text, e.attrs)
        except Exception as e:  # a handler bug is a permanent failure, not a crash
            logging.exception("handler failed")
            outcome = spine_error("failed", f"{type(e).__name__}: {e}")
        self.cache[run.id] = (time.monotonic(), outcome)
        del self.running[run.id]
        for iq in run.iqs:
            self.reply_outcome(iq, outcome)
        self.load_changed()
        logging.info("job %s ended: %s", run.id, outcome[1] if outcome[0] == "error" else "result")

    async def on_cancel(self, iq):
        if iq["type"] != "set":
            return
        if iq["from"].bare not in self.dispatchers:
            return self.reply_error(iq, "not-authorized", "only a dispatcher may cancel")
        job_id = iq.xml.find(f"{{{NS}}}cancel").get("job")
        if job_id in self.running:
            self.running[job_id].task.cancel()
        elif self.cached(job_id) is None:
            return self.reply_error(iq, "unknown-job", f"no job {job_id} here")
        iq.reply(clear=True).send()  # idempotent: an empty result

    # -- shutdown ------------------------------------------------------------------------

    async def drain(self, grace_s):
        """Stop taking jobs, finish the running ones (up to `grace_s`), go unavailable."""
        self.state = "draining"
        for d in self.dispatchers:
            self.send_load(d)
        logging.info("draining: %d running, grace %.0f s", len(self.running), grace_s)
        end = time.monotonic() + grace_s
        while self.running and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for run in list(self.running.values()):
            run.task.cancel()
        await asyncio.sleep(0.1)
        if self.heartbeat_handle:
            self.heartbeat_handle.cancel()
        self.send_presence(ptype="unavailable")
        self.disconnect()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jid", required=True, help="the agent's account, e.g. agent7@example.com/py")
    p.add_argument("--server", required=True, help="host:port of the XMPP server")
    p.add_argument("--dispatcher", action="append", required=True,
                   help="bare JID of a dispatcher allowed to send jobs (repeatable)")
    p.add_argument("--ca-file", help="PEM file of the CA certificate(s) to trust (default: the system's)")
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--heartbeat-ms", type=int, default=10000)
    p.add_argument("--drain-grace", type=float, default=30.0)
    p.add_argument("--log", default="INFO")
    opts = p.parse_args()
    logging.basicConfig(level=opts.log, format="%(asctime)s %(levelname)s %(message)s")
    opts.password = os.environ.get("SPINE_AGENT_PASSWORD")
    if not opts.password:
        p.error("set the password in SPINE_AGENT_PASSWORD")
    if opts.slots < 1 or opts.heartbeat_ms < 100:
        p.error("--slots must be at least 1 and --heartbeat-ms at least 100")
    host, _, port = opts.server.rpartition(":")
    try:
        opts.loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        opts.loopback = host == "localhost"
    agent = Agent(opts)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        agent.loop.add_signal_handler(sig, stop.set)

    async def run():
        agent.connect(host, int(port))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([stopping, agent.gone], return_when=asyncio.FIRST_COMPLETED)
        if agent.gone.done():
            # The stream ended on its own: leave restarting to the supervisor (systemd).
            if agent.exit_code == 0:
                logging.error("the connection to the server was lost")
                agent.exit_code = 1
            return
        await agent.drain(opts.drain_grace)
        try:
            await asyncio.wait_for(agent.gone, 5)
        except asyncio.TimeoutError:
            pass

    agent.loop.run_until_complete(run())
    sys.exit(agent.exit_code)


if __name__ == "__main__":
    main()
