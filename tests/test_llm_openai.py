"""OpenAIBackend against the fake OpenAI-compatible server: styles, stops, usage, concurrency, faults, key hygiene.

Every test runs with both HTTP libraries of ``llm.http_client`` (aiohttp, the default, and httpx).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import sys

import pytest

from retroformer.errors import ConfigError, LLMError
from retroformer.llm import LLMConfig, build_llm
from retroformer.llm.base import GenerationRequest, SamplingParams
from retroformer.llm.openai_backend import OpenAIBackend
from retroformer.testing import FakeOpenAIServer, Fault

KEY = "sk-SENTINEL-0123456789abcdef"
HTTP_CLIENT = "aiohttp"


@pytest.fixture(autouse=True, params=["aiohttp", "httpx"])
def http_client(request, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "HTTP_CLIENT", request.param)
    return request.param


def make_backend(base_url: str, **overrides) -> OpenAIBackend:
    fields = {"backend": "openai", "model": "fake-model", "base_url": base_url, "max_retries": 2, "timeout_s": 5.0}
    fields["http_client"] = HTTP_CLIENT
    fields.update(overrides)
    return OpenAIBackend(LLMConfig(**fields), api_key=KEY, backoff_s=0.001, max_backoff_s=0.01)


def run(coro):
    return asyncio.run(coro)


async def generate(llm: OpenAIBackend, prompt: str = "hello world", **kw) -> object:
    try:
        return await llm.generate(GenerationRequest(prompt=prompt, **kw))
    finally:
        await llm.aclose()


def test_chat_style_sends_system_and_user_and_counts_usage():
    server = FakeOpenAIServer(reply=lambda p: f"you said: {p}")
    with server as url:
        llm = make_backend(url)
        out = run(generate(llm, "two words", system="be brief"))
    assert out.text == "you said: two words"
    assert out.model_id == "fake-model@127.0.0.1"
    (req,) = server.requests
    assert req.path == "/v1/chat/completions"
    assert req.body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "two words"},
    ]
    # The fake counts whitespace words: "be brief\ntwo words" -> 4, "you said: two words" -> 4.
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.calls) == (4, 4, 1)
    assert llm.usage.total_tokens == 8


def test_completion_style_prepends_system_and_passes_sampling():
    server = FakeOpenAIServer(reply=lambda p: "one two three four five six")
    with server as url:
        llm = make_backend(url, style="completion")
        params = SamplingParams(max_tokens=3, temperature=0.7, top_p=0.9, seed=11)
        out = run(generate(llm, "Q: x", system="SYS", params=params))
    (req,) = server.requests
    assert req.path == "/v1/completions"
    assert req.body["prompt"] == "SYS\n\nQ: x"
    assert (req.body["max_tokens"], req.body["temperature"], req.body["top_p"], req.body["seed"]) == (3, 0.7, 0.9, 11)
    assert out.text == "one two three"
    assert out.finish_reason == "length"


def test_stop_sequences_first_four_to_server_rest_client_side():
    text = "alpha beta gamma delta epsilon STOP5 zeta"
    server = FakeOpenAIServer(reply=lambda p: text)
    stops = ("S1", "S2", "S3", "S4", "STOP5")
    with server as url:
        out = run(generate(make_backend(url), params=SamplingParams(stop=stops)))
    # The fake rejects more than 4 stops with a 400, as OpenAI does: the request succeeded, so only 4 were sent.
    assert server.requests[0].body["stop"] == ["S1", "S2", "S3", "S4"]
    assert out.text == "alpha beta gamma delta epsilon "


def test_concurrency_is_bounded_by_config():
    server = FakeOpenAIServer(latency_s=0.05)

    async def many(llm: OpenAIBackend) -> list:
        try:
            return await asyncio.gather(*(llm.generate(GenerationRequest(prompt=f"p{i}")) for i in range(12)))
        finally:
            await llm.aclose()

    with server as url:
        outs = run(many(make_backend(url, concurrency=3)))
    assert len(outs) == 12 and len(server.requests) == 12
    # At most 3 at once, and the requests did overlap (so the bound is what held them back).
    assert 2 <= server.max_in_flight <= 3


async def waves(llm: OpenAIBackend, waves: int, width: int) -> None:
    """``waves`` rounds of ``width`` concurrent calls."""
    try:
        for w in range(waves):
            await asyncio.gather(*(llm.generate(GenerationRequest(prompt=f"p{w}-{i}")) for i in range(width)))
    finally:
        await llm.aclose()


def test_connections_are_reused_and_as_many_as_concurrency_even_after_faults():
    # Faults that break a connection (reset, timeout) or end a response early (500): the others stay in use.
    server = FakeOpenAIServer(latency_s=0.02, faults=["500", "reset", None, "timeout"], timeout_hold_s=10)
    with server as url:
        run(waves(make_backend(url, concurrency=3, timeout_s=0.5), waves=4, width=9))
    posts = [r for r in server.requests if r.method == "POST"]
    assert len(posts) == 36 + 3  # every call answered; three retried
    # A reset, timed-out or error-ended connection is replaced; the others are kept alive across all 39 requests.
    assert len({r.client_port for r in posts}) <= 3 + 3


def test_all_connections_stay_alive_at_a_concurrency_above_httpx_default_keep_alive():
    # httpx keeps at most 20 (the SDK: 100) idle connections by default: at concurrency 120 every wave would reconnect.
    server = FakeOpenAIServer(latency_s=0.05)
    with server as url:
        run(waves(make_backend(url, concurrency=120), waves=3, width=120))
    posts = [r for r in server.requests if r.method == "POST"]
    assert len(posts) == 360
    assert len({r.client_port for r in posts}) <= 120


@pytest.mark.parametrize(
    "fault", ["timeout", "429", "500", "503", "408", "reset", "malformed", "empty", "null_content"]
)
def test_each_fault_is_retried_then_succeeds(fault, caplog):
    server = FakeOpenAIServer(reply=lambda p: "fine", faults=[fault], timeout_hold_s=10)
    with caplog.at_level(logging.INFO, logger="retroformer"), server as url:
        out = run(generate(make_backend(url, timeout_s=0.3)))
    assert out.text == "fine"
    assert [r.fault for r in server.requests] == [fault, "ok"]
    assert "attempt 1/3 failed" in caplog.text


@pytest.mark.parametrize("fault", ["timeout", "429", "500", "reset", "malformed", "empty"])
def test_each_fault_past_retry_budget_raises_llm_error(fault):
    server = FakeOpenAIServer(faults=[fault] * 3, timeout_hold_s=10)
    with server as url, pytest.raises(LLMError, match=r"failed after 3 attempt\(s\)") as info:
        run(generate(make_backend(url, max_retries=2, timeout_s=0.3)))
    assert len(server.requests) == 3
    message = str(info.value)
    assert "fake-model" in message and url in message


@pytest.mark.parametrize("fault, said", [("timeout", "timed out after 0.3 s"), ("reset", "connection error")])
def test_a_lost_connection_is_not_called_a_timeout(fault, said):
    # The SDK's aiohttp transport reports a reset as a connect timeout; the error names what happened.
    server = FakeOpenAIServer(faults=[fault] * 3, timeout_hold_s=10)
    with server as url, pytest.raises(LLMError) as info:
        run(generate(make_backend(url, max_retries=2, timeout_s=0.3)))
    assert f"last error: {said}" in str(info.value)


@pytest.mark.parametrize("status, hint", [("400", "request settings"), ("401", "API key")])
def test_other_4xx_fail_at_once(status, hint):
    server = FakeOpenAIServer(faults=[status, None])
    with server as url, pytest.raises(LLMError, match=f"HTTP {status}.*not retried.*{hint}"):
        run(generate(make_backend(url)))
    assert len(server.requests) == 1


def test_retry_after_is_honoured_and_capped(caplog):
    server = FakeOpenAIServer(faults=[Fault("429", retry_after="0.3"), None, Fault("429", retry_after="1000"), None])
    with caplog.at_level(logging.INFO, logger="retroformer"), server as url:
        llm = make_backend(url)
        llm.max_retry_after_s = 0.05
        llm_uncapped = make_backend(url)
        out = run(generate(llm_uncapped))
        out2 = run(generate(llm))
    assert out.text and out2.text
    delays = [float(d) for d in re.findall(r"retrying in ([0-9.]+) s", caplog.text)]
    # First request's 429 says 0.3 s (well above the 0.001 s backoff); the second says 1000 s, capped to 0.05 s.
    assert delays == [0.3, 0.05]
    first, retried = server.requests[0], server.requests[1]
    assert retried.arrived - first.arrived >= 0.25


def test_api_key_is_sent_but_never_in_errors_logs_or_repr(caplog):
    server = FakeOpenAIServer(faults=["500", "429", "reset", "401"])
    with caplog.at_level(logging.DEBUG), server as url:
        llm = make_backend(url, max_retries=5)
        with pytest.raises(LLMError) as info:
            run(generate(llm))
    assert all(r.headers.get("authorization") == f"Bearer {KEY}" for r in server.requests)
    assert len(server.requests) == 4
    for text in (str(info.value), repr(info.value), caplog.text, repr(llm), str(llm)):
        assert KEY not in text
    # Chained causes (which carry the HTTP request and its headers) are cut off on purpose.
    assert info.value.__cause__ is None


def test_error_message_scrubs_a_key_echoed_by_the_server():
    server = FakeOpenAIServer(faults=["400"])
    with server as url:
        llm = make_backend(url)
        assert llm._scrub(f"bad key {KEY}!") == "bad key ***!"


def test_key_required_for_openai_and_placeholder_for_local_servers():
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        OpenAIBackend(LLMConfig(backend="openai", model="gpt-4o-mini"), api_key=None)
    server = FakeOpenAIServer()
    with server as url:
        llm = build_llm(LLMConfig(backend="openai", model="m", base_url=url), api_key=None)
        assert isinstance(llm, OpenAIBackend)
        run(generate(llm))
    assert server.requests[0].headers["authorization"] == "Bearer EMPTY"


def test_backend_survives_a_new_event_loop():
    server = FakeOpenAIServer(reply=lambda p: "again")
    with server as url:
        llm = make_backend(url)
        first = run(llm.generate(GenerationRequest(prompt="a")))
        second = run(llm.generate(GenerationRequest(prompt="b")))
    assert first.text == second.text == "again"


def test_a_backend_used_from_several_event_loops_leaves_no_unclosed_session(caplog):
    # Each asyncio.run gets its own client; the one of the loop before is closed, not reported as leaked when
    # collected (aiohttp logs "Unclosed client session" at ERROR level), and the last close does not raise.
    server = FakeOpenAIServer(reply=lambda p: "again")
    with caplog.at_level(logging.DEBUG), server as url:
        llm = make_backend(url)
        for prompt in "abc":
            assert run(llm.generate(GenerationRequest(prompt=prompt))).text == "again"
            gc.collect()
        run(llm.aclose())
        gc.collect()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_fake_server_lists_models_and_handles_many_connections():
    from openai import AsyncOpenAI

    async def go(url: str) -> tuple[list[str], int]:
        client = AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0)
        try:
            models = [m.id async for m in client.models.list()]
            llm = make_backend(url, concurrency=64)
            outs = await asyncio.gather(*(llm.generate(GenerationRequest(f"p{i}")) for i in range(64)))
            await llm.aclose()
            return models, len(outs)
        finally:
            await client.close()

    server = FakeOpenAIServer(latency_s=0.1)
    with server as url:
        models, n = run(go(url))
    assert models == ["fake-model"] and n == 64
    assert server.max_in_flight > 8  # the server really serves connections in parallel
