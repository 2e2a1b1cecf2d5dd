"""The Celery side of bench.py: one task doing what Spine's `text.upper` does, on a Celery app
whose broker and result backend are the Redis that bench.py starts (``$BENCH_REDIS``, such as
``redis://127.0.0.1:6390``). The worker imports this module (``celery -A tasks worker``) and so
does the benchmark, which calls ``upper.delay(text).get()``.

Everything but the addresses is Celery's default (prefork pool, JSON, prefetch multiplier 4,
acks on receipt), as a web app that adopts Celery would start.
"""

from __future__ import annotations

import os

from celery import Celery

REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379")

app = Celery("bench_tasks", broker=f"{REDIS}/0", backend=f"{REDIS}/1")
app.conf.broker_connection_retry_on_startup = True


@app.task
def upper(text: str) -> str:
    return text.upper()
