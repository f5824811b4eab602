#!/usr/bin/env python3
"""A small Box-shaped main API in front of nudge (Python standard library only).

It speaks just enough of Box's events API for the shipped Box SDKs'
event streams to work against it, unchanged:

  OPTIONS /2.0/events   registers a channel with nudge (POST /v1/channels on
                        nudge's internal listener) and returns nudge's body as
                        is: Box's {"chunk_size":1,"entries":[{"type":
                        "realtime_server","url":...}]} shape.
  GET /2.0/events       pages the event log: ?stream_position=now|0|N&limit=L.
                        next_stream_position is a JSON number, never 0, and
                        every event carries an event_id.

and a few routes for tests and demos (not Box's):

  POST /test/events     {"count": N} appends N events to the log and publishes
                        the newest position to nudge ({"topic", "position"}).
                        A publish that fails (nudge down or restarting) is
                        retried in the background until nudge takes it, so no
                        change is lost across a nudge restart.
  GET  /test/stats      every request this API has served (time, method,
                        path, query), for counting a client's requests.
  POST /test/nudge      {"internal": URL} points the API at another nudge node.
  GET  /healthz

One user, one topic: a real main API would authorize the bearer token, map it
to a user and register that user's topics. Here any bearer token is the user
named by --subject, whose changes go to --topic.

Run by hand:
  nudge --listen 127.0.0.1:8080 --internal-listen 127.0.0.1:8081 &
  python3 examples/box_main_api.py --nudge-internal http://127.0.0.1:8081 --port 8000
  curl -X OPTIONS -H 'Authorization: Bearer x' http://127.0.0.1:8000/2.0/events
  curl -X POST -d '{"count":1}' http://127.0.0.1:8000/test/events
Then point a Box SDK at http://127.0.0.1:8000 (see tests/sdk/ for each SDK).
"""

import argparse
import datetime
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# Stream positions start far from 0: several SDKs treat a position of 0 (or a
# missing one) as "no position" (box-node-sdk 3.x re-polls instead of moving on).
BASE_POSITION = 1_000_000
DEFAULT_LIMIT = 100  # Box's default page size for GET /events


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class NudgeError(Exception):
    pass


class MainApi:
    def __init__(self, nudge_internal, topic, subject, max_page, channel_limits,
                 nudge_token=None, publish_retry_interval=0.5):
        self.lock = threading.Lock()
        self.nudge_internal = nudge_internal.rstrip("/")
        self.nudge_token = nudge_token
        self.topic = topic
        self.subject = subject
        self.max_page = max_page
        self.channel_limits = channel_limits  # e.g. {"max_retries": 1}
        self.events = []  # (position, event), positions increasing
        self.requests = []  # log of served requests
        self.publish_errors = 0
        self.unpublished = None  # newest position whose publish has not gone through
        self.publish_retry_interval = publish_retry_interval
        self.wake = threading.Condition(self.lock)
        self.stopping = False
        self.publisher = threading.Thread(target=self._retry_publishes, daemon=True)
        self.publisher.start()

    # -- nudge's internal API ------------------------------------------------
    def _nudge(self, method, path, body=None, timeout=5.0):
        with self.lock:
            base = self.nudge_internal
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.nudge_token:
            req.add_header("Authorization", "Bearer " + self.nudge_token)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (OSError, urllib.error.URLError) as e:
            raise NudgeError(str(e)) from e

    def register_channel(self):
        body = {"topics": [self.topic], "subject": self.subject}
        body.update(self.channel_limits)
        status, raw = self._nudge("POST", "/v1/channels", body)
        if status != 201:
            raise NudgeError(f"POST /v1/channels answered {status}: {raw[:200]!r}")
        return raw

    def _publish(self, position):
        status, raw = self._nudge("POST", "/v1/publish", {"topic": self.topic, "position": position})
        if status != 200:
            raise NudgeError(f"POST /v1/publish answered {status}: {raw[:200]!r}")
        return json.loads(raw)

    def _retry_publishes(self):
        while True:
            with self.lock:
                while self.unpublished is None and not self.stopping:
                    self.wake.wait()
                if self.stopping:
                    return
                position = self.unpublished
            try:
                self._publish(position)
            except NudgeError:
                with self.lock:
                    self.publish_errors += 1
                time.sleep(self.publish_retry_interval)
                continue
            with self.lock:
                if self.unpublished == position:
                    self.unpublished = None

    # -- the event log -------------------------------------------------------
    def latest(self):
        return self.events[-1][0] if self.events else BASE_POSITION

    def append(self, count, event_type="ITEM_UPLOAD"):
        with self.lock:
            added = []
            for _ in range(count):
                position = self.latest() + 1
                event = {
                    "type": "event",
                    "event_id": f"evt-{position}",
                    "event_type": event_type,
                    "created_at": now_iso(),
                    "recorded_at": now_iso(),
                    "session_id": None,
                    "source": None,
                    "additional_details": {"position": position},
                }
                self.events.append((position, event))
                added.append(event)
            position = self.latest()
        result = {"event_ids": [e["event_id"] for e in added], "position": position}
        try:
            result["publish"] = self._publish(position)
        except NudgeError as e:
            # nudge is down or restarting: keep the newest position and retry.
            with self.lock:
                self.publish_errors += 1
                if self.unpublished is None or self.unpublished < position:
                    self.unpublished = position
                self.wake.notify_all()
            result["publish_error"] = str(e)
        return result

    def page(self, stream_position, limit):
        with self.lock:
            latest = self.latest()
            if stream_position == "now":
                return {"chunk_size": 0, "next_stream_position": latest, "entries": []}
            after = BASE_POSITION if stream_position in (None, "", "0") else int(stream_position)
            entries = [e for (p, e) in self.events if p > after][:limit]
            if entries:
                nxt = entries[-1]["additional_details"]["position"]
            else:
                nxt = max(after, BASE_POSITION)
            return {"chunk_size": len(entries), "next_stream_position": nxt, "entries": entries}

    def log_request(self, method, path, query):
        with self.lock:
            self.requests.append({"t": time.time(), "method": method, "path": path, "query": query})

    def stop(self):
        with self.lock:
            self.stopping = True
            self.wake.notify_all()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs expect
    server_version = "box-main-api-example"
    api: MainApi = None

    def log_message(self, fmt, *args):  # quiet; the request log is in /test/stats
        pass

    def _send(self, status, body, headers=None):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)

    def _error(self, status, code, message, headers=None):
        self._send(status, {"type": "error", "status": status, "code": code, "message": message}, headers)

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw.strip() else {}

    def _route(self):
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        self.api.log_request(self.command, url.path, query)
        return url.path, query

    def _authorized(self):
        if not (self.headers.get("Authorization") or "").startswith("Bearer "):
            self._error(401, "unauthorized", "a bearer token is required")
            return False
        return True

    def do_OPTIONS(self):
        path, _ = self._route()
        if path != "/2.0/events":
            return self._error(404, "not_found", "no such route")
        if not self._authorized():
            return
        try:
            raw = self.api.register_channel()
        except NudgeError as e:
            return self._error(503, "unavailable", f"realtime server unavailable: {e}", {"Retry-After": "1"})
        self._send(200, raw)  # nudge's body as is

    def do_GET(self):
        path, query = self._route()
        if path == "/2.0/events":
            if not self._authorized():
                return
            try:
                limit = int(query.get("limit") or DEFAULT_LIMIT)
                position = query.get("stream_position")
                if position not in (None, "", "now"):
                    int(position)
            except ValueError:
                return self._error(400, "bad_request", "bad limit or stream_position")
            limit = max(0, min(limit, self.api.max_page))
            return self._send(200, self.api.page(position, limit))
        if path == "/test/stats":
            with self.api.lock:
                body = {"requests": list(self.api.requests), "latest": self.api.latest(),
                        "events": len(self.api.events), "publish_errors": self.api.publish_errors,
                        "unpublished": self.api.unpublished}
            return self._send(200, body)
        if path == "/healthz":
            return self._send(200, {"ok": True})
        self._error(404, "not_found", "no such route")

    def do_POST(self):
        path, _ = self._route()
        try:
            body = self._body()
        except ValueError:
            return self._error(400, "bad_request", "body is not JSON")
        if path == "/test/events":
            count = int(body.get("count", 1))
            if not 1 <= count <= 10_000:
                return self._error(400, "bad_request", "count must be 1..10000")
            return self._send(200, self.api.append(count, body.get("event_type", "ITEM_UPLOAD")))
        if path == "/test/nudge":
            with self.api.lock:
                self.api.nudge_internal = str(body["internal"]).rstrip("/")
            return self._send(200, {"internal": self.api.nudge_internal})
        self._error(404, "not_found", "no such route")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nudge-internal", default="http://127.0.0.1:8081",
                   help="base URL of nudge's internal listener")
    p.add_argument("--nudge-token-file", help="bearer token for nudge's internal API, if it wants one")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--topic", default="user:42", help="the nudge topic of this user's changes")
    p.add_argument("--subject", default="user:42", help="who channels are for (for revocation)")
    p.add_argument("--max-page", type=int, default=500, help="most events one GET /2.0/events returns")
    p.add_argument("--channel-max-retries", type=int, help="max_retries asked for each channel")
    p.add_argument("--channel-retry-timeout", help="retry_timeout asked for each channel (e.g. 45s)")
    p.add_argument("--channel-ttl", help="ttl asked for each channel (e.g. 5m)")
    args = p.parse_args(argv)

    limits = {}
    if args.channel_max_retries is not None:
        limits["max_retries"] = args.channel_max_retries
    if args.channel_retry_timeout:
        limits["retry_timeout"] = args.channel_retry_timeout
    if args.channel_ttl:
        limits["ttl"] = args.channel_ttl
    token = None
    if args.nudge_token_file:
        with open(args.nudge_token_file) as f:
            token = f.read().strip()

    api = MainApi(args.nudge_internal, args.topic, args.subject, args.max_page, limits, token)
    Handler.api = api
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"box_main_api listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        api.stop()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
