// Many jobs at once: 2,000 small `hash.sha256` jobs with 64 in flight through one Client,
// each a `run` (submit and wait in one request). Every output is checked; the rate is printed
// for the record, not asserted (the machine is shared).

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { after, before, test } from "node:test";

import { Client } from "../dist/index.js";
import { startSpine } from "./spine.js";

const JOBS = 2000;
const IN_FLIGHT = 64;

/** @type {{url: string, stop: () => Promise<void>}} */
let spine;
before(async () => {
  spine = await startSpine();
});
after(async () => {
  await spine?.stop();
});

test(`${JOBS} jobs with ${IN_FLIGHT} in flight`, async () => {
  const client = new Client({ url: spine.url });
  let next = 0;
  let right = 0;
  const worker = async () => {
    while (next < JOBS) {
      const data = `job ${next++}`;
      const out = await client.run("hash.sha256", {}, { input: data, timeoutMs: 60_000 });
      if (out.text() === createHash("sha256").update(data).digest("hex")) right++;
    }
  };
  const started = performance.now();
  // This process's CPU time: what the client costs, apart from the dispatcher and agents.
  const cpu = process.cpuUsage();
  await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
  const seconds = (performance.now() - started) / 1000;
  const used = process.cpuUsage(cpu);
  const clientCpu = (used.user + used.system) / 1e6;
  assert.equal(right, JOBS, `${JOBS - right} of ${JOBS} jobs gave a wrong output`);
  const line =
    `${JOBS} jobs, ${IN_FLIGHT} in flight: ${seconds.toFixed(2)} s, ` +
    `${(JOBS / seconds).toFixed(0)} jobs/s; client CPU ${clientCpu.toFixed(2)} s ` +
    `(${((clientCpu * 1e6) / JOBS).toFixed(0)} µs a job)`;
  console.log(line);
});
