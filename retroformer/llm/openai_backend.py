"""OpenAI-compatible HTTP backend: OpenAI, vLLM, ``transformers serve``, ``llm/serve.sh``, any base URL.

Requests go through the official SDK and its own HTTP client (``llm.http_client``: the SDK's ``DefaultAioHttpClient``
by default, or its httpx client), built with the documented options only: redirects not followed, one keep-alive
connection per request in flight, and an httpx response hook that turns a reply other than 2xx into an error here
(reading at most :data:`MAX_ERROR_BODY_BYTES` of it). A completion's body is read through the SDK's
``with_streaming_response`` in chunks, at most :data:`MAX_RESPONSE_BYTES` of it (decompressed), and parsed with
:func:`json.loads`.

The SDK's own retries are switched off (``max_retries=0``) so that one loop here decides what is retried, how long
to wait, and what the final error says:

- every attempt has a total deadline of ``llm.timeout_s`` (connect, send and the whole body), so a server that sends
  its headers and then a byte at a time cannot hold a call for ever;
- retried: timeouts (ours, and a server's 408), connection errors, 429 (its ``Retry-After`` is honoured, capped), 5xx,
  and replies that are not a usable completion (body not JSON, no choices, null content), with exponential backoff
  and jitter, up to ``cfg.max_retries`` retries; then :class:`~retroformer.errors.LLMError`;
- not retried: a redirect (an API does not redirect its POSTs; following one would resend the key elsewhere: the
  error names where it points), any other 4xx (bad request, wrong key, unknown model: an error with a hint), and a
  reply larger than :data:`MAX_RESPONSE_BYTES`;
- after :meth:`OpenAIBackend.wind_down` (a signal stops the run): no retries, and no call that could not end within
  one ``timeout_s``.

The API key is held privately and never appears in ``repr``, logs or error messages (messages are also scrubbed of
it, in case a server echoes it back). The SDK itself reads a few ``OPENAI_*`` variables (organisation, project) when
the client is created; base URL and key are always passed explicitly.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import httpx2
import openai

from retroformer.errors import ConfigError, LLMError
from retroformer.llm.base import LLM, Completion, GenerationRequest, apply_stop, is_openai_url
from retroformer.types import Usage

if TYPE_CHECKING:
    from retroformer.llm import LLMConfig

logger = logging.getLogger(__name__)

#: OpenAI rejects more than this many stop sequences; the rest are applied client-side.
MAX_SERVER_STOPS = 4
OPENAI_BASE_URL = "https://api.openai.com/v1"
#: Key sent to local servers started without one (vLLM and ``transformers serve`` accept any key).
PLACEHOLDER_KEY = "EMPTY"
#: Most bytes of a completion's body (decompressed) that are read: a completion of thousands of tokens is tens of
#: kilobytes; a larger reply (a broken server, a compression bomb) fails the call instead of filling the memory.
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
#: Most bytes of an error reply's body that are read: its message comes first; the rest is not kept.
MAX_ERROR_BODY_BYTES = 16 * 1024
#: Most characters of a server's error message kept in an error (and so in a record).
MAX_MESSAGE_CHARS = 500
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


class _Retryable(Exception):
    """One failed attempt that may be retried; ``delay_s`` overrides the backoff (from ``Retry-After``)."""

    def __init__(self, what: str, delay_s: float | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.delay_s = delay_s


class _ErrorReply(Exception):
    """A reply other than 2xx, raised by the HTTP client's response hook with the start of its body."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.headers = headers
        self.body = body


def _seconds(text: str) -> float | None:
    """A finite, non-negative number of seconds, or None (not a number, nan, inf)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return max(value, 0.0) if math.isfinite(value) else None


def _retry_after_s(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date), None if absent or not a
    finite number or date."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        seconds = _seconds(ms)
        if seconds is not None:
            return seconds / 1000.0
        logger.debug("ignoring unparsable retry-after-ms header %r", ms)
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    try:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(parsed.timestamp() - time.time(), 0.0)
    except (TypeError, ValueError, IndexError, OverflowError):
        logger.debug("ignoring unparsable Retry-After header %r", value)
        return None


async def _read_at_most(chunks: AsyncIterator[bytes], limit: int) -> tuple[bytes, bool]:
    """The first ``limit`` bytes of ``chunks``, and whether there were more (the rest is not read)."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            return bytes(body[:limit]), True
    return bytes(body), False


async def _raise_error_reply(response: httpx2.Response) -> None:
    """The HTTP client's response hook: a reply other than 2xx (a redirect, a 4xx, a 5xx) is read here, at most
    :data:`MAX_ERROR_BODY_BYTES` of it, and raised as :class:`_ErrorReply` for the backend to map."""
    if response.is_success:
        return
    try:
        body, _ = await _read_at_most(response.aiter_bytes(), MAX_ERROR_BODY_BYTES)
    finally:
        await response.aclose()
    raise _ErrorReply(response.status_code, response.headers, body)


def _error_text(body: bytes) -> str:
    """A server's error message: OpenAI's ``{"error": {"message": ...}}`` where it has one, else the body's text;
    at most :data:`MAX_MESSAGE_CHARS` characters."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        text = error["message"]
    elif isinstance(error, str):
        text = error
    text = " ".join(text.split()) or "empty body"
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


def _lost_attempt(exc: BaseException, timeout_s: float) -> _Retryable:
    """A timeout or a lost connection, named by the innermost error it wraps: the SDK's aiohttp client reports a
    connection the server closed as a connect timeout, which it was not."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, (TimeoutError, asyncio.TimeoutError, httpx2.TimeoutException)):
        return _Retryable(f"timed out after {timeout_s} s")
    return _Retryable(f"connection error ({type(root).__name__}{': ' + str(root) if str(root) else ''})")


def _count(value: Any) -> int:
    """A token count from a reply's ``usage``; 0 for a missing or non-integer one."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class OpenAIBackend(LLM):
    """Async client for ``/chat/completions`` (``cfg.style == "chat"``) or ``/completions``.

    At most ``cfg.concurrency`` requests are in flight at once (the semaphore is held per attempt, not during
    backoff). ``backoff_s`` is the first retry delay, doubled per retry up to ``max_backoff_s``, with jitter in
    [50%, 100%]; a 429's ``Retry-After`` replaces the backoff, capped at ``max_retry_after_s``. ``transport``, when
    given, carries every request instead of the one ``llm.http_client`` names (an ``httpx2.MockTransport`` in tests,
    an in-memory one in ``bench/client_layers.py``).
    """

    def __init__(
        self,
        cfg: LLMConfig,
        api_key: str | None = None,
        *,
        backoff_s: float = 0.5,
        max_backoff_s: float = 20.0,
        max_retry_after_s: float = 60.0,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        self.cfg = cfg
        self.style = cfg.style
        self.base_url = (cfg.base_url or OPENAI_BASE_URL).rstrip("/")
        host = urlparse(self.base_url).hostname or ""
        self.model_id = cfg.model if cfg.base_url is None else f"{cfg.model}@{host}"
        self.key_env = cfg.key_env()
        if not api_key:
            if is_openai_url(self.base_url):
                raise ConfigError(
                    f"no API key for {self.base_url}: set the environment variable {self.key_env} (e.g. in .env) "
                    "or point llm.base_url at a local server"
                )
            if host not in _LOCAL_HOSTS:
                logger.warning("no API key given for %s; sending a placeholder key", self.base_url)
            api_key = PLACEHOLDER_KEY
        self.__key = api_key
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_retry_after_s = max_retry_after_s
        self._client: Any = None
        self._given_transport = transport
        self._semaphore: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: set[asyncio.Task] = set()  # earlier event loops' clients being closed
        self._closer: Any = None  # see _bind
        #: Set by :meth:`wind_down`: the event-loop time by which every call must end; retries stop at once.
        self._stop_at: float | None = None
        self._winding_down: asyncio.Event | None = None
        self.usage = Usage()

    @property
    def cache_identity(self) -> str:
        """The model name at the full base URL (scheme, host, port, path), plus ``llm.revision`` when set."""
        revision = f"#{self.cfg.revision}" if self.cfg.revision else ""
        return f"{self.cfg.model}{revision}@{self.base_url}"

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.cfg.model!r}, base_url={self.base_url!r}, style={self.style!r})"

    __str__ = __repr__

    def _scrub(self, text: str) -> str:
        return text.replace(self.__key, "***") if self.__key and self.__key != PLACEHOLDER_KEY else text

    def _http_client(self) -> httpx2.AsyncClient:
        """The SDK's own HTTP client (``llm.http_client``), or a plain httpx client over the given transport: redirects
        not followed, a keep-alive connection per request in flight, and error replies read by the response hook."""
        options: dict[str, Any] = {
            "timeout": self.cfg.timeout_s,
            "follow_redirects": False,
            "limits": httpx2.Limits(
                max_connections=self.cfg.concurrency, max_keepalive_connections=self.cfg.concurrency
            ),
            "event_hooks": {"response": [_raise_error_reply]},
        }
        if self._given_transport is not None:
            return httpx2.AsyncClient(transport=self._given_transport, **options)
        if self.cfg.http_client == "httpx":
            return openai.DefaultAsyncHttpxClient(**options)
        try:
            return openai.DefaultAioHttpClient(**options)
        except RuntimeError as exc:  # the SDK's words when aiohttp is not installed
            raise ConfigError(
                f"llm.http_client 'aiohttp' cannot be used ({exc}): pip install aiohttp==3.14.5 (requirements.txt "
                "pins it), or set llm.http_client: httpx"
            ) from None

    async def _bind(self) -> tuple[Any, asyncio.Semaphore]:
        """The client and semaphore of the running loop, (re)created when the loop changes (e.g. a new asyncio.run)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._client is None or self._semaphore is None:
            if self._client is not None and self._given_transport is None:
                # The client of an earlier event loop that was not closed with it (a loop run without asyncio.run):
                # closed from this one, as far as a closed loop allows.
                closing = loop.create_task(self._close_client(self._client))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=self.__key,
                max_retries=0,
                timeout=self.cfg.timeout_s,
                http_client=self._http_client(),
            )
            self._semaphore = asyncio.Semaphore(self.cfg.concurrency)
            self._winding_down = asyncio.Event()
            if self._stop_at is not None:
                self._winding_down.set()
            self._loop = loop
            # Closes the client when its loop ends without aclose(): asyncio.run closes every open async generator
            # (loop.shutdown_asyncgens) before it closes the loop, so the connections are released in their own loop
            # instead of being reported as leaked ("Unclosed connector") when collected.
            self._closer = self._close_with_loop(self._client)
            await self._closer.__anext__()
        return self._client, self._semaphore

    async def _close_with_loop(self, client: Any) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if self._client is client:
                self._client = None
            await self._close_client(client)

    def _kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        """The arguments of the SDK's ``create`` for ``request``."""
        params = request.params
        kwargs: dict[str, Any] = {
            "model": self.cfg.model,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        stops = [s for s in params.stop if s][:MAX_SERVER_STOPS]
        if stops:
            kwargs["stop"] = stops
        if params.seed is not None:
            kwargs["seed"] = params.seed
        if self.style == "chat":
            messages = [{"role": "system", "content": request.system}] if request.system else []
            messages.append({"role": "user", "content": request.prompt})
            kwargs["messages"] = messages
        else:
            kwargs["prompt"] = f"{request.system}\n\n{request.prompt}" if request.system else request.prompt
        return kwargs

    async def _attempt(self, client: Any, request: GenerationRequest) -> tuple[str, str, Usage]:
        """One request; returns (text, finish_reason, usage) or raises _Retryable / LLMError."""
        endpoint = client.chat.completions if self.style == "chat" else client.completions
        try:
            # The body is read here, in chunks and at most MAX_RESPONSE_BYTES of it, and parsed with json.loads (the
            # SDK's pydantic parse is not needed: _parse checks the fields used).
            async with endpoint.with_streaming_response.create(**self._kwargs(request)) as response:
                body, too_large = await _read_at_most(response.iter_bytes(), MAX_RESPONSE_BYTES)
        except _ErrorReply as reply:
            raise self._status_error(reply) from None
        except (openai.APIConnectionError, httpx2.TransportError) as exc:  # APITimeoutError included
            raise _lost_attempt(exc, self.cfg.timeout_s) from exc
        except httpx2.DecodingError as exc:  # a compressed body that does not decompress
            raise _Retryable(f"malformed response body ({type(exc).__name__}: {exc})") from exc
        except Exception as exc:
            # Whatever else a request raises (an SDK or HTTP library surprise) ends this call as an LLMError, so that
            # the episode is recorded as llm_error and the run goes on, instead of the whole run crashing.
            raise LLMError(
                self._scrub(
                    f"{self.style} request to {self.base_url} for model {self.cfg.model!r} raised "
                    f"{type(exc).__name__}: {exc}; not retried. Check the server and the client library version"
                )
            ) from None
        if too_large:
            raise LLMError(
                f"{self.style} request to {self.base_url} for model {self.cfg.model!r}: the reply is larger than "
                f"{MAX_RESPONSE_BYTES} bytes, far more than a completion of llm.max_tokens={self.cfg.max_tokens} "
                "tokens; not retried. Check what answers at llm.base_url"
            )
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _Retryable(f"malformed response body ({type(exc).__name__}: {exc})") from exc
        return self._parse(data)

    def _status_error(self, reply: _ErrorReply) -> Exception:
        """The error of a reply other than 2xx: retryable (429, 408, 5xx, honouring ``Retry-After``) or fatal."""
        message = _error_text(reply.body)
        if reply.status == 429:
            return _Retryable(f"HTTP 429 rate limited ({message})", _retry_after_s(reply.headers))
        # 408 is the server's own request timeout: as transient as ours. A 503's Retry-After is honoured too.
        if reply.status >= 500 or reply.status == 408:
            return _Retryable(f"HTTP {reply.status} ({message})", _retry_after_s(reply.headers))
        return LLMError(self._fatal_message(reply.status, message, reply.headers.get("location")))

    def _parse(self, data: Any) -> tuple[str, str, Usage]:
        """(text, finish_reason, usage) of a completion's JSON; a reply without a usable completion is retryable."""
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise _Retryable("response has no choices")
        choice = choices[0]
        if self.style == "chat":
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else None
        else:
            text = choice.get("text")
        if not isinstance(text, str):
            raise _Retryable("response choice has no content")
        counts = data.get("usage")
        if not isinstance(counts, dict):
            logger.debug("%s returned no usage; counting 0 tokens", self.model_id)
            usage = Usage(calls=1)
        else:
            usage = Usage(
                prompt_tokens=_count(counts.get("prompt_tokens")),
                completion_tokens=_count(counts.get("completion_tokens")),
                calls=1,
            )
        return text, choice.get("finish_reason") or "stop", usage

    def _fatal_message(self, status: int, message: str, location: str | None = None) -> str:
        if 300 <= status < 400:
            # Redirects are not followed (an API does not redirect its POSTs; following one would resend the key).
            where = f"to {location}" if location else "elsewhere"
            return self._scrub(
                f"{self.style} request to {self.base_url} for model {self.cfg.model!r} was redirected {where} "
                f"(HTTP {status}); not followed: set llm.base_url to the address the server points at"
            )
        hint = {
            401: f"check the API key (llm.api_key_env names the variable; now {self.key_env})",
            403: f"check that the key (environment variable {self.key_env}) may use model {self.cfg.model!r}",
            404: f"check llm.model={self.cfg.model!r} and llm.base_url={self.base_url!r} (and llm.style={self.style!r})",
        }.get(status, "check the request settings (llm.model, llm.max_tokens, stop sequences)")
        return self._scrub(
            f"{self.style} request to {self.base_url} for model {self.cfg.model!r} was rejected with HTTP {status} "
            f"({message}); not retried: {hint}"
        )

    def _backoff(self, retry: int) -> float:
        delay = min(self.max_backoff_s, self.backoff_s * (2**retry))
        return delay * (0.5 + 0.5 * random.random())

    def wind_down(self) -> None:
        """Finish the calls in flight within one ``timeout_s`` from now, start no retries, refuse calls that could not
        finish by then (a signalled run then exits within about one timeout, inside a cluster's grace period)."""
        if self._stop_at is None:
            self._stop_at = time.monotonic() + self.cfg.timeout_s
        if self._winding_down is not None:
            self._winding_down.set()

    def _time_left(self) -> float:
        """Seconds this attempt may take: ``timeout_s``, less while winding down; an LLMError when none is left."""
        if self._stop_at is None:
            return self.cfg.timeout_s
        left = min(self.cfg.timeout_s, self._stop_at - time.monotonic())
        if left <= 0:
            raise LLMError(
                f"{self.style} request to {self.base_url} for model {self.cfg.model!r} not sent: the run is stopping "
                "(a signal) and no call may start that could not end within llm.timeout_s of it; a rerun resumes"
            )
        return left

    async def _attempt_in_time(self, client: Any, semaphore: asyncio.Semaphore, request: GenerationRequest):
        """One attempt under a total deadline (connect, send and the whole body), not a per-read timeout: a server
        that sends its headers and then a byte a second is cut off too. The wait for a free slot is not counted."""
        async with semaphore:
            limit = self._time_left()
            try:
                return await asyncio.wait_for(self._attempt(client, request), limit)
            except asyncio.TimeoutError:
                raise _Retryable(
                    f"timed out after {limit:.3g} s without a complete reply (llm.timeout_s bounds the whole attempt)"
                ) from None

    async def _wait_before_retry(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; False at once if the run starts winding down meanwhile (no retry then)."""
        assert self._winding_down is not None
        if self._winding_down.is_set():
            return False
        try:
            await asyncio.wait_for(self._winding_down.wait(), delay)
        except asyncio.TimeoutError:
            return True
        return False

    async def generate(self, request: GenerationRequest) -> Completion:
        client, semaphore = await self._bind()
        attempts = self.cfg.max_retries + 1
        failures: list[str] = []
        for attempt in range(attempts):
            try:
                text, finish, usage = await self._attempt_in_time(client, semaphore, request)
            except _Retryable as fault:
                failures.append(fault.what)
                if attempt + 1 >= attempts:
                    break
                delay = self._backoff(attempt) if fault.delay_s is None else min(fault.delay_s, self.max_retry_after_s)
                logger.info(
                    "%s: attempt %d/%d failed (%s); retrying in %.3f s",
                    self.model_id,
                    attempt + 1,
                    attempts,
                    self._scrub(fault.what),
                    delay,
                )
                if not await self._wait_before_retry(delay):
                    raise LLMError(
                        self._scrub(
                            f"{self.style} request to {self.base_url} for model {self.cfg.model!r} failed "
                            f"({failures[-1]}) and was not retried: the run is stopping (a signal); a rerun resumes"
                        )
                    ) from None
                continue
            self.usage.add(usage)
            return Completion(
                text=apply_stop(text, request.params.stop), usage=usage, model_id=self.model_id, finish_reason=finish
            )
        raise LLMError(
            self._scrub(
                f"{self.style} request to {self.base_url} for model {self.cfg.model!r} failed after {attempts} "
                f"attempt(s); last error: {failures[-1]}; all: {failures}. Check that the server is up and not "
                "overloaded, or raise llm.max_retries / llm.timeout_s"
            )
        )

    async def _close_client(self, client: Any) -> None:
        try:
            await client.close()
        except RuntimeError as exc:  # connections that belong to an event loop that is closed: nothing left to send
            logger.debug("%s: closing a client of a closed event loop: %s", self.model_id, exc)

    async def aclose(self) -> None:
        closer, self._closer = self._closer, None
        if closer is not None and self._loop is asyncio.get_running_loop():
            await closer.aclose()  # closes the client (see _bind)
        if self._client is not None:
            await self._close_client(self._client)
        self._client = None
        self._semaphore = None
        self._loop = None
