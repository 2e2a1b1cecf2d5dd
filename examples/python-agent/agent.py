#!/usr/bin/env python3
"""A Spine agent in Python with slixmpp, written from docs/PROTOCOL.md alone.

It offers `text.upper` (UTF-8 input, upper-cased output), `text.lower` and `bytes.reverse`
(any input, its bytes in reverse order: an output as large as the input), and follows the
agent side of the protocol: advertisement and load by directed presence (§4, §5), heartbeats
that start short after each connect, answers to dispatcher hellos (§4.4), jobs with the checks
of §7.3 in order, the outcome cache and attachment of repeated job ids (§10), deadlines (§7.7),
cancel (§9), progress on request (§8), draining on SIGTERM, XEP-0030 and XEP-0199 (§14).
Inputs and outputs over 64 KiB travel in chunks (§13.1, §13.2) or, with protocol 1.1, over
HTTP: inputs fetched by reference, outputs put to an upload slot (§13.4, payloads.py);
`--no-http-data` announces 1.0 and keeps to chunks.

    python3 agent.py --jid agent7@bus.example.com/py --server 127.0.0.1:5222 \\
        --dispatcher dispatcher@bus.example.com        # password from SPINE_AGENT_PASSWORD
"""

import argparse
import asyncio
import base64
import binascii
import concurrent.futures
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import socket
import ssl
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections import OrderedDict

import slixmpp
from slixmpp import JID
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream.handler import CoroutineCallback
from slixmpp.xmlstream.matcher import MatchXPath

import payloads

NS = "urn:spine:1"
HASHES_NS = "urn:xmpp:hashes:2"  # XEP-0300
URL_DATA_NS = "http://jabber.org/protocol/url-data"  # XEP-0103
INLINE_LIMIT = 65536
FRAGMENTS_MIME = "application/vnd.spine.fragments+json"  # §11.7
CHUNK_WINDOW = 8  # chunks unacknowledged at once (§13.1)
CHUNK_TRIES = 5  # sends of one chunk that got a `wait` error or no answer
IQ_TIMEOUT_S = 30  # for a chunk's acknowledgement and a slot request's answer
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
    "fetch-failed": ("recipient-unavailable", "wait"),  # 1.1
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
    # An output as large as its input: a large job exercises both directions of §13.
    "bytes.reverse": lambda args, data: (data[::-1], "application/octet-stream", {}),
    # A reduce step (§11.7): its fragments' bytes, concatenated in order. Fragments that name
    # blobs by URL (§11.7.1) were fetched before the handler runs: it reads `data` only.
    "fragments.concat": lambda args, data: (
        b"".join(base64.b64decode(f["data"]) for f in json.loads(data)),
        "application/octet-stream", {}),
}


U64 = re.compile(r"[0-9]{1,20}")
ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # job and blob ids (§3.2)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def u64(text, what):
    if text is None or not U64.fullmatch(text) or int(text) >= 2**64:
        raise ValueError(f"{what} must be an unsigned integer, not {text!r}")
    return int(text)


def b64decode(text):
    """Base64 with any whitespace in it ignored (§3.8)."""
    return base64.b64decode("".join(text.split()), validate=True)


def local_name(tag):
    return tag.rpartition("}")[2]


def parse_reference(el, max_payload):
    """The reference form of a job's <input> (§13.4): ("ref", size, sha256 bytes, [urls])."""
    extra = set(el.attrib) - {"size", "type"}
    if extra:
        raise ValueError(f"<input> in the reference form has no attribute {sorted(extra)[0]!r}")
    size = u64(el.get("size"), "<input size>")
    if (el.text or "").strip():
        raise ValueError("<input> in the reference form has no text")
    sha256, sources = None, None
    for child in el:
        if child.tag == f"{{{HASHES_NS}}}hash":
            if child.get("algo") != "sha-256":
                continue  # other algorithms may be added beside it (XEP-0300)
            if sha256 is not None:
                raise ValueError("<input> has a second <hash algo='sha-256'>")
            sha256 = b64decode(child.text or "")
            if len(sha256) != 32:
                raise ValueError(f"<hash algo='sha-256'> holds {len(sha256)} bytes, not 32")
        elif child.tag == f"{{{NS}}}sources":
            if sources is not None:
                raise ValueError("<input> has a second <sources>")
            sources = []
            for u in child:
                if u.tag != f"{{{URL_DATA_NS}}}url-data" or set(u.attrib) != {"target"}:
                    raise ValueError("<sources> holds only <url-data target='…'/> in "
                                     f"{URL_DATA_NS}")
                target = u.attrib["target"]
                if len(target) > 4096 or not target.startswith(("http://", "https://")):
                    raise ValueError("a <url-data target> is an http:// or https:// URL of at "
                                     "most 4096 characters")
                sources.append(target)
            if not 1 <= len(sources) <= 8:
                raise ValueError(f"<sources> holds {len(sources)} <url-data>, not 1 to 8")
        else:
            raise ValueError(f"<input> has no child <{local_name(child.tag)}>")
    if sha256 is None:
        raise ValueError("<input> in the reference form needs <hash algo='sha-256'>")
    if sources is None:
        raise ValueError("a job's <input> reference needs <sources>")
    if size > max_payload:
        raise JobError("too-large", f"an input of {size} bytes is over this agent's limit",
                       max=max_payload)
    return ("ref", size, sha256, sources)


def parse_minor(protocol):
    """The minor version of a `protocol` value `1.N` (§2); anything else counts as 1.0."""
    major, _, minor = (protocol or "").partition(".")
    return int(minor) if major == "1" and U64.fullmatch(minor) else 0


def error_of(iq):
    """'condition: text' of an IQ error, the Spine condition if there is one (§7.5)."""
    err = iq.xml.find("{jabber:client}error")
    children = list(err) if err is not None else []
    spine = [local_name(c.tag) for c in children if c.tag.startswith(f"{{{NS}}}")]
    condition = spine[0] if spine else iq["error"]["condition"]
    text = iq["error"]["text"]
    return f"{condition}: {text}" if text else condition


def spine_error(condition, text, attrs=None):
    """An outcome that is an error: (spine condition, text, attributes)."""
    return ("error", condition, text, attrs or {})


class Job:
    """A running job: its handler task and every job IQ attached to it (§10)."""

    def __init__(self, job_id, dispatcher, attempt, sender):
        self.id, self.dispatcher, self.attempt = job_id, dispatcher, attempt
        self.sender = sender  # the job IQ's full `from`: where slot requests and chunks go
        self.iqs = []
        self.task = None
        self.stop = threading.Event()  # ends an HTTP transfer of this job in its thread
        self.input_type = None  # the <input type>: a fragment list may name blobs (§11.7.1)


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
        # Protocol 1.1 (§13.4): HTTP transfers, unless --no-http-data. A dispatcher's minor
        # version is 0 until its hello, or a job carrying a reference, says more (§2.1).
        self.http = payloads.HttpData(opts.ca_file) if opts.http_data else None
        self.minor = {}  # dispatcher bare JID -> minor version
        self.blobs = payloads.Blobs(opts.max_payload)  # inputs arriving in chunks
        # HTTP transfers and hashing block: they run here, never on the XMPP loop.
        self.transfers = concurrent.futures.ThreadPoolExecutor(4, "http-data")
        self.warned = set()  # (kind, dispatcher) whose HTTP failure was logged
        self.register_plugin("xep_0030")
        self.register_plugin("xep_0199")
        ns = "{jabber:client}"
        for name, xpath, handler in [
            ("spine-job", f"{ns}iq/{{{NS}}}job", self.on_job),
            ("spine-cancel", f"{ns}iq/{{{NS}}}cancel", self.on_cancel),
            ("spine-chunk", f"{ns}iq/{{{NS}}}chunk", self.on_chunk),
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
        self.minor.clear()  # until the dispatchers' hellos
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
            self.blobs.expire(time.monotonic())  # chunked inputs no job came for (§13.2)
            self.schedule_heartbeat(min(interval * 2, self.opts.heartbeat_ms / 1000))

        self.heartbeat_handle = self.loop.call_later(interval, beat)

    async def on_hello(self, pres):
        bare = pres["from"].bare
        if bare not in self.dispatchers or pres["type"] == "unavailable":
            return  # hellos from anyone else are ignored (§4.4)
        self.targets[bare] = str(pres["from"])
        hello = pres.xml.find(f"{{{NS}}}dispatcher")
        minor = parse_minor(hello.get("protocol"))
        if self.minor.get(bare) != minor:
            logging.info("dispatcher %s speaks protocol 1.%d", pres["from"], minor)
        self.minor[bare] = minor
        self.send_load(bare, advertise=True)

    def on_unavailable(self, pres):
        bare = pres["from"].bare
        if bare in self.targets and self.targets[bare] == str(pres["from"]):
            self.targets[bare] = bare  # that dispatcher session ended: back to the bare JID
            self.minor.pop(bare, None)  # and its successor may speak another version

    # -- advertisement and load ----------------------------------------------------------

    def send_load(self, dispatcher, advertise=False):
        self.seq += 1
        pres = self.make_presence(pto=self.targets.get(dispatcher, dispatcher))
        if advertise:
            adv = ET.Element(f"{{{NS}}}advertise", {
                "protocol": "1.1" if self.http else "1.0",
                "instance": self.instance, "gen": str(self.gen),
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
            source = ("inline", b"")
            if input_el is not None:
                source = self.parse_input(input_el, dispatcher)
        except (KeyError, ValueError, binascii.Error, json.JSONDecodeError) as e:
            return self.reply_error(iq, "malformed", f"invalid <job/>: {e}")
        except JobError as e:  # too-large
            return self.reply_error(iq, e.condition, e.text, **e.attrs)
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
        run = Job(job_id, dispatcher, attempt, iq["from"])
        run.input_type = input_el.get("type") if input_el is not None else None
        run.iqs.append(iq)
        self.running[job_id] = run
        self.load_changed()
        if progress:  # rule 7: the start notification
            self.send_progress(iq["from"], job_id, attempt, 0)
        run.task = asyncio.ensure_future(
            self.execute(run, CAPABILITIES[capability], args, source, deadline_s))

    def parse_input(self, el, dispatcher):
        """A job's <input> in one of its three forms (§7.1, §13.1, §13.4): ("inline", bytes),
        ("blob", id, size, sha256 hex) or ("ref", size, sha256, [urls]). Raises ValueError
        (malformed) or JobError (too-large)."""
        if el.find(f"{{{HASHES_NS}}}hash") is not None:
            if self.http is None:
                raise ValueError("<input> in the reference form is protocol 1.1 (§13.4); this "
                                 "agent announced 1.0 (--no-http-data)")
            self.minor[dispatcher] = max(self.minor.get(dispatcher, 0), 1)  # it speaks 1.1
            return parse_reference(el, self.opts.max_payload)
        if el.get("blob") is not None:
            extra = set(el.attrib) - {"blob", "size", "sha256", "type"}
            if extra:
                raise ValueError(f"a blob <input> has no attribute {sorted(extra)[0]!r}")
            blob_id, sha256 = el.get("blob"), el.get("sha256")
            size = u64(el.get("size"), "<input size>")
            if not ID.fullmatch(blob_id) or sha256 is None or not SHA256_HEX.fullmatch(sha256):
                raise ValueError("a blob <input> needs a blob id and sha256 as 64 lowercase "
                                 "hexadecimal digits")
            if (el.text or "").strip() or len(el):
                raise ValueError("a blob <input> is empty")
            if size > self.opts.max_payload:
                raise JobError("too-large", f"an input of {size} bytes is over this agent's "
                               "limit", max=self.opts.max_payload)
            return ("blob", blob_id, size, sha256)
        data = b64decode(el.text or "")
        if len(data) > INLINE_LIMIT:
            raise JobError("too-large", "inline input over the limit", max=INLINE_LIMIT)
        if el.get("size") is not None and u64(el.get("size"), "<input size>") != len(data):
            raise ValueError("<input size> does not match the data")
        return ("inline", data)

    async def input_of(self, run, source, deadline):
        """The job's input bytes. Raises JobError for a refusal that is not an outcome: a
        blob that does not check out (`malformed`), a fetch that failed (`fetch-failed`)."""
        data = await self.input_bytes(run, source, deadline)
        if run.input_type != FRAGMENTS_MIME or self.http is None:
            return data
        # A reduce step's fragment list names the map outputs by signed URL (§11.7.1): the
        # handler gets every fragment inline.
        try:
            return await self.loop.run_in_executor(
                self.transfers, self.http.resolve_fragments, data, run.stop, deadline)
        except payloads.TransferError as e:
            self.log_once("fetch", run.dispatcher, f"fetching the fragments of job {run.id} "
                          f"over HTTP failed: {e}; the dispatcher sends them again inline")
            raise JobError("fetch-failed", str(e))

    async def input_bytes(self, run, source, deadline):
        """The input as it came: inline, from chunks, or fetched by its reference."""
        if source[0] == "inline":
            return source[1]
        if source[0] == "blob":
            _, blob_id, size, sha256 = source
            try:
                blob = self.blobs.take(run.dispatcher, blob_id)
                return await self.loop.run_in_executor(
                    self.transfers, payloads.checked, blob, blob_id, size, sha256)
            except ValueError as e:
                raise JobError("malformed", str(e))
        _, size, sha256, urls = source
        try:
            data = await self.loop.run_in_executor(
                self.transfers, self.http.fetch, urls, size, sha256, run.stop, deadline)
        except payloads.TransferError as e:
            self.log_once("fetch", run.dispatcher, f"fetching the input of job {run.id} over "
                          f"HTTP failed: {e}; the dispatcher sends it again in chunks")
            raise JobError("fetch-failed", str(e))
        self.warned.discard(("fetch", run.dispatcher))
        logging.info("job %s: input of %d bytes fetched over HTTP", run.id, len(data))
        return data

    def log_once(self, kind, dispatcher, text):
        """A data-plane failure: a warning the first time for a dispatcher, until a success."""
        if (kind, dispatcher) in self.warned:
            logging.debug("%s", text)
        else:
            self.warned.add((kind, dispatcher))
            logging.warning("%s (logged once per dispatcher until HTTP works again)", text)

    def send_progress(self, to, job_id, attempt, percent, text=None):
        msg = self.make_message(mto=to, mtype="headline")
        el = ET.Element(f"{{{NS}}}progress",
                        {"job": job_id, "attempt": str(attempt), "percent": str(percent)})
        el.text = text
        msg.append(el)
        msg.send()

    async def execute(self, run, handler, args, source, deadline_s):
        started = time.monotonic()
        deadline = None if deadline_s is None else started + deadline_s
        try:
            try:
                data = await asyncio.wait_for(self.input_of(run, source, deadline), deadline_s)
            except JobError as e:
                # Not an outcome (§10): the job is forgotten, so that the dispatcher's resend
                # of the same id and attempt (in chunks, after fetch-failed) runs.
                del self.running[run.id]
                for iq in run.iqs:
                    self.reply_error(iq, e.condition, e.text, **e.attrs)
                self.load_changed()
                return
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            work = asyncio.to_thread(handler, args, data)
            out, mime, meta = await asyncio.wait_for(work, left)
            elapsed_ms = int((time.monotonic() - started) * 1000)
            output = await self.output_of(run, bytes(out), mime)
            result = ET.Element(f"{{{NS}}}result", {
                "job": run.id, "attempt": str(run.attempt), "elapsed-ms": str(elapsed_ms)})
            if meta:
                ET.SubElement(result, f"{{{NS}}}meta").text = json.dumps(meta)
            result.append(output)
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
        finally:
            run.stop.set()
        self.cache[run.id] = (time.monotonic(), outcome)
        del self.running[run.id]
        for iq in run.iqs:
            self.reply_outcome(iq, outcome)
        self.load_changed()
        logging.info("job %s ended: %s", run.id, outcome[1] if outcome[0] == "error" else "result")

    # -- large outputs and chunks (§13) ----------------------------------------------------

    def speaks_1_1(self, dispatcher):
        return self.http is not None and self.minor.get(dispatcher, 0) >= 1

    async def output_of(self, run, out, mime):
        """The <output> of a result: inline up to 64 KiB; above, put to an upload slot when
        the dispatcher speaks 1.1 (§13.4), else (or if that fails) sent in chunks (§13.1)."""
        attrs = {"size": str(len(out))}
        if mime:
            attrs["type"] = mime
        output = ET.Element(f"{{{NS}}}output", attrs)
        if len(out) <= INLINE_LIMIT:
            output.text = base64.b64encode(out).decode()
            return output
        digest = await self.loop.run_in_executor(
            self.transfers, lambda: hashlib.sha256(out).digest())
        if self.speaks_1_1(run.dispatcher):
            try:
                await self.put_to_slot(run, out, mime, digest)
                self.warned.discard(("upload", run.dispatcher))
                logging.info("job %s: output of %d bytes uploaded over HTTP", run.id, len(out))
                h = ET.SubElement(output, f"{{{HASHES_NS}}}hash", {"algo": "sha-256"})
                h.text = base64.b64encode(digest).decode()
                return output  # the reference form without <sources>: "what I put to the slot"
            except payloads.TransferError as e:
                self.log_once("upload", run.dispatcher, f"uploading the output of job {run.id} "
                              f"over HTTP failed: {e}; sending it in chunks")
        blob_id = f"out-{secrets.token_hex(16)}"
        await self.send_chunks(run.sender, blob_id, out)
        logging.info("job %s: output of %d bytes sent in chunks", run.id, len(out))
        output.set("blob", blob_id)
        output.set("sha256", digest.hex())
        return output

    async def put_to_slot(self, run, out, mime, digest):
        """Asks the job's sender for an upload slot and PUTs the output there (§13.4); raises
        TransferError on any failure."""
        req = ET.Element(f"{{{NS}}}request-slot", {
            "job": run.id, "attempt": str(run.attempt), "size": str(len(out)),
            "sha256": digest.hex()})
        if mime:
            req.set("type", mime)
        iq = self.make_iq_get(ito=run.sender)
        iq.xml.append(req)
        try:
            reply = await iq.send(timeout=IQ_TIMEOUT_S)
        except IqError as e:
            raise payloads.TransferError(f"the slot request was refused ({error_of(e.iq)})")
        except IqTimeout:
            raise payloads.TransferError(
                f"no answer to the slot request within {IQ_TIMEOUT_S} s")
        slot = reply.xml.find(f"{{{NS}}}slot")
        if slot is None or slot.get("job") != run.id or not slot.get("put"):
            raise payloads.TransferError("the answer to the slot request is not a <slot> for "
                                         f"job {run.id} with a put URL")
        await self.loop.run_in_executor(
            self.transfers, self.http.put, slot.get("put"), out, mime)

    async def send_chunks(self, to, blob_id, data):
        """Sends `data` as blob `blob_id` to `to`, at most CHUNK_WINDOW chunks unacknowledged
        (§13.1). Raises JobError if the receiver refuses it."""
        pending = payloads.chunks(data)

        async def sender():
            for offset, text in pending:  # shared: each chunk is taken by one sender
                await self.send_chunk(to, blob_id, offset, len(data), text)

        senders = [asyncio.ensure_future(sender()) for _ in range(CHUNK_WINDOW)]
        try:
            await asyncio.gather(*senders)
        finally:
            for s in senders:
                s.cancel()

    async def send_chunk(self, to, blob_id, offset, total, text):
        why = ""
        for attempt in range(CHUNK_TRIES):
            iq = self.make_iq_set(ito=to)
            el = ET.Element(f"{{{NS}}}chunk",
                            {"blob": blob_id, "offset": str(offset), "total": str(total)})
            el.text = text
            iq.xml.append(el)
            try:
                await iq.send(timeout=IQ_TIMEOUT_S)
                return
            except IqTimeout:
                why = f"no answer within {IQ_TIMEOUT_S} s"
            except IqError as e:
                why = error_of(e.iq)
                if why.startswith("too-large"):  # the same payload is not tried again (§13.2)
                    raise JobError("too-large", f"the dispatcher refused the output: {why}")
                if e.iq["error"]["type"] != "wait":
                    raise JobError("retryable", f"the dispatcher refused a chunk of the output: "
                                   f"{why}")
                await asyncio.sleep(min(0.2 * 2 ** attempt, 5))  # busy: its blobs drain
        raise JobError("retryable", f"a chunk of the output went unacknowledged after "
                       f"{CHUNK_TRIES} tries: {why}")

    async def on_chunk(self, iq):
        """A chunk of an input blob, from a dispatcher (§13.1, §13.2)."""
        if iq["type"] in ("result", "error"):
            return
        if iq["type"] != "set":
            return self.reply_error(iq, "malformed", "a <chunk/> travels in an IQ set")
        sender = iq["from"].bare
        if sender not in self.dispatchers:
            return self.reply_error(iq, "not-authorized", f"{sender} is not a dispatcher of "
                                    "this agent")
        el = iq.xml.find(f"{{{NS}}}chunk")
        try:
            extra = set(el.attrib) - {"blob", "offset", "total"}
            if extra:
                raise ValueError(f"<chunk> has no attribute {sorted(extra)[0]!r}")
            blob_id = el.get("blob")
            if blob_id is None or not ID.fullmatch(blob_id):
                raise ValueError("<chunk blob> must be 1 to 128 of [A-Za-z0-9._:-]")
            offset = u64(el.get("offset"), "<chunk offset>")
            total = u64(el.get("total"), "<chunk total>")
            data = b64decode(el.text or "")
        except (ValueError, binascii.Error) as e:
            return self.reply_error(iq, "malformed", f"invalid <chunk/>: {e}")
        try:
            self.blobs.chunk(sender, blob_id, offset, total, data, time.monotonic())
        except payloads.ChunkError as e:
            return self.reply_error(iq, e.condition, e.text, **e.attrs)
        iq.reply(clear=True).send()

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
    p.add_argument("--no-http-data", dest="http_data", action="store_false",
                   help="announce protocol 1.0: inputs and outputs over 64 KiB only in chunks, "
                   "never over HTTP")
    p.add_argument("--max-payload", type=int, default=64 * 1024 * 1024,
                   help="largest input taken, in chunks or over HTTP, in bytes")
    p.add_argument("--log", default="INFO")
    opts = p.parse_args()
    logging.basicConfig(level=opts.log, format="%(asctime)s %(levelname)s %(message)s")
    opts.password = os.environ.get("SPINE_AGENT_PASSWORD")
    if not opts.password:
        p.error("set the password in SPINE_AGENT_PASSWORD")
    if opts.slots < 1 or opts.heartbeat_ms < 100 or opts.max_payload < 1:
        p.error("--slots and --max-payload must be at least 1 and --heartbeat-ms at least 100")
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
