"""The blocking Client against a real `spine up` (conftest.py): every assertion checks a
value the agents computed, a state the dispatcher recorded or an error it answered."""

from __future__ import annotations

import hashlib
import socket
from typing import List

import httpx
import pytest

import spine_client as sc
from spine_client import _common

import helpers


class Recording(httpx.BaseTransport):
    """The real HTTP transport, noting each request it forwards; `fail_after_send` requests
    are sent and answered by the dispatcher, then reported as a lost connection, like a
    connection cut while the answer was on its way."""

    def __init__(self, fail_after_send: int = 0) -> None:
        self.inner = httpx.HTTPTransport()
        self.requests: List[httpx.Request] = []
        self.lost_answers: List[dict] = []
        self.fail_after_send = fail_after_send

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = self.inner.handle_request(request)
        if self.fail_after_send > 0:
            self.fail_after_send -= 1
            response.read()
            self.lost_answers.append(
                httpx.Response(response.status_code, content=response.content).json()
            )
            raise httpx.ReadError("connection reset (injected by the test)", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def spine(spine_url):
    with sc.Client(spine_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def slow_image():
    """An image `image.blur` with a large sigma takes seconds on (a debug build of) the
    agents: the slow job for cancel, deadline and client-side timeout tests."""
    return helpers.png(500, 500)


def test_run_returns_the_agents_output(spine):
    data = b"the quick brown fox"
    assert spine.run("hash.sha256", input=data) == hashlib.sha256(data).hexdigest().encode()
    assert spine.run("text.upper", input="hello, spine") == b"HELLO, SPINE"


def test_a_large_input_goes_as_a_raw_upload(spine_url):
    data = bytes(range(256)) * 4096  # 1 MiB
    rec = Recording()
    with sc.Client(spine_url, transport=rec) as spine:
        assert spine.run("hash.sha256", input=data) == hashlib.sha256(data).hexdigest().encode()
    post = rec.requests[0]
    assert post.method == "POST" and post.url.path == "/v1/jobs"
    assert post.headers["content-type"] == "application/octet-stream"
    assert post.headers["content-length"] == str(len(data))
    assert post.url.params["capability"] == "hash.sha256"
    assert post.url.params["wait"] == "30000ms"
    assert post.url.params["idempotency_key"].startswith("py-")


def test_a_small_input_goes_as_json(spine_url):
    rec = Recording()
    with sc.Client(spine_url, transport=rec) as spine:
        assert spine.run("text.upper", input="small") == b"SMALL"
    # A job that ends within the wait costs one request: no poll, no second fetch.
    assert len(rec.requests) == 1
    post = rec.requests[0]
    assert post.headers["content-type"] == "application/json"
    assert b'"input":"c21hbGw="' in post.content.replace(b" ", b"")


def test_a_path_input_is_streamed_from_the_file(spine, tmp_path):
    data = b"line of text\n" * 20_000  # 260 kB
    path = tmp_path / "in.txt"
    path.write_bytes(data)
    assert spine.run("hash.sha256", input=path) == hashlib.sha256(data).hexdigest().encode()


def test_submit_then_result(spine):
    job = spine.submit("text.upper", input="later")
    assert job.id and job.state in ("queued", "dispatched", "running", "succeeded")
    assert job.result(timeout=30) == b"LATER"
    assert job.state == "succeeded" and job.done and job.error is None
    assert spine.job(job.id).state == "succeeded"
    assert job.refresh().view["result"]["output_size"] == 5


def test_a_large_output_is_fetched_from_its_url(spine, slow_image):
    # A grayscale PNG of 500×500 is over 64 KiB: the view carries output_url, not output.
    job = spine.submit("image.grayscale", input=slow_image, input_type="image/png", wait=60)
    out = job.result(timeout=60)
    assert job.view["result"]["output_url"] == f"/v1/jobs/{job.id}/output"
    assert out[:8] == b"\x89PNG\r\n\x1a\n" and len(out) == job.view["result"]["output_size"]
    assert hashlib.sha256(out).hexdigest() == job.view["result"]["output_sha256"]
    assert job.output() == out


def test_events_end_with_the_final_event(spine):
    texts = helpers.corpus(4)
    job = spine.map_reduce("wordcount.map", "wordcount.reduce", texts, fan_in=2, progress=True)
    events = list(job.events())
    assert events, "no event"
    assert events[-1].kind == "final"
    assert events[-1].data["state"] == "succeeded"
    assert job.state == "succeeded"
    for ev in events:
        assert ev.kind in ("state", "progress", "final")
        if ev.kind == "progress" and ev.data.get("percent") is not None:
            assert 0 <= ev.data["percent"] <= 100


def test_cancel(spine, slow_image):
    job = spine.submit("image.blur", {"sigma": 30}, input=slow_image, input_type="image/png")
    assert job.cancel().state == "cancelled"
    with pytest.raises(sc.JobCancelled) as e:
        job.result(timeout=10)
    assert e.value.job_id == job.id and e.value.condition == "cancelled"
    assert isinstance(e.value, sc.JobError)


def test_wait_timeout_leaves_the_job_running(spine, slow_image):
    job = spine.submit("image.blur", {"sigma": 30}, input=slow_image, input_type="image/png")
    with pytest.raises(sc.WaitTimeout) as e:
        job.result(timeout=0.2)
    assert e.value.job_id == job.id
    assert "job.cancel()" in str(e.value) and f"DELETE /v1/jobs/{job.id}" in str(e.value)
    assert job.refresh().state in ("queued", "dispatched", "running")
    job.cancel()


def test_run_times_out_with_wait_timeout(spine, slow_image):
    with pytest.raises(sc.WaitTimeout) as e:
        spine.run(
            "image.blur", {"sigma": 30}, input=slow_image, input_type="image/png", timeout=0.3
        )
    spine.job(e.value.job_id).cancel()


def test_a_deadline_ends_the_job_timed_out(spine, slow_image):
    job = spine.submit(
        "image.blur", {"sigma": 30}, input=slow_image, input_type="image/png", deadline=0.3
    )
    with pytest.raises(sc.JobTimedOut) as e:
        job.result(timeout=30)
    assert e.value.condition == "deadline-exceeded" and job.state == "timed-out"


def test_submit_many_answers_each_job(spine):
    answers = spine.submit_many(
        [
            {"capability": "text.upper", "input": "one"},
            {"capability": "text.uppr", "input": "two"},
            {"capability": "hash.sha256", "input": b"three"},
        ]
    )
    assert len(answers) == 3
    first, bad, third = answers
    assert isinstance(first, sc.Job) and first.result(timeout=30) == b"ONE"
    assert isinstance(bad, sc.UnknownCapability)
    assert bad.field == "capability" and bad.status == 422 and "text.upper" in bad.message
    assert third.result(timeout=30) == hashlib.sha256(b"three").hexdigest().encode()


def test_unknown_capability_is_typed_with_its_field(spine):
    with pytest.raises(sc.UnknownCapability) as e:
        spine.submit("image.thumbnal", input=b"x")
    assert e.value.status == 422 and e.value.field == "capability"
    assert e.value.message.split("closest first: ")[1].startswith("image.thumbnail")


def test_bad_arguments_from_the_agent_and_from_the_api(spine):
    with pytest.raises(sc.JobBadArguments) as e:
        spine.run("text.upper", {"shout": True}, input="x")
    assert e.value.field == "shout" and e.value.condition == "bad-arguments"
    assert isinstance(e.value, sc.JobFailed) and isinstance(e.value, sc.BadArguments)
    with pytest.raises(sc.BadArguments) as e2:
        spine.submit("text.upper", input="x", priority=100_000)
    assert e2.value.status == 400 and e2.value.field == "priority"
    with pytest.raises(sc.BadRequest) as e3:
        spine.submit("text.upper", input="x", deadline="30")
    assert e3.value.status == 400 and e3.value.field == "deadline"


def test_unknown_job(spine):
    with pytest.raises(sc.UnknownJob) as e:
        spine.job("no-such-job")
    assert e.value.status == 404 and isinstance(e.value, sc.NotFound)


def test_put_blob_feeds_input_ref(spine):
    data = b"uploaded once " * 10_000
    blob = spine.put_blob(data)
    assert blob == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    for _ in range(2):
        out = spine.run("hash.sha256", input_ref=blob["sha256"])
        assert out == blob["sha256"].encode()


def test_map_reduce_equals_a_local_word_count(spine):
    texts = helpers.corpus(9)
    job = spine.map_reduce("wordcount.map", "wordcount.reduce", texts, fan_in=4, wait=60)
    import json

    counts = dict((w, n) for w, n in json.loads(job.result(timeout=60)))
    assert counts == helpers.word_count(texts)
    assert job.view["mapreduce"]["fragments"] == 9


def test_agents(spine):
    agents = spine.agents("hash.sha256")
    assert len(agents) == 2 and all(a["slots"] == 8 for a in agents)
    assert spine.agents("hash.sha256", filter="gpu") == []
    with pytest.raises(sc.BadRequest) as e:
        spine.agents("hash.sha256", filter="((")
    assert e.value.field == "filter"


def test_a_lost_answer_is_retried_without_a_second_job(spine_url):
    rec = Recording(fail_after_send=1)
    with sc.Client(spine_url, transport=rec) as spine:
        job = spine.submit("text.upper", input="once")
        # The retry's answer is the job the lost answer named: one job, not two.
        assert rec.lost_answers[0]["id"] == job.id
        assert job.result(timeout=30) == b"ONCE"
    first, second = rec.requests[0], rec.requests[1]
    assert first.content == second.content and b'"idempotency_key":"py-' in first.content


def test_connection_errors_are_retried_then_raised():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with sc.Client(f"http://127.0.0.1:{port}", retries=2) as spine:
        with pytest.raises(sc.ConnectionFailed) as e:
            spine.run("text.upper", input="x")
    assert "after 3 attempts" in e.value.message and isinstance(
        e.value.__cause__, httpx.ConnectError
    )


def test_the_request_forms_without_a_server():
    fields = _common.job_fields(
        "text.upper",
        {"a": 1},
        idempotency_key="k",
        priority=None,
        deadline=2.5,
        filter=None,
        more={},
    )
    assert fields == {
        "capability": "text.upper",
        "args": {"a": 1},
        "idempotency_key": "k",
        "deadline": "2500ms",
    }
    raw = _common.submit_request(fields, _common.read_input(b"x" * 70_000, None), wait=5)
    assert raw.json is None and raw.params["args"] == '{"a":1}' and raw.params["wait"] == "5000ms"
    # A large JSON input would be read as the job itself: it stays inline.
    js = _common.submit_request(
        fields, _common.read_input(b"{}" * 40_000, "application/json"), None
    )
    assert js.json is not None and js.json["input_type"] == "application/json"
