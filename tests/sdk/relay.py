"""A byte-for-byte TCP relay in front of nudge's public listener that also reads along.

nudge is started with --public-url pointing here, so every channel URL an SDK
gets leads through this relay. It forwards the bytes unchanged both ways (one
upstream connection per client connection, closed together), and records each
HTTP request it sees (time, method, target, whether an Authorization header
came along) and the answer to it (time, status, nudge's "message").

That gives the tests an SDK's exact traffic to nudge without touching nudge or
the SDK, and lets a test take nudge away and bring a new node back on the same
address (pause: stop listening, so new connections are refused as by a stopped
server; set_target; resume).
"""

import asyncio
import json
import threading
import time


class _Parser:
    """Incremental HTTP/1.1 message-head reader for one direction of a connection."""

    def __init__(self, on_message):
        self.buf = b""
        self.on_message = on_message  # (head_lines, body_bytes)
        self.state = "head"
        self.need = 0
        self.head = None
        self.body = b""
        self.chunked = False
        self.broken = False

    def feed(self, data):
        if self.broken:
            return
        self.buf += data
        try:
            while self._step():
                pass
        except Exception:  # never let bookkeeping disturb the relay
            self.broken = True

    def _step(self):
        if self.state == "head":
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return False
            lines = self.buf[:i].decode("latin-1").split("\r\n")
            self.buf = self.buf[i + 4:]
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            self.head = (lines[0], headers)
            self.body = b""
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self.state = "chunk-size"
            else:
                self.need = int(headers.get("content-length") or 0)
                self.state = "body"
            return True
        if self.state == "body":
            take = min(self.need, len(self.buf))
            self.body += self.buf[:take]
            self.buf = self.buf[take:]
            self.need -= take
            if self.need:
                return False
            self.state = "head"
            self.on_message(self.head, self.body)
            return True
        if self.state == "chunk-size":
            i = self.buf.find(b"\r\n")
            if i < 0:
                return False
            size = int(self.buf[:i].split(b";")[0], 16)
            self.buf = self.buf[i + 2:]
            if size == 0:
                self.state = "trailer"
            else:
                self.need = size + 2
                self.state = "chunk"
            return True
        if self.state == "chunk":
            if len(self.buf) < self.need:
                return False
            self.body += self.buf[: self.need - 2]
            self.buf = self.buf[self.need:]
            self.state = "chunk-size"
            return True
        if self.state == "trailer":
            i = self.buf.find(b"\r\n\r\n") if not self.buf.startswith(b"\r\n") else 0
            if i < 0:
                return False
            self.buf = self.buf[i + (2 if i == 0 else 4):]
            self.state = "head"
            self.on_message(self.head, self.body)
            return True
        return False


class Relay:
    def __init__(self, host="127.0.0.1"):
        self.host = host
        self.port = None
        self.target = None  # (host, port)
        self.lock = threading.Lock()
        self.records = []  # one dict per request
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.conns = set()
        self.thread = threading.Thread(target=self.loop.run_forever, name="relay", daemon=True)
        self.thread.start()

    # -- public API (thread-safe, called from the test thread) ----------------
    def start(self):
        self._call(self._listen(0))
        return self.port

    def set_target(self, host, port):
        with self.lock:
            self.target = (host, port)

    def pause(self):
        """Stop listening: new connections are refused, open ones stay."""
        self._call(self._close_server())

    def resume(self):
        self._call(self._listen(self.port))

    def drop_connections(self):
        """Close every relayed connection at once (as a crashed server would)."""
        self._call(self._drop())

    def close(self):
        try:
            self._call(self._close_server())
            self._call(self._drop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    def requests(self):
        with self.lock:
            return [dict(r) for r in self.records]

    # -- internals ------------------------------------------------------------
    def _call(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _listen(self, port):
        self.server = await asyncio.start_server(self._serve, self.host, port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _close_server(self):
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _drop(self):
        for w in list(self.conns):
            w.transport.abort()

    async def _serve(self, creader, cwriter):
        with self.lock:
            target = self.target
            self.connections += 1
            conn_id = self.connections
        if target is None:
            cwriter.transport.abort()
            return
        try:
            ureader, uwriter = await asyncio.open_connection(*target)
        except OSError:
            cwriter.transport.abort()  # upstream refused: so do we
            return
        self.conns.update((cwriter, uwriter))
        pending = []  # records waiting for their answer, in order (no pipelining in practice)

        def on_request(head, body):
            line, headers = head
            parts = line.split(" ")
            rec = {
                "t": time.time(),
                "conn": conn_id,
                "upstream": target[1],
                "method": parts[0],
                "target": parts[1] if len(parts) > 1 else "",
                "authorization": "authorization" in headers,
                "user_agent": headers.get("user-agent", ""),
                "t_answer": None,
                "status": None,
                "message": None,
            }
            with self.lock:
                self.records.append(rec)
            pending.append(rec)

        def on_response(head, body):
            line, headers = head
            if not pending:
                return
            rec = pending.pop(0)
            status = int(line.split(" ")[1])
            try:
                msg = json.loads(body).get("message")
            except Exception:
                msg = None
            with self.lock:
                rec["t_answer"] = time.time()
                rec["status"] = status
                rec["message"] = msg

        async def pipe(reader, writer, parser):
            try:
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    parser.feed(data)
                    writer.write(data)
                    await writer.drain()
            except (OSError, asyncio.CancelledError):
                writer.transport.abort()
                return
            writer.close()  # flushes what is buffered, then FIN

        up = asyncio.ensure_future(pipe(creader, uwriter, _Parser(on_request)))
        down = asyncio.ensure_future(pipe(ureader, cwriter, _Parser(on_response)))
        try:
            await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        finally:
            # One side is gone: the connection is over for the other side too.
            for w in (cwriter, uwriter):
                w.close()
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            for w in (cwriter, uwriter):
                self.conns.discard(w)
