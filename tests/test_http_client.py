"""The SDK's own HTTP client under the backend: compressed replies, redirects refused with where they point, a
server's error message in the error, bounded reads of large and compressed bodies, and no library internals
subclassed."""

from __future__ import annotations

import asyncio
import gzip
import inspect
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import httpx2
import openai
import pytest

from retroformer.errors import ConfigError, LLMError
from retroformer.llm import LLMConfig, openai_backend
from retroformer.llm.base import GenerationRequest
from retroformer.llm.openai_backend import MAX_ERROR_BODY_BYTES, MAX_RESPONSE_BYTES, OpenAIBackend

REPLY = {"choices": [{"message": {"content": "Action: open[amber]"}, "finish_reason": "stop"}], "usage": {}}


class _Handler(BaseHTTPRequestHandler):
    """Answers every POST as the server's ``mode`` says."""

    mode = "gzip"
    seen: list[dict[str, str]] = []

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass

    def _send(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802 - http.server naming
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).seen.append({name.lower(): value for name, value in self.headers.items()})
        if self.mode == "redirect":
            self._send(301, b"", Location="https://vault.example/v2/chat/completions")
        elif self.mode == "gzip":
            self._send(200, gzip.compress(json.dumps(REPLY).encode()), Content_Encoding="gzip")
        elif self.mode == "gzip_bomb":  # a few kB on the wire, far more than MAX_RESPONSE_BYTES decompressed
            self._send(200, gzip.compress(b" " * (MAX_RESPONSE_BYTES + 4096)), Content_Encoding="gzip")
        elif self.mode == "huge_error":  # 1 MB of error text
            error = {"error": {"message": "overloaded " + "x" * 1_000_000, "type": "server_error"}}
            self._send(400, json.dumps(error).encode())
        elif self.mode == "error_message":
            self._send(404, json.dumps({"error": {"message": "The model `m` does not exist", "type": "nf"}}).encode())


@pytest.fixture
def server(request):
    handler = type("Handler", (_Handler,), {"mode": request.param, "seen": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def _backend(url: str, http_client: str = "aiohttp", **over) -> OpenAIBackend:
    cfg = LLMConfig(
        **{"backend": "openai", "model": "m", "base_url": url, "http_client": http_client, "max_retries": 0, **over}
    )
    return OpenAIBackend(cfg, api_key="sk-test")


async def _generate(llm: OpenAIBackend):
    try:
        return await llm.generate(GenerationRequest(prompt="which door?"))
    finally:
        await llm.aclose()


@pytest.mark.parametrize("server", ["gzip"], indirect=True)
@pytest.mark.parametrize("http_client", ["aiohttp", "httpx"])
def test_a_compressed_reply_is_decoded(server, http_client):
    url, handler = server
    out = asyncio.run(_generate(_backend(url, http_client)))
    assert out.text == "Action: open[amber]"
    (headers,) = handler.seen
    assert "gzip" in headers["accept-encoding"]


@pytest.mark.parametrize(
    "server, said",
    [
        # a redirect is not followed (it would resend the key elsewhere): the error says where it points
        ("redirect", r"redirected to https://vault.example/v2/chat/completions \(HTTP 301\)"),
        # a compressed reply larger than the cap decompressed is not read whole
        ("gzip_bomb", rf"larger than {MAX_RESPONSE_BYTES} bytes.*not retried"),
    ],
    indirect=["server"],
)
@pytest.mark.parametrize("http_client", ["aiohttp", "httpx"])
def test_a_redirect_or_an_oversized_reply_fails_once_without_a_retry(server, said, http_client):
    url, handler = server
    with pytest.raises(LLMError, match=said):
        asyncio.run(_generate(_backend(url, http_client, max_retries=3)))
    assert len(handler.seen) == 1


@pytest.mark.parametrize("server", ["error_message"], indirect=True)
def test_the_servers_error_message_and_a_hint_are_in_the_error(server):
    url, _ = server
    with pytest.raises(LLMError, match=r"HTTP 404 \(The model `m` does not exist\); not retried: check llm.model"):
        asyncio.run(_generate(_backend(url)))


@pytest.mark.parametrize("server", ["huge_error"], indirect=True)
def test_a_megabyte_error_body_gives_an_error_of_a_few_hundred_characters(server):
    url, _ = server
    with pytest.raises(LLMError) as info:
        asyncio.run(_generate(_backend(url)))
    message = str(info.value)
    assert "HTTP 400 (" in message and "overloaded xxx" in message and len(message) < 2 * 1024
    assert MAX_ERROR_BODY_BYTES <= 64 * 1024


def test_a_given_transport_carries_every_request():
    seen: list[httpx2.Request] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(200, json=REPLY)

    cfg = LLMConfig(backend="openai", model="m", base_url="http://127.0.0.1:9/v1", max_retries=0)
    llm = OpenAIBackend(cfg, api_key="sk-test", transport=httpx2.MockTransport(answer))
    out = asyncio.run(_generate(llm))
    assert out.text == "Action: open[amber]"
    (request,) = seen
    assert str(request.url) == "http://127.0.0.1:9/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert json.loads(request.content)["messages"] == [{"role": "user", "content": "which door?"}]


def test_without_aiohttp_the_error_says_how_to_install_it_or_use_httpx(monkeypatch):
    def missing(**kwargs):
        raise RuntimeError("To use the aiohttp client you must have installed the package with the `aiohttp` extra")

    monkeypatch.setattr(openai_backend.openai, "DefaultAioHttpClient", missing)
    with pytest.raises(ConfigError, match=r"pip install aiohttp==.*or set llm.http_client: httpx"):
        asyncio.run(_generate(_backend("http://127.0.0.1:9/v1")))


def test_no_class_of_the_backend_subclasses_a_class_of_the_http_libraries():
    libraries = ("httpx2", "httpx", "openai", "aiohttp")
    for _, cls in inspect.getmembers(openai_backend, inspect.isclass):
        if cls.__module__ == openai_backend.__name__:
            bases = [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] in libraries]
            assert not bases, f"{cls.__name__} subclasses {bases}"
    assert openai and aiohttp  # the libraries checked are the ones installed
