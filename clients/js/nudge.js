// nudge.js: follow a nudge channel from a browser page or Node 18+.
// One dependency-free ES module; see README.md beside it.
//
//   import { subscribe } from "./nudge.js";
//   const sub = subscribe({ register: () => myApi.realtimeEntry(), onChange: refresh });
//   sub.stop();

/** Follows nudge's version (Cargo.toml); a test keeps the two equal. */
export const VERSION = "0.1.0";

const DEFAULTS = {
  // Full-jitter backoff after a network error or an error answer: a random delay in
  // [0, min(maxDelay, baseDelay * 2^attempt)], so a tier that comes back is not hit in step.
  baseDelay: 1000,
  maxDelay: 30000,
  // Never start two polls closer than this: a floor that holds whatever a server answers.
  minInterval: 250,
  // A `reconnect` sooner than this is a node that is draining or a channel that is gone:
  // count it as a failure and back off instead of polling again at once.
  fastReconnect: 1000,
  // Added to the entry's retry_timeout to give up on a poll no server answered.
  pollSlack: 15000,
  pauseWhenHidden: false,
};

/**
 * Picks Box's `realtime_server` entry out of what `register` returned: the entry itself or
 * the whole `OPTIONS /events` body (`{"entries":[...]}`).
 */
export function realtimeEntry(answer) {
  if (answer && Array.isArray(answer.entries)) {
    answer = answer.entries.find((e) => e && e.type === "realtime_server");
  }
  if (!answer || typeof answer.url !== "string" || answer.url === "") {
    throw new Error("register() returned no realtime_server entry with a url");
  }
  const retry = Number(answer.retry_timeout);
  return { url: answer.url, retryTimeout: retry > 0 ? retry * 1000 : 60000 };
}

/** The poll URL for `entry`, with `stream_position` when the application gives one. */
export function pollUrl(entryUrl, position) {
  const u = new URL(entryUrl);
  if (position !== undefined && position !== null && position !== "") {
    u.searchParams.set("stream_position", String(position));
  } else {
    u.searchParams.delete("stream_position");
  }
  return u.toString();
}

/** Full-jitter delay for the given attempt (0-based), in ms. */
export function backoffDelay(attempt, baseDelay, maxDelay, random = Math.random) {
  const cap = Math.min(maxDelay, baseDelay * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

/** `Retry-After` in ms (delta-seconds or an HTTP date), or null when absent or unreadable. */
export function retryAfterMs(value, now = Date.now()) {
  if (value === null || value === undefined || value === "") return null;
  const s = String(value).trim();
  if (/^\d+$/.test(s)) return Number(s) * 1000;
  const t = Date.parse(s);
  return Number.isNaN(t) ? null : Math.max(0, t - now);
}

/**
 * Follows a channel until `stop()`.
 *
 * - `register()`: the application's async function that asks its main API for a channel and
 *   returns the `realtime_server` entry or the whole `OPTIONS /events` body. Called at the
 *   start, on `max_retries`, and when a server refuses the channel (4xx).
 * - `onChange()`: called once per `new_change`; fetch what changed from your API there.
 * - `onError(err)`: optional; told about every failure (the subscription goes on).
 * - `onRegister(entry)`: optional; called after each registration, e.g. to resync.
 * - `position`: optional value or function returning the application's current stream
 *   position; sent as `stream_position` so changes already seen do not wake the page.
 * - `pauseWhenHidden`: stop polling while `document.hidden`, resume when visible.
 */
export function subscribe(options) {
  const opts = { ...DEFAULTS, ...options };
  if (typeof opts.register !== "function") throw new TypeError("subscribe: register must be a function");
  if (typeof opts.onChange !== "function") throw new TypeError("subscribe: onChange must be a function");
  const fetchFn = opts.fetch || globalThis.fetch;
  const random = opts.random || Math.random;
  const doc = opts.document !== undefined ? opts.document : globalThis.document;

  let stopped = false;
  let entry = null;
  let attempt = 0;
  let lastStart = -Infinity;
  let controller = null;
  let wake = null; // resolves the current wait early (stop, page visible again)
  let running = false;

  const report = (err) => {
    if (opts.onError) {
      try {
        opts.onError(err);
      } catch {
        // An onError that throws must not end the subscription.
      }
    }
  };

  const sleep = (ms) =>
    new Promise((resolve) => {
      const t = setTimeout(done, ms);
      function done() {
        clearTimeout(t);
        if (wake === done) wake = null;
        resolve();
      }
      wake = done;
    });

  const hidden = () => Boolean(opts.pauseWhenHidden && doc && doc.hidden);

  const backoff = async (floorMs = 0) => {
    const ms = Math.max(floorMs, backoffDelay(attempt, opts.baseDelay, opts.maxDelay, random));
    attempt += 1;
    await sleep(ms);
  };

  const currentPosition = () => (typeof opts.position === "function" ? opts.position() : opts.position);

  const onVisibility = () => {
    if (hidden()) {
      if (controller) controller.abort();
    } else if (wake) {
      wake();
    }
  };
  if (opts.pauseWhenHidden && doc && doc.addEventListener) {
    doc.addEventListener("visibilitychange", onVisibility);
  }

  async function registerOnce() {
    try {
      entry = realtimeEntry(await opts.register());
    } catch (err) {
      entry = null;
      report(err);
      return false;
    }
    if (opts.onRegister) {
      try {
        opts.onRegister(entry);
      } catch (err) {
        report(err);
      }
    }
    return true;
  }

  /** One poll; returns the answer's message, or throws. */
  async function pollOnce() {
    const now = Date.now();
    const gap = lastStart + opts.minInterval - now;
    if (gap > 0) await sleep(gap);
    if (stopped || hidden()) return null;
    lastStart = Date.now();
    controller = new AbortController();
    const ctl = controller;
    const timer = setTimeout(() => ctl.abort(), entry.retryTimeout + opts.pollSlack);
    try {
      const resp = await fetchFn(pollUrl(entry.url, currentPosition()), {
        signal: ctl.signal,
        cache: "no-store",
        credentials: "omit",
      });
      const body = await resp.text();
      if (resp.status === 429 || resp.status === 503) {
        const err = new Error(`nudge answered ${resp.status}`);
        err.status = resp.status;
        err.retryAfter = retryAfterMs(resp.headers.get("retry-after"));
        throw err;
      }
      if (resp.status >= 400 && resp.status < 500) {
        const err = new Error(`nudge refused the channel: ${resp.status} ${body.slice(0, 200)}`);
        err.status = resp.status;
        err.refused = true;
        throw err;
      }
      if (resp.status !== 200) {
        const err = new Error(`nudge answered ${resp.status}`);
        err.status = resp.status;
        throw err;
      }
      const msg = JSON.parse(body).message;
      if (typeof msg !== "string") throw new Error("nudge answered without a message");
      return msg;
    } finally {
      clearTimeout(timer);
      if (controller === ctl) controller = null;
    }
  }

  async function run() {
    running = true;
    while (!stopped) {
      if (hidden()) {
        await new Promise((resolve) => {
          wake = resolve;
        });
        wake = null;
        continue;
      }
      if (!entry) {
        if (!(await registerOnce())) await backoff();
        continue;
      }
      const started = Date.now();
      let msg;
      try {
        msg = await pollOnce();
      } catch (err) {
        if (stopped) break;
        if (hidden() && err && err.name === "AbortError") continue; // paused on purpose
        report(err);
        if (err.refused) entry = null;
        await backoff(err.retryAfter || 0);
        continue;
      }
      if (msg === null) continue;
      if (msg === "new_change") {
        attempt = 0;
        try {
          const r = opts.onChange();
          if (r && typeof r.catch === "function") r.catch(report);
        } catch (err) {
          report(err);
        }
      } else if (msg === "reconnect") {
        if (Date.now() - started < opts.fastReconnect) await backoff();
        else attempt = 0;
      } else if (msg === "max_retries") {
        entry = null;
        // A channel that is gone right after its registration must not make a loop either.
        if (Date.now() - started < opts.fastReconnect) await backoff();
      } else if (msg === "no_change") {
        attempt = 0;
      } else {
        report(new Error(`nudge answered an unknown message: ${msg}`));
        await backoff();
      }
    }
    running = false;
  }

  const done = run();

  return {
    /** Ends the subscription: aborts the parked poll; no callback runs afterwards. */
    stop() {
      stopped = true;
      if (controller) controller.abort();
      if (wake) wake();
      if (doc && doc.removeEventListener) doc.removeEventListener("visibilitychange", onVisibility);
      return done;
    },
    /** True until stop() has taken effect. */
    get running() {
      return running;
    },
  };
}
