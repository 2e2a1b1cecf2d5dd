/**
 * JavaScript/TypeScript client of Spine's HTTP API: submit jobs to a dispatcher from a web app
 * (Node 20+ or a browser page served beside the API) or a script, wait for their outputs,
 * follow their events, fan out with batches and map/reduce.
 *
 * ```ts
 * import { Client } from "spine-client";
 * const spine = new Client({ url: "http://127.0.0.1:8480" });
 * const digest = (await spine.run("hash.sha256", {}, { input: "hello" })).text();
 * ```
 *
 * Errors are the typed classes of `errors.ts`, all {@link SpineError}s.
 */

export { Client, Job, Output, DEFAULT_URL, type ClientOptions } from "./client.js";
export {
  SpineError,
  BadRequest,
  BadArguments,
  UnknownCapability,
  QueueFull,
  RateLimited,
  NotFound,
  UnknownJob,
  NoOutput,
  NotAuthorized,
  Unauthorized,
  Forbidden,
  TooLarge,
  StorageFull,
  RequestTimeout,
  TooManyStreams,
  Unavailable,
  ConnectionFailed,
  JobError,
  JobFailed,
  JobBadArguments,
  JobCancelled,
  JobTimedOut,
  WaitTimeout,
  isBadArguments,
} from "./errors.js";
export { INLINE_LIMIT, MAX_WAIT_MS, BATCH_LIMIT } from "./request.js";
export type * from "./types.js";
