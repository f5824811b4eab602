// The module's logic without a browser: helpers, then subscribe() against a small scripted
// HTTP server on 127.0.0.1 that answers polls the way nudge does (the real nudge is driven in
// tests/browser/). Every wait has a deadline.
import { test } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { subscribe, realtimeEntry, pollUrl, backoffDelay, retryAfterMs, VERSION } from "../nudge.js";

const here = (p) => fileURLToPath(new URL(p, import.meta.url));

async function eventually(cond, what, ms = 5000) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (cond()) return;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** A server whose answers come from `answer(req, n)`; records every request. */
async function scripted(answer) {
  const requests = [];
  const server = http.createServer((req, res) => {
    const n = requests.length;
    const rec = { url: new URL(req.url, "http://x"), at: Date.now(), closed: false };
    requests.push(rec);
    req.socket.on("close", () => (rec.closed = true));
    const a = answer(req, n, rec);
    if (a === "hang") return; // parked until the client gives up
    const { status = 200, body, headers = {}, delay = 0 } = a;
    setTimeout(() => {
      res.writeHead(status, { "content-type": "application/json", ...headers });
      res.end(typeof body === "string" ? body : JSON.stringify(body));
    }, delay);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const base = `http://127.0.0.1:${server.address().port}`;
  return {
    requests,
    base,
    entry: (ch = "c1") => ({ type: "realtime_server", url: `${base}/subscribe?channel=${ch}&stream_type=all`, ttl: "10", max_retries: "10", retry_timeout: 60 }),
    close: () => {
      server.closeAllConnections();
      return new Promise((r) => server.close(r));
    },
  };
}

const msg = (m, delay = 0) => ({ body: { message: m }, delay });

test("version follows nudge's Cargo.toml and package.json", () => {
  const cargo = readFileSync(here("../../../Cargo.toml"), "utf8");
  const cargoVersion = /^version\s*=\s*"([^"]+)"/m.exec(cargo)[1];
  const pkg = JSON.parse(readFileSync(here("../package.json"), "utf8"));
  assert.equal(VERSION, cargoVersion);
  assert.equal(pkg.version, cargoVersion);
});

test("realtimeEntry takes the entry or Box's whole OPTIONS /events body", () => {
  const e = { type: "realtime_server", url: "http://n/subscribe?channel=a", retry_timeout: 30 };
  assert.deepEqual(realtimeEntry(e), { url: e.url, retryTimeout: 30000 });
  assert.deepEqual(realtimeEntry({ chunk_size: 1, entries: [{ type: "other" }, e] }), { url: e.url, retryTimeout: 30000 });
  assert.equal(realtimeEntry({ url: "http://n/s?channel=a" }).retryTimeout, 60000);
  assert.throws(() => realtimeEntry({ entries: [] }), /realtime_server/);
  assert.throws(() => realtimeEntry(undefined), /realtime_server/);
});

test("pollUrl sets or drops stream_position and keeps the rest", () => {
  const u = "http://n/subscribe?channel=a&stream_type=all&stream_position=3";
  assert.equal(new URL(pollUrl(u, 7)).searchParams.get("stream_position"), "7");
  assert.equal(new URL(pollUrl(u, undefined)).searchParams.has("stream_position"), false);
  assert.equal(new URL(pollUrl(u, "now")).searchParams.get("channel"), "a");
});

test("backoff is full jitter under a cap; Retry-After reads seconds and dates", () => {
  assert.equal(backoffDelay(0, 1000, 30000, () => 0.999), 999);
  assert.equal(backoffDelay(3, 1000, 30000, () => 0.5), 4000);
  assert.equal(backoffDelay(40, 1000, 30000, () => 0.999), 29970);
  assert.equal(backoffDelay(5, 1000, 30000, () => 0), 0);
  assert.equal(retryAfterMs("5"), 5000);
  assert.equal(retryAfterMs(null), null);
  assert.equal(retryAfterMs("soon"), null);
  assert.equal(retryAfterMs(new Date(10_000).toUTCString(), 4_000), 6000);
});

test("every new_change calls onChange once; reconnect polls again; position is sent", async () => {
  const s = await scripted((req, n) => (n < 3 ? msg("new_change") : n === 3 ? msg("reconnect", 1100) : "hang"));
  let changes = 0;
  let registers = 0;
  const sub = subscribe({
    register: async () => (registers++, { chunk_size: 1, entries: [s.entry()] }),
    onChange: () => changes++,
    position: () => 40 + changes,
    minInterval: 0,
  });
  await eventually(() => s.requests.length === 5, "five polls");
  assert.equal(changes, 3);
  assert.equal(registers, 1);
  assert.deepEqual(s.requests.map((r) => r.url.searchParams.get("stream_position")), ["40", "41", "42", "43", "43"]);
  await sub.stop();
  await eventually(() => s.requests[4].closed, "stop() to close the parked poll");
  assert.equal(sub.running, false);
  await s.close();
});

test("max_retries and a refused channel (4xx) lead to one new registration each", async () => {
  const s = await scripted((req, n) => {
    if (n === 0) return msg("max_retries", 1100);
    if (n === 1) return { status: 400, body: { code: "bad_request", message: "no channel" } };
    return "hang";
  });
  const channels = [];
  const errors = [];
  const sub = subscribe({
    register: async () => {
      channels.push(`c${channels.length}`);
      return s.entry(channels.at(-1));
    },
    onChange: () => {},
    onError: (e) => errors.push(e),
    baseDelay: 50,
  });
  await eventually(() => s.requests.length === 3, "three polls");
  assert.deepEqual(s.requests.map((r) => r.url.searchParams.get("channel")), ["c0", "c1", "c2"]);
  assert.equal(channels.length, 3);
  assert.equal(errors.length, 1);
  assert.equal(errors[0].status, 400);
  await sub.stop();
  await s.close();
});

test("Retry-After on 503 and 429 is honoured", async () => {
  const s = await scripted((req, n) => {
    if (n === 0) return { status: 503, body: { code: "over_capacity", message: "full" }, headers: { "retry-after": "1" } };
    if (n === 1) return { status: 429, body: { code: "too_many_polls", message: "many" }, headers: { "retry-after": "1" } };
    return "hang";
  });
  const sub = subscribe({ register: async () => s.entry(), onChange: () => {}, baseDelay: 10, random: () => 0 });
  await eventually(() => s.requests.length === 3, "three polls", 6000);
  assert.ok(s.requests[1].at - s.requests[0].at >= 990, "waited Retry-After after 503");
  assert.ok(s.requests[2].at - s.requests[1].at >= 990, "waited Retry-After after 429");
  await sub.stop();
  await s.close();
});

test("network errors back off with jitter: no hot loop", async () => {
  // A port that refuses connections: bind, note the port, close.
  const probe = await scripted(() => "hang");
  const url = probe.entry().url;
  await probe.close();
  let failures = 0;
  const sub = subscribe({
    register: async () => ({ url, retry_timeout: 60 }),
    onChange: () => {},
    onError: () => failures++,
    baseDelay: 100,
    maxDelay: 400,
  });
  await new Promise((r) => setTimeout(r, 2000)); // a fixed window in which to count attempts
  await sub.stop();
  // minInterval 250 ms bounds it at 8; full jitter with base 100 ms, cap 400 ms usually less.
  assert.ok(failures >= 2 && failures <= 9, `attempts in 2 s: ${failures}`);
});

test("a fast reconnect (a draining node) is backed off, not polled in a loop", async () => {
  const s = await scripted(() => msg("reconnect"));
  const sub = subscribe({ register: async () => s.entry(), onChange: () => {}, baseDelay: 200, maxDelay: 1000 });
  await new Promise((r) => setTimeout(r, 2000));
  await sub.stop();
  assert.ok(s.requests.length <= 9, `polls in 2 s: ${s.requests.length}`);
  await s.close();
});

test("register failures are reported and retried with backoff", async () => {
  const s = await scripted(() => "hang");
  let calls = 0;
  const errors = [];
  const sub = subscribe({
    register: async () => {
      calls++;
      if (calls < 3) throw new Error("main API down");
      return s.entry();
    },
    onChange: () => {},
    onError: (e) => errors.push(e.message),
    baseDelay: 20,
  });
  await eventually(() => s.requests.length === 1, "the poll after two failed registrations");
  assert.deepEqual(errors, ["main API down", "main API down"]);
  await sub.stop();
  await s.close();
});

test("pauseWhenHidden: a hidden page parks no poll, a visible one resumes", async () => {
  const s = await scripted(() => "hang");
  const doc = new EventTarget();
  doc.hidden = false;
  const sub = subscribe({ register: async () => s.entry(), onChange: () => {}, pauseWhenHidden: true, document: doc, minInterval: 0 });
  await eventually(() => s.requests.length === 1, "first poll");
  doc.hidden = true;
  doc.dispatchEvent(new Event("visibilitychange"));
  await eventually(() => s.requests[0].closed, "the poll closed while hidden");
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(s.requests.length, 1, "no poll while hidden");
  doc.hidden = false;
  doc.dispatchEvent(new Event("visibilitychange"));
  await eventually(() => s.requests.length === 2, "a poll once visible again");
  await sub.stop();
  await s.close();
});

test("onChange and onError that throw do not end the subscription", async () => {
  const s = await scripted((req, n) => (n < 2 ? msg("new_change") : "hang"));
  let changes = 0;
  const sub = subscribe({
    register: async () => s.entry(),
    onChange: () => {
      changes++;
      throw new Error("app bug");
    },
    onError: () => {
      throw new Error("worse");
    },
  });
  await eventually(() => s.requests.length === 3, "three polls");
  assert.equal(changes, 2);
  await sub.stop();
  await s.close();
});
