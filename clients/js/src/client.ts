/**
 * The client: a web app or a script calls `Client.run` or `Client.submit` and gets an
 * {@link Output} or a {@link Job} back. Each call becomes a request built in `request.ts`, sent
 * with the platform's `fetch` (Node 20+, browsers, Deno, Bun); connection errors are retried
 * with the same request, so a submission keeps its idempotency key and a retry never makes a
 * second job; a 429 or 503 is tried again after its `Retry-After`; any other error answer
 * becomes a typed error from `errors.ts`.
 */

import {
  ConnectionFailed,
  JobError,
  SpineError,
  WaitTimeout,
  apiError,
  errorFor,
  jobError,
} from "./errors.js";
import {
  BATCH_LIMIT,
  FINAL_STATES,
  MAX_WAIT_MS,
  type Request,
  backoffMs,
  batchItem,
  fragmentRef,
  fromBase64,
  jobFields,
  readInput,
  retryAfterMs,
  submitRequest,
  waitParam,
} from "./request.js";
import { events as sseEvents } from "./sse.js";
import type {
  Agent,
  BatchAnswer,
  BatchJob,
  BlobRef,
  Capability,
  Input,
  JobFields,
  JobState,
  JobView,
  RunOptions,
  SpineEvent,
  SubmitOptions,
} from "./types.js";

/** Where `spine up` and a default dispatcher serve the API. */
export const DEFAULT_URL = "http://127.0.0.1:8480";

/** How a {@link Client} is made. */
export interface ClientOptions {
  /** The dispatcher's base URL (default `http://127.0.0.1:8480`). */
  url?: string;
  /** An API token (`[[http_token]]`), sent as `Authorization: Bearer <token>`. */
  token?: string;
  /** Bounds each request, in milliseconds (default 30 000); a request that waits for a job gets its wait on top. */
  timeoutMs?: number;
  /**
   * How many times a request is sent again after a connection error, or after a 429 or 503
   * answer that carries `Retry-After` (default 3). Other error answers are never retried.
   */
  retries?: number;
  /** The `fetch` to use (default the global one): a test's recorder, or a fetch with a proxy agent. */
  fetch?: typeof fetch;
}

/** A job's output: its bytes, its MIME type, and readers for text and JSON. */
export class Output {
  constructor(
    readonly bytes: Uint8Array,
    readonly type: string | null,
  ) {}

  /** The output as UTF-8 text. */
  text(): string {
    return new TextDecoder().decode(this.bytes);
  }

  /** The output parsed as JSON (a `SyntaxError` if it is not JSON). */
  json<T = unknown>(): T {
    return JSON.parse(this.text()) as T;
  }
}

/** An answer, read whole. */
interface Answer {
  status: number;
  headers: Headers;
  body: Uint8Array;
}

/**
 * A submitted job: its id, and its last known state and view (`GET /v1/jobs/{id}`). Methods
 * that talk to the dispatcher update `view`.
 */
export class Job {
  readonly id: string;
  view: JobView;

  constructor(
    private readonly client: Client,
    view: JobView,
  ) {
    this.id = String(view.id);
    this.view = { ...view };
  }

  get state(): JobState {
    return this.view.state;
  }

  /** Whether the job reached a final state (it never changes after). */
  get done(): boolean {
    return FINAL_STATES.has(this.view.state);
  }

  /** The job's outcome as an error when it ended without success, else `null`. */
  get error(): JobError | null {
    return this.done && this.state !== "succeeded" ? jobError(this.view) : null;
  }

  /**
   * Reads the job again; with `waitMs`, a long poll (`GET /v1/jobs/{id}?wait=`) that answers as
   * soon as the job ends, or when the wait is over.
   */
  async refresh(opts: { waitMs?: number; signal?: AbortSignal } = {}): Promise<this> {
    this.merge(await this.client.jobView(this.id, opts.waitMs, opts.signal));
    return this;
  }

  /**
   * Waits until the job ends, with long polls of up to 60 s (no busy loop). Throws
   * {@link WaitTimeout} after `timeoutMs` (default: no limit); does not throw for a failed job.
   */
  async wait(opts: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<this> {
    const started = Date.now();
    const { timeoutMs, signal } = opts;
    while (!this.done) {
      const left = timeoutMs === undefined ? MAX_WAIT_MS : timeoutMs - (Date.now() - started);
      if (left <= 0) throw new WaitTimeout(this.id, timeoutMs ?? 0, this.state);
      await this.refresh({ waitMs: Math.min(left, MAX_WAIT_MS), signal });
    }
    if (this.view.result === undefined && this.view.error === undefined) {
      // A submission's or a cancel's answer carries only the id and state.
      await this.refresh({ signal });
    }
    return this;
  }

  /**
   * The job's output once it succeeded. Throws {@link JobFailed}, {@link JobCancelled} or
   * {@link JobTimedOut} when it ended otherwise, and {@link WaitTimeout} when `timeoutMs`
   * passes first (the job goes on).
   */
  async result(opts: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<Output> {
    await this.wait(opts);
    const err = this.error;
    if (err !== null) throw err;
    const result = this.view.result ?? {};
    if (typeof result.output === "string") {
      return new Output(fromBase64(result.output), result.type ?? null);
    }
    if (!result.output_url && !result.output_size) {
      return new Output(new Uint8Array(), result.type ?? null);
    }
    return this.output(opts);
  }

  /** The raw output (`GET /v1/jobs/{id}/output`), whatever its size. */
  async output(opts: { signal?: AbortSignal } = {}): Promise<Output> {
    const a = await this.client.send(
      get(`/v1/jobs/${encodeURIComponent(this.id)}/output`),
      opts.signal,
    );
    check(a);
    return new Output(a.body, a.headers.get("content-type"));
  }

  /** Cancels the job (`DELETE /v1/jobs/{id}`); a job that had ended keeps its state. */
  async cancel(opts: { signal?: AbortSignal } = {}): Promise<this> {
    const req: Request = {
      method: "DELETE",
      path: `/v1/jobs/${encodeURIComponent(this.id)}`,
      query: {},
      headers: {},
    };
    this.merge(decodeJson<JobView>(await this.client.send(req, opts.signal)));
    return this;
  }

  /**
   * Follows the job (`GET /v1/jobs/{id}/events`): `state`, `progress`, `partial`, and last
   * `final`, after which the iteration ends. Progress and partials come only for jobs
   * submitted with `progress: true`. Leaving the loop early (`break`) closes the stream.
   */
  async *events(opts: { signal?: AbortSignal } = {}): AsyncGenerator<SpineEvent> {
    const path = `/v1/jobs/${encodeURIComponent(this.id)}/events`;
    const res = await this.client.open(get(path), opts.signal);
    const broken = (why: string, cause?: unknown): ConnectionFailed =>
      new ConnectionFailed(
        "connection-failed",
        `the event stream of job ${this.id} ${why}; the job goes on: follow it again with ` +
          `job.events(), or wait for it with job.result()`,
        null,
        null,
        { cause },
      );
    if (res.body === null) throw broken("had no body");
    try {
      for await (const ev of sseEvents(res.body)) {
        if (ev.kind === "state" || ev.kind === "final") this.merge(ev.data);
        yield ev;
        if (ev.kind === "final") return;
      }
    } catch (e) {
      if (opts.signal?.aborted) throw e;
      throw broken(`broke: ${describeError(e)}`, e);
    }
    // The dispatcher closes a stream after its final event; an end before it is a cut.
    throw broken("ended before the job's final event");
  }

  private merge(view: Partial<JobView>): void {
    this.view = { ...this.view, ...view } as JobView;
  }
}

/**
 * A client of a Spine dispatcher's HTTP API. One per process is enough: `fetch` pools its
 * connections (HTTP/1.1 keep-alive) and the client holds no other state.
 */
export class Client {
  readonly url: string;
  readonly timeoutMs: number;
  readonly retries: number;
  private readonly headers: Record<string, string>;
  private readonly fetchFn: typeof fetch;

  constructor(opts: ClientOptions = {}) {
    this.url = (opts.url ?? DEFAULT_URL).replace(/\/+$/, "");
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    this.retries = opts.retries ?? 3;
    this.headers = opts.token ? { Authorization: `Bearer ${opts.token}` } : {};
    // `fetch` called as a method of another object throws "Illegal invocation" in browsers.
    this.fetchFn = opts.fetch ?? ((input, init) => globalThis.fetch(input, init));
  }

  // -- jobs ----------------------------------------------------------------------------

  /**
   * Submits a job (`POST /v1/jobs`) and returns it. `input` is bytes, text (UTF-8) or a `Blob`
   * (a form's `File`); over 64 KiB it goes as a raw upload. With `waitMs` the answer comes when
   * the job ends or the wait is over, in one round trip.
   */
  async submit(
    capability: string,
    args?: Record<string, unknown>,
    opts: SubmitOptions = {},
  ): Promise<Job> {
    const { waitMs, signal, input, inputType, ...rest } = opts;
    const fields = jobFields(capability, args, rest as JobFields & Record<string, unknown>);
    const req = await submitRequest(fields, readInput(input, inputType), waitMs);
    return new Job(this, decodeJson<JobView>(await this.send(req, signal)));
  }

  /**
   * Submits a job and returns its output: one round trip (`POST /v1/jobs?wait=`) when it ends
   * within `timeoutMs` (default 30 s). Throws like {@link Job.result}.
   */
  async run(
    capability: string,
    args?: Record<string, unknown>,
    opts: RunOptions = {},
  ): Promise<Output> {
    const { timeoutMs = 30_000, signal, ...fields } = opts;
    const started = Date.now();
    const job = await this.submit(capability, args, { ...fields, waitMs: timeoutMs, signal });
    return job.result({ timeoutMs: Math.max(0, timeoutMs - (Date.now() - started)), signal });
  }

  /** The job with this id (`GET /v1/jobs/{id}`). */
  async job(id: string, opts: { signal?: AbortSignal } = {}): Promise<Job> {
    return new Job(this, await this.jobView(id, undefined, opts.signal));
  }

  /**
   * Submits many jobs with `POST /v1/jobs:batch` (1000 per request). The answer lists, in
   * order, a {@link Job} for each accepted job or the {@link SpineError} refusing it: a refused
   * item does not throw.
   */
  async submitBatch(
    jobs: BatchJob[],
    opts: { signal?: AbortSignal } = {},
  ): Promise<(Job | SpineError)[]> {
    const items = await Promise.all(jobs.map(batchItem));
    const out: (Job | SpineError)[] = [];
    for (let i = 0; i < items.length; i += BATCH_LIMIT) {
      const req: Request = {
        method: "POST",
        path: "/v1/jobs:batch",
        query: {},
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ jobs: items.slice(i, i + BATCH_LIMIT) }),
      };
      const doc = decodeJson<{ jobs: BatchAnswer[] }>(await this.send(req, opts.signal));
      for (const a of doc.jobs) {
        if ("error" in a) {
          out.push(
            errorFor(
              a.error,
              a.message ?? "",
              typeof a.field === "string" ? a.field : null,
              a.status,
            ),
          );
        } else {
          out.push(new Job(this, a));
        }
      }
    }
    return out;
  }

  /** Uploads bytes once (`PUT /v1/blobs`) for `inputRef` or fragment references. */
  async putBlob(data: Input, opts: { signal?: AbortSignal } = {}): Promise<BlobRef> {
    const payload = readInput(data, undefined);
    const req: Request = {
      method: "PUT",
      path: "/v1/blobs",
      query: {},
      headers: { "Content-Type": "application/octet-stream" },
      body: payload.data ?? new Uint8Array(),
    };
    return decodeJson<BlobRef>(await this.send(req, opts.signal));
  }

  /**
   * A map/reduce job: each fragment is uploaded with `PUT /v1/blobs` (eight at a time) and
   * named by reference (`part-0`, `part-1`… unless `names` are given), so the submission stays
   * small whatever the fragments weigh.
   */
  async mapReduce(
    mapCapability: string,
    reduceCapability: string,
    fragments: Input[],
    opts: SubmitOptions & { names?: string[]; args?: Record<string, unknown> } = {},
  ): Promise<Job> {
    const { names, args, fanIn = 16, ...rest } = opts;
    if (names !== undefined && names.length !== fragments.length) {
      throw new TypeError(`names has ${names.length} entries for ${fragments.length} fragments`);
    }
    const blobs: BlobRef[] = new Array(fragments.length);
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < fragments.length) {
        const i = next++;
        blobs[i] = await this.putBlob(fragments[i] as Input, { signal: opts.signal });
      }
    };
    await Promise.all(Array.from({ length: Math.min(8, fragments.length) }, worker));
    const refs = blobs.map((b, i) => fragmentRef(b, names ? names[i] : `part-${i}`));
    return this.submit(mapCapability, args, {
      ...rest,
      reduce: reduceCapability,
      fanIn,
      fragments: refs,
    });
  }

  /** The agents offering `capability` that pass `filter`, ranked (`GET /v1/agents`). */
  async agents(
    capability: string,
    filter?: string,
    opts: { sort?: string; limit?: number; signal?: AbortSignal } = {},
  ): Promise<Agent[]> {
    const req = get("/v1/agents");
    req.query.capability = capability;
    if (filter !== undefined) req.query.filter = filter;
    if (opts.sort !== undefined) req.query.sort = opts.sort;
    if (opts.limit !== undefined) req.query.limit = String(opts.limit);
    return decodeJson<{ agents: Agent[] }>(await this.send(req, opts.signal)).agents;
  }

  /** The capabilities this caller may run, with their agents and queued jobs (`GET /v1/capabilities`). */
  async capabilities(opts: { signal?: AbortSignal } = {}): Promise<Capability[]> {
    return decodeJson<{ capabilities: Capability[] }>(
      await this.send(get("/v1/capabilities"), opts.signal),
    ).capabilities;
  }

  // -- sending -------------------------------------------------------------------------

  /** @internal `GET /v1/jobs/{id}`, as a long poll when `waitMs` is given. */
  async jobView(
    id: string,
    waitMs: number | undefined,
    signal: AbortSignal | undefined,
  ): Promise<JobView> {
    const req = get(`/v1/jobs/${encodeURIComponent(id)}`);
    if (waitMs !== undefined) {
      req.query.wait = waitParam(waitMs);
      req.waitMs = waitMs;
    }
    return decodeJson<JobView>(await this.send(req, signal));
  }

  /** @internal Sends a request and reads its answer whole, retrying as {@link ClientOptions.retries} says. */
  async send(req: Request, signal?: AbortSignal): Promise<Answer> {
    return this.attempt(req, signal, false, async (res) => ({
      status: res.status,
      headers: res.headers,
      body: new Uint8Array(await res.arrayBuffer()),
    }));
  }

  /**
   * @internal Opens a stream: the answer's headers within the timeout, then its body for as
   * long as it lasts (an event stream is not bounded by the request timeout).
   */
  async open(req: Request, signal?: AbortSignal): Promise<Response> {
    return this.attempt(req, signal, true, async (res) => {
      if (res.status >= 400) {
        check({
          status: res.status,
          headers: res.headers,
          body: new Uint8Array(await res.arrayBuffer()),
        });
      }
      return res;
    });
  }

  private async attempt<T>(
    req: Request,
    signal: AbortSignal | undefined,
    stream: boolean,
    read: (res: Response) => Promise<T>,
  ): Promise<T> {
    const url = this.url + req.path + query(req.query);
    const limit = this.timeoutMs + (req.waitMs ?? 0);
    for (let attempt = 1; ; attempt++) {
      signal?.throwIfAborted();
      const timer = new AbortController();
      const timeout = setTimeout(
        () => timer.abort(new DOMException(`no answer within ${limit} ms`, "TimeoutError")),
        limit,
      );
      const both = signal ? AbortSignal.any([signal, timer.signal]) : timer.signal;
      let res: Response;
      let value: T;
      try {
        res = await this.fetchFn(url, {
          method: req.method,
          headers: { ...this.headers, ...req.headers },
          body: (req.body ?? null) as BodyInit | null,
          signal: both,
        });
        if (stream) clearTimeout(timeout);
        const wait =
          res.status === 429 || res.status === 503
            ? retryAfterMs(res.headers.get("retry-after"))
            : null;
        if (wait !== null && attempt <= this.retries) {
          // The dispatcher refused for now and said when to come back: nothing was created
          // (a submission keeps its idempotency key anyway), so the same request goes again.
          await res.arrayBuffer().catch(() => undefined);
          clearTimeout(timeout);
          await sleep(wait, signal);
          continue;
        }
        value = await read(res);
      } catch (e) {
        clearTimeout(timeout);
        if (signal?.aborted || e instanceof SpineError) throw e;
        // A connection refused or cut, or no answer in time: the request is sent again as it
        // was, its idempotency key included, so a submission whose answer was lost finds its job.
        if (attempt > this.retries) {
          throw new ConnectionFailed(
            "connection-failed",
            `${req.method} ${this.url}${req.path} failed after ${attempt} attempts: ${describeError(e)}`,
            null,
            null,
            { cause: e },
          );
        }
        await sleep(backoffMs(attempt), signal);
        continue;
      }
      clearTimeout(timeout);
      return value;
    }
  }
}

function get(path: string): Request {
  return { method: "GET", path, query: {}, headers: {} };
}

function query(q: Record<string, string>): string {
  const s = new URLSearchParams(q).toString();
  return s === "" ? "" : `?${s}`;
}

/** Throws the typed error for an error answer. */
function check(a: Answer): void {
  if (a.status >= 400) {
    throw apiError(
      a.status,
      new TextDecoder().decode(a.body),
      retryAfterMs(a.headers.get("retry-after")),
    );
  }
}

function decodeJson<T>(a: Answer): T {
  check(a);
  const text = new TextDecoder().decode(a.body);
  try {
    return JSON.parse(text) as T;
  } catch (e) {
    throw new SpineError(
      "bad-answer",
      `expected JSON from the dispatcher, got ${JSON.stringify(text.slice(0, 100))}: ${describeError(e)}`,
      null,
      a.status,
    );
  }
}

function describeError(e: unknown): string {
  if (e instanceof Error) {
    // Node's fetch says only "fetch failed"; the reason (ECONNREFUSED, a reset) is its cause.
    const cause = (e as { cause?: unknown }).cause;
    return cause instanceof Error ? `${e.message} (${cause.message})` : e.message;
  }
  return String(e);
}

/** Waits `ms`, or until `signal` aborts (then rejects with its reason). */
function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    const onAbort = (): void => {
      clearTimeout(t);
      reject(signal?.reason);
    };
    const t = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
