// The parts that need no server: the request forms the client builds, the event-stream parser
// fed in awkward pieces, and the errors made from answers a dispatcher (or a proxy in front of
// it) can give.

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  BadArguments,
  Client,
  ConnectionFailed,
  Job,
  Forbidden,
  JobBadArguments,
  JobCancelled,
  JobTimedOut,
  NotAuthorized,
  QueueFull,
  SpineError,
  Unauthorized,
  Unavailable,
  isBadArguments,
} from "../dist/index.js";
import { apiError, errorFor, jobError } from "../dist/errors.js";
import {
  INLINE_LIMIT,
  jobFields,
  readInput,
  retryAfterMs,
  submitRequest,
} from "../dist/request.js";
import { events } from "../dist/sse.js";

test("job fields: camelCase options become the API's names; deadline numbers are milliseconds", () => {
  const fields = jobFields(
    "text.upper",
    { a: 1 },
    {
      idempotencyKey: "k",
      deadline: 2500,
      maxAttempts: 2,
      waitForAgent: true,
      affinityKey: "user-7",
      fanIn: 4,
      inputRef: "ab".repeat(32),
      priority: undefined,
    },
  );
  assert.deepEqual(fields, {
    capability: "text.upper",
    args: { a: 1 },
    idempotency_key: "k",
    deadline: "2500ms",
    max_attempts: 2,
    wait_for_agent: true,
    affinity_key: "user-7",
    fan_in: 4,
    input_ref: "ab".repeat(32),
  });
  assert.equal(jobFields("x", undefined, { deadline: "1h 30m" }).deadline, "1h 30m");
  assert.match(String(jobFields("x", undefined, {}).idempotency_key), /^js-/);
});

test("an unknown option is refused by the client, naming it", () => {
  assert.throws(
    () => jobFields("x", undefined, /** @type {any} */ ({ priorty: 3 })),
    (e) =>
      e instanceof TypeError &&
      /unknown option 'priorty'/.test(e.message) &&
      /priority/.test(e.message),
  );
});

test("inputs: text is UTF-8, a Blob keeps its type, other values are refused", async () => {
  const text = readInput("héllo", undefined);
  assert.equal(text.size, 6);
  assert.equal(text.type, "text/plain; charset=utf-8");
  const blob = readInput(new Blob(["x"], { type: "image/png" }), undefined);
  assert.equal(blob.type, "image/png");
  assert.throws(() => readInput(/** @type {any} */ (42), undefined), /not number/);

  const small = await submitRequest({ capability: "text.upper" }, text, 45_000);
  assert.equal(small.query.wait, "45000ms");
  assert.deepEqual(JSON.parse(String(small.body)), {
    capability: "text.upper",
    input: Buffer.from("héllo").toString("base64"),
    input_type: "text/plain; charset=utf-8",
  });
  // A wait over 60 s is cut to 60 s: a longer one is a loop of waits.
  assert.equal((await submitRequest({ capability: "x" }, text, 600_000)).query.wait, "60000ms");
});

test("a large input is a raw upload, unless its type is JSON (it would be read as the job)", async () => {
  const big = new Uint8Array(INLINE_LIMIT + 1);
  const fields = {
    capability: "hash.sha256",
    args: { a: 1 },
    idempotency_key: "k",
    progress: true,
  };
  const raw = await submitRequest(fields, readInput(big, undefined), undefined);
  assert.equal(raw.body, big);
  assert.equal(raw.headers["Content-Type"], "application/octet-stream");
  assert.deepEqual(raw.query, {
    capability: "hash.sha256",
    args: '{"a":1}',
    idempotency_key: "k",
    progress: "true",
  });
  const js = await submitRequest(fields, readInput(big, "application/json"), undefined);
  assert.equal(js.headers["Content-Type"], "application/json");
  assert.equal(JSON.parse(String(js.body)).input_type, "application/json");
});

/** A stream of the given pieces of text. @param {string[]} pieces */
function streamOf(pieces) {
  const enc = new TextEncoder();
  return new ReadableStream({
    start(c) {
      for (const p of pieces) c.enqueue(enc.encode(p));
      c.close();
    },
  });
}

test("the event-stream parser, whatever the pieces and line endings", async () => {
  const text =
    ': keep-alive\r\n\r\nevent: state\r\ndata: {"id":"j1","state":"queued"}\r\n\r\n' +
    'event: progress\ndata: {"message":"résumé","percent":40}\n\n' +
    'event: final\rdata: {"id":"j1","state":"succeeded"}\r\r';
  const want = [
    { kind: "state", data: { id: "j1", state: "queued" } },
    { kind: "progress", data: { message: "résumé", percent: 40 } },
    { kind: "final", data: { id: "j1", state: "succeeded" } },
  ];
  const bytes = new TextEncoder().encode(text);
  // Every split point, including inside `\r\n` and inside the two bytes of `é`.
  for (let cut = 1; cut < bytes.length; cut += 1) {
    const body = new ReadableStream({
      start(c) {
        c.enqueue(bytes.slice(0, cut));
        c.enqueue(bytes.slice(cut));
        c.close();
      },
    });
    const got = [];
    for await (const ev of events(body)) got.push(ev);
    assert.deepEqual(got, want, `split at byte ${cut}`);
  }
  const multi = [];
  for await (const ev of events(streamOf(["data: 1\ndata: 2\n\n"]))) multi.push(ev);
  assert.deepEqual(multi, [{ kind: "message", data: { text: "1\n2" } }]);
});

test("errors from answers: JSON bodies, bodiless answers, statuses that decide", () => {
  const e = apiError(
    400,
    '{"error":"bad-arguments","field":"priority","message":"over the bound"}',
    null,
  );
  assert.ok(e instanceof BadArguments && isBadArguments(e));
  assert.equal(e.field, "priority");
  assert.equal(e.detail, "over the bound");
  assert.equal(e.message, "HTTP 400 bad-arguments (field 'priority'): over the bound");

  const proxy = apiError(502, "<html>Bad Gateway</html>", null);
  assert.equal(proxy.constructor, SpineError);
  assert.equal(proxy.condition, "http-502");
  assert.equal(proxy.detail, "<html>Bad Gateway</html>");

  assert.ok(errorFor("not-authorized", "unknown token", null, 401) instanceof Unauthorized);
  assert.ok(errorFor("not-authorized", "not yours", null, 403) instanceof Forbidden);
  assert.ok(errorFor("not-authorized", "?", null, null) instanceof NotAuthorized);

  const full = apiError(429, '{"error":"queue-full","message":"full"}', retryAfterMs("1"));
  assert.ok(full instanceof QueueFull);
  assert.equal(full.retryAfterMs, 1000);
  assert.ok(
    apiError(503, '{"error":"too-many-connections","message":"m"}', 1000) instanceof Unavailable,
  );
  assert.equal(retryAfterMs("Wed, 21 Oct 2015 07:28:00 GMT"), null);
});

test("job outcomes become JobError subclasses", () => {
  const bad = jobError({
    id: "j",
    state: "failed",
    error: { condition: "bad-arguments", field: "size", message: "m" },
  });
  assert.ok(bad instanceof JobBadArguments && isBadArguments(bad));
  assert.equal(bad.field, "size");
  assert.equal(bad.jobId, "j");
  assert.ok(jobError({ id: "j", state: "cancelled" }) instanceof JobCancelled);
  const late = jobError({ id: "j", state: "timed-out", error: { condition: "deadline-exceeded" } });
  assert.ok(late instanceof JobTimedOut);
  assert.equal(late.condition, "deadline-exceeded");
});

test("an event stream cut before its final event is ConnectionFailed, naming the job", async () => {
  // A loopback server standing in for a dispatcher that goes away mid-stream: one state
  // event, then the connection closes.
  const { createServer } = await import("node:http");
  const server = createServer((req, res) => {
    res.writeHead(200, { "content-type": "text/event-stream" });
    res.end('event: state\ndata: {"id":"j1","state":"running"}\n\n');
  });
  await new Promise((ok) => server.listen(0, "127.0.0.1", () => ok(undefined)));
  try {
    const addr = server.address();
    assert.ok(addr !== null && typeof addr === "object");
    const client = new Client({ url: `http://127.0.0.1:${addr.port}` });
    const job = new Job(client, { id: "j1", state: "queued" });
    /** @type {string[]} */
    const seen = [];
    await assert.rejects(
      (async () => {
        for await (const ev of job.events()) seen.push(ev.kind);
      })(),
      (e) => {
        assert.ok(e instanceof ConnectionFailed);
        assert.match(e.message, /event stream of job j1 ended before the job's final event/);
        return true;
      },
    );
    assert.deepEqual(seen, ["state"]);
    assert.equal(job.state, "running");
  } finally {
    server.close();
  }
});
