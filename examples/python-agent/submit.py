#!/usr/bin/env python3
"""Submit a Spine job over XMPP with slixmpp and wait for its outcome (PROTOCOL.md §11).

Sends <submit watch='true'> to the dispatcher's full JID, reads the <accepted> job id, then
waits for the <job-status> message the dispatcher pushes when the job ends. Prints the output
on standard output and exits 0 on success; prints the failure and exits 1 otherwise.

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
import xml.etree.ElementTree as ET

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

NS = "urn:spine:1"


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
        if status is None or status.get("state") not in ("succeeded", "failed", "cancelled", "timed-out"):
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

    async def on_start(self, _):
        self.send_presence()  # the pushed status goes to this full JID
        iq = self.make_iq_set(ito=self.opts.dispatcher)
        submit = ET.Element(f"{{{NS}}}submit", {"capability": self.opts.capability, "watch": "true"})
        if self.data:
            inp = ET.SubElement(submit, f"{{{NS}}}input", {"type": self.opts.type})
            inp.text = base64.b64encode(self.data).decode()
        iq.append(submit)
        try:
            reply = await iq.send(timeout=30)
        except IqError as e:
            err = e.iq["error"]
            spine = next((c.tag.split("}")[1] for c in err.xml if c.tag.startswith(f"{{{NS}}}")), "?")
            return self.finish(1, f"submit refused: {err['text']} ({spine})")
        except IqTimeout:
            return self.finish(1, "no answer from the dispatcher within 30 s")
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
    p.add_argument("capability")
    opts = p.parse_args()
    logging.basicConfig(level="WARNING", format="%(levelname)s %(message)s")
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
