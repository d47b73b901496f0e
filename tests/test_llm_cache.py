"""The on-disk response cache and cost accounting."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from retroformer.errors import BudgetExceeded
from retroformer.llm import LLMConfig, ScriptedLLM
from retroformer.llm.base import GenerationRequest, SamplingParams
from retroformer.llm.cache import CachedLLM, cache_key
from retroformer.llm.cost import CostLedger, Price, is_local_model, usage_cost
from retroformer.llm.openai_backend import OpenAIBackend
from retroformer.testing import FakeOpenAIServer
from retroformer.types import Usage


def counting_llm() -> ScriptedLLM:
    # Replies depend on the call count, so a reply that comes back unchanged can only come from the cache.
    llm = ScriptedLLM(model_id="scripted-counter")
    llm.replies = lambda prompt: f"reply {len(llm.prompts)} to {prompt}"
    return llm


def run_trials(llm, requests):
    async def go():
        return [await llm.generate(r) for r in requests]

    return asyncio.run(go())


REQUESTS = [
    GenerationRequest(prompt="task one", system="sys"),
    GenerationRequest(prompt="task two", params=SamplingParams(stop=("\n",), max_tokens=9)),
    GenerationRequest(prompt="task three", params=SamplingParams(temperature=0.8, seed=3)),
]


def test_second_identical_run_makes_zero_inner_calls(tmp_path):
    inner = counting_llm()
    first = run_trials(CachedLLM(inner, tmp_path), REQUESTS)
    assert len(inner.prompts) == 3

    inner2 = counting_llm()
    cached = CachedLLM(inner2, tmp_path)
    second = run_trials(cached, REQUESTS)
    assert inner2.prompts == []
    assert [c.text for c in second] == [c.text for c in first]
    assert all(c.cached and c.usage == Usage(calls=0, cached_calls=1) for c in second)
    assert (cached.hits, cached.misses) == (3, 0)
    assert cached.saved.calls == 3 and cached.saved.completion_tokens == sum(c.usage.completion_tokens for c in first)
    assert len(list(tmp_path.rglob("*.json"))) == 3
    assert not list(tmp_path.rglob("*.tmp"))


def test_any_change_in_the_request_misses():
    base = GenerationRequest(prompt="p", system="s", params=SamplingParams(max_tokens=5))
    keys = {
        cache_key("m", "chat", base),
        cache_key("m2", "chat", base),
        cache_key("m", "completion", base),
        cache_key("m", "chat", GenerationRequest(prompt="p", system="s2", params=base.params)),
        cache_key("m", "chat", GenerationRequest(prompt="p!", system="s", params=base.params)),
        cache_key("m", "chat", GenerationRequest(prompt="p", system="s", params=SamplingParams(max_tokens=6))),
        cache_key("m", "chat", GenerationRequest(prompt="p", system="s", params=SamplingParams(seed=1))),
    }
    assert len(keys) == 7
    assert cache_key("m", "chat", base) == cache_key("m", "chat", GenerationRequest("p", base.params, "s"))


def test_non_deterministic_params_bypass_the_cache(tmp_path):
    inner = counting_llm()
    cached = CachedLLM(inner, tmp_path)
    sampled = GenerationRequest(prompt="x", params=SamplingParams(temperature=0.7))
    a, b = run_trials(cached, [sampled, sampled])
    assert a.text != b.text and not a.cached and not b.cached
    assert len(inner.prompts) == 2 and cached.bypassed == 2
    assert not list(tmp_path.rglob("*.json"))


def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path, caplog):
    inner = counting_llm()
    cached = CachedLLM(inner, tmp_path)
    path = cached.path_for(REQUESTS[0])
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        (out,) = run_trials(cached, REQUESTS[:1])
    assert "unreadable cache file" in caplog.text and not out.cached
    assert json.loads(path.read_text())["text"] == out.text


def test_cache_files_never_hold_the_api_key(tmp_path):
    key = "sk-CACHE-SENTINEL-999"
    server = FakeOpenAIServer(reply=lambda p: "cached answer")
    with server as url:
        llm = OpenAIBackend(LLMConfig(backend="openai", model="m", base_url=url), api_key=key)
        cached = CachedLLM(llm, tmp_path)
        first = run_trials(cached, REQUESTS[:2])
        second = run_trials(cached, REQUESTS[:2])
    assert len(server.requests) == 2
    assert [c.text for c in first] == [c.text for c in second] == ["cached answer"] * 2
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert key not in f.read_text()
    assert key not in repr(cached)


# --- cost ---


def test_usage_cost_and_local_models():
    prices = {"big": Price(prompt_per_m=2.0, completion_per_m=10.0)}
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=500_000, calls=3)
    assert usage_cost("big", usage, prices) == pytest.approx(7.0)
    assert usage_cost("big@api.example.com", usage, prices) == pytest.approx(7.0)
    for local in ("runs/tiny/lm", "Qwen/Qwen2.5-0.5B+adapter:sft@abc123", "m@127.0.0.1", "scripted"):
        assert is_local_model(local)
        assert usage_cost(local, usage, prices) == 0.0
    assert not is_local_model("gpt-4o-mini") and not is_local_model("m@gpu-node-3")


def test_unknown_remote_model_costs_zero_and_warns_once(caplog):
    with caplog.at_level(logging.WARNING, logger="retroformer.llm.cost"):
        for _ in range(3):
            assert usage_cost("mystery-model-x1", Usage(prompt_tokens=10)) == 0.0
    assert caplog.text.count("no price known for model 'mystery-model-x1'") == 1


def test_ledger_sums_per_role_and_model():
    ledger = CostLedger(prices={"actor-m": Price(1.0, 2.0)})
    ledger.add("actor", "actor-m", Usage(prompt_tokens=100, completion_tokens=10, calls=1))
    ledger.add("actor", "actor-m", Usage(prompt_tokens=200, completion_tokens=20, calls=1))
    ledger.add("actor", "actor-m", Usage(calls=0, cached_calls=1))
    ledger.add("reflector", "runs/tiny/lm", Usage(prompt_tokens=50, completion_tokens=5, calls=1))
    assert ledger.total_tokens == 385
    assert ledger.usage("actor").prompt_tokens == 300
    assert ledger.total_usd == pytest.approx((300 * 1.0 + 30 * 2.0) / 1e6)
    summary = ledger.summary()
    assert summary["calls"] == 3 and summary["cached_calls"] == 1
    assert [(e["role"], e["model_id"]) for e in summary["by_role_model"]] == [
        ("actor", "actor-m"),
        ("reflector", "runs/tiny/lm"),
    ]
    assert json.loads(json.dumps(summary)) == summary


def test_budget_check_raises_with_message():
    ledger = CostLedger(prices={"m": Price(1000.0, 1000.0)})
    ledger.add("actor", "m", Usage(prompt_tokens=600, completion_tokens=400, calls=1))
    ledger.check(max_tokens=1001, max_usd=1.01)
    ledger.check()
    with pytest.raises(BudgetExceeded, match="token budget reached: 1000 tokens used, limit 1000"):
        ledger.check(max_tokens=1000)
    with pytest.raises(BudgetExceeded, match=r"cost budget reached: \$1.0000 spent, limit \$0.5000"):
        ledger.check(max_usd=0.5)
