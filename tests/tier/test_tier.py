"""The realtime tier of docs/scaling-out.md "Run a tier", run for real: Debian's nginx with the shipped
deploy/compose/nginx.conf (its ports and node addresses rewritten to loopback ones, nothing
else), three nudge nodes and a Redis, all on 127.0.0.0/8. The example main API registers and
publishes through nginx's internal address; the shipped Box SDKs poll through nginx's public
hosts, one per node, routed by Host.

Node N's public host is 127.0.1.N (an address, so that every SDK resolves it without DNS):
nginx listens there and routes by the Host header exactly as it routes nodeN.localhost.
Run through tests/tier/run.sh (or with tests/sdk's venv and NUDGE_BIN set).
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "tests" / "sdk"))

from harness import NUDGE_BIN, TOKEN, Client, MainApi, _stop, http_json, wait_until  # noqa: E402

NGINX_CONF = REPO / "deploy" / "compose" / "nginx.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NODES = 3
NODE_ARGS = ["--retry-timeout", "3s", "--ttl", "2m", "--drain-period", "1s"]
# Every shipped SDK for steady changes; for a node that goes away, those that recover from
# refused polls (docs/box-sdks.md, 4c: boxsdk 3.9.2's stream ends then).
ALL_SDKS = ["boxsdk-3.9.2", "boxsdk-10.18.0", "box-node-sdk-3.8.2", "box-node-sdk-10.12.0"]
RECOVERING_SDKS = ["boxsdk-10.18.0", "box-node-sdk-3.8.2", "box-node-sdk-10.12.0"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_nginx(dest, lb_port, internal_port, gate_port, nodes):
    """deploy/compose/nginx.conf with loopback ports: each rewrite must match exactly as
    often as the shipped file has that shape, so the test never runs a different config."""
    text = NGINX_CONF.read_text()

    def sub(pattern, repl, expect):
        nonlocal text
        text, n = re.subn(pattern, repl, text)
        assert n == expect, f"nginx.conf: {pattern!r} matched {n} times, expected {expect}"

    sub(r"listen 80( default_server)?;",
        lambda m: " ".join(f"listen 127.0.1.{i}:{lb_port}{m.group(1) or ''};" for i in range(1, NODES + 1)),
        NODES + 1)
    sub(r"listen 81;", f"listen 127.0.0.1:{internal_port};", 1)
    sub(r"127\.0\.2\.(\d):82([ ;])", rf"127.0.2.\1:{gate_port}\2", 2 * NODES)
    sub(r"server node(\d):8080;", lambda m: f"server 127.0.0.1:{nodes[int(m.group(1)) - 1].public_port};", NODES)
    sub(r"server node(\d):8081;", lambda m: f"server 127.0.0.1:{nodes[int(m.group(1)) - 1].internal_port};", NODES)
    sub(r"server_name node(\d)\.localhost;", r"server_name 127.0.1.\1;", NODES)
    sub(r"/var/log/nginx", str(dest / "logs"), 2)
    tmp = dest / "tmp"
    text, n = re.subn(r"^http \{", "http {\n    " + " ".join(
        f"{k}_temp_path {tmp}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")), text, flags=re.M)
    assert n == 1, "nginx.conf: no http block"
    return text


class TcpCut:
    """A TCP forwarder on loopback that the test can cut (close every connection and refuse
    new ones) and restore: one node's own way to Redis, to take that node's bus down alone."""

    def __init__(self, target_port):
        self.target = target_port
        self.lock = threading.Lock()
        self.conns = []
        self.port = free_port()
        self.server = None
        self.restore()

    def restore(self):
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def _accept(self, server):
        while True:
            try:
                c, _ = server.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        # shutdown wakes the accept() blocked in the other thread, so the port is free again.
        try:
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class TierNode:
    """One nudge node on fixed loopback ports, so that nginx's upstreams stay right across
    a restart; its public URL is its host on nginx."""

    def __init__(self, tmp, n):
        self.n = n
        self.tmp = tmp
        self.public_port = free_port()
        self.internal_port = free_port()
        self.internal = f"http://127.0.0.1:{self.internal_port}"
        self.proc = None
        self.starts = 0

    def start(self, lb_port, redis_port):
        self.starts += 1
        self.log_path = self.tmp / f"node{self.n}-{self.starts}.log"
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, RUST_LOG="info")
        self.proc = subprocess.Popen(
            [str(NUDGE_BIN), "--listen", f"127.0.0.1:{self.public_port}",
             "--internal-listen", f"127.0.0.1:{self.internal_port}",
             "--public-url", f"http://127.0.1.{self.n}:{lb_port}",
             "--redis-url", f"redis://127.0.0.1:{redis_port}", *NODE_ARGS],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, env=env)
        return self

    def ready(self):
        try:
            return http_json("GET", self.internal + "/readyz", timeout=2)[0] == 200
        except Exception:
            return False

    def wait_ready(self, timeout=20):
        def ok():
            if self.proc.poll() is not None:
                raise AssertionError(f"node{self.n} exited {self.proc.returncode}: {self.log()[-2000:]}")
            return self.ready()
        wait_until(ok, timeout, what=f"node{self.n} to be ready")

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.proc is None:
            return None
        code = _stop(self.proc, sig=sig, timeout=timeout)
        self._log.close()
        self.proc = None
        return code

    def metric(self, name):
        """Sum of one metric's samples on this node (0 when the node is down)."""
        try:
            import urllib.request
            with urllib.request.urlopen(self.internal + "/metrics", timeout=5) as r:
                text = r.read().decode()
        except Exception:
            return 0.0
        return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                   if line.startswith(name + " ") or line.startswith(name + "{"))

    def log(self):
        texts = []
        for p in sorted(self.tmp.glob(f"node{self.n}-*.log")):
            texts.append(p.read_text(errors="replace"))
        return "\n".join(texts)


class Tier:
    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []
        self.clients = []
        self.api = None

    def start(self):
        # Redis, pub/sub only.
        self.redis_port = free_port()
        self.redis = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port), "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp)],
            stdout=open(self.tmp / "redis.log", "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(lambda: self._redis_up(), 10, what="redis to answer PING")
        # Node 3 reaches Redis through a forwarder the test can cut.
        self.cut3 = TcpCut(self.redis_port)
        self.lb_port, self.lb_internal_port, self.gate_port = free_port(), free_port(), free_port()
        self.nodes = [TierNode(self.tmp, n) for n in range(1, NODES + 1)]
        for node in self.nodes:
            node.start(self.lb_port, self.redis_port_for(node))
        for node in self.nodes:
            node.wait_ready()
        # nginx, in the foreground, with its own prefix, logs and temp dirs.
        ngx = self.tmp / "nginx"
        for d in ("logs", "tmp"):
            (ngx / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.tmp, 0o755)
        os.chmod(ngx, 0o755)
        os.chmod(ngx / "tmp", 0o777)  # workers run as nobody when the test runs as root
        conf = ngx / "nginx.conf"
        conf.write_text(render_nginx(ngx, self.lb_port, self.lb_internal_port, self.gate_port, self.nodes))
        self.nginx = subprocess.Popen(
            [NGINX, "-p", f"{ngx}/", "-c", str(conf), "-e", str(ngx / "logs" / "error.log"),
             "-g", f"daemon off; pid {ngx}/nginx.pid;"],
            stdout=open(ngx / "stdout.log", "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.lb_internal = f"http://127.0.0.1:{self.lb_internal_port}"

        def nginx_up():
            if self.nginx.poll() is not None:
                raise AssertionError(f"nginx exited: {(ngx / 'logs' / 'error.log').read_text()[-2000:]}")
            try:
                return http_json("GET", self.lb_internal + "/readyz", timeout=2)[0] == 200
            except Exception:
                return False
        wait_until(nginx_up, 10, what="nginx to proxy the internal address")
        self.api = MainApi(self.tmp / "main_api.log", self.lb_internal).start()
        return self

    def redis_port_for(self, node):
        return self.cut3.port if node.n == 3 else self.redis_port

    def _redis_up(self):
        try:
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def restart(self, node):
        node.start(self.lb_port, self.redis_port_for(node)).wait_ready()

    def register(self):
        """One registration through nginx's internal address; returns (node number, url)."""
        status, body = http_json("POST", self.lb_internal + "/v1/channels", {"topics": ["t"], "subject": "s"})
        assert status == 201, (status, body)
        url = body["entries"][0]["url"]
        m = re.match(rf"http://127\.0\.1\.(\d):{self.lb_port}/subscribe\?", url)
        assert m, url
        return int(m.group(1)), url

    def start_clients(self, kinds):
        for kind in kinds:
            self.clients.append(Client(kind, self.api.url, self.tmp / f"client-{kind}.log").start())

    def wait_parked(self, count, timeout=60):
        def parked():
            for c in self.clients:
                if not c.alive():
                    raise AssertionError(f"{c.kind} exited: {c.of_kind('fatal')} {c.stderr()[-2000:]}")
            return sum(n.metric("nudge_parked_polls") for n in self.nodes if n.proc) >= count
        wait_until(parked, timeout, what=f"{count} parked polls")

    def wait_all_received(self, timeout):
        def done():
            sets = []
            for c in self.clients:
                if not c.alive():
                    raise AssertionError(f"{c.kind} exited: {c.of_kind('fatal')} {c.stderr()[-2000:]}")
                sets.append(set(c.event_ids()))
            return len(sets[0]) >= self.published and all(s == sets[0] for s in sets)
        try:
            wait_until(done, timeout, what=f"every client to receive all {self.published} events")
        except TimeoutError as e:
            state = {c.kind: (len(c.event_ids()), [l for l in c.lines if l.get("kind") != "event"][-4:])
                     for c in self.clients}
            api = [(round(r["t"], 1), r["method"], r["path"]) for r in self.api.client_requests()][-12:]
            raise AssertionError(f"{e}: clients {state}; main API saw {api}") from None

    def check_exactly_once(self):
        for c in self.clients:
            ids = c.event_ids()
            assert len(ids) == len(set(ids)), f"{c.kind} received an event twice: {ids}"
            assert len(ids) == self.published, f"{c.kind}: {len(ids)} events, {self.published} published"

    def stop(self):
        for c in self.clients:
            c.stop()
        if self.api:
            self.api.stop()
        if getattr(self, "nginx", None):
            _stop(self.nginx, signal.SIGQUIT, timeout=10)
        for n in getattr(self, "nodes", []):
            n.stop(sig=signal.SIGKILL)
        if getattr(self, "cut3", None):
            self.cut3.cut()
        if getattr(self, "redis", None):
            _stop(self.redis, timeout=10)


def _tools_missing():
    missing = [t for t in ("redis-server",) if not shutil.which(t)]
    if not Path(NGINX).exists():
        missing.append("nginx")
    if not NUDGE_BIN.exists():
        missing.append(str(NUDGE_BIN))
    return missing


@pytest.fixture
def tier(tmp_path):
    missing = _tools_missing()
    if missing:
        if os.environ.get("NUDGE_REQUIRE_TOOLS") == "1":
            pytest.fail(f"missing: {missing}")
        pytest.skip(f"missing: {missing}")
    t = Tier(tmp_path)
    t.published = 0
    try:
        yield t.start()
    finally:
        t.stop()
        logs = "\n".join(n.log() for n in getattr(t, "nodes", []))
        assert TOKEN not in logs, "a node logged the client's Authorization token"


def publish(t, n=1, timeout=60):
    for _ in range(n):
        t.api.publish(1)
        t.published += 1
        t.wait_all_received(timeout)
    t.check_exactly_once()


def worst_polls_per_second(t):
    """The most polls nginx received in any one second (its access log has whole seconds)."""
    log = (t.tmp / "nginx" / "logs" / "access.log").read_text()
    seconds = re.findall(r"\[([^\]]+)\] \"GET /subscribe\"", log)
    return max((seconds.count(s) for s in set(seconds)), default=0)


def busiest(t):
    return max((n for n in t.nodes if n.proc), key=lambda n: n.metric("nudge_parked_polls"))


def test_public_hosts_route_by_host_and_unknown_hosts_get_404(tier):
    node, url = tier.register()
    status, body = http_json("GET", url + "&dont_block=true")
    assert (status, body) == (200, {"message": "no_change"})
    # The same path on another node's host: that node does not know the channel.
    other = url.replace(f"127.0.1.{node}:", f"127.0.1.{node % NODES + 1}:")
    assert http_json("GET", other + "&dont_block=true") == (200, {"message": "max_retries"})
    status, body = http_json("GET", url + "&dont_block=true", headers={"Host": "nope.example"})
    assert status == 404 and body["code"] == "not_found"


def test_registrations_spread_and_a_publish_to_any_node_reaches_all(tier):
    channels = {}
    for _ in range(2 * NODES):
        node, url = tier.register()
        channels.setdefault(node, url)
    assert set(channels) == set(range(1, NODES + 1)), channels
    for sender in tier.nodes:
        status, body = http_json("POST", sender.internal + "/v1/publish", {"topic": "t"})
        assert status == 200, (status, body)
        for node, url in channels.items():
            # Through nginx's public host of the channel's node; the bus carried the publish.
            wait_until(lambda: http_json("GET", url + "&dont_block=true") == (200, {"message": "new_change"}),
                       10, what=f"node{node}'s channel to see node{sender.n}'s publish")
            assert http_json("GET", url + "&dont_block=true") == (200, {"message": "no_change"})


def test_readyz_takes_a_node_out_of_the_internal_pool_while_its_bus_is_down(tier):
    node3 = tier.nodes[2]
    tier.cut3.cut()
    wait_until(lambda: not node3.ready(), 15, what="node3's /readyz to answer 503 with its bus down")
    for _ in range(3 * NODES):
        assert tier.register()[0] != 3
        status, body = http_json("POST", tier.lb_internal + "/v1/publish", {"topic": "t"})
        assert status == 200, (status, body)  # node3 would answer 503 bus_unavailable
    tier.cut3.restore()
    node3.wait_ready(timeout=20)
    wait_until(lambda: tier.register()[0] == 3, 20, interval=0.3, what="node3 back in the internal pool")


def test_sdks_steady_changes_published_through_any_node(tier):
    tier.start_clients(ALL_SDKS)
    tier.wait_parked(len(ALL_SDKS))
    publish(tier, 3)  # through nginx's internal address
    for node in tier.nodes:  # and straight to each node
        tier.api.point_at(node.internal)
        publish(tier, 1)
    tier.api.point_at(tier.lb_internal)
    publish(tier, 2)


def test_sdks_node_drained_and_restarted(tier):
    tier.start_clients(RECOVERING_SDKS)
    tier.wait_parked(len(RECOVERING_SDKS))
    publish(tier, 2)
    node = busiest(tier)
    assert node.stop(signal.SIGTERM) == 0, "a node drains and exits 0 on SIGTERM"
    publish(tier, 2, timeout=90)  # reaches the clients whose node is gone once they re-register
    tier.restart(node)
    publish(tier, 2, timeout=90)
    # No hot loop from any client (three of them; nginx holds a channel to 2 polls/s).
    assert worst_polls_per_second(tier) <= 12, worst_polls_per_second(tier)


def test_sdks_node_killed(tier):
    tier.start_clients(RECOVERING_SDKS)
    tier.wait_parked(len(RECOVERING_SDKS))
    publish(tier, 2)
    busiest(tier).stop(signal.SIGKILL)
    publish(tier, 3, timeout=90)
    assert worst_polls_per_second(tier) <= 12, worst_polls_per_second(tier)
