/**
 * The server-sent events of `GET /v1/jobs/{id}/events`, read from a `fetch` response body.
 * `Job.events()` feeds the body's bytes through {@link SseParser} and yields each complete
 * event; comments (the dispatcher's keep-alives) are skipped.
 *
 * Why not `EventSource`: it cannot send an `Authorization` header, which is how the dispatcher
 * authenticates every request, and Node 20 has none. A streamed `fetch` body works in both,
 * with the same headers, retries and `AbortSignal` as every other call, so there is one path.
 */

import type { SpineEvent } from "./types.js";

/** Turns lines of a `text/event-stream` into events: `feed` returns one when a blank line ends it. */
export class SseParser {
  private kind = "message";
  private data: string[] = [];

  /** One line, without its line ending. */
  feed(line: string): { kind: string; data: string } | null {
    if (line === "") {
      if (this.data.length === 0) {
        this.kind = "message";
        return null;
      }
      const ev = { kind: this.kind, data: this.data.join("\n") };
      this.kind = "message";
      this.data = [];
      return ev;
    }
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "event") this.kind = value;
    else if (name === "data") this.data.push(value);
    return null;
  }
}

/** The lines of a byte stream, split at `\n`, `\r\n` or `\r` (all three end a line in SSE). */
export async function* lines(body: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  const reader = body.getReader();
  let buf = "";
  try {
    for (;;) {
      const { done, value } = await reader.read();
      buf += done ? decoder.decode() : decoder.decode(value, { stream: true });
      let start = 0;
      for (let i = 0; i < buf.length; i++) {
        const ch = buf[i];
        if (ch !== "\n" && ch !== "\r") continue;
        // A `\r` at the end of what arrived may be the first half of `\r\n`: wait for more.
        if (ch === "\r" && i === buf.length - 1 && !done) break;
        yield buf.slice(start, i);
        if (ch === "\r" && buf[i + 1] === "\n") i++;
        start = i + 1;
      }
      buf = buf.slice(start);
      if (done) {
        if (buf !== "") yield buf;
        return;
      }
    }
  } finally {
    // Closes the connection when the caller stops iterating early (`break` in `for await`).
    await reader.cancel().catch(() => undefined);
    reader.releaseLock();
  }
}

/** The events of a stream's bytes, their data parsed as JSON. */
export async function* events(body: ReadableStream<Uint8Array>): AsyncGenerator<SpineEvent> {
  const parser = new SseParser();
  for await (const line of lines(body)) {
    const ev = parser.feed(line);
    if (ev === null) continue;
    let data: unknown;
    try {
      data = JSON.parse(ev.data);
    } catch {
      data = { text: ev.data };
    }
    yield { kind: ev.kind, data } as SpineEvent;
  }
}
