"""The HTTP client the SDK sends through: DirectClient's requests, aiohttp's errors as httpx's, compressed replies,
redirects."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import httpx2
import pytest

from retroformer.errors import ConfigError, LLMError
from retroformer.llm import LLMConfig
from retroformer.llm.base import GenerationRequest
from retroformer.llm.openai_backend import OpenAIBackend
from retroformer.llm.transport import AiohttpTransport, DirectClient, Lanes, _httpx_error

REPLY = {"choices": [{"message": {"content": "Action: open[amber]"}, "finish_reason": "stop"}], "usage": {}}


class _Handler(BaseHTTPRequestHandler):
    """Answers every POST as the server's ``mode`` says: ``gzip`` (a compressed completion) or ``redirect``."""

    mode = "gzip"
    seen: list[dict[str, str]] = []

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass

    def do_POST(self):  # noqa: N802 - http.server naming
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).seen.append({name.lower(): value for name, value in self.headers.items()})
        if self.mode == "redirect":
            self.send_response(301)
            self.send_header("Location", "https://vault.example/v2/chat/completions")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = gzip.compress(json.dumps(REPLY).encode())
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


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


def _backend(url: str, http_client: str) -> OpenAIBackend:
    cfg = LLMConfig(backend="openai", model="fake-model", base_url=url, http_client=http_client, max_retries=0)
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


@pytest.mark.parametrize("server", ["redirect"], indirect=True)
@pytest.mark.parametrize("http_client", ["aiohttp", "httpx"])
def test_a_redirect_is_not_followed_and_the_error_says_where_it_points(server, http_client):
    url, handler = server
    with pytest.raises(LLMError, match=r"redirected to https://vault.example/v2/chat/completions \(HTTP 301\)"):
        asyncio.run(_generate(_backend(url, http_client)))
    assert len(handler.seen) == 1


def test_direct_client_builds_the_sdks_request_with_every_header_once():
    client = DirectClient(Lanes("http://127.0.0.1:9/v1"), timeout_s=7.0)
    body = b'{"model": "m"}'
    sdk_headers = [("Authorization", "Bearer k"), ("Accept", "application/json"), ("User-Agent", "sdk/1")]
    request = client.build_request("POST", "http://127.0.0.1:9/v1/chat/completions", headers=sdk_headers, content=body)
    names = [name.lower() for name, _ in request.headers.multi_items()]
    assert sorted(names) == sorted(set(names))  # no header twice
    assert request.headers["host"] == "127.0.0.1:9"
    assert request.headers["content-length"] == str(len(body))
    assert request.headers["accept"] == "application/json"  # the SDK's value, not httpx's default
    assert request.headers["user-agent"] == "sdk/1"
    assert "accept-encoding" in request.headers  # httpx's default, which the SDK did not name
    assert request.content == body and request.method == "POST"
    assert request.extensions["timeout"] == httpx2.Timeout(7.0).as_dict()
    # The same request as httpx's own build_request would make.
    reference = httpx2.AsyncClient(timeout=7.0).build_request(
        "POST", "http://127.0.0.1:9/v1/chat/completions", headers=sdk_headers, content=body
    )
    assert sorted(request.headers.multi_items()) == sorted(reference.headers.multi_items())
    assert request.url == reference.url
    # What the fast path does not cover goes through httpx's own build_request.
    with_params = client.build_request("GET", "http://127.0.0.1:9/v1/models", params={"limit": "2"})
    assert with_params.url.params["limit"] == "2"


@pytest.mark.parametrize(
    "raised, expected",
    [
        (aiohttp.ServerDisconnectedError(), httpx2.ReadError),
        (aiohttp.ServerTimeoutError("read"), httpx2.ReadTimeout),
        (aiohttp.ConnectionTimeoutError("connect"), httpx2.ConnectTimeout),
        (asyncio.TimeoutError(), httpx2.ReadTimeout),
        (aiohttp.ClientPayloadError("cut"), httpx2.ReadError),
        (aiohttp.ClientOSError(104, "reset"), httpx2.NetworkError),
    ],
)
def test_aiohttp_errors_become_httpx_errors_the_sdk_maps(raised, expected):
    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    mapped = _httpx_error(raised, request)
    assert type(mapped) is expected
    assert mapped.request is request


def test_a_refused_connection_is_a_connect_error():
    transport = AiohttpTransport("http://127.0.0.1:9/v1", concurrency=2)

    async def send():
        try:
            await transport.handle_async_request(httpx2.Request("POST", "http://127.0.0.1:9/v1/x", content=b"{}"))
        finally:
            await transport.aclose()

    with pytest.raises(httpx2.ConnectError) as info:
        asyncio.run(send())
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectorError)


def test_a_given_transport_carries_every_request_with_the_sdks_headers():
    seen: list[httpx2.Request] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(200, json=REPLY)

    cfg = LLMConfig(backend="openai", model="fake-model", base_url="http://127.0.0.1:9/v1", max_retries=0)
    llm = OpenAIBackend(cfg, api_key="sk-test", transport=httpx2.MockTransport(answer))
    out = asyncio.run(_generate(llm))
    assert out.text == "Action: open[amber]"
    (request,) = seen
    assert str(request.url) == "http://127.0.0.1:9/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert json.loads(request.content)["messages"] == [{"role": "user", "content": "which door?"}]
    assert not [name for name in request.headers if name.lower().startswith("x-stainless")]


def test_without_aiohttp_the_error_says_how_to_install_it_or_use_httpx(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "aiohttp", None)  # import aiohttp now raises ImportError
    cfg = LLMConfig(backend="openai", model="fake-model", base_url="http://127.0.0.1:9/v1", http_client="aiohttp")
    with pytest.raises(ConfigError, match=r"pip install aiohttp==.*or set llm.http_client: httpx"):
        asyncio.run(_generate(OpenAIBackend(cfg, api_key="sk-test")))
