// The client in a real browser: headless Chromium loads a page that imports dist/index.js as
// an ES module and drives a real `spine up` through a loopback server giving the page and the
// API one origin (the dispatcher sends no CORS headers, so a page reaches it this way, as
// behind a reverse proxy). The page posts what it saw to that server, and the test checks it:
// outputs the agents computed, a thumbnail's size read from its PNG header, the event kinds,
// typed errors. Chromium is Debian's (`chromium`); without it the test is skipped, unless
// SPINE_REQUIRE_SERVERS=1 (CI), where it fails.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer, request } from "node:http";
import { tmpdir } from "node:os";
import { join, normalize, resolve } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";

import { png } from "./helpers.js";
import { startSpine } from "./spine.js";

const DIST = resolve(fileURLToPath(new URL(".", import.meta.url)), "../dist");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const BLOB_TEXT = "bytes from a File, hashed by an agent";

const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>spine-client in a browser</title>
<script type="module">
import { Client, UnknownCapability, SpineError } from "/dist/index.js";
const report = {};
try {
  const spine = new Client({ url: location.origin });
  report.userAgent = navigator.userAgent;
  report.upper = (await spine.run("text.upper", {}, { input: "hello from a browser" })).text();
  const file = new File([${JSON.stringify(BLOB_TEXT)}], "note.txt", { type: "text/plain" });
  report.digest = (await spine.run("hash.sha256", {}, { input: file })).text();
  const image = await (await fetch("/fixture.png")).blob();
  const thumb = await spine.run("image.thumbnail", { size: 64 }, { input: image });
  const view = new DataView(thumb.bytes.buffer, thumb.bytes.byteOffset);
  report.thumb = { type: thumb.type, width: view.getUint32(16), height: view.getUint32(20) };
  const job = await spine.submit("text.upper", {}, { input: "events", progress: true });
  report.events = [];
  for await (const ev of job.events()) report.events.push(ev.kind);
  report.final = (await job.result()).text();
  try {
    await spine.submit("text.uppr", {}, { input: "x" });
  } catch (e) {
    report.error = {
      typed: e instanceof UnknownCapability && e instanceof SpineError,
      name: e.name, field: e.field, status: e.status,
    };
  }
} catch (e) {
  report.failure = String(e && e.stack || e);
}
await fetch("/report", { method: "POST", body: JSON.stringify(report) });
</script>`;

/** @type {{url: string, stop: () => Promise<void>}} */
let spine;
before(async () => {
  if (existsSync(CHROMIUM)) spine = await startSpine();
});
after(async () => {
  await spine?.stop();
});

/**
 * The page's origin: the page, dist/ and a PNG fixture from here, /v1/ forwarded to the
 * dispatcher as it comes (event streams included), and the page's report.
 * @param {string} api
 */
async function origin(api) {
  /** @type {(r: any) => void} */
  let reported = () => {};
  const report = new Promise((ok) => (reported = ok));
  const fixture = png(320, 160);
  const server = createServer((req, res) => {
    const url = new URL(req.url ?? "/", "http://x");
    if (url.pathname.startsWith("/v1/")) {
      const target = new URL(req.url ?? "/", api);
      const upstream = request(
        target,
        { method: req.method, headers: { ...req.headers, host: target.host } },
        (up) => {
          res.writeHead(up.statusCode ?? 502, up.headers);
          up.pipe(res);
        },
      );
      upstream.on("error", () => res.destroy());
      req.pipe(upstream);
    } else if (url.pathname === "/report") {
      let body = "";
      req.on("data", (c) => (body += c));
      req.on("end", () => {
        res.end("ok");
        reported(JSON.parse(body));
      });
    } else if (url.pathname === "/page.html") {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8" }).end(PAGE);
    } else if (url.pathname === "/fixture.png") {
      res.writeHead(200, { "content-type": "image/png" }).end(fixture);
    } else if (url.pathname.startsWith("/dist/")) {
      const file = normalize(join(DIST, url.pathname.slice("/dist/".length)));
      if (!file.startsWith(DIST) || !existsSync(file)) return void res.writeHead(404).end();
      const type = file.endsWith(".js") ? "text/javascript" : "application/json";
      res.writeHead(200, { "content-type": type }).end(readFileSync(file));
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise((ok) => server.listen(0, "127.0.0.1", () => ok(undefined)));
  const addr = server.address();
  assert.ok(addr !== null && typeof addr === "object");
  return { url: `http://127.0.0.1:${addr.port}`, report, server };
}

test("the client works in headless Chromium, same-origin through a proxy", async (t) => {
  if (!existsSync(CHROMIUM)) {
    if (process.env.SPINE_REQUIRE_SERVERS === "1") {
      assert.fail(`no Chromium at ${CHROMIUM}: apt-get install chromium, or set CHROMIUM`);
    }
    t.skip(`no Chromium at ${CHROMIUM} (apt-get install chromium)`);
    return;
  }
  const site = await origin(spine.url);
  const profile = mkdtempSync(join(tmpdir(), "spine-chromium-"));
  // Chromium's own temporary directories (its singleton socket) go inside the profile, which
  // is deleted at the end: under /tmp a killed browser left them.
  const tmp = join(profile, "tmp");
  mkdirSync(tmp);
  const browser = spawn(
    CHROMIUM,
    [
      "--headless=new",
      "--no-sandbox", // as root (CI) Chromium refuses to start with its sandbox
      "--disable-gpu",
      "--disable-dev-shm-usage",
      "--no-first-run",
      `--user-data-dir=${profile}`,
      `${site.url}/page.html`,
    ],
    // Its own process group: Chromium starts helpers (zygote, renderer), stopped with it.
    { stdio: ["ignore", "ignore", "pipe"], detached: true, env: { ...process.env, TMPDIR: tmp } },
  );
  // The end of Chromium's own log, for a failure's message.
  let log = "";
  browser.stderr?.on("data", (c) => (log = (log + c).slice(-4000)));
  const exited = new Promise((ok) => browser.once("exit", () => ok(undefined)));
  /** @type {NodeJS.Timeout | undefined} */
  let timer;
  try {
    /** @type {any} */
    const report = await Promise.race([
      site.report,
      exited.then(() => assert.fail(`Chromium exited before the page reported:\n${log}`)),
      new Promise((_, fail) => {
        timer = setTimeout(
          () => fail(new Error(`no report from the page in 60 s; Chromium said:\n${log}`)),
          60_000,
        );
      }),
    ]);
    assert.equal(report.failure, undefined, report.failure);
    assert.match(report.userAgent, /HeadlessChrome/);
    assert.equal(report.upper, "HELLO FROM A BROWSER");
    assert.equal(report.digest, createHash("sha256").update(BLOB_TEXT).digest("hex"));
    assert.deepEqual(report.thumb, { type: "image/png", width: 64, height: 32 });
    assert.equal(report.events.at(-1), "final");
    const kinds = ["state", "progress", "partial", "final"];
    assert.ok(
      report.events.every((/** @type {string} */ k) => kinds.includes(k)),
      report.events.join(", "),
    );
    assert.equal(report.final, "EVENTS");
    assert.deepEqual(report.error, {
      typed: true,
      name: "UnknownCapability",
      field: "capability",
      status: 422,
    });
  } finally {
    clearTimeout(timer);
    const group = browser.pid;
    if (group !== undefined) {
      /** @param {NodeJS.Signals} sig */
      const signal = (sig) => {
        try {
          process.kill(-group, sig);
        } catch {
          // The group has no process left.
        }
      };
      signal("SIGTERM");
      const killed = setTimeout(() => signal("SIGKILL"), 10_000);
      await exited;
      clearTimeout(killed);
      signal("SIGKILL"); // a helper that outlived the browser
    }
    site.server.closeAllConnections();
    site.server.close();
    rmSync(profile, { recursive: true, force: true });
  }
});
