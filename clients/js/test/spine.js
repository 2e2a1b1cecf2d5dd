// A real Spine for the client's tests: one `spine up` (embedded XMPP server, dispatcher,
// local agents) per test file, on free loopback ports with a temporary data directory,
// stopped by its PID at the end (SIGTERM, then SIGKILL if it does not stop). The same
// recipe as clients/python/tests/conftest.py.

import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { isAbsolute, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const REPO = resolve(fileURLToPath(import.meta.url), "../../../..");
const BANNER = /HTTP API (http:\/\/\S+),/;

/** The spine binary: $SPINE_BIN (relative to the repository), else target/debug/spine. */
function spineBin() {
  const given = process.env.SPINE_BIN ?? "target/debug/spine";
  const path = isAbsolute(given) ? given : join(REPO, given);
  if (!existsSync(path)) {
    throw new Error(
      `no spine binary at ${path}: build it with \`cargo build -p spine\`, or set SPINE_BIN`,
    );
  }
  return path;
}

/**
 * Starts `spine up` and resolves once it printed its banner, which comes only after every
 * local agent registered, so the first job meets no unknown capability.
 * @returns {Promise<{url: string, stop: () => Promise<void>}>}
 */
export async function startSpine({ agents = 2, slots = 8 } = {}) {
  const data = mkdtempSync(join(tmpdir(), "spine-nodetest-"));
  const args = [
    "up",
    "--http-listen",
    "127.0.0.1:0",
    "--xmpp-listen",
    "127.0.0.1:0",
    "--data-dir",
    data,
  ];
  args.push("--agents", String(agents), "--slots", String(slots));
  const proc = spawn(spineBin(), args, { stdio: ["ignore", "pipe", "pipe"] });
  /** @type {string[]} */
  const lines = [];
  let exited = false;
  const exit = new Promise((done) =>
    proc.once("exit", () => {
      exited = true;
      done(undefined);
    }),
  );
  const url = await new Promise((ok, fail) => {
    const timer = setTimeout(
      () => fail(new Error(`spine up printed no banner in 90 s:\n${lines.slice(-40).join("\n")}`)),
      90_000,
    );
    let buf = "";
    const onData = (/** @type {Buffer} */ chunk) => {
      buf += chunk.toString();
      const parts = buf.split("\n");
      buf = parts.pop() ?? "";
      for (const line of parts) {
        lines.push(line);
        const m = BANNER.exec(line);
        if (m) {
          clearTimeout(timer);
          ok(m[1]);
        }
      }
    };
    proc.stdout.on("data", onData);
    proc.stderr.on("data", onData);
    proc.once("exit", (code) => {
      clearTimeout(timer);
      fail(
        new Error(`spine up exited (${code}) before it was ready:\n${lines.slice(-40).join("\n")}`),
      );
    });
  });
  const stop = async () => {
    if (!exited && proc.pid !== undefined) {
      process.kill(proc.pid, "SIGTERM");
      const killed = setTimeout(
        () => proc.pid !== undefined && !exited && process.kill(proc.pid, "SIGKILL"),
        20_000,
      );
      await exit;
      clearTimeout(killed);
    }
    rmSync(data, { recursive: true, force: true });
  };
  return { url: String(url), stop };
}

/** A free loopback port nobody listens on (bound, then closed). */
export async function closedPort() {
  const net = await import("node:net");
  const srv = net.createServer();
  await new Promise((ok) => srv.listen(0, "127.0.0.1", () => ok(undefined)));
  const addr = srv.address();
  await new Promise((ok) => srv.close(() => ok(undefined)));
  if (addr === null || typeof addr === "string") throw new Error("no port");
  return addr.port;
}
