// The client against a real `spine up` (spine.js): every assertion checks a value the agents
// computed, a state the dispatcher recorded or an error it answered.

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { after, before, describe, test } from "node:test";

import {
  BadArguments,
  BadRequest,
  Client,
  ConnectionFailed,
  Job,
  JobBadArguments,
  JobCancelled,
  JobError,
  JobFailed,
  JobTimedOut,
  NotFound,
  SpineError,
  TooManyStreams,
  UnknownCapability,
  UnknownJob,
  WaitTimeout,
  isBadArguments,
} from "../dist/index.js";
import { corpus, png, pngSize, wordCount } from "./helpers.js";
import { closedPort, startSpine } from "./spine.js";

/** @param {string | Uint8Array} data */
const sha256 = (data) => createHash("sha256").update(data).digest("hex");

/** @type {{url: string, stop: () => Promise<void>}} */
let spine;
/** @type {Client} */
let client;

before(async () => {
  spine = await startSpine();
  client = new Client({ url: spine.url, timeoutMs: 30_000 });
});

after(async () => {
  await spine?.stop();
});

/**
 * The global fetch, noting each request (URL, method, headers, body) it forwards; the first
 * `loseAnswers` answers are read and then reported as a lost connection, like a connection cut
 * while the answer was on its way.
 */
function recorder(loseAnswers = 0) {
  /** @type {{url: URL, method: string, headers: Headers, body: unknown}[]} */
  const requests = [];
  /** @type {any[]} */
  const lost = [];
  /** @type {typeof fetch} */
  const fetchFn = async (input, init) => {
    requests.push({
      url: new URL(String(input)),
      method: init?.method ?? "GET",
      headers: new Headers(init?.headers),
      body: init?.body,
    });
    const res = await fetch(input, init);
    if (loseAnswers > 0) {
      loseAnswers--;
      lost.push(await res.json());
      throw new TypeError("fetch failed (connection reset, injected by the test)");
    }
    return res;
  };
  return { fetchFn, requests, lost };
}

/** A job that stays queued: its capability has no agent, and `waitForAgent` keeps it waiting. */
async function neverEndingJob() {
  return client.submit("test.never-offered", {}, { input: "x", waitForAgent: true });
}

describe("running jobs", () => {
  test("run returns the agents' output", async () => {
    const data = "the quick brown fox";
    assert.equal((await client.run("hash.sha256", {}, { input: data })).text(), sha256(data));
    const upper = await client.run("text.upper", {}, { input: "hello, spine" });
    assert.equal(upper.text(), "HELLO, SPINE");
    assert.equal(upper.type, "text/plain; charset=utf-8");
  });

  test("run with wait is one round trip", async () => {
    const rec = recorder();
    const c = new Client({ url: spine.url, fetch: rec.fetchFn });
    assert.equal((await c.run("text.upper", {}, { input: "small" })).text(), "SMALL");
    // A job that ends within the wait costs one request: no poll, no second fetch.
    assert.equal(rec.requests.length, 1);
    const [post] = rec.requests;
    assert.ok(post);
    assert.equal(post.method, "POST");
    assert.equal(post.url.pathname, "/v1/jobs");
    assert.equal(post.url.searchParams.get("wait"), "30000ms");
    assert.equal(post.headers.get("content-type"), "application/json");
    const body = JSON.parse(String(post.body));
    assert.equal(body.input, Buffer.from("small").toString("base64"));
    assert.match(body.idempotency_key, /^js-[0-9a-f-]{36}$/);
  });

  test("submit then result (long polls)", async () => {
    const job = await client.submit("text.upper", {}, { input: "later" });
    assert.ok(job.id);
    assert.ok(["queued", "dispatched", "running", "succeeded"].includes(job.state), job.state);
    assert.equal((await job.result({ timeoutMs: 30_000 })).text(), "LATER");
    assert.equal(job.state, "succeeded");
    assert.equal(job.done, true);
    assert.equal(job.error, null);
    assert.equal((await client.job(job.id)).state, "succeeded");
    assert.equal((await job.refresh()).view.result?.output_size, 5);
  });

  test("image.thumbnail of a real PNG fits the size asked for", async () => {
    const input = png(320, 160);
    const out = await client.run(
      "image.thumbnail",
      { size: 64 },
      { input, inputType: "image/png" },
    );
    assert.deepEqual(pngSize(out.bytes), { width: 64, height: 32 });
    assert.equal(out.type, "image/png");
    // A Blob (a browser File from a form) is an input too, its type taken from the Blob.
    const blob = new Blob([png(90, 300)], { type: "image/png" });
    const tall = await client.run("image.thumbnail", { size: 30 }, { input: blob });
    assert.deepEqual(pngSize(tall.bytes), { width: 9, height: 30 });
  });

  test("a large input goes as a raw upload", async () => {
    const data = new Uint8Array(1024 * 1024).map((_, i) => i % 256);
    const rec = recorder();
    const c = new Client({ url: spine.url, fetch: rec.fetchFn });
    assert.equal((await c.run("hash.sha256", {}, { input: data })).text(), sha256(data));
    const post = rec.requests[0];
    assert.ok(post);
    assert.equal(post.headers.get("content-type"), "application/octet-stream");
    assert.equal(post.url.searchParams.get("capability"), "hash.sha256");
    assert.match(post.url.searchParams.get("idempotency_key") ?? "", /^js-/);
    assert.ok(post.body instanceof Uint8Array && post.body.length === data.length);
  });

  test("a large output is fetched from its URL", async () => {
    const job = await client.submit(
      "image.grayscale",
      {},
      { input: png(500, 500), inputType: "image/png", waitMs: 60_000 },
    );
    const out = await job.result({ timeoutMs: 60_000 });
    const result = job.view.result;
    assert.ok(result);
    assert.equal(result.output_url, `/v1/jobs/${job.id}/output`);
    assert.equal(out.bytes.length, result.output_size);
    assert.equal(sha256(out.bytes), result.output_sha256);
    assert.deepEqual(pngSize(out.bytes), { width: 500, height: 500 });
  });

  test("putBlob feeds inputRef", async () => {
    const data = "uploaded once ".repeat(10_000);
    const blob = await client.putBlob(data);
    assert.deepEqual(blob, { sha256: sha256(data), size: data.length });
    for (let i = 0; i < 2; i++) {
      assert.equal(
        (await client.run("hash.sha256", {}, { inputRef: blob.sha256 })).text(),
        blob.sha256,
      );
    }
  });

  test("mapReduce equals a local word count, and its events end with final", async () => {
    const texts = corpus(6);
    const job = await client.mapReduce("wordcount.map", "wordcount.reduce", texts, {
      fanIn: 2,
      progress: true,
    });
    const kinds = [];
    for await (const ev of job.events()) {
      kinds.push(ev.kind);
      assert.ok(["state", "progress", "final"].includes(ev.kind), ev.kind);
      if (ev.kind === "progress" && ev.data.percent !== null) {
        assert.ok(ev.data.percent >= 0 && ev.data.percent <= 100);
      }
      if (ev.kind === "final") assert.equal(ev.data.state, "succeeded");
    }
    assert.equal(kinds.at(-1), "final");
    assert.equal(job.state, "succeeded");
    /** @type {[string, number][]} */
    const pairs = (await job.result()).json();
    assert.deepEqual(Object.fromEntries(pairs), wordCount(texts));
    assert.equal(job.view.mapreduce?.fragments, 6);
  });

  test("events of a job that already ended: one final event", async () => {
    const job = await client.submit("text.upper", {}, { input: "done", waitMs: 30_000 });
    assert.equal(job.state, "succeeded");
    const all = [];
    for await (const ev of job.events()) all.push(ev);
    assert.equal(all.length, 1);
    const [ev] = all;
    assert.ok(ev && ev.kind === "final");
    assert.equal(ev.data.result?.output, Buffer.from("DONE").toString("base64"));
  });
});

describe("cancel and waiting", () => {
  test("cancel ends the job cancelled, and result throws JobCancelled", async () => {
    const job = await neverEndingJob();
    assert.equal(job.state, "queued");
    assert.equal((await job.cancel()).state, "cancelled");
    await assert.rejects(job.result({ timeoutMs: 10_000 }), (e) => {
      assert.ok(e instanceof JobCancelled && e instanceof JobError && e instanceof SpineError);
      assert.equal(e.jobId, job.id);
      assert.equal(e.condition, "cancelled");
      return true;
    });
    assert.equal((await client.job(job.id)).state, "cancelled");
  });

  test("WaitTimeout leaves the job waiting", async () => {
    const job = await neverEndingJob();
    const started = Date.now();
    await assert.rejects(job.result({ timeoutMs: 300 }), (e) => {
      assert.ok(e instanceof WaitTimeout);
      assert.equal(e.jobId, job.id);
      assert.equal(e.state, "queued");
      assert.match(e.message, new RegExp(`DELETE /v1/jobs/${job.id}`));
      return true;
    });
    assert.ok(Date.now() - started < 5_000);
    assert.equal((await job.refresh()).state, "queued");
    await job.cancel();
  });

  test("a deadline in milliseconds ends the job timed-out: JobTimedOut", async () => {
    const job = await client.submit(
      "test.never-offered",
      {},
      { input: "x", waitForAgent: true, deadline: 300 },
    );
    await assert.rejects(job.result({ timeoutMs: 30_000 }), (e) => {
      assert.ok(e instanceof JobTimedOut && e instanceof JobError);
      assert.equal(e.condition, "deadline-exceeded");
      assert.equal(e.jobId, job.id);
      return true;
    });
    assert.equal(job.state, "timed-out");
  });

  test("an event stream of a cancelled job ends with final", async () => {
    const job = await neverEndingJob();
    const seen = [];
    for await (const ev of job.events()) {
      seen.push(ev.kind);
      if (ev.kind === "state") await client.job(job.id).then((j) => j.cancel());
    }
    assert.deepEqual(seen, ["state", "final"]);
    assert.equal(job.state, "cancelled");
  });
});

describe("batches and errors", () => {
  test("submitBatch answers each job, a bad item with its typed error", async () => {
    const answers = await client.submitBatch([
      { capability: "text.upper", input: "one" },
      { capability: "text.uppr", input: "two" },
      { capability: "hash.sha256", input: new TextEncoder().encode("three") },
    ]);
    assert.equal(answers.length, 3);
    const [first, bad, third] = answers;
    assert.ok(first instanceof Job && third instanceof Job);
    assert.equal((await first.result({ timeoutMs: 30_000 })).text(), "ONE");
    assert.ok(bad instanceof UnknownCapability);
    assert.equal(bad.field, "capability");
    assert.equal(bad.status, 422);
    assert.match(bad.detail, /text\.upper/);
    assert.equal((await third.result({ timeoutMs: 30_000 })).text(), sha256("three"));
  });

  test("an unknown capability is typed, with its field and the closest known one", async () => {
    await assert.rejects(client.submit("image.thumbnal", {}, { input: "x" }), (e) => {
      assert.ok(e instanceof UnknownCapability);
      assert.equal(e.status, 422);
      assert.equal(e.field, "capability");
      assert.ok(e.detail.split("closest first: ")[1]?.startsWith("image.thumbnail"), e.detail);
      return true;
    });
  });

  test("bad arguments from the agent and from the API", async () => {
    await assert.rejects(client.run("text.upper", { shout: true }, { input: "x" }), (e) => {
      assert.ok(e instanceof JobBadArguments && e instanceof JobFailed && isBadArguments(e));
      assert.equal(e.field, "shout");
      assert.equal(e.condition, "bad-arguments");
      return true;
    });
    await assert.rejects(
      client.submit("text.upper", {}, { input: "x", priority: 100_000 }),
      (e) => {
        assert.ok(e instanceof BadArguments && isBadArguments(e));
        assert.equal(e.status, 400);
        assert.equal(e.field, "priority");
        return true;
      },
    );
    await assert.rejects(client.submit("text.upper", {}, { input: "x", deadline: "30" }), (e) => {
      assert.ok(e instanceof BadRequest);
      assert.equal(e.field, "deadline");
      return true;
    });
  });

  test("a bad filter is a BadRequest naming filter; agents and capabilities", async () => {
    const agents = await client.agents("hash.sha256");
    assert.equal(agents.length, 2);
    assert.ok(agents.every((a) => a.slots === 8 && a.jid.endsWith("@localhost/up")));
    assert.deepEqual(await client.agents("hash.sha256", "gpu"), []);
    await assert.rejects(client.agents("hash.sha256", "(("), (e) => {
      assert.ok(e instanceof BadRequest);
      assert.equal(e.field, "filter");
      assert.equal(e.status, 400);
      return true;
    });
    // A filter on a job is checked at submission too.
    await assert.rejects(client.submit("text.upper", {}, { input: "x", filter: "((" }), (e) => {
      assert.ok(e instanceof BadRequest);
      assert.equal(e.field, "filter");
      return true;
    });
    const caps = await client.capabilities();
    const upper = caps.find((c) => c.name === "text.upper");
    assert.ok(upper, "text.upper is listed");
    assert.equal(upper.name, "text.upper");
    assert.equal(upper.agents, 2);
    assert.equal(upper.queued, 0);
    assert.equal(upper.slots, 16);
    assert.equal(upper.in_flight, 0);
    assert.equal(upper.window_s, 300);
    // The jobs this suite ran: the window's counts hold them.
    assert.ok(upper.succeeded + upper.failed > 0, JSON.stringify(upper));
    assert.ok(caps.some((c) => c.name === "image.thumbnail"));
  });

  test("an unknown job is UnknownJob, a NotFound", async () => {
    await assert.rejects(client.job("no-such-job"), (e) => {
      assert.ok(e instanceof UnknownJob && e instanceof NotFound);
      assert.equal(e.status, 404);
      return true;
    });
  });

  test("the token goes as a Bearer header", async () => {
    // `spine up` has no tokens (its loopback callers are served as `local`), so this checks
    // what the client sends, and that the dispatcher serves the request with it.
    const rec = recorder();
    const c = new Client({ url: spine.url, token: "s3cret", fetch: rec.fetchFn });
    assert.equal((await c.run("text.upper", {}, { input: "auth" })).text(), "AUTH");
    assert.equal(rec.requests[0]?.headers.get("authorization"), "Bearer s3cret");
  });
});

describe("retries", () => {
  test("a lost answer is retried with the same key: one job, not two", async () => {
    const rec = recorder(1);
    const c = new Client({ url: spine.url, fetch: rec.fetchFn });
    const job = await c.submit("text.upper", {}, { input: "once" });
    // The retry's answer is the job the lost answer named.
    assert.equal(rec.lost[0].id, job.id);
    assert.equal((await job.result({ timeoutMs: 30_000 })).text(), "ONCE");
    const [first, second] = rec.requests;
    assert.ok(first && second);
    assert.equal(first.body, second.body);
    assert.match(String(first.body), /"idempotency_key":"js-/);
  });

  test("connection errors are retried, then ConnectionFailed", async () => {
    const c = new Client({ url: `http://127.0.0.1:${await closedPort()}`, retries: 2 });
    await assert.rejects(c.run("text.upper", {}, { input: "x" }), (e) => {
      assert.ok(e instanceof ConnectionFailed);
      assert.match(e.message, /after 3 attempts/);
      assert.match(e.message, /ECONNREFUSED/);
      assert.ok(e.cause instanceof TypeError);
      return true;
    });
  });

  test("429 too-many-streams: typed with Retry-After, and retried after it", async () => {
    // The dispatcher allows 32 event streams per caller (http_max_event_streams_per_token).
    const job = await neverEndingJob();
    const iterators = [];
    for (let i = 0; i < 32; i++) {
      const it = job.events();
      const first = await it.next();
      assert.equal(first.value?.kind, "state");
      iterators.push(it);
    }
    const noRetry = new Client({ url: spine.url, retries: 0 });
    const j0 = await noRetry.job(job.id);
    await assert.rejects(j0.events().next(), (e) => {
      assert.ok(e instanceof TooManyStreams);
      assert.equal(e.status, 429);
      assert.equal(e.retryAfterMs, 1000);
      return true;
    });
    // With retries, the client waits the second the dispatcher asked for; a stream closes
    // meanwhile (once the refusal has come), and the retry gets its place.
    /** @type {(at: number) => void} */
    let refused = () => {};
    const refusal = new Promise((ok) => (refused = ok));
    /** @type {typeof fetch} */
    const watching = async (input, init) => {
      const res = await fetch(input, init);
      if (res.status === 429) refused(Date.now());
      return res;
    };
    const retrying = new Client({ url: spine.url, fetch: watching });
    const retried = (await retrying.job(job.id)).events();
    const pending = retried.next();
    const refusedAt = await refusal;
    await iterators[0]?.return(undefined);
    const ev = await pending;
    assert.equal(ev.value?.kind, "state");
    const waited = Date.now() - refusedAt;
    assert.ok(waited >= 900 && waited < 5000, `retried ${waited} ms after the 429`);
    await job.cancel();
    // The cancel ends every stream with its final event.
    assert.equal((await retried.next()).value?.kind, "final");
    for (const it of iterators.slice(1)) assert.equal((await it.next()).value?.kind, "final");
  });
});
