"""OpenAI-compatible HTTP backend: OpenAI, vLLM, ``transformers serve``, ``llm/serve.sh``, any base URL.

The SDK's own retries are switched off (``max_retries=0``) so that one loop here decides what is retried, how long
to wait, and what the final error says:

- retried: timeouts (ours, and a server's 408), connection errors, 429 (its ``Retry-After`` is honoured, capped), 5xx, and replies that are
  not a usable completion (body not JSON, no choices, null content), with exponential backoff and jitter, up to
  ``cfg.max_retries`` retries; then :class:`~retroformer.errors.LLMError`;
- not retried: any other 4xx (bad request, wrong key, unknown model) fails at once with a hint.

The API key is held privately and never appears in ``repr``, logs or error messages (messages are also scrubbed of
it, in case a server echoes it back). The SDK itself reads a few ``OPENAI_*`` variables (organisation, project) when
the client is created; base URL and key are always passed explicitly.

Client CPU per call (measured in ``bench/RESULTS.md``, sections 7-7d): one SDK client per event loop, sending through
:class:`~retroformer.llm.transport.DirectClient` (``llm.http_client``: aiohttp by default, or httpx), which builds the
SDK's requests as they are and hands them straight to the transport. Requests go through the SDK's ``post`` (its
documented way to reach any endpoint) to an absolute URL, with the JSON body built here as bytes, and the reply is
parsed with :func:`json.loads`: this skips the SDK's typed-dict transform of the parameters and its pydantic parse of
the response. The SDK's telemetry headers go only to OpenAI's own servers. Authentication, headers, timeouts and the
error classes are still the SDK's own.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import logging
import random
import secrets
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import httpx2
import openai

from retroformer.errors import ConfigError, LLMError
from retroformer.llm.base import LLM, Completion, GenerationRequest, SamplingParams, apply_stop, is_openai_url
from retroformer.llm.transport import AiohttpTransport, DirectClient, Lanes
from retroformer.types import Usage

if TYPE_CHECKING:
    from retroformer.llm import LLMConfig

logger = logging.getLogger(__name__)

#: OpenAI rejects more than this many stop sequences; the rest are applied client-side.
MAX_SERVER_STOPS = 4
OPENAI_BASE_URL = "https://api.openai.com/v1"
#: Key sent to local servers started without one (vLLM and ``transformers serve`` accept any key).
PLACEHOLDER_KEY = "EMPTY"
#: The SDK's telemetry headers (platform, versions, retry count, read timeout), meant for OpenAI's servers: left out
#: for every other server, which ignores them; nine fewer headers to build, merge and send per request.
_PLATFORM_HEADERS = (
    "X-Stainless-Lang", "X-Stainless-Package-Version", "X-Stainless-OS", "X-Stainless-Arch", "X-Stainless-Runtime",
    "X-Stainless-Runtime-Version", "X-Stainless-Async",
)  # fmt: skip
_PER_REQUEST_HEADERS = ("x-stainless-retry-count", "x-stainless-read-timeout")
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


class _Retryable(Exception):
    """One failed attempt that may be retried; ``delay_s`` overrides the backoff (from ``Retry-After``)."""

    def __init__(self, what: str, delay_s: float | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.delay_s = delay_s


def _retry_after_s(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date), None if absent."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            logger.debug("ignoring unparsable retry-after-ms header %r", ms)
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass  # not a number of seconds: an HTTP date, or garbage
    try:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(parsed.timestamp() - time.time(), 0.0)
    except (TypeError, ValueError, IndexError, OverflowError):
        logger.debug("ignoring unparsable Retry-After header %r", value)
        return None


def _aiohttp_transport(base_url: str, concurrency: int) -> AiohttpTransport:
    """:class:`AiohttpTransport`, or a :class:`ConfigError` that says how to install aiohttp when it is missing."""
    try:
        return AiohttpTransport(base_url, concurrency)
    except ImportError:
        raise ConfigError(
            "llm.http_client 'aiohttp' needs the aiohttp package, which is not installed: pip install "
            "aiohttp==3.14.5 (requirements.txt pins it), or set llm.http_client: httpx"
        ) from None


def _cause(exc: BaseException) -> str:
    """What an SDK connection error wraps (the transport's own words), else the error itself."""
    cause = exc.__cause__
    return f"{type(cause).__name__}: {cause}" if cause is not None and str(cause) else str(exc)


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
        # Absolute URLs: the SDK then parses a URL once per request instead of merging a path into its base URL.
        self._url = self.base_url + ("/chat/completions" if cfg.style == "chat" else "/completions")
        openai_server = is_openai_url(self.base_url)
        self._default_headers = None if openai_server else {name: openai.Omit() for name in _PLATFORM_HEADERS}
        self._request_headers: dict[str, Any] = (
            {} if openai_server else {name: openai.Omit() for name in _PER_REQUEST_HEADERS}
        )
        # Each request's idempotency key, unique without a uuid4 (os.urandom) per request as the SDK would draw.
        self._idempotency_keys = map(f"retroformer-{secrets.token_hex(8)}-{{}}".format, itertools.count())
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
        self._transport: httpx2.AsyncBaseTransport | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: set[asyncio.Task] = set()  # earlier event loops' clients being closed
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

    def _bind(self) -> tuple[Any, asyncio.Semaphore]:
        """The client and semaphore of the running loop, (re)created when the loop changes (e.g. a new asyncio.run)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._client is None or self._semaphore is None:
            if self._client is not None and self._given_transport is None:
                # The client of an earlier event loop (a new asyncio.run): closed from this one, so that its sessions
                # are released instead of reported as leaked ("Unclosed client session") when they are collected. (A
                # given transport is the caller's, and the new client sends through it too.)
                closing = loop.create_task(self._close_client(self._client))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
            if self._given_transport is not None:
                self._transport = self._given_transport
            elif self.cfg.http_client == "aiohttp":
                self._transport = _aiohttp_transport(self.base_url, self.cfg.concurrency)
            else:
                self._transport = Lanes(self.base_url)
            http_client = DirectClient(self._transport, self.cfg.timeout_s)
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=self.__key,
                max_retries=0,
                timeout=self.cfg.timeout_s,
                http_client=http_client,
                default_headers=self._default_headers,
            )
            self._semaphore = asyncio.Semaphore(self.cfg.concurrency)
            self._winding_down = asyncio.Event()
            if self._stop_at is not None:
                self._winding_down.set()
            self._loop = loop
        return self._client, self._semaphore

    def _options(self) -> dict[str, Any]:
        """The SDK's per-request options, each given: the SDK deep-copies the default of every option left out, on
        every request. The values are the client's own (no retries of the SDK's, the configured timeout)."""
        return {
            "headers": self._request_headers,
            "params": {},
            "max_retries": 0,
            "timeout": self.cfg.timeout_s,
            "idempotency_key": next(self._idempotency_keys),
        }

    def _kwargs(self, params: SamplingParams) -> dict[str, Any]:
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
        return kwargs

    async def _attempt(self, client: Any, request: GenerationRequest) -> tuple[str, str, Usage]:
        """One request; returns (text, finish_reason, usage) or raises _Retryable / LLMError."""
        body = self._kwargs(request.params)
        if self.style == "chat":
            messages = [{"role": "system", "content": request.system}] if request.system else []
            messages.append({"role": "user", "content": request.prompt})
            body["messages"] = messages
        else:
            body["prompt"] = f"{request.system}\n\n{request.prompt}" if request.system else request.prompt
        try:
            # The body as JSON bytes (content=): the SDK sends them as they are instead of serialising a mapping its own way.
            # cast_to=httpx2.Response: the SDK hands back the response it read, without wrapping or parsing it.
            response = await client.post(
                self._url, content=json.dumps(body).encode(), cast_to=httpx2.Response, options=self._options()
            )
            data = json.loads(response.content)
        except openai.APITimeoutError as exc:
            raise _Retryable(f"timed out after {self.cfg.timeout_s} s") from exc
        except openai.APIConnectionError as exc:
            raise _Retryable(f"connection error ({_cause(exc)})") from exc
        except openai.RateLimitError as exc:
            raise _Retryable("HTTP 429 rate limited", _retry_after_s(exc.response.headers)) from exc
        except openai.APIStatusError as exc:
            # 408 is the server's own request timeout: as transient as ours. A 503's Retry-After is honoured too.
            if exc.status_code >= 500 or exc.status_code == 408:
                delay = _retry_after_s(exc.response.headers) if exc.response is not None else None
                raise _Retryable(f"HTTP {exc.status_code} ({exc.message})", delay) from exc
            location = exc.response.headers.get("location") if exc.response is not None else None
            raise LLMError(self._fatal_message(exc.status_code, exc.message, location)) from None
        except (json.JSONDecodeError, UnicodeDecodeError, openai.APIResponseValidationError) as exc:
            raise _Retryable(f"malformed response body ({type(exc).__name__}: {exc})") from exc
        except LLMError:
            raise
        except Exception as exc:
            # Whatever else a request raises (an SDK or transport surprise) ends this call as an LLMError, so that the
            # episode is recorded as llm_error and the run goes on, instead of the whole run crashing.
            raise LLMError(
                self._scrub(
                    f"{self.style} request to {self.base_url} for model {self.cfg.model!r} raised "
                    f"{type(exc).__name__}: {exc}; not retried. Check the server and the client library version"
                )
            ) from None
        return self._parse(data)

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
        client, semaphore = self._bind()
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
        if self._client is not None:
            await self._close_client(self._client)
            self._client = None
            self._transport = None
            self._semaphore = None
            self._loop = None
