"""Many jobs at once: 2,000 small `hash.sha256` jobs with 64 in flight through one
AsyncClient, each one `run` (submit and wait in one request). Every output is checked; the
rate is printed for the record, not asserted (the machine is shared)."""

from __future__ import annotations

import asyncio
import hashlib
import time

import spine_client as sc

JOBS = 2000
IN_FLIGHT = 64


def test_two_thousand_jobs_with_64_in_flight(spine_url):
    async def main():
        gate = asyncio.Semaphore(IN_FLIGHT)
        async with sc.AsyncClient(spine_url, max_connections=IN_FLIGHT) as spine:

            async def one(i: int) -> bool:
                data = f"job {i}".encode()
                async with gate:
                    out = await spine.run("hash.sha256", input=data, timeout=60)
                return out == hashlib.sha256(data).hexdigest().encode()

            started = time.monotonic()
            ok = await asyncio.gather(*(one(i) for i in range(JOBS)))
            return ok, time.monotonic() - started

    ok, elapsed = asyncio.run(main())
    assert sum(ok) == JOBS, f"{JOBS - sum(ok)} of {JOBS} jobs gave a wrong output"
    print(f"\n{JOBS} jobs, {IN_FLIGHT} in flight: {elapsed:.2f} s, {JOBS / elapsed:.0f} jobs/s")
