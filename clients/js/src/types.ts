/**
 * The JSON shapes of Spine's HTTP API as this client reads and writes them (docs/dispatcher.md
 * §6): what `POST /v1/jobs` takes, the job view every job endpoint answers with, the batch
 * answers, agents, capabilities and the error body. The client builds requests from
 * {@link SubmitOptions} and hands the dispatcher's answers back typed as these, unchanged, so
 * that a field the API adds later is still there in `view` even before it gets a type here.
 *
 * Field names are the API's (snake_case) wherever a value is the wire's own; the options a
 * caller passes are camelCase, as JavaScript code expects, and are translated in one place
 * (`request.ts`).
 */

/** A job's state (§4 of docs/dispatcher.md). The last four never change. */
export type JobState =
  | "accepted"
  | "queued"
  | "dispatched"
  | "running"
  | "succeeded"
  | "failed"
  | "cancelled"
  | "timed-out";

/** A succeeded job's result, as the job view carries it. */
export interface JobResultView {
  /** The whole output in base64 when it is at most 64 KiB; `null` (or absent) otherwise. */
  output?: string | null;
  /** The output's size in bytes. */
  output_size?: number;
  /** Where a larger output streams from: `/v1/jobs/{id}/output`. */
  output_url?: string;
  /** The SHA-256 of an output served from `output_url`. */
  output_sha256?: string;
  /** The agent that keeps a map step's output (then there is no `output_url`). */
  output_kept_by?: string;
  /** The output's MIME type. */
  type?: string | null;
  /** The agent's metadata object. */
  meta?: Record<string, unknown>;
  /** The handler's time, when the agent reported it. */
  elapsed_ms?: number | null;
}

/** Why a job ended without success: its `error` object. */
export interface JobErrorView {
  /** `failed`, `no-agent`, `bad-arguments`, `deadline-exceeded`, `cancelled`… */
  condition: string;
  message?: string;
  /** The argument or input the agent refused, when it named one. */
  field?: string;
}

/** Progress of a map/reduce job. */
export interface MapReduceProgress {
  fragments: number;
  fragments_done: number;
  reduce_steps: number;
  reduce_steps_done: number;
  speculative: number;
}

/**
 * A job as `GET /v1/jobs/{id}` shows it. A submission's or a cancel's answer carries only
 * `id` and `state`; the other fields are filled in by the next read.
 */
export interface JobView {
  id: string;
  state: JobState;
  capability?: string;
  /** The agent of the current or last attempt; `null` before the first dispatch. */
  agent?: string | null;
  attempts?: number;
  /** Last reported progress, 100 on success, `null` when none was reported. */
  percent?: number | null;
  /** `http:<token name>`, or an XMPP submitter's bare JID. */
  submitter?: string;
  /** Only when the job succeeded. */
  result?: JobResultView;
  /** Only when the job failed, was cancelled or timed out. */
  error?: JobErrorView;
  /** Jobs an `all` or map/reduce job created. */
  children?: string[];
  /** The job that created this one. */
  parent?: string;
  reduce?: string;
  split?: string;
  fan_in?: number;
  mapreduce?: MapReduceProgress;
  /** A delayed job: when it may start (RFC 3339, UTC); it is `accepted` until then. */
  not_before?: string;
  /** Its placement priority (higher first). */
  priority?: number;
  /** Its arguments (not in listings). */
  args?: Record<string, unknown>;
  /** Its input's size and type (not in listings). */
  input?: JobInput;
  /** When it was accepted, last changed, last dispatched and ended (RFC 3339, UTC). */
  accepted_at?: string;
  updated_at?: string;
  dispatched_at?: string;
  ended_at?: string;
  /** Its timeline, oldest first (not in listings). */
  history?: JobStep[];
  /** A job an event rule made (docs/events.md): the rule and the event it came from. */
  event?: JobEventRef;
  [more: string]: unknown;
}

/** The rule and the event that made a job (`JobView.event`). */
export interface JobEventRef {
  rule: string;
  /** The event's `id`, `source` and `type`. */
  id: string;
  source: string;
  type: string;
  /** Rules that led to the event (0: it came from outside). */
  depth: number;
}

/** A job's input as `GET /v1/jobs/{id}` shows it. */
export interface JobInput {
  size: number;
  mime?: string | null;
}

/** One step of a job's life (`history`). */
export interface JobStep {
  /** When (RFC 3339, UTC). */
  at: string;
  /** The state it entered. */
  state: JobState;
  /** The attempt then (0 before the first dispatch). */
  attempt: number;
  /** The agent of the attempt, once dispatched. */
  agent?: string | null;
  /** Why: a retry's failure, a busy agent, the outcome's message. */
  note?: string | null;
}

/** The body of every error answer of the API (§6, "Errors"). */
export interface ApiErrorBody {
  /** The condition: `bad-request`, `unknown-capability`, `queue-full`… */
  error: string;
  message: string;
  /** The request field at fault, when one is. */
  field?: string;
  /** The HTTP status it goes with (in a batch's items: the one `POST /v1/jobs` would have answered). */
  status?: number;
  /** For 429 and 503: seconds until a retry may succeed (the `Retry-After` header). */
  retry_after?: number;
  /** For `standby` (one of several dispatchers that does not lead): the leader's base URL. */
  leader?: string;
}

/** One answer of `POST /v1/jobs:batch`: the accepted job, or the error refusing it. */
export type BatchAnswer = { id: string; state: JobState } | (ApiErrorBody & { status: number });

/** An agent as `GET /v1/agents` ranks it. */
export interface Agent {
  jid: string;
  /** Effective attributes for the capability, as strings. */
  attributes: Record<string, string>;
  in_flight: number;
  load: number;
  slots: number;
  /** `ready`, `busy`, `draining`… */
  state: string;
  /** The agent's load average, memory used and total (bytes); `null` when it does not report them. */
  loadavg?: number | null;
  mem_used?: number | null;
  mem_total?: number | null;
}

/** A capability as `GET /v1/capabilities` lists it. */
export interface Capability {
  name: string;
  /** Agents offering it now. */
  agents: number;
  /** Jobs queued for it, retry backoff included. */
  queued: number;
  /** Its agents' slots for it, and its jobs running on them now. */
  slots: number;
  in_flight: number;
  /** The seconds the counts and latencies cover (the last five minutes). */
  window_s: number;
  succeeded: number;
  /** Failed or timed out. */
  failed: number;
  retried: number;
  /** Jobs ended per minute over the window. */
  per_minute: number;
  /** Acceptance to end of the jobs that succeeded, in ms; `null` when none did. */
  latency_ms?: { p50: number; p95: number; p99: number } | null;
  /** Its load every 5 s over the last 10 minutes, oldest first. */
  samples: { at_ms: number; in_flight: number; slots: number; queued: number }[];
}

/** A blob uploaded with `PUT /v1/blobs`: what `input_ref` and fragment references name. */
export interface BlobRef {
  sha256: string;
  size: number;
}

/** A map/reduce fragment, inline (`data` in base64) or by reference to an uploaded blob. */
export type Fragment =
  | { data: string; type?: string; name?: string }
  | { sha256: string; size: number; type?: string; name?: string };

/**
 * A job's input: bytes, text (sent as UTF-8), or a `Blob` (a browser `File` from a form).
 * Up to 64 KiB it goes base64 inside the JSON body; above, as a raw upload.
 */
export type Input = Uint8Array | ArrayBuffer | string | Blob;

/**
 * The fields of a submission beyond `capability` and `args`, camelCase; each maps to the
 * API's field of the same name in snake_case (`idempotencyKey` → `idempotency_key`).
 */
export interface JobFields {
  input?: Input;
  /** The input's MIME type (a `Blob`'s own type, or `text/plain; charset=utf-8` for a string, by default). */
  inputType?: string;
  /** Instead of `input`: the SHA-256 of a blob uploaded with `putBlob`. */
  inputRef?: string;
  /** Which agents qualify (docs/dispatcher.md §3): `"gpu, zone in (eu-1,eu-2)"`. */
  filter?: string;
  /** Signed; higher runs first. */
  priority?: number;
  /** A duration with units (`"30s"`, `"1h 30m"`), or a number of milliseconds. */
  deadline?: string | number;
  /**
   * A delayed job: not started before this time. A `Date`, an RFC 3339 time
   * (`"2026-11-26T18:00:00Z"`), a countdown with units (`"90s"`, `"2h"`), or a number of
   * milliseconds from now. The job is `accepted` until then.
   */
  notBefore?: string | number | Date;
  /**
   * Makes a resubmission find the job instead of creating a second one. The client makes one
   * (`js-<uuid>`) for every submission that has none, so its own retries are safe.
   */
  idempotencyKey?: string;
  strategy?: "least-loaded" | "random" | "round-robin" | "power-of-two" | "affinity" | "all";
  sort?: string;
  affinityKey?: string;
  /** With `strategy: "all"`: `"5"` or `"50%"` of the agents. */
  limit?: string;
  /** With `strategy: "all"`: copies running at once. */
  batch?: number;
  maxAttempts?: number;
  /** Ask the agent for progress and partial results (the event stream's `progress`, `partial`). */
  progress?: boolean;
  /** Queue the job even if no agent has ever offered the capability. */
  waitForAgent?: boolean;
  /** A map/reduce job: the reduce capability (`capability` is the map step). */
  reduce?: string;
  split?: string;
  fanIn?: number;
  fragments?: Fragment[];
}

/** Options of `Client.submit`. */
export interface SubmitOptions extends JobFields {
  /**
   * Hold the answer until the job ends or this many milliseconds pass (`POST /v1/jobs?wait=`):
   * one round trip for a job that ends in time. At most 60 s per request.
   */
  waitMs?: number;
  /** Aborts the request. */
  signal?: AbortSignal;
}

/** Options of `Client.run`. */
export interface RunOptions extends JobFields {
  /** How long to wait for the job's end before throwing `WaitTimeout` (default 30 s). */
  timeoutMs?: number;
  signal?: AbortSignal;
}

/** One job of `Client.submitBatch`: a capability, its arguments and the fields of a submission. */
export interface BatchJob extends JobFields {
  capability: string;
  args?: Record<string, unknown>;
}

/** An event of `GET /v1/jobs/{id}/events`. */
export type SpineEvent =
  | { kind: "state"; data: JobView }
  | { kind: "progress"; data: { message: string | null; percent: number | null } }
  | { kind: "partial"; data: { data: string; seq: number; type: string | null } }
  | { kind: "final"; data: JobView }
  | { kind: "lagged"; data: { missed: number } };
