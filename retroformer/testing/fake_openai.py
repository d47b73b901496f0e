"""A small OpenAI-compatible HTTP server on 127.0.0.1 for tests and throughput benchmarks.

    server = FakeOpenAIServer(reply=lambda prompt: "Thought: done", latency_s=0.2, faults=["429", "500"])
    with server as base_url:  # e.g. "http://127.0.0.1:41234/v1"
        ...  # point an OpenAI client at base_url
    assert server.max_in_flight <= 8

It serves ``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models`` from a
``ThreadingHTTPServer`` in a background thread (one thread per connection, so many concurrent clients are fine).
Replies come from a function of the prompt; stop sequences are applied server-side, and more than four are rejected
with a 400 as OpenAI does. Faults are scripted: each request consumes the next entry of ``faults`` (``None`` or
``"ok"`` means answer normally), so a test states exactly which attempt fails and how.

Fault kinds: ``timeout`` (hold the request past the client's timeout), ``429`` (with ``Retry-After``), ``500``,
``503``, ``408``, ``400``, ``401``, ``reset`` (close the socket without a response), ``malformed`` (200 with a body that is
not JSON), ``empty`` (200 with no choices), ``null_content`` (200 with a choice whose content is null), ``drip`` (200
headers, then one byte of the body per ``drip_interval_s`` until the client leaves: no read ever times out),
``500_huge`` (a 500 whose error message is a megabyte long).

``outage(seconds)`` answers every request of a time window with one fault kind (a total outage).

Requests are recorded (path, headers, JSON body, arrival time, the client's port: one per connection) for assertions. The server never echoes the
``Authorization`` header in any response.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

FAULT_KINDS = (
    "ok", "timeout", "429", "500", "503", "400", "401", "408", "reset", "malformed", "empty", "null_content", "drip",
    "500_huge",
)  # fmt: skip

#: OpenAI rejects requests with more than this many stop sequences.
MAX_STOP_SEQUENCES = 4


@dataclass(frozen=True)
class Fault:
    """One scripted fault. ``retry_after`` is the ``Retry-After`` header of a 429 or 503 (text; None omits it)."""

    kind: str
    retry_after: str | None = "0"

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")


@dataclass
class RecordedRequest:
    """What the server received: method, path, headers (as sent), parsed JSON body, arrival time (monotonic), and the
    client's port (each connection has its own: how many connections a client opened, and whether it reused them)."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    arrived: float
    fault: str = "ok"
    client_port: int = 0


def _default_reply(prompt: str) -> str:
    return "Thought: I should look again.\nAction: finish[fake]"


def _count_tokens(text: str) -> int:
    # Whitespace words stand in for tokens: deterministic and enough for usage accounting tests.
    return len(text.split())


def _cut_at_stop(text: str, stop: list[str]) -> str:
    cut = len(text)
    for s in stop:
        i = text.find(s) if s else -1
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


@dataclass
class _State:
    reply: Callable[[str], str]
    latency_s: float
    timeout_hold_s: float
    faults: list[Fault]
    drip_interval_s: float = 0.2
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    requests: list[RecordedRequest] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    outage_until: float = 0.0
    outage_kind: str = "503"


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections alive, as real servers do; every response carries Content-Length.
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without TCP_NODELAY, Nagle's algorithm holds the body until the
        # client's delayed ACK (~40 ms per request), which would swamp any latency a benchmark sets.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        logger.debug("fake openai: " + format, *args)

    # --- helpers ---
    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send_raw(status, json.dumps(payload).encode(), headers)

    def _send_raw(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, etype: str, headers: dict[str, str] | None = None) -> None:
        self._send_json(status, {"error": {"message": message, "type": etype, "code": None}}, headers)

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout makes close() send a RST: the client sees a reset, not a clean EOF.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _drip(self, state: _State) -> None:
        """A 200 whose body comes one byte per ``drip_interval_s``, for as long as the client reads (or the server
        stops): each read gets a byte well within any per-read timeout."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(1 << 30))
        self.end_headers()
        self.wfile.flush()
        while not state.stopping.wait(state.drip_interval_s):
            self.wfile.write(b" ")
            self.wfile.flush()

    # --- endpoints ---
    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        state = self.server.state
        with state.lock:
            state.requests.append(
                RecordedRequest(
                    "GET", self.path, dict(self.headers), None, time.monotonic(), client_port=self.client_address[1]
                )
            )
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(
                200, {"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "me"}]}
            )
        else:
            self._error(404, f"no route GET {self.path}", "not_found")

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        state = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = None
        with state.lock:
            if time.monotonic() < state.outage_until:
                fault = Fault(state.outage_kind, retry_after=None)
            else:
                fault = state.faults.pop(0) if state.faults else Fault("ok")
            state.requests.append(
                RecordedRequest(
                    "POST", self.path, dict(self.headers), body, time.monotonic(), fault.kind, self.client_address[1]
                )
            )
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            self._serve(state, body, fault)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # The client gave up (e.g. its timeout fired while we held a `timeout` fault): nothing to answer.
            logger.debug("fake openai: client went away: %s", exc)
            self.close_connection = True
        finally:
            with state.lock:
                state.in_flight -= 1

    def _serve(self, state: _State, body: dict[str, Any] | None, fault: Fault) -> None:
        if fault.kind == "timeout":
            state.stopping.wait(state.timeout_hold_s)
            self._reset()
            return
        if fault.kind == "reset":
            self._reset()
            return
        if fault.kind == "drip":
            self._drip(state)
            return
        if state.latency_s > 0:
            state.stopping.wait(state.latency_s)
        if fault.kind == "429":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            self._error(429, "Rate limit reached (fake)", "rate_limit_exceeded", headers)
            return
        if fault.kind == "503":  # overloaded servers send Retry-After with a 503 too
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            self._error(503, "scripted 503 (fake)", "server_error", headers)
            return
        if fault.kind == "500_huge":
            self._error(500, "overloaded " + "x" * 1_000_000, "server_error")
            return
        if fault.kind in ("500", "400", "401", "408"):
            self._error(int(fault.kind), f"scripted {fault.kind} (fake)", "server_error")
            return
        if fault.kind == "malformed":
            self._send_raw(200, b'{"id": "cmpl-broken", "choices": [')
            return
        path = self.path.rstrip("/")
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self._error(404, f"no route POST {self.path}", "not_found")
            return
        if body is None or "model" not in body:
            self._error(400, "request body must be JSON with a 'model' field", "invalid_request_error")
            return
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        if len(stop) > MAX_STOP_SEQUENCES:
            self._error(400, f"'stop' allows at most {MAX_STOP_SEQUENCES} sequences", "invalid_request_error")
            return
        chat = path.endswith("chat/completions")
        if chat:
            messages = body.get("messages") or []
            prompt = "\n".join(str(m.get("content") or "") for m in messages)
            user = next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")
        else:
            prompt = user = str(body.get("prompt") or "")
        text = _cut_at_stop(state.reply(user), stop)
        words = text.split()
        max_tokens = body.get("max_tokens")
        finish = "stop"
        if isinstance(max_tokens, int) and len(words) > max_tokens:
            text, finish = " ".join(words[:max_tokens]), "length"
        usage = {
            "prompt_tokens": _count_tokens(prompt),
            "completion_tokens": _count_tokens(text),
            "total_tokens": _count_tokens(prompt) + _count_tokens(text),
        }
        if fault.kind == "empty":
            choices: list[dict[str, Any]] = []
        elif chat:
            content = None if fault.kind == "null_content" else text
            choices = [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}]
        else:
            choices = [{"index": 0, "text": None if fault.kind == "null_content" else text, "finish_reason": finish}]
        self._send_json(
            200,
            {
                "id": f"cmpl-{len(state.requests)}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": choices,
                "usage": usage,
            },
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # A deep listen backlog: benchmarks open hundreds of connections at once.
    request_queue_size = 512

    def __init__(self, state: _State) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state


class FakeOpenAIServer:
    """An OpenAI-compatible server on 127.0.0.1 (random free port); a context manager yielding its base URL."""

    def __init__(
        self,
        reply: Callable[[str], str] = _default_reply,
        latency_s: float = 0.0,
        faults: Iterable[Fault | str | None] = (),
        timeout_hold_s: float = 30.0,
    ) -> None:
        """``reply``: maps the prompt (the last user message in chat style) to the reply text. ``latency_s``: fixed
        delay before each answer. ``faults``: consumed one per POST request. ``timeout_hold_s``: how long a
        ``timeout`` fault holds the request (set it past the client's timeout; shutdown interrupts it)."""
        self.state = _State(reply=reply, latency_s=latency_s, timeout_hold_s=timeout_hold_s, faults=[])
        self.add_faults(faults)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    def add_faults(self, faults: Iterable[Fault | str | None]) -> None:
        """Append faults to the script (strings are fault kinds; ``None`` is a normal answer)."""
        parsed = [f if isinstance(f, Fault) else Fault("ok" if f is None else str(f)) for f in faults]
        with self.state.lock:
            self.state.faults.extend(parsed)

    def outage(self, seconds: float, kind: str = "503") -> None:
        """Answer every request of the next ``seconds`` with the fault ``kind`` (a total outage), from now."""
        Fault(kind)  # validates the kind
        with self.state.lock:
            self.state.outage_kind = kind
            self.state.outage_until = time.monotonic() + seconds

    @property
    def requests(self) -> list[RecordedRequest]:
        with self.state.lock:
            return list(self.state.requests)

    @property
    def max_in_flight(self) -> int:
        return self.state.max_in_flight

    @property
    def faults_left(self) -> int:
        with self.state.lock:
            return len(self.state.faults)

    def start(self) -> str:
        """Start serving in a background thread; returns the base URL (``http://127.0.0.1:<port>/v1``)."""
        if self._server is not None:
            raise RuntimeError("FakeOpenAIServer is already running; use one instance per `with` block")
        self.state.stopping.clear()
        self._server = _Server(self.state)
        host, port = self._server.server_address[:2]
        self.base_url = f"http://{host}:{port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        logger.debug("fake openai server on %s", self.base_url)
        return self.base_url

    def stop(self) -> None:
        """Stop serving; requests held by `timeout` faults or latency are released at once."""
        if self._server is None:
            return
        self.state.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
