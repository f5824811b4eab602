"""The Box SDKs, unchanged, receive every change through nudge.

Each test runs one SDK's own event stream (see clients/ and node/) against the
Box-shaped main API in examples/ and a fresh nudge, and checks that every
event the main API appended reaches the client exactly once, and that the
client never loops hot (scenario 5, checked in every test).

Scenarios (the issue's numbering):
  1 test_steady_changes         single changes at a steady pace, and a burst larger than a page
  2 test_quiet_periods          quiet longer than the park time: reconnects, then changes
  3 test_small_max_retries      channels with max_retries=1 retire; the client re-registers
  4 test_revoked                the channel is revoked while the client is parked
  4 test_restart_with_downtime  nudge stops (connections refused) and a new node starts
  4 test_restart_behind_lb      a new node takes the address with no downtime (channel unknown)
  4 test_crash_with_state_dir   SIGKILL and a restart with --state-dir: the channel is restored
  4 test_upgrade_under_traffic  SIGUSR2 while changes are published: the new binary takes the poll over
  5 every test                  no hot loop (assert_no_hot_loop)
    test_drain_no_hot_loop      a long drain while the client's connection is to the draining node
and pins of what the SDKs need from nudge: test_registration_body_is_box_shaped,
test_default_park_time_within_sdk_read_timeout; every single-node test also checks
that the SDK's polls went through nudge's fast path.
What each SDK does in each scenario is written down in docs/box-sdks.md.
"""

import collections
import re
import threading
import time

import pytest

from harness import CLIENTS, TOKEN, http_json, wait_until

ALL = list(CLIENTS)
SUBJECT = "user:42"  # the main API's defaults: --subject and --topic
TOPIC = "user:42"

# Scenario 5: "never a hot loop". Within any WINDOW seconds a client makes at
# most WINDOW_LIMIT requests to nudge and, separately, to the main API; and on
# average at most AVG_LIMIT per second over the whole test. The bursts these
# allow come from the tests' own publishes (fetch, re-register, poll); the hot
# loops seen while writing these tests did 35 to 800 requests a second.
WINDOW = 1.0
WINDOW_LIMIT = 15
AVG_LIMIT = 4.0


def rate_report(times, t_start):
    """Most requests within any WINDOW seconds, and requests per second since
    the test started (over at least 5 s)."""
    times = sorted(times)
    if not times:
        return 0, 0.0
    worst, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - WINDOW:
            j += 1
        worst = max(worst, i - j + 1)
    span = max(time.time() - t_start, 5.0)
    return worst, len(times) / span


def assert_no_hot_loop(stack):
    for name, times in (("nudge", [p["t"] for p in stack.polls()]),
                        ("main API", [r["t"] for r in stack.api_requests()])):
        worst, avg = rate_report(times, stack.t_start)
        stack.notes[f"{name} requests"] = len(times)
        stack.notes[f"{name} max per {WINDOW:g}s"] = worst
        stack.notes[f"{name} avg per s"] = round(avg, 2)
        assert worst <= WINDOW_LIMIT, f"{stack.client_kind}: {worst} requests to {name} within {WINDOW}s"
        assert avg <= AVG_LIMIT, f"{stack.client_kind}: {avg:.1f} requests/s to {name} on average"


def assert_exactly_once(stack, published):
    got = stack.client.event_ids()
    dupes = [i for i, n in collections.Counter(got).items() if n > 1]
    assert not dupes, f"{stack.client_kind} received duplicates: {dupes}"
    assert sorted(got) == sorted(published), (
        f"{stack.client_kind}: missing {sorted(set(published) - set(got))}, "
        f"unexpected {sorted(set(got) - set(published))}")


def assert_fast_path(stack, expect="fast"):
    """Every poll the SDK made went through nudge's buffer-less fast path (the
    one that parks a poll in about 1-2 KiB), not the hyper fallback; or, with
    expect="hyper" (--fast-path false), all through hyper."""
    m = stack.nudge.metrics()
    counts = {p: m.get(f'nudge_public_requests_total{{path="{p}"}}', 0) for p in ("fast", "hyper")}
    stack.notes["requests by nudge path"] = counts
    other = "hyper" if expect == "fast" else "fast"
    assert counts[other] == 0 and counts[expect] >= 1, f"{stack.client_kind}: {counts}"


def count_messages(stack, message):
    return sum(1 for m in stack.messages() if m == message)


def channel_of(target):
    for part in target.split("?", 1)[-1].split("&"):
        if part.startswith("channel="):
            return part[len("channel="):]
    return None


def assert_sdk_sent_authorization(stack):
    """Every SDK sends its API bearer token to the realtime URL too; nudge ignores it."""
    polls = stack.polls()
    assert polls and all(p["authorization"] for p in polls)


def assert_all_answers_ok(stack):
    bad = [(p["target"], p["status"], p["message"]) for p in stack.polls()
           if p["status"] is not None and (p["status"] != 200 or p["message"] not in
                                           ("new_change", "reconnect", "max_retries"))]
    assert not bad, f"nudge answered an SDK poll with something else than 200 + a message: {bad}"


# --------------------------------------------------------------------------- 1
@pytest.mark.parametrize("path", ["fast", "hyper"])
@pytest.mark.parametrize("client", ALL)
def test_steady_changes(make_stack, client, path):
    # Pages of at most 5 events: a burst of 12 takes several GET /events, and the
    # SDKs that fetch one page per new_change rely on nudge's stream_position
    # check to come back for the rest at once. Run on both ways nudge serves a
    # poll: the fast path, and hyper (--fast-path false; also TLS connections).
    s = make_stack(client, api_args=["--max-page", "5"],
                   nudge_args=["--fast-path", "false"] if path == "hyper" else [])
    s.wait_ready()
    published = []
    for _ in range(8):
        published += s.api.publish(1)["event_ids"]
        time.sleep(0.8)  # the publisher's pace, not a wait for the client
    published += s.api.publish(12)["event_ids"]
    time.sleep(0.8)
    for _ in range(3):
        published += s.api.publish(1)["event_ids"]
        time.sleep(0.8)
    s.wait_received(published, timeout=40)
    assert_exactly_once(s, published)
    assert_sdk_sent_authorization(s)
    assert_all_answers_ok(s)
    assert_fast_path(s, expect=path)
    assert_no_hot_loop(s)


# --------------------------------------------------------------------------- 2
@pytest.mark.parametrize("client", ALL)
def test_quiet_periods(make_stack, client):
    s = make_stack(client)
    s.wait_ready()
    published = []
    for quiet_reconnects, burst in ((3, 1), (2, 2)):
        base = count_messages(s, "reconnect")
        wait_until(lambda: (s.check_client_alive(), count_messages(s, "reconnect") >= base + quiet_reconnects)[1],
                   timeout=6 * quiet_reconnects, what="reconnects during a quiet period")
        ids = s.api.publish(burst)["event_ids"]
        published += ids
        s.wait_received(ids, timeout=20)
    assert_exactly_once(s, published)
    s.notes["reconnects"] = count_messages(s, "reconnect")
    s.notes["OPTIONS"] = s.options_count()
    assert_all_answers_ok(s)
    assert_fast_path(s)
    assert_no_hot_loop(s)


# --------------------------------------------------------------------------- 3
@pytest.mark.parametrize("client", ALL)
def test_small_max_retries(make_stack, client):
    # Every channel the main API registers asks for max_retries=1: it answers
    # "reconnect" at most twice, then "max_retries" and is gone.
    s = make_stack(client, api_args=["--channel-max-retries", "1"])
    s.wait_ready()
    published = []
    for round_ in range(2):
        base = s.options_count()
        # Quiet until the client has been through at least two more channels.
        wait_until(lambda: (s.check_client_alive(), s.options_count() >= base + 2)[1],
                   timeout=25, what="the client to re-register through OPTIONS")
        ids = s.api.publish(1 + round_)["event_ids"]
        published += ids
        s.wait_received(ids, timeout=25)
    # Then changes at a pace that does not line up with the park time, so that
    # some land while the client is between two channels.
    for _ in range(6):
        published += s.api.publish(1)["event_ids"]
        time.sleep(1.3)  # the publisher's pace, not a wait for the client
    s.wait_received(published, timeout=25)
    assert_exactly_once(s, published)

    # nudge kept every channel within its budget: 1 + max_retries reconnects.
    per_channel = collections.Counter(channel_of(p["target"]) for p in s.polls() if p["message"] == "reconnect")
    assert per_channel and max(per_channel.values()) <= 2, per_channel
    s.notes["max_retries answers"] = count_messages(s, "max_retries")
    s.notes["OPTIONS"] = s.options_count()
    s.notes["channels polled"] = len({channel_of(p["target"]) for p in s.polls()})
    if client == "boxsdk-3.9.2":
        # boxsdk 3.x re-polls on reconnect with no counter of its own: it is the
        # one that spends the channel's budget, gets max_retries, and goes back
        # to OPTIONS.
        assert s.notes["max_retries answers"] >= 1
    assert_all_answers_ok(s)
    assert_fast_path(s)
    assert_no_hot_loop(s)


# --------------------------------------------------------------------------- 4
@pytest.mark.parametrize("client", ALL)
def test_revoked(make_stack, client):
    s = make_stack(client)
    s.wait_ready()
    published = s.api.publish(1)["event_ids"]
    s.wait_received(published, timeout=20)
    wait_until(s.has_parked_poll, 15, what="a parked poll")

    options_before = s.options_count()
    t_revoke = time.time()
    status, body = s.nudge.post("/v1/revoke", {"subject": SUBJECT})
    assert status == 200 and body["revoked"] >= 1, (status, body)
    # The parked poll is answered max_retries at once.
    wait_until(lambda: count_messages(s, "max_retries") >= 1, 5, what="the parked poll to get max_retries")
    # A change right after the revocation: the client must still get it once it
    # has come back through OPTIONS (the main API authorizes it again here).
    ids = s.api.publish(1)["event_ids"]
    published += ids
    s.wait_received(ids, timeout=50)
    t_new = min(r["t"] for r in s.api_requests() if r["method"] == "OPTIONS" and r["t"] > t_revoke)
    s.notes["seconds from revoke to new OPTIONS"] = round(t_new - t_revoke, 2)
    s.notes["polls on the revoked channel after revoke"] = sum(
        1 for p in s.polls() if p["t"] > t_revoke and p["t"] < t_new)
    assert s.options_count() > options_before
    ids = s.api.publish(1)["event_ids"]
    published += ids
    s.wait_received(ids, timeout=20)
    assert_exactly_once(s, published)
    assert_all_answers_ok(s)
    assert_fast_path(s)
    assert_no_hot_loop(s)


def _restart(s, downtime):
    s.wait_ready()
    published = s.api.publish(1)["event_ids"]
    s.wait_received(published, timeout=20)
    wait_until(s.has_parked_poll, 15, what="a parked poll")
    options_before = s.options_count()
    t_restart = time.time()

    def publish_while_down():
        # The main API's publish fails while nudge is down; it retries it until
        # the new node takes it (see examples/box_main_api.py).
        body = s.api.publish(1)
        assert "publish_error" in body, body
        published.extend(body["event_ids"])

    code = s.restart_nudge(downtime=downtime, during=publish_while_down if downtime else None)
    assert code == 0, "nudge should drain and exit 0 on SIGTERM"
    s.notes["restart took"] = round(time.time() - t_restart, 2)
    ids = s.api.publish(1)["event_ids"]
    published += ids
    return published, options_before, t_restart


@pytest.mark.parametrize("client", ALL)
def test_restart_behind_lb(make_stack, client):
    """A new node takes the public address before the old one drains: the
    client's channel is unknown to the node it reaches next."""
    s = make_stack(client)
    published, options_before, t_restart = _restart(s, downtime=False)
    s.wait_received(published, timeout=50)
    assert s.options_count() > options_before
    t_new = min(r["t"] for r in s.api_requests() if r["method"] == "OPTIONS" and r["t"] > t_restart)
    s.notes["seconds from restart to new OPTIONS"] = round(t_new - t_restart, 2)
    ids = s.api.publish(1)["event_ids"]
    published += ids
    s.wait_received(ids, timeout=20)
    assert_exactly_once(s, published)
    assert_all_answers_ok(s)
    assert_no_hot_loop(s)


# SDKs whose event stream ends with an error when the realtime server refuses
# the connection: the application has to start the stream again.
STOPS_ON_REFUSED = {"boxsdk-3.9.2"}


@pytest.mark.parametrize("client", ALL)
def test_restart_with_downtime(make_stack, client):
    """nudge is stopped (SIGTERM: it drains, then exits) and started again 3 s
    later; in between, connections to its address are refused, and a change
    is published (the main API retries that publish until the new node is up)."""
    s = make_stack(client)
    published, options_before, t_restart = _restart(s, downtime=True)

    def settled():
        if set(published) <= set(s.client.event_ids()):
            return "recovered"
        if not s.client.alive():
            return "stopped"
        return None

    outcome = wait_until(settled, 50, what=f"{client} to recover or stop")
    s.notes["outcome"] = outcome
    fatal = s.client.of_kind("fatal")
    expected = "stopped" if client in STOPS_ON_REFUSED else "recovered"
    assert outcome == expected, f"{client} {outcome} (docs/box-sdks.md says {expected}): {fatal}"
    if outcome == "stopped":
        assert fatal and "ConnectionError" in fatal[-1]["error"] and "refused" in fatal[-1]["error"], fatal
        # What the application must do: start the event stream again. It starts
        # at "now", so the change published during the restart is not delivered.
        s.notes["fatal"] = fatal[-1]["error"][:200]
        s.start_client()
        s.wait_ready()
        ids = s.api.publish(1)["event_ids"]
        s.wait_received(ids, timeout=20)
        assert_exactly_once(s, ids)
        assert_no_hot_loop(s)
        return
    assert s.options_count() > options_before
    ids = s.api.publish(1)["event_ids"]
    published += ids
    s.wait_received(ids, timeout=20)
    assert_exactly_once(s, published)
    assert_all_answers_ok(s)
    assert_no_hot_loop(s)


@pytest.mark.parametrize("client", ALL)
def test_crash_with_state_dir(make_stack, client, tmp_path):
    """nudge runs with --state-dir; it is killed (SIGKILL, no drain) and started
    again at once with the same arguments, as systemd's Restart= does. The new
    node restores the channel, and marks it pending (no bus: it cannot know what
    it missed), so the SDK's first poll after the crash, on the same URL, gets
    new_change; the SDK fetches from the main API and carries on. The SDKs that
    register a new channel after every new_change (both 3.x) do so here too; the
    others make no OPTIONS at all."""
    state = tmp_path / "state"
    s = make_stack(client, nudge_args=["--state-dir", str(state), "--state-interval", "200ms"])
    s.wait_ready()
    published = s.api.publish(1)["event_ids"]
    s.wait_received(published, timeout=20)
    wait_until(s.has_parked_poll, 15, what="a parked poll")

    # The file holds every channel, the one parked now included. A count of
    # snapshots would not say so: the node writes only when something changed, and
    # the 3.x SDKs register a new channel after each change.
    def written():
        m = s.nudge.metrics()
        return (state / "nudge.state").exists() and 1 <= m.get("nudge_channels", 0) <= m.get("nudge_state_snapshot_channels", -1)

    wait_until(written, 10, what="a snapshot holding every channel")
    parked_on = channel_of(s.polls()[-1]["target"])
    options_before = s.options_count()
    t_crash = time.time()
    s.crash_nudge()
    assert re.search(r"state restored channels=[1-9]", s.nudge.log()), s.nudge.log()[-2000:]

    def since_crash():
        return [p for p in s.polls() if p["t"] > t_crash]

    def settled():
        if not s.client.alive():
            return "stopped"
        # Its first poll answered (the relay records a request before its answer),
        # and a later one parked.
        polls = since_crash()
        if len(polls) >= 2 and polls[0]["t_answer"] is not None and polls[-1]["t_answer"] is None:
            return "parked again"
        return None

    outcome = wait_until(settled, 50, what=f"{client} to poll the restarted node or stop")
    s.notes["outcome"] = outcome
    s.notes["seconds from crash to a parked poll"] = round(time.time() - t_crash, 2)
    if client in STOPS_ON_REFUSED and outcome == "stopped":
        # Its stream ends on the refused connection while the new node starts:
        # the application starts it again, as after any refused connection.
        fatal = s.client.of_kind("fatal")
        s.notes["fatal"] = fatal[-1]["error"][:200] if fatal else ""
        s.start_client()
        s.wait_ready()
        ids = s.api.publish(1)["event_ids"]
        s.wait_received(ids, timeout=20)
        assert_no_hot_loop(s)
        return
    assert outcome == "parked again", f"{client}: {outcome}: {s.client.of_kind('fatal')}"
    first = since_crash()[0]
    s.notes["first poll after the crash"] = f"{'same' if channel_of(first['target']) == parked_on else 'another'} channel: {first['message']}"
    s.notes["OPTIONS after the crash"] = s.options_count() - options_before
    assert channel_of(first["target"]) == parked_on and first["message"] == "new_change", \
        f"{client}: the first poll after the crash: {first}"
    if client in REREGISTERS_AFTER_CHANGE:
        assert s.options_count() - options_before <= 1, "one OPTIONS, as after any change"
    else:
        assert s.options_count() == options_before, "the SDK went back to the main API for a new channel"
    ids = s.api.publish(1)["event_ids"]
    published += ids
    s.wait_received(ids, timeout=20)
    assert_exactly_once(s, published)
    assert_no_hot_loop(s)


@pytest.mark.parametrize("client", ALL)
def test_upgrade_under_traffic(make_stack, client, tmp_path):
    """SIGUSR2 while the SDK is parked and changes are being published: nudge starts
    its binary again and hands it the listeners and the parked connection (the relay's
    upstream connection is one of them: it is not closed). No SDK notices: no error,
    no OPTIONS beyond what it makes after any change, every change received once, and
    the poll parked at the signal is answered on its connection, by the new process."""
    pid_file = tmp_path / "nudge.pid"
    s = make_stack(client, nudge_args=["--pid-file", str(pid_file)])
    s.wait_ready()
    published = s.api.publish(1)["event_ids"]
    s.wait_received(published, timeout=20)
    # Counted from the SDK's next poll: the SDKs that register again after a change do so
    # after handing over its events, and before they poll.
    wait_until(s.has_parked_poll, 15, what="a parked poll")
    options_before = s.options_count()
    changes_before = len(published)

    # Changes keep coming before and after the signal; the main API publishes each
    # to nudge's internal listener, which the new process inherits: none is refused.
    go = threading.Event()
    stop = threading.Event()
    errors = []

    def publish_loop():
        while not stop.is_set():
            go.wait()
            body = s.api.publish(1)
            if "publish_error" in body:
                errors.append(body["publish_error"])
            published.extend(body["event_ids"])
            stop.wait(0.25)

    publisher = threading.Thread(target=publish_loop, daemon=True)
    publisher.start()
    go.set()
    wait_until(lambda: len(published) >= changes_before + 3, 10, what="changes before the upgrade")
    # The signal goes while a poll is parked (the publisher holds still until the SDK
    # has parked again), and publishing resumes right after it.
    go.clear()
    wait_until(lambda: s.has_parked_poll() and s.client.event_ids() and set(published) <= set(s.client.event_ids()),
               15, what="every change so far received and a poll parked")
    parked_index = len(s.polls()) - 1
    t_upgrade = time.time()
    code = s.nudge.upgrade(pid_file, on_signal=go.set)
    s.notes["upgrade took"] = round(time.time() - t_upgrade, 2)
    at_upgrade = len(published)
    wait_until(lambda: len(published) >= at_upgrade + 3, 10, what="changes after the upgrade")
    stop.set()
    publisher.join(10)
    s.notes["changes published around the upgrade"] = len(published) - changes_before
    assert code == 0, "the old process exits 0 once the new one has taken over"
    assert "upgrade: the new process has taken over" in s.nudge.log(), s.nudge.log()[-2000:]
    assert not errors, f"the main API's publishes failed during the upgrade: {errors}"

    ids = s.api.publish(1)["event_ids"]
    published += ids
    s.wait_received(published, timeout=30)
    # ...and it parks again, on the new process.
    wait_until(lambda: s.has_parked_poll() and s.nudge.metrics().get("nudge_parked_polls", 0) >= 1, 15,
               what="a poll parked on the new process")
    # The poll parked at the signal kept its connection and was answered after it.
    answered = s.polls()[parked_index]
    s.notes["the poll parked at the signal"] = f"{answered['status']} {answered['message']}"
    assert answered["t_answer"] > t_upgrade and answered["status"] == 200 \
        and answered["message"] in ("new_change", "reconnect"), answered
    assert s.client.alive() and not s.client.of_kind("fatal") and not s.client.of_kind("error"), \
        s.client.of_kind("error") + s.client.of_kind("fatal")
    new_options = s.options_count() - options_before
    s.notes["OPTIONS after the upgrade"] = new_options
    changes = len(published) - changes_before
    if client in REREGISTERS_AFTER_CHANGE:
        assert new_options <= changes, "at most one OPTIONS per change, as without an upgrade"
    else:
        assert new_options == 0, "the SDK went back to the main API for a new channel"
    # Nothing of the channel was forgotten: no poll after the upgrade was refused.
    assert not [p for p in s.polls() if p["t"] >= t_upgrade and p["message"] == "max_retries"]
    assert_exactly_once(s, published)
    assert_all_answers_ok(s)
    assert_fast_path(s)
    assert_no_hot_loop(s)


# The SDKs that register a new channel (OPTIONS) after every new_change.
REREGISTERS_AFTER_CHANGE = {"boxsdk-3.9.2", "box-node-sdk-3.8.2"}


def channel_of(target):
    """The channel id in a poll's request target."""
    m = re.search(r"[?&]channel=([^&]+)", target)
    return m.group(1) if m else None


# ------------------------------------------------------------------ pins
def test_registration_body_is_box_shaped(make_stack):
    """OPTIONS /2.0/events returns nudge's POST /v1/channels body as is. The
    SDKs need Box's exact shape: box-node-sdk 10.x rejects a numeric ttl or
    max_retries and a non-numeric retry_timeout (and then re-sends OPTIONS with
    no delay); boxsdk 3.x hands retry_timeout to requests as its read timeout,
    so it must be a number; boxsdk 10.x and box-node-sdk 10.x parse max_retries
    as an integer string to count their polls."""
    s = make_stack("boxsdk-10.18.0", api_args=["--channel-max-retries", "2"], start_client=False)
    status, body = http_json("OPTIONS", s.api.url + "/2.0/events", headers={"Authorization": "Bearer " + TOKEN})
    assert status == 200, (status, body)
    assert body["chunk_size"] == 1 and len(body["entries"]) == 1
    entry = body["entries"][0]
    assert entry["type"] == "realtime_server"
    assert isinstance(entry["ttl"], str) and entry["ttl"].isdigit()
    assert entry["max_retries"] == "2"  # the channel's own limit, as a string
    assert isinstance(entry["retry_timeout"], int) and not isinstance(entry["retry_timeout"], bool)
    assert entry["retry_timeout"] == 3
    assert entry["url"].startswith(s.relay_url + "/subscribe?channel=")
    assert "stream_type=all" in entry["url"]


def test_default_park_time_within_sdk_read_timeout(make_stack):
    """With nudge's default retry_timeout (60 s) a parked poll is answered
    reconnect before the 60 s read timeout of boxsdk 10.x (and the Java SDK):
    the SDK sees reconnect, not a read error."""
    s = make_stack("boxsdk-10.18.0", nudge_args=["--retry-timeout", "60s"])
    s.wait_ready()
    first = wait_until(lambda: [p for p in s.polls() if p["message"] == "reconnect"], 65,
                       interval=0.5, what="the first reconnect")[0]
    held = first["t_answer"] - first["t"]
    s.notes["default park seconds"] = round(held, 1)
    assert 45 <= held < 55, held  # 60 s - 6 s grace - up to 10 % jitter
    assert not s.client.of_kind("error") and s.client.alive()
    ids = s.api.publish(1)["event_ids"]
    s.wait_received(ids, timeout=10)


def _park_bystanders(s, n):
    """n polls parked directly on nudge (not through the relay) on channels of
    other users, so that a drain takes its whole period to answer them all."""
    import http.client
    import threading

    def poll(url):
        u = url.split("//", 1)[1]
        hostport, path = u.split("/", 1)
        conn = http.client.HTTPConnection(hostport, timeout=60)
        try:
            conn.request("GET", "/" + path)
            conn.getresponse().read()
        except OSError:
            pass
        finally:
            conn.close()

    threads = []
    for i in range(n):
        status, body = s.nudge.post("/v1/channels", {"topics": [f"bystander:{i}"]})
        assert status == 201, (status, body)
        url = body["entries"][0]["url"].replace(s.relay_url, "http://" + s.nudge.public)
        t = threading.Thread(target=poll, args=(url,), daemon=True)
        t.start()
        threads.append(t)

    def parked():
        status, text = http_json_text(s.nudge.internal + "/metrics")
        for line in text.splitlines():
            if line.startswith("nudge_parked_polls "):
                return float(line.split()[1]) >= n + 1
        return False
    wait_until(parked, 10, what="the bystander polls to park")
    return threads


def http_json_text(url):
    import urllib.request
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read().decode()


def _drain_params():
    for path in ("fast", "hyper"):
        for c in ALL:
            yield pytest.param(c, path, id=f"{c}-{path}")


@pytest.mark.parametrize("client,path", _drain_params())
def test_drain_no_hot_loop(make_stack, client, path):
    """A node drains (SIGTERM) with many polls parked, so the drain lasts its
    whole period, while a new node has taken its address. The client's
    connection is still to the draining node: its next polls must not loop.
    Both ways nudge serves a poll: its fast path, and hyper (--fast-path false,
    which is also how TLS connections are served). Before nudge closed every
    connection after an answer given while draining, the hyper path kept them
    open and boxsdk 3.x, boxsdk 10.x and box-node-sdk 3.x looped on the draining
    node at 20 to 800 polls a second."""
    fast = ["--fast-path", "false"] if path == "hyper" else []
    s = make_stack(client, nudge_args=["--retry-timeout", "30s", "--drain-period", "4s", *fast])
    s.wait_ready()
    published = s.api.publish(1)["event_ids"]
    s.wait_received(published, timeout=20)
    wait_until(s.has_parked_poll, 15, what="a parked poll")
    _park_bystanders(s, 40)
    t0 = time.time()
    old = s.begin_replacing_nudge()
    wait_until(lambda: http_json("GET", old.internal + "/readyz")[0] == 503, 5, what="the old node to drain")
    # A change reaches the draining node while the client's poll is still
    # parked there (the drain answers 41 polls over 4 s): its poll is answered
    # at once, early in the drain, and its next one goes on its open connection.
    body = s.api.publish(1)
    published += body["event_ids"]
    status, _ = http_json("POST", old.internal + "/v1/publish", {"topic": TOPIC, "position": body["position"]})
    assert status == 200
    code = s.end_replacing_nudge(old)
    assert code == 0
    t1 = time.time()
    during = [p for p in s.polls() if t0 <= p["t"] <= t1]
    s.notes["drain seconds"] = round(t1 - t0, 2)
    s.notes["polls during drain"] = len(during)
    s.notes["answers during drain"] = collections.Counter(p["message"] for p in during)
    ids = s.api.publish(1)["event_ids"]
    published += ids
    s.wait_received(ids, timeout=50)
    assert_exactly_once(s, published)
    assert_no_hot_loop(s)
