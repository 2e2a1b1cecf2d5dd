"""The blocking client: a web view (Flask, Django) calls ``Client.run`` or ``Client.submit``
and gets bytes or a :class:`Job` back. Each call becomes a request built in ``_common`` and is
sent over a kept-alive connection of its own; connection errors are retried (submissions carry an
idempotency key, so a retry never makes a second job), HTTP errors become typed exceptions.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import httpx

from . import _common as c
from ._errors import ConnectionFailed, JobError, SpineError, WaitTimeout, error_for, job_error

DEFAULT_URL = "http://127.0.0.1:8480"


class Job:
    """A submitted job: its id, its last known state and view (``GET /v1/jobs/{id}``).

    Methods that talk to the dispatcher update ``state`` and ``view``.
    """

    def __init__(self, client: "Client", view: Dict[str, Any]) -> None:
        self._client = client
        self.view: Dict[str, Any] = dict(view)
        self.id: str = str(view["id"])

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.state}>"

    @property
    def state(self) -> str:
        return str(self.view.get("state"))

    @property
    def done(self) -> bool:
        """Whether the job reached a final state (it never changes after)."""
        return self.state in c.FINAL_STATES

    @property
    def error(self) -> Optional[JobError]:
        """The job's outcome as an exception when it ended without success."""
        if self.done and self.state != "succeeded":
            return job_error(self.view)
        return None

    def _merge(self, view: Mapping[str, Any]) -> None:
        self.view.update(view)

    def refresh(self, wait: Optional[float] = None) -> "Job":
        """Reads the job again; with ``wait`` (seconds), a long poll that answers as soon as
        the job ends or when the wait is over."""
        self._merge(self._client._job_view(self.id, wait))
        return self

    def wait(self, timeout: Optional[float] = None) -> "Job":
        """Waits until the job ends (long polls, no busy loop); raises :class:`WaitTimeout`
        after ``timeout`` seconds (``None``: no limit). Does not raise for a failed job."""
        started = time.monotonic()
        while not self.done:
            left = None if timeout is None else timeout - (time.monotonic() - started)
            if left is not None and left <= 0:
                raise WaitTimeout(self.id, timeout or 0.0, self.state)
            self.refresh(wait=c.MAX_WAIT if left is None else min(left, c.MAX_WAIT))
        if "result" not in self.view and "error" not in self.view:
            # Answers such as a submission's or a cancel's carry only the id and state.
            self.refresh()
        return self

    def result(self, timeout: Optional[float] = None) -> bytes:
        """The job's output once it succeeded. Raises :class:`JobFailed`,
        :class:`JobCancelled` or :class:`JobTimedOut` when it ended otherwise, and
        :class:`WaitTimeout` when ``timeout`` seconds pass first (the job goes on)."""
        self.wait(timeout)
        err = self.error
        if err is not None:
            raise err
        out = c.inline_output(self.view)
        return out if out is not None else self.output()

    def output(self) -> bytes:
        """The raw output (``GET /v1/jobs/{id}/output``), whatever its size."""
        r = self._client._send(c.Request("GET", f"/v1/jobs/{self.id}/output"))
        c.check(r.status_code, r.content)
        return r.content

    def cancel(self) -> "Job":
        """Cancels the job (``DELETE /v1/jobs/{id}``); a job that had ended keeps its state."""
        r = self._client._send(c.Request("DELETE", f"/v1/jobs/{self.id}"))
        self._merge(c.decode_json(r.status_code, r.content))
        return self

    def events(self) -> Iterator[c.Event]:
        """Follows the job (``GET /v1/jobs/{id}/events``): ``state``, ``progress``,
        ``partial`` and last ``final`` events, until the job ends. Progress and partials come
        only for jobs submitted with ``progress=True``."""
        client = self._client
        timeout = httpx.Timeout(client.timeout, read=max(client.timeout, 40.0))
        with client._http() as http, http.stream(
            "GET", f"/v1/jobs/{self.id}/events", timeout=timeout
        ) as r:
            if r.status_code >= 400:
                c.check(r.status_code, r.read())
            for ev in c.parse_lines(r.iter_lines()):
                if ev.kind in ("state", "final"):
                    self._merge(ev.data)
                yield ev
                if ev.kind == "final":
                    return


class Client:
    """A client of a Spine dispatcher's HTTP API, with kept-alive connections.

    ``timeout`` bounds each request (seconds); a request that waits for a job gets its wait
    on top. ``retries`` is how many times a request is sent again after a connection error
    (never after an HTTP error answer). Use it as a context manager, or call ``close()``.

    One ``Client`` is meant to be shared by every thread of a web app: each request uses a
    kept-alive connection no other request uses at the same time, taken from the idle ones
    (any thread's) or opened; at most ``max_connections`` are open, and a request beyond waits
    for one.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: Optional[str] = None,
        timeout: float = 30.0,
        *,
        retries: int = 3,
        max_connections: int = 100,
        transport: Optional[httpx.BaseTransport] = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self._token = token
        self._transport = transport
        # httpx's pool takes one lock for every request and answer and scans every connection
        # under it: 64 threads sharing one pool spent half their time there (BENCHMARKS.md,
        # "Python client against Celery"). So each request checks out an httpx.Client that
        # only it uses (its own kept-alive connection), from a stack of idle ones, and puts it
        # back: connections are reused across threads, and at most `max_connections` exist.
        self._idle: List[httpx.Client] = []
        self._every: List[httpx.Client] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._closed = False

    @contextlib.contextmanager
    def _http(self) -> Iterator[httpx.Client]:
        """An httpx.Client for one request (or one event stream), this caller's alone until it
        is done; waits while `max_connections` are in use."""
        self._slots.acquire()
        try:
            with self._lock:
                if self._closed:
                    raise RuntimeError("this spine_client.Client is closed")
                http = self._idle.pop() if self._idle else None
            if http is None:
                http = httpx.Client(
                    base_url=self.base_url,
                    headers=c.auth_headers(self._token),
                    timeout=self.timeout,
                    limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                    transport=self._transport,
                )
                with self._lock:
                    self._every.append(http)
            try:
                yield http
            finally:
                with self._lock:
                    if self._closed:
                        http.close()
                    else:
                        self._idle.append(http)
        finally:
            self._slots.release()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            every, self._every, self._idle = self._every, [], []
        for http in every:
            http.close()

    # -- sending ------------------------------------------------------------------------

    def _send(self, req: c.Request) -> httpx.Response:
        timeout = httpx.Timeout(
            self.timeout,
            read=None if req.read_timeout is None else req.read_timeout + self.timeout,
        )
        attempt = 0
        while True:
            attempt += 1
            try:
                if req.path_body is not None:
                    with open(req.path_body, "rb") as f, self._http() as http:
                        return http.request(
                            req.method,
                            req.path,
                            params=req.params,
                            content=f,
                            headers=req.headers,
                            timeout=timeout,
                        )
                with self._http() as http:
                    return http.request(
                        req.method,
                        req.path,
                        params=req.params,
                        json=req.json,
                        content=req.content,
                        headers=req.headers,
                        timeout=timeout,
                    )
            except httpx.TransportError as e:
                if attempt > self.retries:
                    raise ConnectionFailed(
                        "connection-failed",
                        f"{req.method} {self.base_url}{req.path} failed after {attempt} "
                        f"attempts: {e!r}",
                    ) from e
                time.sleep(c.backoff(attempt))

    def _job_view(self, job_id: str, wait: Optional[float]) -> Dict[str, Any]:
        req = c.Request("GET", f"/v1/jobs/{job_id}")
        if wait is not None:
            req.params["wait"] = c.wait_param(wait)
            req.read_timeout = wait
        r = self._send(req)
        return c.decode_json(r.status_code, r.content)

    # -- jobs ---------------------------------------------------------------------------

    def submit(
        self,
        capability: str,
        args: Optional[Mapping[str, Any]] = None,
        input: c.InputType = None,
        input_type: Optional[str] = None,
        *,
        wait: Optional[float] = None,
        idempotency_key: Optional[str] = None,
        priority: Optional[int] = None,
        deadline: Union[str, float, None] = None,
        filter: Optional[str] = None,
        **more: Any,
    ) -> Job:
        """Submits a job (``POST /v1/jobs``) and returns it.

        ``input`` is bytes, ``str`` (UTF-8 text), a ``pathlib.Path`` (streamed) or a file
        object; over 64 KiB it goes as a raw upload. With ``wait`` (seconds) the answer comes
        when the job ends or the wait is over, in one round trip. ``deadline`` is seconds or a
        string with units (``"30s"``). Other API fields (``strategy``, ``sort``,
        ``max_attempts``, ``progress``, ``wait_for_agent``…) go in ``more``.
        """
        fields = c.job_fields(
            capability,
            args,
            idempotency_key=idempotency_key,
            priority=priority,
            deadline=deadline,
            filter=filter,
            more=more,
        )
        req = c.submit_request(fields, c.read_input(input, input_type), wait)
        if wait is not None:
            req.read_timeout = min(wait, c.MAX_WAIT)
        r = self._send(req)
        return Job(self, c.decode_json(r.status_code, r.content))

    def run(
        self,
        capability: str,
        args: Optional[Mapping[str, Any]] = None,
        input: c.InputType = None,
        input_type: Optional[str] = None,
        *,
        timeout: float = 30.0,
        **more: Any,
    ) -> bytes:
        """Submits a job and returns its output: one round trip when it ends within
        ``timeout`` seconds. Raises like :meth:`Job.result`."""
        started = time.monotonic()
        job = self.submit(capability, args, input, input_type, wait=timeout, **more)
        return job.result(timeout=max(0.0, timeout - (time.monotonic() - started)))

    def job(self, job_id: str) -> Job:
        """The job with this id (``GET /v1/jobs/{id}``)."""
        return Job(self, self._job_view(job_id, None))

    def submit_many(self, jobs: Sequence[Mapping[str, Any]]) -> List[Union[Job, SpineError]]:
        """Submits many jobs with ``POST /v1/jobs:batch`` (1000 per request). Each job is the
        JSON form of ``POST /v1/jobs`` (``input`` may be bytes or str). The answer lists, in
        order, a :class:`Job` for each accepted job or the :class:`SpineError` refusing it."""
        items = [c.batch_item(j) for j in jobs]
        out: List[Union[Job, SpineError]] = []
        for chunk in c.split_batches(items):
            if not chunk:
                break
            r = self._send(c.Request("POST", "/v1/jobs:batch", json={"jobs": chunk}))
            out.extend(_batch_answers(self, c.decode_json(r.status_code, r.content), Job))
        return out

    def put_blob(self, data: Union[bytes, str, "os.PathLike[str]"]) -> Dict[str, Any]:
        """Uploads bytes once (``PUT /v1/blobs``) for ``input_ref`` or fragment references;
        returns ``{"sha256": …, "size": …}``. A path is streamed from the file."""
        payload = c.read_input(data, None)
        req = c.Request(
            "PUT",
            "/v1/blobs",
            content=payload.data,
            path_body=payload.path,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(payload.size),
            },
        )
        r = self._send(req)
        return c.decode_json(r.status_code, r.content)

    def map_reduce(
        self,
        map_capability: str,
        reduce_capability: str,
        fragments: Sequence[Union[bytes, str]],
        fan_in: int = 16,
        *,
        names: Optional[List[str]] = None,
        args: Optional[Mapping[str, Any]] = None,
        wait: Optional[float] = None,
        **more: Any,
    ) -> Job:
        """A map/reduce job: each fragment is uploaded with ``PUT /v1/blobs`` and named by
        reference (``part-0``, ``part-1``… unless ``names`` are given), so the submission stays
        small whatever the fragments weigh."""
        refs = [
            c.fragment_ref(self.put_blob(c.as_bytes(f)), n)
            for f, n in zip(fragments, c.fragment_names(len(fragments), names))
        ]
        return self.submit(
            map_capability,
            args,
            wait=wait,
            reduce=reduce_capability,
            fan_in=fan_in,
            fragments=refs,
            **more,
        )

    def agents(
        self,
        capability: str,
        filter: Optional[str] = None,
        *,
        sort: Optional[str] = None,
        limit: Optional[int] = None,
    ) -> List[Dict[str, Any]]:
        """The agents offering ``capability`` that pass ``filter``, least loaded first."""
        params = {
            k: str(v)
            for k, v in {
                "capability": capability,
                "filter": filter,
                "sort": sort,
                "limit": limit,
            }.items()
            if v is not None
        }
        r = self._send(c.Request("GET", "/v1/agents", params=params))
        return list(c.decode_json(r.status_code, r.content).get("agents", []))


def _batch_answers(client: Any, doc: Mapping[str, Any], job_cls: Any) -> List[Any]:
    out: List[Any] = []
    for item in doc.get("jobs", []):
        if "error" in item:
            out.append(
                error_for(
                    str(item["error"]),
                    str(item.get("message") or ""),
                    item.get("field"),
                    item.get("status"),
                )
            )
        else:
            out.append(job_cls(client, item))
    return out
