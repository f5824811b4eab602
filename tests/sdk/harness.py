"""Processes the SDK tests run: nudge, the Box-shaped main API, and one SDK client.

Every process is started on 127.0.0.1 with port 0 (or a port it picked) and is
stopped by the test's teardown; every wait polls an observable condition until
a deadline.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
NUDGE_BIN = Path(os.environ.get("NUDGE_BIN", REPO / "target" / "release" / "nudge"))
MAIN_API = REPO / "examples" / "box_main_api.py"
VENV_GEN = Path(os.environ.get("SDK_VENV", HERE / ".venv"))
VENV_V3 = Path(os.environ.get("SDK_VENV_BOXSDK3", HERE / ".venv-boxsdk3"))

# The bearer token every SDK sends, to the main API and (unasked) to nudge.
# Distinctive, so that the tests can check nudge never logs it.
TOKEN = "nudge-sdk-test-token-4f8a2c9e71"

CLIENTS = {
    # id: (label for reports, command)
    "boxsdk-3.9.2": ("Python boxsdk 3.9.2", [str(VENV_V3 / "bin" / "python"), str(HERE / "clients" / "py_boxsdk3.py")]),
    "boxsdk-10.18.0": ("Python boxsdk 10.18.0 (box_sdk_gen)", [str(VENV_GEN / "bin" / "python"), str(HERE / "clients" / "py_boxsdk10.py")]),
    "box-node-sdk-3.8.2": ("Node box-node-sdk 3.8.2", ["node", str(HERE / "node" / "box3.js")]),
    "box-node-sdk-10.12.0": ("Node box-node-sdk 10.12.0", ["node", str(HERE / "node" / "box10.js")]),
}


def wait_until(cond, timeout, interval=0.05, what="condition"):
    """Poll cond() until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def http_json(method, url, body=None, timeout=10, headers=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw.strip() else None)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw


def _stop(proc, sig=signal.SIGTERM, timeout=10):
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(sig)
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


def _read_pid(path):
    try:
        return int(Path(path).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _running(pid):
    """pid is a live process (not gone, not a zombie waiting for its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _stop_adopted(pid, timeout):
    """Stop a process that is not our child (it was started by an upgrade): SIGTERM,
    then SIGKILL after timeout. Returns 0 when it ended on SIGTERM."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return 0
    try:
        wait_until(lambda: not _running(pid), timeout, what=f"process {pid} to exit")
        return 0
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        return -signal.SIGKILL


ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Nudge:
    """One nudge process; its stderr goes to a file that is read for the bound addresses."""

    def __init__(self, log_path, args, env=None):
        self.log_path = Path(log_path)
        self.args = list(args)
        self.env = env
        self.proc = None
        self.adopted_pid = None  # the process serving after an upgrade in place (not our child)
        self.public = None
        self.internal = None

    def start(self, timeout=20):
        if not NUDGE_BIN.exists():
            raise RuntimeError(f"{NUDGE_BIN} is missing: build it with cargo build --release")
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "debug,nudge=trace")
        env.update(self.env or {})
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(NUDGE_BIN), "--listen", "127.0.0.1:0", "--internal-listen", "127.0.0.1:0", *self.args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, env=env,
        )

        def bound():
            if self.proc.poll() is not None:
                raise RuntimeError(f"nudge exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            text = self.log()
            pub = re.search(r"listening public=(\S+)", text)
            internal = re.search(r"listening internal=(\S+)", text)
            return (pub and internal) and (pub.group(1), internal.group(1))

        pub, internal = wait_until(bound, timeout, what="nudge to log its addresses")
        self.public = pub.rstrip(",;")
        self.internal = "http://" + internal.rstrip(",;")
        return self

    @property
    def public_port(self):
        return int(self.public.rsplit(":", 1)[1])

    def log(self):
        try:
            return ANSI.sub("", self.log_path.read_text(errors="replace"))
        except FileNotFoundError:
            return ""

    def stop(self, timeout=20):
        if self.proc is None:
            return None
        code = _stop(self.proc, timeout=timeout)
        if self.adopted_pid is not None:
            code = _stop_adopted(self.adopted_pid, timeout)
        self._log.close()
        return code

    def upgrade(self, pid_file, on_signal=None, timeout=20):
        """SIGUSR2: the node starts its binary again and hands it everything; on_signal()
        runs right after the signal is sent. Waits for the old process to exit (0 once
        the new one has taken over) and for the pid file to name the new one, which
        stop() then stops. Returns the old process's exit code."""
        old = self.adopted_pid or self.proc.pid
        os.kill(old, signal.SIGUSR2)
        if on_signal:
            on_signal()
        if old == self.proc.pid:
            code = self.proc.wait(timeout)
        else:
            wait_until(lambda: not _running(old), timeout, what="the old process to exit")
            code = 0  # not our child: its exit code is not ours to read; the log says it
        new = wait_until(lambda: _read_pid(pid_file) not in (None, old) and _read_pid(pid_file),
                         timeout, what="the pid file to name the new process")
        self.adopted_pid = new
        return code

    def post(self, path, body):
        return http_json("POST", self.internal + path, body)

    def get(self, path):
        return http_json("GET", self.internal + path)

    def metrics(self):
        """nudge's /metrics as {"name{labels}": value}."""
        with urllib.request.urlopen(self.internal + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                try:
                    out[key] = float(value)
                except ValueError:
                    pass
        return out


class MainApi:
    """examples/box_main_api.py in its own process."""

    def __init__(self, log_path, nudge_internal, extra_args=()):
        self.log_path = Path(log_path)
        self.nudge_internal = nudge_internal
        self.extra_args = list(extra_args)
        self.proc = None
        self.url = None

    def start(self, timeout=20):
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(MAIN_API), "--port", "0", "--nudge-internal", self.nudge_internal,
             *self.extra_args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )
        line = {}

        def read():
            line["v"] = self.proc.stdout.readline()

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        m = re.search(r"listening on (http://\S+)", line.get("v") or "")
        if not m:
            _stop(self.proc)
            raise RuntimeError(f"main API did not start: {line.get('v')!r}")
        self.url = m.group(1)
        return self

    def publish(self, count=1):
        status, body = http_json("POST", self.url + "/test/events", {"count": count})
        assert status == 200, (status, body)
        return body

    def stats(self):
        status, body = http_json("GET", self.url + "/test/stats")
        assert status == 200, (status, body)
        return body

    def client_requests(self):
        """The requests the SDK made (Box's routes), not the test's own."""
        return [r for r in self.stats()["requests"] if r["path"].startswith("/2.0/")]

    def point_at(self, nudge_internal):
        status, body = http_json("POST", self.url + "/test/nudge", {"internal": nudge_internal})
        assert status == 200, (status, body)

    def stop(self):
        if self.proc is None:
            return None
        code = _stop(self.proc, timeout=5)
        self._log.close()
        return code


class Client:
    """One SDK event stream in a subprocess, reporting JSON lines."""

    def __init__(self, kind, api_url, log_path, max_seconds=240):
        self.kind = kind
        self.label, cmd = CLIENTS[kind]
        self.cmd = [*cmd, "--api", api_url, "--token", TOKEN, "--max-seconds", str(max_seconds)]
        self.log_path = Path(log_path)
        self.lines = []
        self.lock = threading.Lock()
        self.proc = None

    def start(self):
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, cwd=str(HERE))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                obj = {"kind": "stdout", "line": line.rstrip()}
            with self.lock:
                self.lines.append(obj)

    def of_kind(self, kind):
        with self.lock:
            return [l for l in self.lines if l.get("kind") == kind]

    def event_ids(self):
        return [l["event_id"] for l in self.of_kind("event")]

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if self.proc is None:
            return None
        code = _stop(self.proc, timeout=5)
        self.reader.join(5)
        self._log.close()
        return code

    def stderr(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
