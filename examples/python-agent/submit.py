#!/usr/bin/env python3
"""Submit a Spine job over XMPP with slixmpp and wait for its outcome (PROTOCOL.md §11).

Sends <submit watch='true' wait-ms='…'> to the dispatcher's full JID (protocol 1.3, §11.2.1):
a job that ends within the wait is answered with its final <job-status>; otherwise the answer
is <accepted> with the job id, and the <job-status> message the dispatcher pushes when the job
ends follows. A dispatcher older than 1.3 refuses wait-ms as malformed: the submit is sent
again without it. Prints the output on standard output and exits 0 on success; prints the
failure and exits 1 otherwise.

    echo hello | SPINE_PASSWORD=... python3 submit.py --jid webapp@bus.example.com \\
        --server 127.0.0.1:5222 --dispatcher dispatcher@bus.example.com/d1 text.upper
"""

import argparse
import asyncio
import base64
import ipaddress
import logging
import os
import ssl
import sys
import uuid
import xml.etree.ElementTree as ET

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

NS = "urn:spine:1"
MAX_WAIT_MS = 300_000  # the protocol's limit on wait-ms (PROTOCOL.md §11.1)
FINAL = ("succeeded", "failed", "cancelled", "timed-out")


class Submitter(slixmpp.ClientXMPP):
    def __init__(self, opts, data, loopback):
        # SCRAM without TLS on loopback only (it never reveals the password); PLAIN never.
        mechs = {"unencrypted_scram": loopback, "unencrypted_plain": False}
        super().__init__(opts.jid, opts.password, plugin_config={"feature_mechanisms": mechs})
        self.opts, self.data = opts, data
        self.job = None
        self.statuses = {}  # job id -> <job-status> element, as they arrive
        self.outcome = self.loop.create_future()
        self.register_handler(Callback(
            "spine-status", MatchXPath(f"{{jabber:client}}message/{{{NS}}}job-status"),
            self.on_status))
        self.add_event_handler("session_start", self.on_start)
        self.add_event_handler("failed_all_auth", lambda _: self.finish(2, "login failed: credentials refused or no acceptable SASL mechanism"))
        self.add_event_handler("connection_failed", lambda e: self.finish(2, f"cannot connect: {e}"))

    def finish(self, code, text=None):
        if text:
            print(text, file=sys.stderr)
        if not self.outcome.done():
            self.outcome.set_result(code)

    def on_status(self, msg):
        status = msg.xml.find(f"{{{NS}}}job-status")
        self.statuses[status.get("job")] = status
        self.check()

    def check(self):
        status = self.statuses.get(self.job)
        if status is None or status.get("state") not in FINAL:
            return
        if status.get("state") == "succeeded":
            out = status.find(f"{{{NS}}}result/{{{NS}}}output")
            if out is not None and (out.get("truncated") == "true" or out.get("blob")):
                # Over 64 KiB: sent as chunks (PROTOCOL.md §13.1), which this small client
                # does not take, so the dispatcher marked it left out. Never print nothing.
                self.finish(1, f"job {self.job} succeeded, but its output ({out.get('size')} bytes) "
                               "is larger than 64 KiB and this client does not assemble chunks: "
                               f"fetch it with GET /v1/jobs/{self.job} over HTTP")
                return
            data = base64.b64decode(out.text or "") if out is not None else b""
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
            self.finish(0)
        else:
            failure = status.find(f"{{{NS}}}failure")
            cond = failure.get("condition") if failure is not None else "?"
            text = (failure.text or "") if failure is not None else ""
            self.finish(1, f"job {self.job} {status.get('state')}: {text} ({cond})")

    async def submit(self, key, wait_ms):
        """Sends the submit; its reply, or raises IqError / IqTimeout."""
        iq = self.make_iq_set(ito=self.opts.dispatcher)
        attrs = {"capability": self.opts.capability, "watch": "true", "idempotency-key": key}
        if wait_ms:
            attrs["wait-ms"] = str(wait_ms)
        submit = ET.Element(f"{{{NS}}}submit", attrs)
        if self.data:
            inp = ET.SubElement(submit, f"{{{NS}}}input", {"type": self.opts.type})
            inp.text = base64.b64encode(self.data).decode()
        iq.append(submit)
        # The answer may wait for the job's end: the IQ's timeout is longer than the wait.
        return await iq.send(timeout=wait_ms / 1000 + 30)

    async def on_start(self, _):
        self.send_presence()  # the pushed status goes to this full JID
        # The same key if the submit is sent again: one job, however often it is asked for.
        key = str(uuid.uuid4())
        wait_ms = int(max(0, min(self.opts.timeout - 5, MAX_WAIT_MS / 1000)) * 1000)
        for attempt in range(3):
            try:
                reply = await self.submit(key, wait_ms)
                break
            except IqError as e:
                err = e.iq["error"]
                spine = next((c.tag.split("}")[1] for c in err.xml if c.tag.startswith(f"{{{NS}}}")), "?")
                if wait_ms and spine == "malformed" and "wait-ms" in (err["text"] or ""):
                    logging.info("the dispatcher does not take wait-ms (before protocol 1.3): submitting without it")
                    wait_ms = 0
                    continue
                return self.finish(1, f"submit refused: {err['text']} ({spine})")
            except IqTimeout:
                # The answer is not stored (the dispatcher restarted, or its session ended):
                # ask again with the same key.
                logging.info("no answer to the submit: sending it again with the same key")
        else:
            return self.finish(1, "no answer from the dispatcher to three submits")
        status = reply.xml.find(f"{{{NS}}}job-status")
        if status is not None:
            # The job ended within the wait: its end is the answer.
            self.job = status.get("job")
            self.statuses[self.job] = status
            logging.info("job %s ended within the wait (%s)", self.job, status.get("state"))
            return self.check()
        accepted = reply.xml.find(f"{{{NS}}}accepted")
        self.job = accepted.get("job")
        logging.info("job %s accepted (%s)", self.job, accepted.get("state"))
        self.check()  # the status may have arrived before the reply was read


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jid", required=True, help="the submitter's account")
    p.add_argument("--server", required=True, help="host:port of the XMPP server")
    p.add_argument("--dispatcher", required=True, help="the dispatcher's FULL JID (§11)")
    p.add_argument("--type", default="text/plain", help="MIME type of the input")
    p.add_argument("--ca-file", help="PEM file of the CA certificate(s) to trust (default: the system's)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the outcome")
    p.add_argument("-v", "--verbose", action="store_true", help="say how the job was answered")
    p.add_argument("capability")
    opts = p.parse_args()
    logging.basicConfig(level="INFO" if opts.verbose else "WARNING", format="%(levelname)s %(message)s")
    if not opts.verbose:
        logging.getLogger("slixmpp").setLevel("WARNING")
    opts.password = os.environ.get("SPINE_PASSWORD")
    if not opts.password:
        p.error("set the password in SPINE_PASSWORD")
    data = sys.stdin.buffer.read()
    host, _, port = opts.server.rpartition(":")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    client = Submitter(opts, data, loopback)
    client.enable_direct_tls = False  # plain TCP, then STARTTLS when offered
    if opts.ca_file:
        client.ca_certs = opts.ca_file
        client.ssl_context = ssl.create_default_context(cafile=opts.ca_file)
    if not loopback:
        client.enable_plaintext = False  # TLS off loopback, never a clear password

    async def run():
        client.connect(host, int(port))
        try:
            return await asyncio.wait_for(client.outcome, opts.timeout)
        except asyncio.TimeoutError:
            print(f"no outcome within {opts.timeout:.0f} s", file=sys.stderr)
            return 1
        finally:
            client.disconnect()

    sys.exit(client.loop.run_until_complete(run()))


if __name__ == "__main__":
    main()
