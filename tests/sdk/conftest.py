"""Fixtures for the Box SDK compatibility tests.

`make_stack(client, ...)` starts, for one test and one SDK: a relay (see
relay.py) on a free port, nudge with --public-url pointing at the relay, the
Box-shaped main API pointing at nudge's internal listener, and the SDK client
pointing at the main API. Teardown stops all of them and checks that nudge
never wrote the SDK's bearer token to its log.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import TOKEN, Client, MainApi, Nudge, wait_until  # noqa: E402
from relay import Relay  # noqa: E402

# Short durations keep the suite within a few minutes: a 3 s retry_timeout
# parks polls for about 2.4-2.7 s.
RETRY_TIMEOUT = "3s"
DEFAULT_NUDGE_ARGS = ["--retry-timeout", RETRY_TIMEOUT, "--ttl", "2m", "--drain-period", "1s"]
RESULTS_DIR = Path(os.environ.get("SDK_RESULTS_DIR", Path(__file__).resolve().parent / ".results"))


class Stack:
    def __init__(self, tmp_path, client_kind, nudge_args, api_args):
        self.tmp = tmp_path
        self.client_kind = client_kind
        self.nudge_args = list(nudge_args)
        self.api_args = list(api_args)
        self.relay = None
        self.nudge = None
        self.old_nudges = []
        self.api = None
        self.client = None
        self.notes = {}
        self.restarts = 0
        self.nudges_made = 0

    def start(self, start_client=True):
        self.t_start = time.time()
        self.relay = Relay()
        relay_port = self.relay.start()
        self.nudge = self._new_nudge().start()
        self.relay.set_target("127.0.0.1", self.nudge.public_port)
        self.api = MainApi(self.tmp / "main_api.log", self.nudge.internal, self.api_args).start()
        if start_client:
            self.start_client()
        self.relay_url = f"http://127.0.0.1:{relay_port}"
        return self

    def _new_nudge(self):
        relay_port = self.relay.port
        self.nudges_made += 1
        return Nudge(self.tmp / f"nudge{self.nudges_made}.log",
                     ["--public-url", f"http://127.0.0.1:{relay_port}", *self.nudge_args])

    def start_client(self):
        self.t_client = time.time()
        self.client = Client(self.client_kind, self.api.url, self.tmp / "client.log").start()
        return self.client

    # -- observations -------------------------------------------------------------
    def polls(self):
        """The client's requests to nudge, as the relay saw them."""
        return self.relay.requests()

    def api_requests(self):
        return self.api.client_requests()

    def options_count(self):
        return sum(1 for r in self.api_requests() if r["method"] == "OPTIONS")

    def has_parked_poll(self):
        """The client's latest poll is parked (not yet answered)."""
        polls = self.polls()
        return bool(polls) and polls[-1]["t_answer"] is None

    def messages(self):
        return [p["message"] for p in self.polls() if p["message"] is not None]

    def wait_ready(self, timeout=30):
        """The client has registered a channel and has a poll parked on it."""
        def ready():
            self.check_client_alive()
            since = self.t_client  # a client started again must not count its predecessor's polls
            return (any(r["method"] == "OPTIONS" and r["t"] >= since for r in self.api_requests())
                    and any(p["t_answer"] is None and p["t"] >= since for p in self.polls()))
        wait_until(ready, timeout, what=f"{self.client_kind} to park its first poll")

    def check_client_alive(self):
        if not self.client.alive():
            raise AssertionError(f"{self.client_kind} exited ({self.client.proc.returncode}): "
                                 f"{self.client.of_kind('fatal')}\n{self.client.stderr()[-3000:]}")

    def wait_received(self, ids, timeout):
        want = set(ids)

        def got():
            have = set(self.client.event_ids())
            if want <= have:
                return True
            if not self.client.alive():
                raise AssertionError(f"{self.client_kind} exited before receiving "
                                     f"{sorted(want - have)}: {self.client.of_kind('fatal')}")
            return False
        wait_until(got, timeout, what=f"{self.client_kind} to receive {len(want)} events")

    # -- nudge restarts -----------------------------------------------------------
    def restart_nudge(self, downtime=True, downtime_seconds=3.0, during=None):
        """Replace the nudge node by a new one on the same public address.

        With downtime the relay stops listening first, so that while the old
        node drains and exits, and for downtime_seconds more, connections are
        refused as by a node that is down; during() runs then. Then a new node
        takes the address. Without downtime the new node starts first and the
        old one drains behind it (as behind a load balancer). Either way the
        new node knows no channel. Returns the old node's exit code."""
        old = self.nudge
        new = self._new_nudge()
        if downtime:
            self.relay.pause()
            code = old.stop()
            self.nudge = None
            if during:
                during()
            time.sleep(downtime_seconds)  # the outage itself, not a wait for a condition
            new.start()
        else:
            new.start()
        self.relay.set_target("127.0.0.1", new.public_port)
        self.api.point_at(new.internal)
        if downtime:
            self.relay.resume()
        else:
            code = old.stop()  # its open connections drain on the old node
        self.old_nudges.append((old, code))
        self.nudge = new
        self.restarts += 1
        return code

    def crash_nudge(self):
        """SIGKILL the node (no drain: every relayed connection just ends) and start
        a new one on the same public address and the same arguments, --state-dir
        included, as systemd's Restart= would. Connections are refused while the
        new node starts."""
        old = self.nudge
        self.relay.pause()
        old.proc.send_signal(signal.SIGKILL)
        code = old.stop()
        self.relay.drop_connections()
        new = self._new_nudge().start()
        self.relay.set_target("127.0.0.1", new.public_port)
        self.api.point_at(new.internal)
        self.relay.resume()
        self.old_nudges.append((old, code))
        self.nudge = new
        self.restarts += 1
        return code

    def begin_replacing_nudge(self):
        """Start a new node on the same public address (as behind a load
        balancer) and send SIGTERM to the old one, which keeps draining.
        Returns the old node; end_replacing_nudge(old) waits for its exit."""
        old = self.nudge
        new = self._new_nudge().start()
        self.relay.set_target("127.0.0.1", new.public_port)
        self.api.point_at(new.internal)
        self.nudge = new
        old.proc.send_signal(signal.SIGTERM)
        return old

    def end_replacing_nudge(self, old):
        code = old.stop()
        self.old_nudges.append((old, code))
        self.restarts += 1
        return code

    def stop(self):
        errors = []
        for name, fn in (("client", lambda: self.client and self.client.stop()),
                         ("main API", lambda: self.api and self.api.stop()),
                         ("nudge", lambda: self.nudge and self.nudge.stop()),
                         ("relay", lambda: self.relay and self.relay.close())):
            try:
                fn()
            except Exception as e:  # keep stopping the others
                errors.append(f"{name}: {e!r}")
        return errors

    def nudge_logs(self):
        nodes = [n for n, _ in self.old_nudges] + ([self.nudge] if self.nudge else [])
        return "\n".join(n.log() for n in nodes)


@pytest.fixture
def make_stack(tmp_path, request):
    stacks = []

    def make(client_kind, nudge_args=(), api_args=(), start_client=True):
        # nudge_args override the defaults flag by flag (clap takes a flag once).
        flags = dict(zip(DEFAULT_NUDGE_ARGS[::2], DEFAULT_NUDGE_ARGS[1::2]))
        flags.update(zip(list(nudge_args)[::2], list(nudge_args)[1::2]))
        args = [x for kv in flags.items() for x in kv]
        stack = Stack(tmp_path, client_kind, args, api_args)
        stacks.append(stack)
        return stack.start(start_client=start_client)

    yield make

    for stack in stacks:
        record_results(request.node.nodeid, stack)
        errors = stack.stop()
        logs = stack.nudge_logs()
        assert not errors, errors
        # SPEC §2: the Authorization header the SDKs send to the realtime URL is
        # ignored and never logged (nudge ran with RUST_LOG=debug,nudge=trace).
        assert TOKEN not in logs, "nudge logged the client's Authorization token"


def record_results(nodeid, stack):
    """Keep what each SDK did, for the compatibility table (tests/sdk/.results/)."""
    try:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        polls = stack.polls() if stack.relay else []
        t0 = min([p["t"] for p in polls] + [r["t"] for r in stack.api_requests()] or [0]) if stack.api else 0
        timeline = sorted(
            [(round(p["t"] - t0, 2), "nudge", p["method"], p["target"].split("?", 1)[-1][:40],
              p["status"], p["message"], round((p["t_answer"] or p["t"]) - p["t"], 2),
              f"conn {p['conn']} to :{p['upstream']}") for p in polls]
            + [(round(r["t"] - t0, 2), "api", r["method"], json.dumps(r["query"]), None, None, None)
               for r in (stack.api_requests() if stack.api else [])]
        )
        out = {
            "test": nodeid,
            "client": stack.client_kind,
            "notes": stack.notes,
            "client_lines": [l for l in (stack.client.lines if stack.client else []) if l.get("kind") != "event"],
            "events_received": len(stack.client.event_ids()) if stack.client else 0,
            "timeline": timeline,
        }
        name = nodeid.split("::", 1)[-1].replace("/", "_").replace("[", "-").replace("]", "")
        (RESULTS_DIR / f"{name}.json").write_text(json.dumps(out, indent=1))
    except Exception as e:  # reporting must not fail a test
        print(f"could not record results: {e!r}", file=sys.stderr)


def pytest_collection_modifyitems(config, items):
    # Long scenarios first, so that parallel workers finish together.
    order = {"default_park": 0, "restart": 1, "revoked": 2, "max_retries": 3, "drain": 4, "quiet": 5}
    def key(item):
        for k, v in order.items():
            if k in item.name:
                return v
        return 9
    items.sort(key=key)

