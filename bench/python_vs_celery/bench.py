"""The same no-op job submitted from Python four ways, measured in one run:

  spine_client   the Python client (clients/python): ``Client.run("text.upper", input=…)``, one
                 ``POST /v1/jobs?wait=`` that answers when the job has ended; one ``Client``
                 shared by all threads, as docs/clients.md advises;
  spine_client/thread  the same with one ``Client`` per thread (what the shared connection
                 pool costs);
  requests+poll  hand-written: ``requests`` POSTs the job, then GETs it every ``--poll``
                 seconds until it has ended;
  celery         Celery 5 with Redis as broker and result backend: ``upper.delay(text).get()``.

Each is run one job at a time (latency p50/p99 and jobs/s) and with 64 threads in flight
(jobs/s), ``--reps`` times in a rotating order; the table gives the medians and the ratios to
Celery. Spine is a ``spine up`` of the given binary with its job store on disk (not tmpfs);
Redis is the system's ``redis-server`` with its default configuration, started here on a free
loopback port; the Celery worker is started here with one process per core. All three are
children of this script and are stopped by their PIDs at the end (or when one fails to start).

    python bench/python_vs_celery/bench.py --spine target/release/spine
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TEXT = "hello spine"
EXPECTED = TEXT.upper()
FINAL = ("succeeded", "failed", "cancelled", "timed-out")
VARIANTS = ("spine_client", "spine_client/thread", "requests+poll", "celery")


# -- child processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen, name: str, grace: float = 20.0) -> None:
    """SIGTERM to this child's PID, then SIGKILL if it has not exited after ``grace`` s."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        print(f"  {name} (pid {proc.pid}) ignored SIGTERM for {grace:g} s: SIGKILL", flush=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def drain(proc: subprocess.Popen, lines: list[str], on_line: Callable[[str], None]) -> None:
    """Reads a child's output to its end so that it never blocks on a full pipe."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if len(lines) < 200:
            lines.append(line)
        on_line(line)


def wait_until(
    cond: Callable[[], bool],
    what: str,
    proc: subprocess.Popen,
    lines: list[str],
    timeout: float = 60.0,
) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} (exit {proc.poll()}):\n{''.join(lines[-30:])}")
        time.sleep(0.05)


def start_spine(binary: Path, data: Path, agents: int, slots: int) -> tuple:
    cmd = [
        str(binary),
        "up",
        "--http-listen",
        "127.0.0.1:0",
        "--xmpp-listen",
        "127.0.0.1:0",
        "--data-dir",
        str(data),
        "--agents",
        str(agents),
        "--slots",
        str(slots),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    found: dict[str, str] = {}

    def on_line(line: str) -> None:
        if "url" not in found and "HTTP API http://" in line:
            found["url"] = line.split("HTTP API ", 1)[1].split(",", 1)[0].strip()

    threading.Thread(target=drain, args=(proc, lines, on_line), daemon=True).start()
    try:
        wait_until(lambda: "url" in found, "spine up did not become ready", proc, lines, 90)
    except BaseException:
        stop(proc, "spine up")
        raise
    return proc, found["url"]


def start_redis(binary: str, data: Path) -> tuple:
    port = free_port()
    # The default configuration (RDB snapshots on their default schedule, no AOF); only where
    # it listens and where it would write its snapshot are set.
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def on_line(line: str) -> None:
        if "Ready to accept connections" in line:
            ready.set()

    threading.Thread(target=drain, args=(proc, lines, on_line), daemon=True).start()
    try:
        wait_until(ready.is_set, "redis-server did not become ready", proc, lines, 30)
    except BaseException:
        stop(proc, "redis-server")
        raise
    return proc, f"redis://127.0.0.1:{port}"


def start_celery_worker(redis_url: str, concurrency: int) -> subprocess.Popen:
    env = dict(os.environ, BENCH_REDIS=redis_url)
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tasks",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        str(concurrency),
        "--loglevel",
        "WARNING",
    ]
    proc = subprocess.Popen(
        cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    threading.Thread(target=drain, args=(proc, lines, lambda _l: None), daemon=True).start()
    return proc


# -- the ways to run a job ---------------------------------------------------------------


def spine_client_runner(url: str, per_thread: bool) -> Callable[[], Callable[[], None]]:
    """``Client.run``; with one ``Client`` shared by every thread, as docs/clients.md advises,
    or (``per_thread``) one per thread, which shows what the shared connection pool costs."""
    import spine_client

    shared = None if per_thread else spine_client.Client(url)

    def make() -> Callable[[], None]:
        client = shared or spine_client.Client(url)

        def one() -> None:
            out = client.run("text.upper", input=TEXT, timeout=30)
            if out.decode() != EXPECTED:
                raise RuntimeError(f"spine_client: expected {EXPECTED!r}, got {out!r}")

        return one

    return make


def requests_runner(url: str, poll: float) -> Callable[[], Callable[[], None]]:
    import requests

    body = {"capability": "text.upper", "input": base64.b64encode(TEXT.encode()).decode()}

    def make() -> Callable[[], None]:
        session = requests.Session()  # one per thread: a Session is not meant to be shared

        def one() -> None:
            r = session.post(f"{url}/v1/jobs", json=body, timeout=30)
            r.raise_for_status()
            job = r.json()
            deadline = time.monotonic() + 30
            while job["state"] not in FINAL:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"requests: job {job['id']} still {job['state']}")
                time.sleep(poll)
                r = session.get(f"{url}/v1/jobs/{job['id']}", timeout=30)
                r.raise_for_status()
                job = r.json()
            out = base64.b64decode(job.get("result", {}).get("output", ""))
            if job["state"] != "succeeded" or out.decode() != EXPECTED:
                raise RuntimeError(f"requests: job {job['id']} ended {job['state']}: {job}")

        return one

    return make


def celery_runner() -> Callable[[], Callable[[], None]]:
    sys.path.insert(0, str(HERE))
    import tasks

    def make() -> Callable[[], None]:
        def one() -> None:
            out = tasks.upper.delay(TEXT).get(timeout=30)
            if out != EXPECTED:
                raise RuntimeError(f"celery: expected {EXPECTED!r}, got {out!r}")

        return one

    return make


# -- measuring ------------------------------------------------------------------------------


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an ascending list."""
    i = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[i]


def sequential(make: Callable[[], Callable[[], None]], n: int) -> dict[str, float]:
    one = make()
    lat: list[float] = []
    started = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        one()
        lat.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - started
    lat.sort()
    return {
        "p50_ms": quantile(lat, 0.5) * 1e3,
        "p99_ms": quantile(lat, 0.99) * 1e3,
        "jobs_s": n / elapsed,
        "jobs": n,
    }


def in_flight(make: Callable[[], Callable[[], None]], n: int, threads: int) -> dict[str, float]:
    """``n`` jobs from ``threads`` threads, each running one job after the other."""
    counter = itertools.count()
    errors: list[BaseException] = []
    lat: list[float] = []
    lock = threading.Lock()
    gate = threading.Barrier(threads + 1)

    def worker() -> None:
        one = make()
        mine: list[float] = []
        gate.wait()
        try:
            while next(counter) < n:
                t = time.perf_counter()
                one()
                mine.append(time.perf_counter() - t)
        except BaseException as e:  # noqa: BLE001 (reported after the run)
            errors.append(e)
        with lock:
            lat.extend(mine)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    gate.wait()
    started = time.perf_counter()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} threads failed; first: {errors[0]!r}")
    lat.sort()
    return {"jobs_s": len(lat) / elapsed, "p50_ms": quantile(lat, 0.5) * 1e3, "jobs": len(lat)}


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int], with_children_of: int | None = None) -> float:
    """User + system CPU time of these processes (and of the current children of one of them,
    such as the Celery worker's pool processes), from /proc."""
    pids = list(pids)
    if with_children_of is not None:
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    stat = (d / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == with_children_of:
                    pids.append(int(d.name))
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


def client_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def measured(
    phase: Callable[[], dict[str, float]], server: Callable[[], float]
) -> dict[str, float]:
    """Runs a phase and adds the CPU it cost per job, in ms: the serving side (Spine; or
    Redis and the Celery worker) and this client process."""
    s0, c0 = server(), client_cpu()
    out = phase()
    s1, c1 = server(), client_cpu()
    jobs = out.pop("jobs")
    out["server_cpu_ms"] = (s1 - s0) / jobs * 1e3
    out["client_cpu_ms"] = (c1 - c0) / jobs * 1e3
    return out


@dataclass
class Results:
    runs: dict[str, list[dict[str, dict[str, float]]]] = field(default_factory=dict)

    def add(self, variant: str, seq: dict[str, float], par: dict[str, float]) -> None:
        self.runs.setdefault(variant, []).append({"seq": seq, "par": par})

    def median(self, variant: str, part: str, key: str) -> float:
        return statistics.median(r[part][key] for r in self.runs[variant])


# -- the run --------------------------------------------------------------------------------


def fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path`` (from /proc/mounts)."""
    best, kind = "", "unknown"
    real = str(path.resolve())
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                inside = len(parts) >= 3 and (real + "/").startswith(parts[1].rstrip("/") + "/")
                if inside and len(parts[1]) >= len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def versions(spine: Path, redis_server: str) -> dict[str, str]:
    import celery
    import httpx
    import kombu
    import redis
    import requests
    import spine_client

    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(
                cmd, capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except OSError as e:
            return f"({e})"

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "spine": out([str(spine), "--version"]),
        "redis-server": out([redis_server, "--version"]).split(" sha=")[0],
        "python": platform.python_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis-py": redis.__version__,
        "spine_client": spine_client.__version__,
        "httpx": httpx.__version__,
        "requests": requests.__version__,
        "cpu": f"{os.cpu_count()} × {cpu}",
        "kernel": platform.release(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--spine",
        type=Path,
        default=Path(os.environ.get("SPINE_BIN", REPO / "target/release/spine")),
        help="the spine binary (a release build; default $SPINE_BIN or target/release/spine)",
    )
    p.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    p.add_argument(
        "--sequential", type=int, default=400, help="jobs one at a time, per variant and rep"
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=3000,
        help="jobs with --threads in flight, per variant and rep",
    )
    p.add_argument("--threads", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warm-up", type=int, default=100, help="jobs before each variant's first rep")
    p.add_argument(
        "--poll", type=float, default=0.01, help="seconds between the GETs of requests+poll"
    )
    p.add_argument(
        "--agents",
        type=int,
        default=os.cpu_count() or 2,
        help="spine up's local agents (default: one per core, as spine up)",
    )
    p.add_argument("--slots", type=int, default=2, help="slots per agent (spine up's default: 2)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=os.cpu_count() or 2,
        help="Celery worker processes (default: one per core, as Celery)",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where the job store and Redis's snapshot go (default: a temporary "
        "directory beside this script, on disk)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    args = p.parse_args()

    if not args.spine.exists():
        p.error(
            f"--spine {args.spine}: no such file; build it with `cargo build --release -p spine`"
        )
    if shutil.which(args.redis_server) is None and not Path(args.redis_server).exists():
        p.error(f"--redis-server {args.redis_server}: not found; `apt-get install redis-server`")
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.work_dir or HERE))
    kind = fs_type(work)
    if kind == "tmpfs":
        p.error(f"{work} is on tmpfs: give --work-dir on a disk, the job store must be on one")

    began = time.monotonic()
    info = versions(args.spine, args.redis_server)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"work dir {work} ({kind}); load average at start {os.getloadavg()}", flush=True)
    children: list[tuple] = []
    results = Results()
    loads: list[tuple] = []
    try:
        (work / "spine").mkdir()
        (work / "redis").mkdir()
        spine, url = start_spine(args.spine, work / "spine", args.agents, args.slots)
        children.append((spine, "spine up"))
        redis, redis_url = start_redis(args.redis_server, work / "redis")
        children.append((redis, "redis-server"))
        os.environ["BENCH_REDIS"] = redis_url
        worker = start_celery_worker(redis_url, args.concurrency)
        children.append((worker, "celery worker"))
        print(
            f"spine up {url} (pid {spine.pid}, {args.agents} agents × {args.slots} slots); "
            f"redis-server {redis_url} (pid {redis.pid}); celery worker pid {worker.pid} "
            f"(prefork, {args.concurrency} processes)",
            flush=True,
        )

        runners = {
            "spine_client": spine_client_runner(url, per_thread=False),
            "spine_client/thread": spine_client_runner(url, per_thread=True),
            "requests+poll": requests_runner(url, args.poll),
            "celery": celery_runner(),
        }
        # The first Celery job also waits for the worker to be up.
        deadline = time.monotonic() + 60
        while True:
            try:
                runners["celery"]()()
                break
            except Exception:
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise
        servers = {
            "spine_client": lambda: cpu_seconds([spine.pid]),
            "spine_client/thread": lambda: cpu_seconds([spine.pid]),
            "requests+poll": lambda: cpu_seconds([spine.pid]),
            "celery": lambda: cpu_seconds([redis.pid, worker.pid], with_children_of=worker.pid),
        }
        for name in VARIANTS:
            in_flight(runners[name], args.warm_up, min(args.threads, args.warm_up))
        for rep in range(args.reps):
            k = rep % len(VARIANTS)
            order = VARIANTS[k:] + VARIANTS[:k]
            for name in order:
                r, srv = runners[name], servers[name]
                seq = measured(partial(sequential, r, args.sequential), srv)
                par = measured(partial(in_flight, r, args.parallel, args.threads), srv)
                results.add(name, seq, par)
                print(
                    f"  rep {rep + 1} {name:19} sequential p50 {seq['p50_ms']:6.2f} ms "
                    f"p99 {seq['p99_ms']:6.2f} ms {seq['jobs_s']:7.1f} jobs/s; "
                    f"{args.threads} in flight {par['jobs_s']:7.1f} jobs/s; CPU per job "
                    f"(sequential, in flight): server {seq['server_cpu_ms']:.2f}, "
                    f"{par['server_cpu_ms']:.2f} ms, client {seq['client_cpu_ms']:.2f}, "
                    f"{par['client_cpu_ms']:.2f} ms",
                    flush=True,
                )
            loads.append(os.getloadavg())
            print(f"  load average after rep {rep + 1}: {loads[-1]}", flush=True)
    finally:
        for proc, name in reversed(children):
            stop(proc, name)
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\n{args.sequential} jobs one at a time and {args.parallel} with {args.threads} "
        f"threads in flight, per variant; medians of {args.reps} reps; "
        f"whole run {time.monotonic() - began:.0f} s\n"
    )
    head = (
        f"{'variant':19} | {'seq p50 ms':>10} | {'seq p99 ms':>10} | {'seq jobs/s':>10} | "
        f"{str(args.threads) + ' in flight jobs/s':>19} | {'p50 vs celery':>13} | "
        f"{'jobs/s vs celery':>16}"
    )
    print(head)
    print("-" * len(head))
    c_p50 = results.median("celery", "seq", "p50_ms")
    c_par = results.median("celery", "par", "jobs_s")
    for name in VARIANTS:
        p50 = results.median(name, "seq", "p50_ms")
        par = results.median(name, "par", "jobs_s")
        print(
            f"{name:19} | {p50:10.2f} | {results.median(name, 'seq', 'p99_ms'):10.2f} | "
            f"{results.median(name, 'seq', 'jobs_s'):10.1f} | {par:19.1f} | "
            f"{p50 / c_p50:12.2f}× | {par / c_par:15.2f}×"
        )
    print(
        "\nCPU per job, ms (medians; server: spine up, or redis-server + the Celery worker and "
        "its pool; client: this process)\n"
    )
    head2 = (
        f"{'variant':19} | {'server, seq':>11} | {'client, seq':>11} | "
        f"{'server, ' + str(args.threads):>11} | {'client, ' + str(args.threads):>11}"
    )
    print(head2)
    print("-" * len(head2))
    for name in VARIANTS:
        m = results.median
        print(
            f"{name:19} | {m(name, 'seq', 'server_cpu_ms'):11.2f} | "
            f"{m(name, 'seq', 'client_cpu_ms'):11.2f} | {m(name, 'par', 'server_cpu_ms'):11.2f} | "
            f"{m(name, 'par', 'client_cpu_ms'):11.2f}"
        )
    p50_ratio = results.median("spine_client", "seq", "p50_ms") / c_p50
    par_ratio = results.median("spine_client", "par", "jobs_s") / c_par
    thread_ratio = results.median("spine_client/thread", "par", "jobs_s") / c_par
    print(
        f"\ntargets: spine_client ≥ 3× Celery's jobs/s at {args.threads} in flight: "
        f"{par_ratio:.2f}× ({'met' if par_ratio >= 3 else 'missed'}; with a Client per "
        f"thread {thread_ratio:.2f}×); "
        f"≤ 0.7× its sequential p50: {p50_ratio:.2f}× ({'met' if p50_ratio <= 0.7 else 'missed'})"
    )
    print(f"load average after each rep: {loads}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "versions": info,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "loads": loads,
                    "runs": results.runs,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
