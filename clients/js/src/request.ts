/**
 * From a call to an HTTP request, without sending it: the job's JSON fields (camelCase
 * options to the API's snake_case names), the input inline in base64 or as a raw upload, the
 * `wait` parameter, an idempotency key. `client.ts` sends what these functions build and reads
 * the answers; nothing here does I/O, so the request forms are tested without a server.
 */

import type { BatchJob, BlobRef, Fragment, Input, JobFields } from "./types.js";

/**
 * Inputs up to this size travel inline as base64 JSON; larger ones as a raw upload, which the
 * dispatcher streams into its blob store instead of decoding base64 in memory.
 */
export const INLINE_LIMIT = 64 * 1024;
/** The longest `wait` one request asks for (the dispatcher allows up to its request timeout less a second, 2 min by default). */
export const MAX_WAIT_MS = 60_000;
/** Jobs per `POST /v1/jobs:batch` (the API's bound). */
export const BATCH_LIMIT = 1000;
/** States after which a job never changes. */
export const FINAL_STATES: ReadonlySet<string> = new Set([
  "succeeded",
  "failed",
  "cancelled",
  "timed-out",
]);

/** One request as the client sends it: a path with its query, a method, a body and headers. */
export interface Request {
  method: "GET" | "POST" | "PUT" | "DELETE";
  path: string;
  query: Record<string, string>;
  headers: Record<string, string>;
  body?: string | Uint8Array | Blob;
  /** Extra time the answer may take beyond the client's timeout: the `wait` asked for. */
  waitMs?: number;
}

/** A duration the dispatcher parses (it wants units): whole milliseconds, at least 1. */
export function waitParam(ms: number): string {
  return `${Math.max(1, Math.round(ms))}ms`;
}

/** A `deadline`: a string with units is sent as it is, a number is milliseconds. */
export function duration(value: string | number): string {
  return typeof value === "string" ? value : waitParam(value);
}

/** `notBefore` as the API takes it: a `Date` as its RFC 3339 time, a number as a countdown. */
export function notBefore(value: string | number | Date): string {
  return value instanceof Date ? value.toISOString() : duration(value);
}

/** An idempotency key for a submission the caller gave none: a retried POST then finds the job its first attempt created. */
export function newKey(): string {
  return `js-${uuid()}`;
}

/**
 * A random (version 4) UUID. Browsers offer `crypto.randomUUID` only to pages served over
 * HTTPS or from localhost; `getRandomValues` everywhere.
 */
function uuid(): string {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = ((b[6] ?? 0) & 0x0f) | 0x40;
  b[8] = ((b[8] ?? 0) & 0x3f) | 0x80;
  const hex = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** A job's input once read: bytes in memory or a `Blob`, with its size and type. */
export interface Payload {
  data: Uint8Array | Blob | null;
  size: number;
  type: string | null;
}

/** Normalises an input: a string is UTF-8 text, an `ArrayBuffer` its bytes, a `Blob` keeps its own type. */
export function readInput(value: Input | undefined, inputType: string | undefined): Payload {
  if (value === undefined || value === null)
    return { data: null, size: 0, type: inputType ?? null };
  if (typeof value === "string") {
    const data = new TextEncoder().encode(value);
    return { data, size: data.length, type: inputType ?? "text/plain; charset=utf-8" };
  }
  if (value instanceof Uint8Array)
    return { data: value, size: value.length, type: inputType ?? null };
  if (value instanceof ArrayBuffer) {
    return { data: new Uint8Array(value), size: value.byteLength, type: inputType ?? null };
  }
  if (typeof Blob !== "undefined" && value instanceof Blob) {
    return { data: value, size: value.size, type: inputType ?? (value.type || null) };
  }
  throw new TypeError(
    `input must be a Uint8Array, an ArrayBuffer, a string or a Blob, not ${describe(value)}`,
  );
}

function describe(v: unknown): string {
  if (v === null) return "null";
  if (typeof v === "object") return (v as object).constructor?.name ?? "an object";
  return typeof v;
}

/** Standard base64 with padding, as the API's `input` and `data` fields take; works in browsers and Node alike. */
export function toBase64(bytes: Uint8Array): string {
  let s = "";
  const step = 0x8000;
  for (let i = 0; i < bytes.length; i += step) {
    s += String.fromCharCode(...bytes.subarray(i, i + step));
  }
  return btoa(s);
}

/** The bytes of a base64 string (a job's inline output, a partial result). */
export function fromBase64(text: string): Uint8Array {
  const s = atob(text);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

/** The camelCase options and the API's names for them (the OpenAPI test checks them against `SubmitRequest`). */
export const FIELD_NAMES: Record<string, string> = {
  inputRef: "input_ref",
  filter: "filter",
  priority: "priority",
  deadline: "deadline",
  notBefore: "not_before",
  idempotencyKey: "idempotency_key",
  strategy: "strategy",
  sort: "sort",
  affinityKey: "affinity_key",
  limit: "limit",
  batch: "batch",
  maxAttempts: "max_attempts",
  progress: "progress",
  waitForAgent: "wait_for_agent",
  reduce: "reduce",
  split: "split",
  fanIn: "fan_in",
  fragments: "fragments",
};

/** Options that are the request's, not the job's: they never reach the JSON body. */
const NOT_FIELDS = new Set([
  "input",
  "inputType",
  "waitMs",
  "timeoutMs",
  "signal",
  "capability",
  "args",
]);

/**
 * The job's JSON fields without its input, `undefined` values left out and an idempotency key
 * added. An option this client does not know is refused here, naming it, rather than sent for
 * the dispatcher to refuse.
 */
export function jobFields(
  capability: string,
  args: Record<string, unknown> | undefined,
  opts: JobFields & Record<string, unknown>,
): Record<string, unknown> {
  const fields: Record<string, unknown> = { capability };
  if (args && Object.keys(args).length > 0) fields.args = args;
  for (const [k, v] of Object.entries(opts)) {
    if (v === undefined || NOT_FIELDS.has(k)) continue;
    const name = FIELD_NAMES[k];
    if (name === undefined) {
      throw new TypeError(
        `unknown option '${k}'; a job takes ${Object.keys(FIELD_NAMES).join(", ")}`,
      );
    }
    fields[name] =
      k === "deadline"
        ? duration(v as string | number)
        : k === "notBefore"
          ? notBefore(v as string | number | Date)
          : v;
  }
  if (fields.idempotency_key === undefined) fields.idempotency_key = newKey();
  return fields;
}

/**
 * `POST /v1/jobs`: JSON with the input in base64 up to {@link INLINE_LIMIT}; a raw upload above
 * it (the body is the input, the fields in the query string). A large input whose type is JSON
 * or a form stays inline: a raw body of that type would be read as the job itself.
 */
export async function submitRequest(
  fields: Record<string, unknown>,
  payload: Payload,
  waitMs: number | undefined,
): Promise<Request> {
  const query: Record<string, string> = {};
  if (waitMs !== undefined) query.wait = waitParam(Math.min(waitMs, MAX_WAIT_MS));
  const base = (payload.type ?? "").split(";")[0]?.trim().toLowerCase() ?? "";
  const jsonLike = base === "application/json" || base === "application/x-www-form-urlencoded";
  const req: Request = { method: "POST", path: "/v1/jobs", query, headers: {} };
  if (waitMs !== undefined) req.waitMs = Math.min(waitMs, MAX_WAIT_MS);
  if (payload.data !== null && payload.size > INLINE_LIMIT && !jsonLike) {
    for (const [k, v] of Object.entries(fields)) {
      query[k] = typeof v === "object" && v !== null ? JSON.stringify(v) : String(v);
    }
    req.headers["Content-Type"] = payload.type ?? "application/octet-stream";
    req.body = payload.data;
    return req;
  }
  const body: Record<string, unknown> = { ...fields };
  if (payload.data !== null && payload.size > 0) body.input = toBase64(await bytesOf(payload.data));
  if (payload.type) body.input_type = payload.type;
  req.headers["Content-Type"] = "application/json";
  req.body = JSON.stringify(body);
  return req;
}

async function bytesOf(data: Uint8Array | Blob): Promise<Uint8Array> {
  return data instanceof Uint8Array ? data : new Uint8Array(await data.arrayBuffer());
}

/**
 * One job of `submitBatch` in the JSON form of `POST /v1/jobs`: its input in base64 (a batch
 * is one JSON body; upload large inputs with `putBlob` and name them with `inputRef`).
 */
export async function batchItem(job: BatchJob): Promise<Record<string, unknown>> {
  if (typeof job.capability !== "string" || job.capability === "") {
    throw new TypeError("each job of submitBatch needs a 'capability'");
  }
  const { capability, args, ...rest } = job;
  const item = jobFields(capability, args, rest as JobFields & Record<string, unknown>);
  const payload = readInput(job.input, job.inputType);
  if (payload.data !== null && payload.size > 0) item.input = toBase64(await bytesOf(payload.data));
  if (payload.type) item.input_type = payload.type;
  return item;
}

/** A fragment by reference (PROTOCOL.md §11.7.1): an uploaded blob and its name. */
export function fragmentRef(blob: BlobRef, name: string | undefined): Fragment {
  return name === undefined
    ? { sha256: blob.sha256, size: blob.size }
    : { sha256: blob.sha256, size: blob.size, name };
}

/** Seconds of a `Retry-After` header as milliseconds; `null` when absent or not a number of seconds. */
export function retryAfterMs(header: string | null): number | null {
  if (header === null) return null;
  const s = Number(header.trim());
  return Number.isFinite(s) && s >= 0 ? s * 1000 : null;
}

/**
 * Milliseconds before retry `attempt` (1, 2, …) after a connection error: 100 ms doubling,
 * capped at 2 s, with jitter so that many clients cut off together do not come back together.
 */
export function backoffMs(attempt: number): number {
  const base = Math.min(2000, 100 * 2 ** (attempt - 1));
  return base * (0.5 + Math.random() / 2);
}
