"""Large payloads for agent.py, without XMPP: blobs received in chunks and HTTP transfers.

A job's input over the inline limit reaches the agent either as chunks ahead of the job IQ
(PROTOCOL.md §13.1; `Blobs` holds them until the job refers to them, with the bounds of §13.2)
or, with protocol 1.1, as a reference whose signed URL the agent GETs (§13.4, `HttpData.fetch`).
An output over the limit goes back either to an upload slot by PUT (`HttpData.put`) or in
chunks (`chunks`). agent.py decides which; the functions here only move and check bytes. The
HTTP functions block, so agent.py runs them in a thread pool, never on the XMPP loop.

Standard library only: http.client, not urllib, because a signed URL must be fetched exactly
as given (no proxy from the environment, no redirect) with a short connect timeout and a
separate idle timeout.
"""

import base64
import hashlib
import http.client
import json
import socket
import ssl
import time
from urllib.parse import urlsplit

CHUNK_MAX = 65536  # decoded bytes in one <chunk> (§13.1)
INCOMPLETE_TTL_S = 300  # an incomplete blob is dropped 5 minutes after its last chunk (§13.2)
UNREFERENCED_TTL_S = 600  # a complete blob no job referred to, after 10 minutes
OPEN_PER_SENDER = 64  # open blobs per dispatcher, as Spine's agent allows (§13.2)
CONNECT_TIMEOUT_S = 5
IDLE_TIMEOUT_S = 30  # a transfer that moves no byte for this long is given up
READ_SIZE = 256 * 1024


class ChunkError(Exception):
    """A chunk refused, with its Spine condition: `malformed`, `too-large` or `busy`."""

    def __init__(self, condition, text, **attrs):
        super().__init__(text)
        self.condition, self.text, self.attrs = condition, text, attrs


class Blob:
    """A blob arriving in chunks: the parts that arrived, by offset (no `total` reserved)."""

    def __init__(self, total, now):
        self.total, self.parts, self.have, self.touched = total, {}, 0, now

    def complete(self):
        return self.have >= self.total

    def bytes(self):
        """The whole blob; parts may overlap (a resent chunk with other bounds)."""
        out = bytearray(self.total)
        for offset, data in self.parts.items():
            out[offset:offset + len(data)] = data
        return bytes(out)


class Blobs:
    """Blobs received in chunks, scoped to the sender's bare JID (§13.2)."""

    def __init__(self, max_payload):
        self.max_payload = max_payload
        self.open = {}  # (sender bare JID, blob id) -> Blob

    def expire(self, now):
        for key, b in list(self.open.items()):
            if now - b.touched > (UNREFERENCED_TTL_S if b.complete() else INCOMPLETE_TTL_S):
                del self.open[key]

    def chunk(self, sender, blob_id, offset, total, data, now):
        """Takes one chunk, or raises ChunkError saying why not."""
        self.expire(now)
        if total > self.max_payload:
            raise ChunkError("too-large", f"blob of {total} bytes exceeds the limit of "
                             f"{self.max_payload}", max=self.max_payload)
        if len(data) > CHUNK_MAX:
            raise ChunkError("malformed", f"a chunk holds {len(data)} bytes, over {CHUNK_MAX}")
        if offset + len(data) > total:
            raise ChunkError("malformed", f"chunk at {offset} of {len(data)} bytes reaches past "
                             f"total {total}")
        key = (sender, blob_id)
        blob = self.open.get(key)
        if blob is None:
            mine = [b for (s, _), b in self.open.items() if s == sender]
            announced = sum(b.total for b in mine) + total
            if len(mine) >= OPEN_PER_SENDER or announced > 4 * self.max_payload:
                raise ChunkError("busy", f"blob {blob_id} refused: {len(mine)} open blobs "
                                 f"announcing {announced} bytes with it; send it when earlier "
                                 "blobs were used or expired")
            blob = self.open[key] = Blob(total, now)
        elif blob.total != total:
            raise ChunkError("malformed", f"chunk total {total} differs from the blob's "
                             f"{blob.total}")
        old = blob.parts.get(offset)
        blob.have += len(data) - (len(old) if old is not None else 0)
        blob.parts[offset] = data
        blob.touched = now

    def take(self, sender, blob_id):
        """The complete blob a job refers to, out of the store: the job holds it now (§13.2).
        Raises ValueError (`malformed`) if it is unknown or incomplete."""
        blob = self.open.pop((sender, blob_id), None)
        if blob is None:
            raise ValueError(f"blob {blob_id} is unknown (no chunk of it arrived, or it expired)")
        if not blob.complete():
            raise ValueError(f"blob {blob_id} is incomplete: {blob.have} of {blob.total} bytes")
        return blob


def checked(blob, blob_id, size, sha256_hex):
    """The bytes of a blob, if they have the size and SHA-256 its reference says (§13.2);
    else ValueError (`malformed`). Hashes: run it off the XMPP loop."""
    if size != blob.total:
        raise ValueError(f"size {size} differs from blob {blob_id}'s total {blob.total}")
    data = blob.bytes()
    if hashlib.sha256(data).hexdigest() != sha256_hex:
        raise ValueError(f"the SHA-256 of blob {blob_id} differs from the reference's")
    return data


def chunks(data):
    """(offset, base64 text) of each chunk of `data`, in order (§13.1)."""
    for offset in range(0, len(data), CHUNK_MAX):
        yield offset, base64.b64encode(data[offset:offset + CHUNK_MAX]).decode()


class TransferError(Exception):
    """An HTTP transfer that failed; the message names the URL's host and the reason."""


class HttpData:
    """The agent's HTTP client for references and upload slots (§13.4). HTTPS is verified with
    the CA the XMPP side trusts (`ca_file`, or the system's roots)."""

    def __init__(self, ca_file):
        self.tls = ssl.create_default_context(cafile=ca_file)
        self.tls.minimum_version = ssl.TLSVersion.TLSv1_2

    def _connect(self, url):
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise TransferError(f"{url[:64]}: not an http:// or https:// URL")
        if u.scheme == "https":
            conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=CONNECT_TIMEOUT_S,
                                               context=self.tls)
        else:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=CONNECT_TIMEOUT_S)
        conn.connect()
        conn.sock.settimeout(IDLE_TIMEOUT_S)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        return conn, target

    def fetch(self, urls, size, sha256, stop, deadline):
        """GETs the sources in order until one gives exactly `size` bytes whose SHA-256 is
        `sha256` (32 bytes). Never reads more than `size` bytes. `stop` (a threading.Event)
        and `deadline` (time.monotonic, or None) end it early. Raises TransferError naming
        each source's host and reason."""
        reasons = []
        for url in urls:
            try:
                return self._fetch_one(url, size, sha256, stop, deadline)
            except TransferError as e:
                reasons.append(str(e))
            except Exception as e:  # connection, TLS, protocol: the source failed
                reasons.append(f"{urlsplit(url).hostname}: {describe(e)}")
            if stop.is_set():
                break
        raise TransferError("; ".join(reasons))

    def resolve_fragments(self, data, stop, deadline):
        """A fragment list (§11.7) with every fragment inline: each one that names a blob
        (`sha256`, `size`, `url`) is fetched and checked, in order. Bytes that are not such a
        list come back as they are, for the handler to judge. Raises TransferError."""
        try:
            items = json.loads(data)
        except ValueError:
            return data
        if not isinstance(items, list) or not any(
                isinstance(f, dict) and "url" in f for f in items):
            return data
        out = []
        for i, f in enumerate(items):
            if isinstance(f, dict) and "url" in f:
                try:
                    size, sha256 = int(f["size"]), bytes.fromhex(f["sha256"])
                except (KeyError, TypeError, ValueError) as e:
                    raise TransferError(f"fragment {i}: not a reference: {e}")
                blob = self.fetch([f["url"]], size, sha256, stop, deadline)
                f = {k: v for k, v in f.items() if k not in ("sha256", "size", "url")}
                f["data"] = base64.b64encode(blob).decode("ascii")
            out.append(f)
        return json.dumps(out).encode()

    def _fetch_one(self, url, size, sha256, stop, deadline):
        host = urlsplit(url).hostname
        conn, target = self._connect(url)
        try:
            conn.request("GET", target)
            resp = conn.getresponse()
            if resp.status != 200:
                raise TransferError(f"{host}: HTTP {resp.status} {resp.reason}")
            announced = resp.getheader("Content-Length")
            if announced is not None and announced.strip() != str(size):
                raise TransferError(f"{host}: the response announces {announced} bytes, "
                                    f"not {size}")
            buf, digest = bytearray(), hashlib.sha256()
            while True:
                if stop.is_set():
                    raise TransferError(f"{host}: stopped")
                if deadline is not None and time.monotonic() > deadline:
                    raise TransferError(f"{host}: the job's deadline passed during the fetch")
                # One byte more than `size` at most: enough to see that there are too many.
                block = resp.read(min(READ_SIZE, size + 1 - len(buf)))
                if not block:
                    break
                buf += block
                digest.update(block)
                if len(buf) > size:
                    raise TransferError(f"{host}: more than the announced {size} bytes")
            if len(buf) != size:
                raise TransferError(f"{host}: {len(buf)} bytes, expected {size}")
            if digest.digest() != sha256:
                raise TransferError(f"{host}: the SHA-256 of the bytes differs from the job's")
            return bytes(buf)
        finally:
            conn.close()

    def put(self, url, body, mime):
        """PUTs `body` to an upload slot; returns on 201, else raises TransferError."""
        host = urlsplit(url).hostname
        try:
            conn, target = self._connect(url)
            try:
                headers = {"Content-Length": str(len(body))}
                if mime:
                    headers["Content-Type"] = mime
                conn.request("PUT", target, body=body, headers=headers)
                resp = conn.getresponse()
                detail = resp.read(2048).decode("utf-8", "replace").strip()
                if resp.status != 201:
                    raise TransferError(f"{host}: HTTP {resp.status} {resp.reason}: {detail}")
            finally:
                conn.close()
        except TransferError:
            raise
        except Exception as e:
            raise TransferError(f"{host}: {describe(e)}") from e


def describe(e):
    """A short reason for a failed connection or exchange."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or e}"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the host ({e.strerror})"
    if isinstance(e, http.client.HTTPException):
        return f"invalid HTTP response ({type(e).__name__}: {e})"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return f"{type(e).__name__}: {e}"
