"""Test fixture: a real HTTP server on 127.0.0.1 that speaks the OpenAI chat API and fails on purpose.

It answers ``GET /v1/models`` and ``POST /v1/chat/completions``. Sample j of a request is
``"<last message content> #<seed>.<j>"`` (choices sent out of index order on purpose), so a
stage run against it is reproducible and tests can check order, n and seeds.

Failures, all counted in `injected` (mode -> count):

- scripted: ``fail(mode, times)`` queues the next `times` chat requests to fail as `mode`;
- random: ``failure_rate=0.3`` fails that share of chat requests, mode drawn from `modes`. The
  draw is seeded by (seed, request messages, request seed, how often that request was seen),
  so it does not depend on thread timing: the same stage against the same server fails the
  same requests the same way;
- down: ``down()`` closes the listening socket (connection refused) until ``up()`` reopens it
  on the same port; ``down("503")`` keeps it open but answers 503 to everything;
  ``down_after(k)`` goes down by itself after k more successful chat answers.

Modes: "500", "429" (with ``Retry-After: retry_after``), "timeout" (sleeps `timeout_sleep_s`,
longer than the client's timeout, before answering), "truncated" (200 with a cut JSON body),
"empty" (200 with "" content), "400" (permanent).

    with FlakyChatServer(failure_rate=0.3, seed=1) as server:
        OpenAIGenerator(server.base_url, "fake").generate(...)
    server.injected   # {"500": 3, "timeout": 1, ...}
"""
from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODES = ("500", "429", "timeout", "truncated", "empty")


class FlakyChatServer:
    def __init__(self, failure_rate: float = 0.0, modes: tuple[str, ...] = MODES, seed: int = 0,
                 retry_after: str = "0", timeout_sleep_s: float = 1.0):
        self.failure_rate = failure_rate
        self.modes = tuple(modes)
        self.seed = seed
        self.retry_after = retry_after
        self.timeout_sleep_s = timeout_sleep_s
        self.requests: list[dict] = []     # every chat request: body, auth, time, outcome ("ok" or a mode)
        self.injected: Counter = Counter()  # failures answered, by mode
        self.failures: deque[str] = deque()
        self.lock = threading.Lock()
        self._seen: Counter = Counter()
        self._down: str | None = None       # None | "refuse" | "503"
        self._down_after: int | None = None
        self._port = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._listen()
        self.base_url = f"http://127.0.0.1:{self._port}/v1"

    # -- control ------------------------------------------------------------------------------

    def fail(self, mode: str, times: int = 1) -> None:
        """The next `times` chat requests fail as `mode` (before any random failure)."""
        with self.lock:
            self.failures.extend([mode] * times)

    def down(self, mode: str = "refuse") -> None:
        """Stop answering: "refuse" closes the port (connection refused), "503" answers 503."""
        assert mode in ("refuse", "503"), mode
        with self.lock:
            self._down = mode
            self._down_after = None
        if mode == "refuse":
            self._close()

    def down_after(self, ok_answers: int) -> None:
        """Go down (connection refused) by itself after `ok_answers` more successful chat answers."""
        with self.lock:
            self._down_after = ok_answers

    def up(self) -> None:
        """Answer again, on the same port."""
        with self.lock:
            was, self._down = self._down, None
        if was == "refuse" or self._httpd is None:
            self._close()
            self._listen()

    def __enter__(self) -> "FlakyChatServer":
        return self

    def __exit__(self, *exc) -> None:
        self._close()

    # -- serving ------------------------------------------------------------------------------

    def _decide(self, body: dict) -> str | None:
        """Under self.lock: the failure mode for this request, or None to answer normally."""
        if self.failures:
            return self.failures.popleft()
        if self.failure_rate <= 0:
            return None
        key = json.dumps([body.get("messages"), body.get("seed"), body.get("n")], sort_keys=True)
        nth = self._seen[key]
        self._seen[key] += 1
        digest = hashlib.sha256(f"{self.seed}|{nth}|{key}".encode()).digest()
        rng = random.Random(digest)
        return rng.choice(self.modes) if rng.random() < self.failure_rate else None

    def _listen(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def _send(self, code: int, body: bytes, headers=()) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in headers:
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (its timeout) before we answered
                    pass

            def _refused(self) -> bool:
                """Going down: drop the connection unanswered, as a dying server does."""
                if fake._down == "refuse":
                    self.close_connection = True
                    return True
                if fake._down == "503":
                    self._send(503, b'{"error": "server unavailable"}')
                    return True
                return False

            def do_GET(self):
                if self._refused():
                    return
                if self.path == "/v1/models":
                    self._send(200, json.dumps({"object": "list", "data": [{"id": "fake"}]}).encode())
                else:
                    self._send(404, b"{}")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                entry = {"body": body, "auth": self.headers.get("Authorization"), "t": time.monotonic()}
                with fake.lock:
                    fake.requests.append(entry)
                    down = fake._down
                    mode = None if down else fake._decide(body)
                entry["outcome"] = f"down:{down}" if down else (mode or "ok")
                if self._refused():
                    return
                if mode:
                    with fake.lock:
                        fake.injected[mode] += 1
                if mode == "500":
                    return self._send(500, b'{"error": "boom"}')
                if mode == "429":
                    return self._send(429, b'{"error": "slow down"}', [("Retry-After", fake.retry_after)])
                if mode == "400":
                    return self._send(400, b'{"error": "context too long"}')
                if mode == "timeout":
                    time.sleep(fake.timeout_sleep_s)   # longer than the client waits
                last = body["messages"][-1]["content"]
                texts = ["" if mode == "empty" else f"{last} #{body.get('seed')}.{j}" for j in range(body["n"])]
                # the second choice ran into max_tokens: what a cut answer looks like on the wire
                resp = {"choices": [{"index": j, "message": {"role": "assistant", "content": t},
                                     "finish_reason": "length" if j == 1 else "stop"}
                                    for j, t in reversed(list(enumerate(texts)))],  # out of order on purpose
                        "usage": {"completion_tokens": 3 * body["n"]}}
                raw = json.dumps(resp).encode()
                if mode == "truncated":
                    raw = raw[: len(raw) // 2]
                go_down = False
                if mode is None:
                    with fake.lock:
                        if fake._down_after is not None:
                            fake._down_after -= 1
                            if fake._down_after <= 0:   # refuse from now on, even before the port closes
                                fake._down, fake._down_after, go_down = "refuse", None, True
                self._send(200, raw)
                if go_down:
                    threading.Thread(target=fake._close, daemon=True).start()

        # Same port on up(): the client's base_url (and a stage's cache key) must not change.
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    def _close(self) -> None:
        with self.lock:
            httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
