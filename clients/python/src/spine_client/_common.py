"""What the sync and async clients share: turning a call into an HTTP request (JSON or raw
upload, the ``wait`` parameter, an idempotency key), reading answers into data or typed
exceptions, the retry schedule, and the server-sent-events parser.

Nothing here does I/O, so ``Client`` and ``AsyncClient`` differ only in how they send.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import random
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

from ._errors import SpineError, api_error

#: Inputs up to this size travel inline as base64 JSON; larger ones as a raw upload
#: (the dispatcher's inline limit: docs/dispatcher.md §6).
INLINE_LIMIT = 64 * 1024
#: The longest ``wait`` one request asks for: the dispatcher allows up to its
#: ``http_request_timeout`` (2 min by default) less a second.
MAX_WAIT = 60.0
#: Jobs per ``POST /v1/jobs:batch`` (the API's bound).
BATCH_LIMIT = 1000
#: States after which a job never changes.
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "timed-out"})

InputType = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", None]


def wait_param(seconds: float) -> str:
    """A duration the dispatcher parses (it wants units): milliseconds, at least 1."""
    return f"{max(1, int(seconds * 1000))}ms"


def duration(value: Union[str, float, int, None]) -> Optional[str]:
    """A job ``deadline``: a string with units is sent as it is, a number is seconds."""
    if value is None or isinstance(value, str):
        return value
    return wait_param(float(value))


@dataclass
class Payload:
    """A job's input once read: ``data`` in memory, or ``path`` to stream from."""

    data: Optional[bytes] = None
    path: Optional[str] = None
    size: int = 0
    mime: Optional[str] = None


def read_input(value: Any, input_type: Optional[str]) -> Payload:
    """Normalises ``input``: bytes as they are, ``str`` as UTF-8 text, a path (``pathlib.Path``
    or any ``os.PathLike``) streamed from the file, a file object read whole."""
    if value is None:
        return Payload(mime=input_type)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return Payload(data=data, size=len(data), mime=input_type)
    if isinstance(value, str):
        data = value.encode("utf-8")
        return Payload(data=data, size=len(data), mime=input_type or "text/plain; charset=utf-8")
    if isinstance(value, os.PathLike):
        path = os.fspath(value)
        guessed = mimetypes.guess_type(path)[0]
        return Payload(path=path, size=os.path.getsize(path), mime=input_type or guessed)
    if hasattr(value, "read"):
        data = value.read()
        if isinstance(data, str):
            data = data.encode("utf-8")
        return Payload(data=bytes(data), size=len(data), mime=input_type)
    raise TypeError(
        "input must be bytes, str, a path (pathlib.Path) or a file object, "
        f"not {type(value).__name__}"
    )


def job_fields(
    capability: str,
    args: Optional[Mapping[str, Any]],
    *,
    idempotency_key: Optional[str],
    priority: Optional[int],
    deadline: Union[str, float, None],
    filter: Optional[str],
    more: Mapping[str, Any],
) -> Dict[str, Any]:
    """The job's JSON fields without its input; ``None`` values are left out."""
    fields: Dict[str, Any] = {"capability": capability}
    if args:
        fields["args"] = dict(args)
    fields["idempotency_key"] = idempotency_key or new_key()
    fields["priority"] = priority
    fields["deadline"] = duration(deadline)
    fields["filter"] = filter
    for k, v in more.items():
        fields[k] = duration(v) if k == "deadline" else v
    return {k: v for k, v in fields.items() if v is not None}


def new_key() -> str:
    """An idempotency key for a submission the caller gave none: a retried POST then finds
    the job its first attempt created instead of creating a second one."""
    return f"py-{uuid.uuid4()}"


@dataclass
class Request:
    """One HTTP request, as both clients send it."""

    method: str
    path: str
    params: Dict[str, str] = field(default_factory=dict)
    json: Any = None
    content: Optional[bytes] = None
    path_body: Optional[str] = None
    headers: Dict[str, str] = field(default_factory=dict)
    read_timeout: Optional[float] = None


def submit_request(fields: Dict[str, Any], payload: Payload, wait: Optional[float]) -> Request:
    """``POST /v1/jobs``: JSON with base64 input up to [`INLINE_LIMIT`], a raw upload
    (the body is the input, the fields in the query string) above it, where the dispatcher
    streams the body to its blob store instead of decoding base64 in memory."""
    params: Dict[str, str] = {}
    if wait is not None:
        params["wait"] = wait_param(min(wait, MAX_WAIT))
    large = payload.size > INLINE_LIMIT
    # A raw body whose type is JSON or a form would be read as the job itself: those inputs
    # go inline (the caller uploads them with put_blob and input_ref when they are large).
    json_like = (payload.mime or "").split(";")[0].strip().lower() in (
        "application/json",
        "application/x-www-form-urlencoded",
    )
    if large and not json_like:
        for k, v in fields.items():
            params[k] = (
                json.dumps(v, separators=(",", ":"))
                if isinstance(v, (dict, list))
                else _query_value(v)
            )
        return Request(
            "POST",
            "/v1/jobs",
            params=params,
            content=payload.data,
            path_body=payload.path,
            headers={
                "Content-Type": payload.mime or "application/octet-stream",
                "Content-Length": str(payload.size),
            },
        )
    body = dict(fields)
    data = payload.data
    if payload.path is not None:
        with open(payload.path, "rb") as f:
            data = f.read()
    if data:
        body["input"] = base64.b64encode(data).decode("ascii")
    if payload.mime:
        body["input_type"] = payload.mime
    return Request("POST", "/v1/jobs", params=params, json=body)


def _query_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def batch_item(job: Mapping[str, Any]) -> Dict[str, Any]:
    """One job of ``submit_many``: the JSON form, with ``input`` given as bytes or str
    encoded to base64, ``deadline`` as seconds or a string, and an idempotency key added."""
    item = {k: v for k, v in job.items() if v is not None}
    if "capability" not in item:
        raise ValueError("each job of submit_many needs a 'capability'")
    raw = item.get("input")
    if isinstance(raw, str):
        item.setdefault("input_type", "text/plain; charset=utf-8")
        raw = raw.encode("utf-8")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        item["input"] = base64.b64encode(bytes(raw)).decode("ascii")
    if "deadline" in item:
        item["deadline"] = duration(item["deadline"])
    item.setdefault("idempotency_key", new_key())
    return item


def fragment_ref(blob: Mapping[str, Any], name: Optional[str]) -> Dict[str, Any]:
    """A fragment by reference (PROTOCOL.md §11.7.1): an uploaded blob and its name."""
    ref = {"sha256": blob["sha256"], "size": blob["size"]}
    if name is not None:
        ref["name"] = name
    return ref


def as_bytes(value: Union[bytes, bytearray, memoryview, str]) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"expected bytes or str, not {type(value).__name__}")


def check(status: int, body: bytes) -> None:
    """Raises the typed exception for an error answer."""
    if status >= 400:
        raise api_error(status, body)


def decode_json(status: int, body: bytes) -> Any:
    check(status, body)
    try:
        return json.loads(body)
    except ValueError as e:
        raise SpineError(
            "bad-answer",
            f"expected JSON from the dispatcher, got {body[:100]!r}: {e}",
            None,
            status,
        ) from e


def inline_output(view: Mapping[str, Any]) -> Optional[bytes]:
    """The output carried in a job view (base64, when at most 64 KiB), or ``None`` when it
    must be fetched from ``result.output_url``."""
    result = view.get("result") or {}
    out = result.get("output")
    if isinstance(out, str):
        return base64.b64decode(out)
    if not result.get("output_url") and not result.get("output_size"):
        return b""
    return None


def backoff(attempt: int) -> float:
    """Seconds before retry ``attempt`` (1, 2, …): 0.1 s doubling, capped at 2 s, with
    jitter so that many clients cut off together do not come back together."""
    base = min(2.0, 0.1 * (2 ** (attempt - 1)))
    return base * (0.5 + random.random() / 2)


@dataclass
class Event:
    """One server-sent event of ``GET /v1/jobs/{id}/events``: ``kind`` is ``state``,
    ``progress``, ``partial``, ``final`` or ``lagged``; ``data`` its JSON."""

    kind: str
    data: Dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


class SseParser:
    """Feeds lines of a ``text/event-stream`` and yields complete events (comments, the
    keep-alives, are skipped)."""

    def __init__(self) -> None:
        self._kind = "message"
        self._data: List[str] = []

    def feed(self, line: str) -> Optional[Event]:
        line = line.rstrip("\r\n")
        if line == "":
            if not self._data:
                self._kind = "message"
                return None
            text = "\n".join(self._data)
            kind = self._kind
            self._kind, self._data = "message", []
            try:
                data = json.loads(text)
            except ValueError:
                data = {"text": text}
            return Event(kind, data if isinstance(data, dict) else {"value": data})
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._kind = value
        elif name == "data":
            self._data.append(value)
        return None


def parse_lines(lines: Iterable[str]) -> Iterator[Event]:
    parser = SseParser()
    for line in lines:
        ev = parser.feed(line)
        if ev is not None:
            yield ev


def split_batches(items: List[Dict[str, Any]]) -> List[List[Dict[str, Any]]]:
    return [items[i : i + BATCH_LIMIT] for i in range(0, len(items), BATCH_LIMIT)] or [[]]


def auth_headers(token: Optional[str]) -> Dict[str, str]:
    headers = {"User-Agent": "spine-client-python/0.1"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def fragment_names(n: int, names: Optional[List[str]]) -> List[Optional[str]]:
    if names is None:
        return [f"part-{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"names has {len(names)} entries for {n} fragments")
    return list(names)


Retryable = Tuple[type, ...]
