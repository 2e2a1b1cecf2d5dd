/**
 * Typed errors for the answers of Spine's HTTP API. Every error the dispatcher produces is a
 * JSON body `{"error": condition, "message", "field"?}` with an HTTP status (docs/dispatcher.md
 * §6, "Errors"); a job that ends badly is not an HTTP error but carries its own `error` object.
 * The client turns both into one of the classes below, so that a web handler can write
 * `catch (e) { if (e instanceof UnknownCapability) … }` instead of comparing strings. The
 * classes and their conditions mirror the Python client's exceptions one for one.
 */

import type { ApiErrorBody, JobState, JobView } from "./types.js";

/**
 * Any error from the API or about a job. `condition` is the API's `error` string
 * (`"unknown-capability"`) or the job's `error.condition`; `field` names the request field or
 * job argument at fault when the dispatcher named one; `status` is the HTTP status (`null` for
 * job outcomes and for errors this client raises itself).
 */
export class SpineError extends Error {
  readonly condition: string;
  readonly field: string | null;
  readonly status: number | null;
  /** How long the dispatcher asked to wait before trying again (its `Retry-After`), if it did. */
  readonly retryAfterMs: number | null;
  /** The dispatcher's message, without the condition and field this error's `message` adds. */
  readonly detail: string;

  constructor(
    condition: string,
    detail: string,
    field: string | null = null,
    status: number | null = null,
    options: { cause?: unknown; retryAfterMs?: number | null } = {},
  ) {
    const where = field ? ` (field '${field}')` : "";
    const code = status !== null ? `HTTP ${status} ` : "";
    super(`${code}${condition}${where}: ${detail}`, { cause: options.cause });
    this.name = new.target.name;
    this.condition = condition;
    this.detail = detail;
    this.field = field;
    this.status = status;
    this.retryAfterMs = options.retryAfterMs ?? null;
  }
}

/** 400 or 415: the request is malformed (a field unknown, missing, of the wrong type or refused). */
export class BadRequest extends SpineError {}

/** The job's arguments or bounds were refused (`bad-arguments`, `malformed`). */
export class BadArguments extends BadRequest {}

/**
 * 422: no agent has ever offered the capability named in `field` (`capability`, `reduce` or
 * `split`). The message lists the known capabilities, closest first; submit with
 * `waitForAgent: true` to queue the job until an agent offers it.
 */
export class UnknownCapability extends SpineError {}

/** 429: the capability's queue, or this token's share of it, is full. */
export class QueueFull extends SpineError {}

/**
 * 429: this token sent more requests than its rate allows (`rate-limited`, when the
 * dispatcher limits rates); `retryAfterMs` says when the next one is welcome.
 */
export class RateLimited extends SpineError {}

/** 404: no such endpoint (`not-found`). */
export class NotFound extends SpineError {}

/** 404: no job has that id (it may have passed its retention). */
export class UnknownJob extends NotFound {}

/** 404: the job has no output (it has not succeeded). */
export class NoOutput extends NotFound {}

/** 401 or 403 (`not-authorized`). */
export class NotAuthorized extends SpineError {}

/** 401: the dispatcher has tokens and none, or an unknown one, was given. */
export class Unauthorized extends NotAuthorized {}

/**
 * 403: the token may not run this capability or see this job, or the client is not loopback
 * and the dispatcher has no tokens.
 */
export class Forbidden extends NotAuthorized {}

/** 413: the input or the request body is over the dispatcher's limit. */
export class TooLarge extends SpineError {}

/** 507: the blob store is at its quota. */
export class StorageFull extends SpineError {}

/** 408: the request took longer than the dispatcher's `http_request_timeout`. */
export class RequestTimeout extends SpineError {}

/** 429 or 503: too many event streams are open (for this token, or in all). */
export class TooManyStreams extends SpineError {}

/** 503: the dispatcher is stopping or has no connection left. */
export class Unavailable extends SpineError {}

/** The dispatcher could not be reached after every retry (`cause` holds the last failure). */
export class ConnectionFailed extends SpineError {}

/** A job ended without success. `jobId` names it and `job` is its last view. */
export class JobError extends SpineError {
  readonly jobId: string;
  readonly job: JobView;

  constructor(condition: string, detail: string, field: string | null, job: JobView) {
    super(condition, detail, field, null);
    this.message = `job ${job.id}: ${this.message}`;
    this.jobId = job.id;
    this.job = job;
  }
}

/**
 * The job ended `failed`: `condition` is the job's (`failed`, `no-agent`, `retryable`…),
 * `field` the argument an agent refused.
 */
export class JobFailed extends JobError {}

/**
 * The job failed because its agent refused its arguments or input (`field` names which).
 * JavaScript has single inheritance: this is a `JobFailed`, and `isBadArguments(e)` is true
 * for it as for a `BadArguments`.
 */
export class JobBadArguments extends JobFailed {}

/** The job ended `cancelled` (by a submitter, or its agent answered `cancelled`). */
export class JobCancelled extends JobError {}

/** The job ended `timed-out`: its `deadline` passed. */
export class JobTimedOut extends JobError {}

/**
 * This client stopped waiting; the job itself goes on. Wait again with `job.result()`, or
 * cancel it with `job.cancel()` (`DELETE /v1/jobs/{jobId}`).
 */
export class WaitTimeout extends SpineError {
  readonly jobId: string;
  readonly waitedMs: number;
  readonly state: JobState;

  constructor(jobId: string, waitedMs: number, state: JobState) {
    super(
      "wait-timeout",
      `job ${jobId} is still ${state} after ${waitedMs} ms; it goes on: wait again with ` +
        `job.result(), or cancel it with job.cancel() (DELETE /v1/jobs/${jobId})`,
    );
    this.jobId = jobId;
    this.waitedMs = waitedMs;
    this.state = state;
  }
}

/** Whether the arguments of a job were refused, by the API (`BadArguments`) or by its agent (`JobBadArguments`). */
export function isBadArguments(e: unknown): e is BadArguments | JobBadArguments {
  return e instanceof BadArguments || e instanceof JobBadArguments;
}

type ErrorClass = new (
  condition: string,
  detail: string,
  field: string | null,
  status: number | null,
  options?: { cause?: unknown; retryAfterMs?: number | null },
) => SpineError;

/** The API's `error` strings; for `not-authorized` the status decides between two classes. */
const BY_CONDITION: Record<string, ErrorClass> = {
  "bad-request": BadRequest,
  "tls-required": BadRequest,
  "unsupported-media-type": BadRequest,
  "bad-arguments": BadArguments,
  malformed: BadArguments,
  "unknown-capability": UnknownCapability,
  "queue-full": QueueFull,
  busy: QueueFull,
  "rate-limited": RateLimited,
  "not-found": NotFound,
  "unknown-job": UnknownJob,
  "no-output": NoOutput,
  "too-large": TooLarge,
  "storage-full": StorageFull,
  "request-timeout": RequestTimeout,
  "too-many-streams": TooManyStreams,
  "too-many-connections": Unavailable,
  unavailable: Unavailable,
  standby: Unavailable,
};

/** The error for an API condition; also used for the per-item errors of a batch. */
export function errorFor(
  condition: string,
  detail: string,
  field: string | null,
  status: number | null,
  retryAfterMs: number | null = null,
): SpineError {
  let cls: ErrorClass;
  if (condition === "not-authorized") {
    cls = status === 401 ? Unauthorized : status === 403 ? Forbidden : NotAuthorized;
  } else {
    cls = BY_CONDITION[condition] ?? SpineError;
  }
  return new cls(condition, detail, field, status, { retryAfterMs });
}

/**
 * The error for an HTTP error answer: from its JSON body when it has one, otherwise (a proxy's
 * page, hyper's bodiless 431) the condition `http-<status>` and the first bytes of the body.
 */
export function apiError(status: number, body: string, retryAfterMs: number | null): SpineError {
  let doc: unknown = null;
  try {
    doc = JSON.parse(body);
  } catch {
    // Not JSON: described by its status and its first bytes below.
  }
  if (isErrorBody(doc)) {
    return errorFor(
      doc.error,
      String(doc.message ?? ""),
      typeof doc.field === "string" ? doc.field : null,
      status,
      retryAfterMs,
    );
  }
  return errorFor(`http-${status}`, body.slice(0, 200) || "(no body)", null, status, retryAfterMs);
}

function isErrorBody(doc: unknown): doc is ApiErrorBody {
  return (
    typeof doc === "object" &&
    doc !== null &&
    typeof (doc as { error?: unknown }).error === "string"
  );
}

/** The error for a job that ended `failed`, `cancelled` or `timed-out`. */
export function jobError(job: JobView): JobError {
  const err = job.error;
  const condition = err?.condition || job.state || "failed";
  const detail = err?.message || `the job ended ${job.state}`;
  const field = typeof err?.field === "string" ? err.field : null;
  if (job.state === "cancelled") return new JobCancelled(condition, detail, field, job);
  if (job.state === "timed-out") return new JobTimedOut(condition, detail, field, job);
  if (condition === "bad-arguments" || condition === "malformed") {
    return new JobBadArguments(condition, detail, field, job);
  }
  return new JobFailed(condition, detail, field, job);
}
