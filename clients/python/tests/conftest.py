"""A real Spine for the client's tests: one `spine up` (embedded XMPP server, dispatcher,
local agents) per test session, on free loopback ports with a temporary data directory,
stopped by its PID at the end (SIGTERM, then SIGKILL if it does not stop)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
BANNER = re.compile(r"HTTP API (http://\S+),")


def _spine_bin() -> Path:
    path = Path(os.environ.get("SPINE_BIN", "target/debug/spine"))
    if not path.is_absolute():
        path = REPO / path
    if not path.exists():
        pytest.fail(
            f"no spine binary at {path}: build it with `cargo build -p spine`, or set SPINE_BIN"
        )
    return path


@pytest.fixture(scope="session")
def spine_url():
    """The base URL of a running `spine up`, ready: it prints its banner only once every
    local agent has registered, so the first job meets no unknown capability."""
    data = tempfile.mkdtemp(prefix="spine-pytest-")
    cmd = [
        str(_spine_bin()),
        "up",
        "--http-listen",
        "127.0.0.1:0",
        "--xmpp-listen",
        "127.0.0.1:0",
        "--data-dir",
        data,
        "--agents",
        "2",
        "--slots",
        "8",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: dict = {}
    lines: list = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = BANNER.search(line)
            if m and "url" not in found:
                found["url"] = m.group(1)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 90
    while "url" not in found and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    try:
        if "url" not in found:
            pytest.fail(
                f"spine up did not become ready (exit {proc.poll()}):\n{''.join(lines[-40:])}"
            )
        yield found["url"]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        reader.join(timeout=5)
        shutil.rmtree(data, ignore_errors=True)
