"""The asyncio client: the same calls as ``Client``, awaited, over one pooled
``httpx.AsyncClient``, for ASGI apps (FastAPI, Starlette, Django's async views) and for
fanning many jobs out with ``asyncio.gather``. Requests are built and answers read by
``_common``, exactly as in the blocking client.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, AsyncIterator, Dict, List, Mapping, Optional, Sequence, Union

import httpx

from . import _common as c
from ._errors import ConnectionFailed, JobError, SpineError, WaitTimeout, job_error
from ._sync import DEFAULT_URL, _batch_answers

#: Fragments of a map/reduce uploaded at once.
UPLOADS_AT_ONCE = 8


class AsyncJob:
    """A submitted job, as :class:`spine_client.Job` but with awaitable methods."""

    def __init__(self, client: "AsyncClient", view: Dict[str, Any]) -> None:
        self._client = client
        self.view: Dict[str, Any] = dict(view)
        self.id: str = str(view["id"])

    def __repr__(self) -> str:
        return f"<AsyncJob {self.id} {self.state}>"

    @property
    def state(self) -> str:
        return str(self.view.get("state"))

    @property
    def done(self) -> bool:
        return self.state in c.FINAL_STATES

    @property
    def error(self) -> Optional[JobError]:
        if self.done and self.state != "succeeded":
            return job_error(self.view)
        return None

    async def refresh(self, wait: Optional[float] = None) -> "AsyncJob":
        self.view.update(await self._client._job_view(self.id, wait))
        return self

    async def wait(self, timeout: Optional[float] = None) -> "AsyncJob":
        started = time.monotonic()
        while not self.done:
            left = None if timeout is None else timeout - (time.monotonic() - started)
            if left is not None and left <= 0:
                raise WaitTimeout(self.id, timeout or 0.0, self.state)
            await self.refresh(wait=c.MAX_WAIT if left is None else min(left, c.MAX_WAIT))
        if "result" not in self.view and "error" not in self.view:
            # Answers such as a submission's or a cancel's carry only the id and state.
            await self.refresh()
        return self

    async def result(self, timeout: Optional[float] = None) -> bytes:
        await self.wait(timeout)
        err = self.error
        if err is not None:
            raise err
        out = c.inline_output(self.view)
        return out if out is not None else await self.output()

    async def output(self) -> bytes:
        r = await self._client._send(c.Request("GET", f"/v1/jobs/{self.id}/output"))
        c.check(r.status_code, r.content)
        return r.content

    async def cancel(self) -> "AsyncJob":
        r = await self._client._send(c.Request("DELETE", f"/v1/jobs/{self.id}"))
        self.view.update(c.decode_json(r.status_code, r.content))
        return self

    async def events(self) -> AsyncIterator[c.Event]:
        client = self._client
        timeout = httpx.Timeout(client.timeout, read=max(client.timeout, 40.0))
        async with client._http.stream("GET", f"/v1/jobs/{self.id}/events", timeout=timeout) as r:
            if r.status_code >= 400:
                c.check(r.status_code, await r.aread())
            parser = c.SseParser()
            async for line in r.aiter_lines():
                ev = parser.feed(line)
                if ev is None:
                    continue
                if ev.kind in ("state", "final"):
                    self.view.update(ev.data)
                yield ev
                if ev.kind == "final":
                    return


async def _file_chunks(path: str) -> AsyncIterator[bytes]:
    """A file's bytes, read in a worker thread so that the event loop never blocks on disk."""
    f = await asyncio.to_thread(open, path, "rb")
    try:
        while True:
            chunk = await asyncio.to_thread(f.read, 1 << 20)
            if not chunk:
                return
            yield chunk
    finally:
        f.close()


class AsyncClient:
    """The asyncio twin of :class:`spine_client.Client`: same arguments, same methods,
    awaited. Use ``async with AsyncClient() as spine:`` or ``await spine.aclose()``."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: Optional[str] = None,
        timeout: float = 30.0,
        *,
        retries: int = 3,
        max_connections: int = 100,
        transport: Optional[httpx.AsyncBaseTransport] = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=c.auth_headers(token),
            timeout=self.timeout,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
        )

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, req: c.Request) -> httpx.Response:
        timeout = httpx.Timeout(
            self.timeout,
            read=None if req.read_timeout is None else req.read_timeout + self.timeout,
        )
        attempt = 0
        while True:
            attempt += 1
            try:
                content: Any = req.content
                if req.path_body is not None:
                    content = _file_chunks(req.path_body)
                return await self._http.request(
                    req.method,
                    req.path,
                    params=req.params,
                    json=req.json,
                    content=content,
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
                await asyncio.sleep(c.backoff(attempt))

    async def _job_view(self, job_id: str, wait: Optional[float]) -> Dict[str, Any]:
        req = c.Request("GET", f"/v1/jobs/{job_id}")
        if wait is not None:
            req.params["wait"] = c.wait_param(wait)
            req.read_timeout = wait
        r = await self._send(req)
        return c.decode_json(r.status_code, r.content)

    async def submit(
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
    ) -> AsyncJob:
        fields = c.job_fields(
            capability,
            args,
            idempotency_key=idempotency_key,
            priority=priority,
            deadline=deadline,
            filter=filter,
            more=more,
        )
        payload = c.read_input(input, input_type)
        if payload.path is not None and payload.size <= c.INLINE_LIMIT:
            payload = c.Payload(
                data=await asyncio.to_thread(_read, payload.path),
                size=payload.size,
                mime=payload.mime,
            )
        req = c.submit_request(fields, payload, wait)
        if wait is not None:
            req.read_timeout = min(wait, c.MAX_WAIT)
        r = await self._send(req)
        return AsyncJob(self, c.decode_json(r.status_code, r.content))

    async def run(
        self,
        capability: str,
        args: Optional[Mapping[str, Any]] = None,
        input: c.InputType = None,
        input_type: Optional[str] = None,
        *,
        timeout: float = 30.0,
        **more: Any,
    ) -> bytes:
        started = time.monotonic()
        job = await self.submit(capability, args, input, input_type, wait=timeout, **more)
        return await job.result(timeout=max(0.0, timeout - (time.monotonic() - started)))

    async def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, await self._job_view(job_id, None))

    async def submit_many(
        self, jobs: Sequence[Mapping[str, Any]]
    ) -> List[Union[AsyncJob, SpineError]]:
        items = [c.batch_item(j) for j in jobs]
        out: List[Union[AsyncJob, SpineError]] = []
        for chunk in c.split_batches(items):
            if not chunk:
                break
            r = await self._send(c.Request("POST", "/v1/jobs:batch", json={"jobs": chunk}))
            out.extend(_batch_answers(self, c.decode_json(r.status_code, r.content), AsyncJob))
        return out

    async def put_blob(self, data: Union[bytes, str, "os.PathLike[str]"]) -> Dict[str, Any]:
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
        r = await self._send(req)
        return c.decode_json(r.status_code, r.content)

    async def map_reduce(
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
    ) -> AsyncJob:
        gate = asyncio.Semaphore(UPLOADS_AT_ONCE)

        async def upload(data: Union[bytes, str], name: Optional[str]) -> Dict[str, Any]:
            async with gate:
                return c.fragment_ref(await self.put_blob(c.as_bytes(data)), name)

        refs = await asyncio.gather(
            *(upload(f, n) for f, n in zip(fragments, c.fragment_names(len(fragments), names)))
        )
        return await self.submit(
            map_capability,
            args,
            wait=wait,
            reduce=reduce_capability,
            fan_in=fan_in,
            fragments=list(refs),
            **more,
        )

    async def agents(
        self,
        capability: str,
        filter: Optional[str] = None,
        *,
        sort: Optional[str] = None,
        limit: Optional[int] = None,
    ) -> List[Dict[str, Any]]:
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
        r = await self._send(c.Request("GET", "/v1/agents", params=params))
        return list(c.decode_json(r.status_code, r.content).get("agents", []))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
