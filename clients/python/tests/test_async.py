"""AsyncClient against the same real `spine up`: the main paths of test_sync.py, awaited.
Each test runs its own event loop with asyncio.run (no pytest plugin needed)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

import spine_client as sc

import helpers


def run(coro):
    return asyncio.run(coro)


def test_async_run_and_submit(spine_url):
    async def main():
        async with sc.AsyncClient(spine_url) as spine:
            assert await spine.run("text.upper", input="async") == b"ASYNC"
            job = await spine.submit("hash.sha256", input=b"abc")
            assert isinstance(job, sc.AsyncJob)
            assert await job.result(timeout=30) == hashlib.sha256(b"abc").hexdigest().encode()
            assert job.state == "succeeded"
            assert (await spine.job(job.id)).state == "succeeded"

    run(main())


def test_async_large_input_and_path(spine_url, tmp_path):
    data = bytes(range(256)) * 4096  # 1 MiB: a raw upload
    path = tmp_path / "big.bin"
    path.write_bytes(data[::-1])

    async def main():
        async with sc.AsyncClient(spine_url) as spine:
            want = hashlib.sha256(data).hexdigest().encode()
            assert await spine.run("hash.sha256", input=data) == want
            want_rev = hashlib.sha256(data[::-1]).hexdigest().encode()
            assert await spine.run("hash.sha256", input=path) == want_rev

    run(main())


def test_async_events_cancel_and_errors(spine_url):
    image = helpers.png(500, 500)

    async def main():
        async with sc.AsyncClient(spine_url) as spine:
            job = await spine.submit("text.upper", input="events", progress=True)
            kinds = [ev.kind async for ev in job.events()]
            assert kinds[-1] == "final" and job.state == "succeeded"

            slow = await spine.submit(
                "image.blur", {"sigma": 30}, input=image, input_type="image/png"
            )
            with pytest.raises(sc.WaitTimeout):
                await slow.result(timeout=0.2)
            assert (await slow.cancel()).state == "cancelled"
            with pytest.raises(sc.JobCancelled):
                await slow.result(timeout=10)

            with pytest.raises(sc.UnknownCapability) as e:
                await spine.run("text.uper", input="x")
            assert e.value.field == "capability"
            with pytest.raises(sc.JobBadArguments) as e2:
                await spine.run("hash.sha256", {"bits": 512}, input="x")
            assert e2.value.field == "bits"

    run(main())


def test_async_submit_many_and_map_reduce(spine_url):
    texts = helpers.corpus(6)

    async def main():
        async with sc.AsyncClient(spine_url) as spine:
            answers = await spine.submit_many(
                [{"capability": "text.upper", "input": "a"}, {"capability": "nope.nope"}]
            )
            assert await answers[0].result(timeout=30) == b"A"
            assert isinstance(answers[1], sc.UnknownCapability) and answers[1].status == 422
            job = await spine.map_reduce(
                "wordcount.map", "wordcount.reduce", texts, fan_in=3, wait=60
            )
            counts = dict(json.loads(await job.result(timeout=60)))
            assert counts == helpers.word_count(texts)
            assert len(await spine.agents("wordcount.map")) == 2

    run(main())
