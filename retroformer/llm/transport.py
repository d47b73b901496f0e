"""The HTTP client the OpenAI SDK sends through (``llm.http_client``), built for many short requests in flight.

The SDK takes any ``httpx2.AsyncClient`` as its ``http_client`` and calls two of its methods per request:
``build_request`` (with the absolute URL, every header, the body bytes and the timeout, all settled by the SDK) and
``send``. httpx's own implementations then merge the client's base URL, headers, cookies and query parameters into the
request again, and pass it through auth, redirect, event-hook and cookie layers and three stream wrappers before the
transport sees it; together with the SDK's vendored aiohttp transport (which hands httpx's ``Headers`` to aiohttp, an
O(n^2) walk of decodes) that was about a quarter of the client's CPU at concurrency 64 in a sampled profile; without
it a call costs 0.64-0.95 of the CPU it did (``bench/RESULTS.md`` section 7d).

:class:`DirectClient` keeps httpx's types and its transports' contract, and does only what a request built by the
SDK needs: the URL parsed once per distinct URL, the client's default headers added, the request handed straight to
the transport, the whole body read. Redirects are not followed (an API does not redirect a POST; a base URL that
does is reported with where it points, see ``OpenAIBackend``).

Transports (``llm.http_client``):

- ``aiohttp`` (default): :class:`AiohttpTransport`, one ``aiohttp`` session (HTTP parsed in C) keeping ``concurrency``
  connections alive; its errors become httpx's (a timeout is a timeout, a lost connection a network error), so the SDK
  raises its usual ``APITimeoutError`` / ``APIConnectionError``;
- ``httpx``: :class:`Lanes`, one httpx connection per request in flight, handed out in O(1).

Environment proxies (``HTTP(S)_PROXY``, ``ALL_PROXY``, ``NO_PROXY``) apply to both, as in httpx's default client.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlparse

import httpx2

#: Seconds an idle connection is kept alive.
KEEPALIVE_S = 5.0
#: Distinct URLs whose parsed form :class:`DirectClient` keeps (a backend sends to one).
_URL_CACHE_SIZE = 64


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """The process's one certificate store: loading it takes tens of milliseconds, and each event loop's client (and
    each of :class:`Lanes`' connections) would otherwise load its own."""
    return httpx2.create_ssl_context()


def proxy_for(base_url: str) -> str | None:
    """The proxy the environment names for ``base_url`` (``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``), as httpx's
    default client would use it: a transport given to an httpx client leaves the environment's proxies out."""
    parsed = urlparse(base_url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if proxy is None or urllib.request.proxy_bypass(parsed.hostname or ""):
        return None
    return proxy


class DirectClient(httpx2.AsyncClient):
    """An httpx client that builds the SDK's requests as they are and hands them straight to its transport.

    Anything this fast path does not cover (form data, files, query parameters, cookies, a streamed response) goes
    through httpx's own ``build_request`` / ``send``, unchanged. Cookies a server sets are not collected here (an API
    does not need them back); the aiohttp transport's session keeps its own, as aiohttp does.
    """

    def __init__(self, transport: httpx2.AsyncBaseTransport, timeout_s: float) -> None:
        super().__init__(transport=transport, timeout=timeout_s, trust_env=False, follow_redirects=False)
        self._direct = transport
        self._urls: dict[str, tuple[httpx2.URL, str]] = {}  # a URL's parsed form and its Host header
        self._default_headers = list(self.headers.multi_items())

    def build_request(  # type: ignore[override]
        self,
        method: str,
        url: httpx2.URL | str,
        *,
        content: Any = None,
        data: Any = None,
        files: Any = None,
        json: Any = None,
        params: Any = None,
        headers: Any = None,
        cookies: Any = None,
        timeout: Any = httpx2.USE_CLIENT_DEFAULT,
        extensions: dict[str, Any] | None = None,
    ) -> httpx2.Request:
        if (
            not isinstance(content, bytes)
            or not isinstance(url, str)
            or data is not None
            or files is not None
            or json is not None
            or params
            or cookies
            or self.cookies
        ):
            return super().build_request(
                method, url, content=content, data=data, files=files, json=json, params=params, headers=headers,
                cookies=cookies, timeout=timeout, extensions=extensions,
            )  # fmt: skip
        target = self._urls.get(url)
        if target is None:
            parsed = httpx2.URL(url)
            if parsed.is_relative_url:  # (this client has no base URL: httpx's own path reports it)
                return super().build_request(
                    method, url, content=content, headers=headers, timeout=timeout, extensions=extensions
                )
            target = (parsed, parsed.netloc.decode("ascii"))
            if len(self._urls) < _URL_CACHE_SIZE:
                self._urls[url] = target
        # Every header the request goes out with, settled here: the SDK's, the client's defaults it did not name,
        # Host and Content-Length (what httpx adds to a request built from content); given with the body as a stream,
        # httpx takes them as they are instead of looking each of its own up in the list again.
        given = list(headers.items() if isinstance(headers, dict) else headers or ())
        named = {str(name).lower() for name, _ in given}
        given += [(name, value) for name, value in self._default_headers if name.lower() not in named]
        if "host" not in named:
            given.append(("Host", target[1]))
        if "content-length" not in named:
            given.append(("Content-Length", str(len(content))))
        extensions = dict(extensions or {})
        if "timeout" not in extensions:
            limit = self.timeout if timeout is httpx2.USE_CLIENT_DEFAULT else httpx2.Timeout(timeout)
            extensions["timeout"] = limit.as_dict()
        request = httpx2.Request(
            method, target[0], headers=given, stream=httpx2.ByteStream(content), extensions=extensions
        )
        request.read()
        return request

    async def send(  # type: ignore[override]
        self,
        request: httpx2.Request,
        *,
        stream: bool = False,
        auth: Any = httpx2.USE_CLIENT_DEFAULT,
        follow_redirects: Any = httpx2.USE_CLIENT_DEFAULT,
    ) -> httpx2.Response:
        if stream or auth is not httpx2.USE_CLIENT_DEFAULT:
            return await super().send(request, stream=stream, auth=auth, follow_redirects=follow_redirects)
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        response = await self._direct.handle_async_request(request)
        response.request = request
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response


# -- aiohttp ----------------------------------------------------------------------------------------------------------


def _httpx_error(exc: BaseException, request: httpx2.Request) -> httpx2.TransportError:
    """httpx's error for what aiohttp raised (the SDK turns httpx's timeouts into ``APITimeoutError`` and its other
    request errors into ``APIConnectionError``)."""
    import aiohttp

    if isinstance(exc, (aiohttp.ClientProxyConnectionError, aiohttp.ClientHttpProxyError)):
        kind: type[httpx2.TransportError] = httpx2.ProxyError
    elif isinstance(exc, aiohttp.ConnectionTimeoutError):
        kind = httpx2.ConnectTimeout
    elif isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        kind = httpx2.ReadTimeout
    elif isinstance(exc, aiohttp.ClientConnectorError):
        kind = httpx2.ConnectError
    elif isinstance(exc, (aiohttp.NonHttpUrlClientError, aiohttp.InvalidUrlClientError)):
        kind = httpx2.UnsupportedProtocol
    elif isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
        kind = httpx2.ReadError
    else:
        kind = httpx2.NetworkError
    return kind(str(exc) or type(exc).__name__, request=request)


class AiohttpTransport(httpx2.AsyncBaseTransport):
    """httpx's transport contract over one aiohttp session (created in the running event loop at the first request),
    keeping up to ``concurrency`` connections alive. The body is read whole and decoded by httpx, as the SDK's own
    aiohttp transport leaves it (``auto_decompress=False``)."""

    def __init__(self, base_url: str, concurrency: int, keepalive_expiry: float = KEEPALIVE_S) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self._proxy = proxy_for(base_url)
        self._concurrency = concurrency
        self._keepalive_expiry = keepalive_expiry
        self._session: Any = None
        self._timeouts: dict[tuple[Any, ...], Any] = {}

    def _client_timeout(self, timeout: dict[str, Any]) -> Any:
        key = (timeout.get("connect"), timeout.get("read"), timeout.get("pool"))
        found = self._timeouts.get(key)
        if found is None:
            # As the SDK's transport maps them: connect and read per socket operation, pool for the whole connect.
            found = self._aiohttp.ClientTimeout(sock_connect=key[0], sock_read=key[1], connect=key[2])
            self._timeouts[key] = found
        return found

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        aiohttp = self._aiohttp
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._concurrency, keepalive_timeout=self._keepalive_expiry, ssl=ssl_context()
            )
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        try:
            body: Any = request.content or None
        except httpx2.RequestNotRead:
            body = request.stream
        headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in request.headers.raw]
        timeout = self._client_timeout(request.extensions.get("timeout") or {})
        try:
            async with self._session.request(
                request.method, str(request.url), headers=headers, data=body, allow_redirects=False,
                timeout=timeout, proxy=self._proxy, compress=False,
            ) as reply:  # fmt: skip
                content = await reply.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _httpx_error(exc, request) from exc
        extensions: dict[str, Any] = {"http_version": b"HTTP/1.1"}
        if reply.reason:
            extensions["reason_phrase"] = reply.reason.encode()
        # Built from the whole body: httpx reads (and decodes) it at once, and the client's read is then a no-op.
        return httpx2.Response(
            reply.status, headers=reply.raw_headers, content=content, request=request, extensions=extensions
        )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


# -- httpx ------------------------------------------------------------------------------------------------------------


class _Release(httpx2.AsyncByteStream):
    """A response body that calls ``release`` once, when it is closed (the SDK closes every response it reads)."""

    def __init__(self, inner: httpx2.AsyncByteStream, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._inner:
            yield part

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


class Lanes(httpx2.AsyncBaseTransport):
    """HTTP connections handed out one per request in flight, in O(1).

    httpx's connection pool walks every pooled connection twice per request and probes the socket of each idle one;
    with 64 connections that walk was the largest single item of the client's CPU per call. Here each lane is an httpx
    transport holding at most one keep-alive connection; a request takes the lane freed last (its connection is the
    warmest) or opens a new one when none is free, and gives it back when its response is closed. The lanes therefore
    number the most requests ever in flight at once, which ``OpenAIBackend``'s semaphore bounds by
    ``llm.concurrency``; all of them stay alive (httpx's default keeps 100 or fewer, so a run at concurrency 256
    reconnected all the time). A lane whose connection the server closed reconnects on its next request.
    """

    def __init__(self, base_url: str, keepalive_expiry: float | None = KEEPALIVE_S) -> None:
        self._limits = httpx2.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=keepalive_expiry)
        self._proxy = proxy_for(base_url)
        self._free: list[httpx2.AsyncHTTPTransport] = []
        self.lanes: list[httpx2.AsyncHTTPTransport] = []

    def _take(self) -> httpx2.AsyncHTTPTransport:
        if self._free:
            return self._free.pop()
        lane = httpx2.AsyncHTTPTransport(verify=ssl_context(), limits=self._limits, proxy=self._proxy)
        self.lanes.append(lane)
        return lane

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        lane = self._take()
        try:
            response = await lane.handle_async_request(request)
        except BaseException:
            self._free.append(lane)
            raise
        response.stream = _Release(response.stream, lambda: self._free.append(lane))
        return response

    async def aclose(self) -> None:
        lanes, self.lanes, self._free = self.lanes, [], []
        for lane in lanes:
            await lane.aclose()
