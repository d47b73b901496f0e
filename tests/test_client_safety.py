"""What the LLM clients send where, what they cache under which key, how they read Retry-After, and what a budget
costs: each against the fake OpenAI-compatible server, offline."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import openai
import pytest
import yaml

from retroformer.cli import main as cli_main
from retroformer.config import from_dict
from retroformer.errors import ConfigError, LLMError
from retroformer.llm import LLMConfig
from retroformer.llm.base import GenerationRequest, SamplingParams
from retroformer.llm.cache import CachedLLM
from retroformer.llm.cost import Price, price_for
from retroformer.llm.hf_backend import HFBackend
from retroformer.llm.openai_backend import OpenAIBackend, _retry_after_s
from retroformer.testing import FakeOpenAIServer, Fault
from retroformer.trials import TrialsConfig, run_trials


def backend(url: str, **over) -> OpenAIBackend:
    cfg = LLMConfig(backend="openai", base_url=url, model="sft", max_retries=1, timeout_s=2, **over)
    return OpenAIBackend(cfg, backoff_s=0.01)


def ask(llm, prompt: str = "hello") -> str:
    async def go():
        try:
            return (await llm.generate(GenerationRequest(prompt, SamplingParams(max_tokens=8)))).text
        finally:
            await llm.aclose()

    return asyncio.run(go())


# --- 6. the cache key -------------------------------------------------------------------------------------------------


def test_two_servers_serving_one_model_name_on_different_ports_do_not_share_cached_answers(tmp_path):
    cache = tmp_path / "cache"
    with FakeOpenAIServer(reply=lambda p: "from A") as a, FakeOpenAIServer(reply=lambda p: "from B") as b:
        assert ask(CachedLLM(backend(a), cache)) == "from A"
        assert ask(CachedLLM(backend(b), cache)) == "from B"  # same host, same name, another port
        assert ask(CachedLLM(backend(a + "/"), cache)) == "from A"  # the same URL spelled with a slash: a hit


def test_a_new_revision_of_a_served_model_is_not_answered_from_the_old_ones_cache(tmp_path):
    cache = tmp_path / "cache"
    server = FakeOpenAIServer(reply=lambda p: "answer")
    with server as url:
        ask(CachedLLM(backend(url, revision="ckpt-100"), cache))
        ask(CachedLLM(backend(url, revision="ckpt-100"), cache))
        assert len(server.requests) == 1
        ask(CachedLLM(backend(url, revision="ckpt-200"), cache))
        assert len(server.requests) == 2


def test_an_in_process_models_cache_identity_holds_its_weights_and_prompt_limit(tmp_path):
    model = tmp_path / "lm"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights v1")
    ident = HFBackend(LLMConfig(model=str(model))).cache_identity
    assert HFBackend(LLMConfig(model=str(model), max_prompt_tokens=64)).cache_identity != ident
    (model / "model.safetensors").write_bytes(b"weights v2, retrained")
    assert HFBackend(LLMConfig(model=str(model))).cache_identity != ident


# --- 7. Retry-After ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["soon", "", "Wed, 99 Foo 2026 99:99:99 GMT", "-", "nan", "inf", "-inf", "1e999"])
def test_a_malformed_retry_after_is_ignored(value):
    assert _retry_after_s({"retry-after": value}) is None


def test_a_malformed_retry_after_through_the_client_falls_back_to_the_backoff():
    with FakeOpenAIServer(faults=[Fault("429", retry_after="soon")]) as url:
        assert ask(backend(url)).startswith("Thought")


def test_a_503s_retry_after_is_honoured(caplog):
    caplog.set_level(logging.INFO, logger="retroformer")
    with FakeOpenAIServer(faults=[Fault("503", retry_after="0.07")]) as url:
        ask(backend(url))
    assert "retrying in 0.070 s" in caplog.text


def test_an_unexpected_exception_of_a_request_is_an_llm_error(monkeypatch):
    llm = backend("http://127.0.0.1:9/v1")

    def broken(**kwargs):  # the SDK's create, as the backend calls it
        raise KeyError("choices")

    async def bind():
        client = openai.AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="k")
        monkeypatch.setattr(client.chat.completions.with_streaming_response, "create", broken)
        return client, asyncio.Semaphore(1)

    monkeypatch.setattr(llm, "_bind", bind)
    with pytest.raises(LLMError, match="raised KeyError"):
        ask(llm)


# --- 8. budgets -------------------------------------------------------------------------------------------------------


def test_dated_snapshots_cost_what_their_model_costs():
    assert price_for("gpt-4o-mini-2024-07-18") == price_for("gpt-4o-mini") is not None
    assert price_for("gpt-3.5-turbo-0125") == price_for("gpt-3.5-turbo")
    assert price_for("gpt-4o-mini-2024-07-18@api.example.com") == price_for("gpt-4o-mini")
    assert price_for("my-model") is None
    assert price_for("my-model-2025-01-01", {"my-model": Price(1, 2)}) == Price(1, 2)


def trials_cfg(tmp_path, llm: dict, **budget) -> TrialsConfig:
    return from_dict(
        TrialsConfig,
        {
            "runs_dir": str(tmp_path / "runs"),
            "trials": 2,
            "concurrency": 1,
            "export_dataset": False,
            "env": {"name": "synthetic", "options": {"num_tasks": 4, "num_doors": 3, "max_steps": 3}},
            "actor": {"llm": llm},
            "reflector": {"kind": "none"},
            "budget": budget,
        },
    )


def test_max_usd_needs_a_price_for_a_remote_model_and_budget_prices_give_one(tmp_path):
    llm = {"backend": "openai", "base_url": "http://10.1.2.3:8000/v1", "model": "my-model"}
    with pytest.raises(ConfigError, match="'my-model@10.1.2.3' has no price"):
        run_trials(trials_cfg(tmp_path, llm, max_usd=1.0), progress=False)
    with pytest.raises(ConfigError, match="budget.max_usd must be > 0"):
        trials_cfg(tmp_path, llm, max_usd=-1)
    with pytest.raises(ConfigError, match="budget.prices.my-model must be"):
        trials_cfg(tmp_path, llm, prices={"my-model": {"prompt": 1}})
    cfg = trials_cfg(tmp_path, llm, max_usd=1.0, prices={"my-model": {"prompt_per_m": 1, "completion_per_m": 2}})
    assert price_for("my-model@10.1.2.3", cfg.budget.price_table()) == Price(1.0, 2.0)


def test_the_budget_is_checked_before_each_call_not_after_each_episode(tmp_path):
    # every reply is 'look', so each episode makes 3 calls (the step limit); the budget runs out mid-episode
    llm = {"backend": "scripted", "scripted_replies": ["Thought: hm\nAction: look"]}
    res = run_trials(trials_cfg(tmp_path, llm, max_tokens=2500), progress=False)
    assert res.stopped_by_budget
    assert 0 < res.summary["cost"]["total_tokens"] <= 2500  # never past the limit
    last = res.records[-1]
    assert last.end_reason == "budget" and len(last.steps) < 3 and last.errored


@pytest.mark.parametrize(
    "budget, total",
    [
        ({"max_tokens": 6000}, lambda cost: cost["total_tokens"] <= 6000),
        # fake-model at $1000 per million tokens: $0.001 a token, so $6 is 6000 tokens
        (
            {"max_usd": 6.0, "prices": {"fake-model": {"prompt_per_m": 1000, "completion_per_m": 1000}}},
            lambda cost: cost["total_usd"] <= 6.0,
        ),
    ],
    ids=["max_tokens", "max_usd"],
)
def test_budgets_hold_with_eight_calls_in_flight(tmp_path, budget, total):
    from retroformer.testing.vault_policy import vault_reply

    with FakeOpenAIServer(reply=vault_reply, latency_s=0.05) as url:
        llm = {"backend": "openai", "base_url": url, "model": "fake-model", "concurrency": 8}
        data = {
            "runs_dir": str(tmp_path / "runs"),
            "trials": 3,
            "concurrency": 8,
            "export_dataset": False,
            "env": {"name": "synthetic", "options": {"num_tasks": 32, "num_doors": 3}},
            "actor": {"kind": "react", "llm": llm},
            "reflector": {"llm": dict(llm, max_tokens=64)},
            "budget": budget,
        }
        res = run_trials(from_dict(TrialsConfig, data), progress=False)
    assert res.stopped_by_budget
    cost = res.summary["cost"]
    assert cost["calls"] > 8 and total(cost), cost


def test_a_megabyte_error_message_is_stored_as_a_few_kilobytes(tmp_path):
    with FakeOpenAIServer(faults=[Fault("500_huge")] * 4) as url:
        llm = {"backend": "openai", "base_url": url, "model": "m", "max_retries": 3, "retry_backoff_s": 0.01}
        res = run_trials(dataclasses.replace(trials_cfg(tmp_path, llm), trials=1), progress=False)
    first = res.records[0]
    assert first.errored and "HTTP 500 (" in first.error and "overloaded xxx" in first.error
    assert len(first.error) <= 4 * 1024 + 100
    assert max(len(r.to_json()) for r in res.records) < 16 * 1024


def test_a_megabyte_environment_error_is_stored_as_a_few_kilobytes(tmp_path, monkeypatch):
    from retroformer.envs.synthetic import VaultEnv
    from retroformer.errors import EnvError

    def failing_step(self, action):
        raise EnvError("the server said: " + "y" * 1_000_000)

    monkeypatch.setattr(VaultEnv, "step", failing_step)
    cfg = from_dict(
        TrialsConfig,
        {
            "runs_dir": str(tmp_path / "runs"),
            "trials": 1,
            "export_dataset": False,
            "env": {"name": "synthetic", "options": {"num_tasks": 2}},
            "actor": {"kind": "plan"},
            "reflector": {"kind": "none"},
        },
    )
    res = run_trials(cfg, progress=False)
    assert all(r.errored and "the server said: yyy" in r.error for r in res.records)
    assert max(len(r.error) for r in res.records) <= 4 * 1024 + 100


# --- 9. which key goes where ------------------------------------------------------------------------------------------


def test_the_openai_key_goes_only_to_openai_unless_a_config_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret")
    monkeypatch.setenv("MY_SERVER_KEY", "sk-my-server")
    assert LLMConfig(backend="openai").key_env() == "OPENAI_API_KEY"
    assert LLMConfig(backend="openai", base_url="https://api.openai.com/v1").key_env() == "OPENAI_API_KEY"
    assert LLMConfig(backend="openai", base_url="http://10.0.0.5:8000/v1").key_env() is None
    server = FakeOpenAIServer(reply=lambda p: "Thought: go\nAction: open[red]")
    with server as url:
        recipe = tmp_path / "r.yaml"
        llm = {"backend": "openai", "base_url": url, "model": "m"}
        data = {
            "runs_dir": str(tmp_path / "runs"),
            "trials": 1,
            "export_dataset": False,
            "env": {"options": {"num_tasks": 1}},
            "actor": {"llm": llm},
            "reflector": {"kind": "none"},
        }
        recipe.write_text(yaml.safe_dump(data))
        assert cli_main(["trials", "--config", str(recipe), "--run_name", "a"]) == 0
        assert (
            cli_main(["trials", "--config", str(recipe), "--run_name", "b", "--actor.llm.api_key_env", "MY_SERVER_KEY"])
            == 0
        )
    sent = [{k.lower(): v for k, v in r.headers.items()}["authorization"] for r in server.requests]
    assert sent[0] == "Bearer EMPTY" and sent[-1] == "Bearer sk-my-server"
    assert not any("sk-openai-secret" in s for s in sent)
