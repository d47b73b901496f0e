"""ppo_run.py: in-process and as a subprocess, each reward source and algorithm, resume, and every documented error."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from retroformer.errors import ConfigError, DataError
from retroformer.types import RATED_REFLECTION_COLUMNS

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DOORS = ("amber", "jade", "pearl", "ochre", "cedar", "ivory")


def load_ppo_run():
    spec = importlib.util.spec_from_file_location("ppo_run", REPO / "ppo_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def vault_prompt(k: int) -> str:
    doors = [DOORS[(k + i) % len(DOORS)] for i in range(3)]
    return (
        f"Task: You are in a vault with 3 doors: {', '.join(doors)}. Exactly one leads out.\n"
        f"Action: open[{doors[0]}]\n"
        f"Observation: The {doors[0]} door is locked. Scratched into it: the way out is the {doors[2]} door.\n"
        "Result: failed\nReflection:"
    )


def make_dataset(path: Path, num_prompts: int = 3, columns=RATED_REFLECTION_COLUMNS, rows: list | None = None) -> str:
    from datasets import Dataset

    if rows is None:
        rows = []
        for k in range(num_prompts):
            for good in (True, False):
                row = {c: "" for c in RATED_REFLECTION_COLUMNS}
                row.update(prompt=vault_prompt(k), reflection="Next time open[x]." if good else "Be careful.",
                           rating=float(good), return_before=0.0, return_after=float(good), success_after=good,
                           task_id=f"vault-0-{k:03d}", trial=0, seed=0)  # fmt: skip
                rows.append({c: row[c] for c in columns})
    # num_shards=1: datasets 5.2 saves a zero-row dataset as zero shards otherwise, which load_from_disk cannot read
    ds = Dataset.from_list(rows) if rows else Dataset.from_dict({c: [] for c in columns})
    ds.save_to_disk(str(path), num_shards=1)
    return str(path)


def stub_scores(prompts: list[str], reflections: list[str]) -> list[float]:
    """Varies with the whole text (not just its length), so that groups of different samples are not degenerate and
    the policy gets a gradient."""
    import hashlib

    return [int(hashlib.sha256(y.encode()).hexdigest()[:6], 16) / 0xFFFFFF for y in reflections]


@pytest.fixture
def stub_rm(monkeypatch):
    """Stands in for retroformer.training.reward (the reward-model stage) with a scorer that needs no model."""
    calls = []
    module = types.ModuleType("retroformer.training.reward")

    def load_reward_model(path):
        calls.append(path)
        return stub_scores

    module.load_reward_model = load_reward_model
    monkeypatch.setitem(sys.modules, "retroformer.training.reward", module)
    return calls


def base_args(tiny_models, tmp_path, **over) -> list[str]:
    values = {
        "model": str(tiny_models["lm"]),
        "dataset": make_dataset(tmp_path / "data"),
        "reward_model": str(tiny_models["rm"]),
        "output_dir": str(tmp_path / "ppo"),
        "num_iterations": 2,
        "batch_size": 2,
        "num_samples_per_prompt": 2,
        "minibatch_size": 2,
        "ppo_epochs": 1,
        "max_new_tokens": 6,
        "max_prompt_length": 48,
        "learning_rate": 5e-3,
        "lora.target_modules": "q_proj,v_proj",
    }
    values.update(over)
    args = []
    for key, value in values.items():
        args += [f"--{key}", str(value)]
    return args


def lora_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------------------------- running


def test_ppo_run_in_process_trains_saves_reloads_and_resumes(tiny_models, tmp_path, stub_rm, caplog):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    caplog.set_level("INFO")
    ppo_run = load_ppo_run()
    args = base_args(tiny_models, tmp_path, save_steps=1)
    metrics = ppo_run.main(args)
    out = tmp_path / "ppo"
    assert stub_rm == [str(tiny_models["rm"])]
    assert re.search(r"iteration 2/2 .*ppo/loss", caplog.text)
    assert all(k.startswith(("ppo/", "rollout/")) for k in metrics)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["ppo/iterations"] == 2 and saved["ppo/resumed_from"] == 0
    history = json.loads((out / "history.json").read_text())
    assert [m["iteration"] for m in history] == [1, 2] and all("ppo/loss" in m for m in history)
    assert (out / "config.yaml").is_file() and "num_samples_per_prompt: 2" in (out / "config.yaml").read_text()
    # a fresh LoRA adapter starts with B = 0: training must have moved it
    lora_b = {k: v for k, v in lora_tensors(out).items() if "lora_B" in k}
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b.values())
    # the adapter reloads onto the base model and changes its output
    base = AutoModelForCausalLM.from_pretrained(tiny_models["lm"])
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, str(out))(ids).logits
    assert not torch.allclose(before, after)
    # a rerun with more iterations resumes from the last checkpoint
    assert (out / "checkpoint-2").is_dir()
    resumed = ppo_run.main(args[:-2] + ["--save_steps", "1", "--num_iterations", "3"])
    assert resumed["ppo/resumed_from"] == 2
    assert [m["iteration"] for m in json.loads((out / "history.json").read_text())] == [1, 2, 3]


def test_ppo_run_from_sft_adapter_and_yaml_recipe(tiny_models, tmp_path, stub_rm):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retroformer.training.common import LoraSettings, build_lora_config

    sft = tmp_path / "sft"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_models["lm"]), build_lora_config(LoraSettings(r=2), "CAUSAL_LM")
    )
    with torch.no_grad():  # an SFT adapter that really changes the model (a fresh one has B = 0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(sft)
    AutoTokenizer.from_pretrained(tiny_models["lm"]).save_pretrained(sft)
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text((REPO / "experiments" / "recipes" / "ppo.yaml").read_text())
    args = ["--config", str(recipe), *base_args(tiny_models, tmp_path, sft_adapter=str(sft), num_iterations=1)]
    load_ppo_run().main(args)
    # the trained adapter is the SFT adapter's shape (rank 2), not the recipe's fresh-adapter rank
    out = tmp_path / "ppo"
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 2
    # the reference is the SFT adapter itself (frozen copy), so the first rollout has no KL; only one adapter is saved
    assert json.loads((out / "history.json").read_text())[0]["ppo/kl"] == 0.0
    assert not (out / "reference").exists()
    assert all("lora_" not in k or ".reference." not in k for k in lora_tensors(out))


class FakeScorer:
    """Online scorer double: the next attempt succeeds iff the reflection names the clue's door."""

    calls: list = []

    @classmethod
    def from_run_dir(cls, run_dir, api_key=None):
        cls.calls.append(run_dir)
        return cls()

    async def score(self, rows, reflections):
        out = []
        for row, y in zip(rows, reflections, strict=True):
            door = re.search(r"the way out is the (\w+) door", row["prompt"]).group(1)
            out.append((1.0 if door in y else 0.0) - float(row["return_before"]))
        return out


def test_env_reward_source_with_a_fake_scorer(tiny_models, tmp_path, monkeypatch):
    from retroformer.training.rewards import EnvRewardSource

    module = types.ModuleType("retroformer.rollout")
    module.OnlineReflectionScorer = FakeScorer
    monkeypatch.setitem(sys.modules, "retroformer.rollout", module)
    FakeScorer.calls = []
    source = EnvRewardSource.from_run_dir("runs/x")
    rows = [{"prompt": vault_prompt(0), "task_id": "t", "trial": 0, "return_before": 0.0}] * 2
    assert source.score([r["prompt"] for r in rows], ["open[pearl]", "no idea"], rows) == [1.0, 0.0]
    assert source.score([r["prompt"] for r in rows], ["pearl", "pearl"], rows) == [1.0, 1.0]  # loop is reusable
    source.close()

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = load_ppo_run().main(
        base_args(tiny_models, tmp_path, reward_source="env", env_run_dir=str(run_dir), reward_model="null")
    )
    assert FakeScorer.calls[-1] == str(run_dir)
    assert metrics["ppo/iterations"] == 2


def test_env_reward_source_with_the_real_trial_loop(tmp_path):
    """Integration: a synthetic-vault trials run, then the real online scorer re-runs the next attempt."""
    from datasets import load_from_disk

    from retroformer.config import from_dict
    from retroformer.training.rewards import EnvRewardSource
    from retroformer.trials import TrialsConfig, dataset_path, run_trials

    cfg = from_dict(TrialsConfig, {
        "run_name": "t", "runs_dir": str(tmp_path / "runs"), "trials": 2,
        "env": {"name": "synthetic", "options": {"num_tasks": 3, "num_doors": 3}}, "actor": {"kind": "plan"},
        "reflector": {"llm": {"backend": "scripted", "scripted_policy": "synthetic-clue",
                              "scripted_options": {"carry_prob": 0.0}}},
    })  # fmt: skip
    result = run_trials(cfg, progress=False)
    rows = list(load_from_disk(str(dataset_path(result.run_dir))))
    assert rows and all(r["return_before"] == 0.0 for r in rows)
    source = EnvRewardSource.from_run_dir(str(result.run_dir))
    doors = [re.findall(r"the way out is the (\w+) door", r["prompt"])[-1] for r in rows]
    good = [f"The scratch said the way out is the {d} door. Next time open[{d}]." for d in doors]
    bad = ["Next time I should think more carefully."] * len(rows)
    prompts = [r["prompt"] for r in rows]
    assert source.score(prompts, good, rows) == [1.0] * len(rows)
    assert source.score(prompts, bad, rows) == [0.0] * len(rows)
    source.close()


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trl_algorithms_smoke(tiny_models, tmp_path, stub_rm, algorithm):
    # With few samples a group can get identical rewards; its loss and gradient are then exactly zero (expected).
    metrics = load_ppo_run().main(base_args(tiny_models, tmp_path, algorithm=algorithm, num_iterations=2))
    out = tmp_path / "ppo"
    assert metrics["ppo/algorithm_steps"] == 2
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["ppo/algorithm_steps"] == 2 and all(k.startswith("ppo/") for k in saved)
    assert "ppo/last/loss" in saved
    assert any(v.abs().sum() > 0 for k, v in lora_tensors(out).items() if "lora_B" in k)


def test_only_failed_keeps_prompts_whose_reflection_did_not_help(tiny_models, tmp_path):
    from retroformer.training.ppo_stage import PPORunConfig, load_prompts

    rows = [{"prompt": "a", "success_after": True}, {"prompt": "b", "success_after": False},
            {"prompt": "b", "success_after": False}, {"prompt": "c", "success_after": True}]  # fmt: skip
    path = make_dataset(tmp_path / "d", rows=rows)
    cfg = PPORunConfig(model="m", dataset=[path], reward_model="rm", only_failed=True)
    assert load_prompts(cfg)[0] == ["b"]
    cfg = PPORunConfig(model="m", dataset=[path], reward_model="rm")
    assert load_prompts(cfg)[0] == ["a", "b", "c"]


# ------------------------------------------------------------------------------------------------ as a subprocess


def test_help_lists_every_field_and_exits_0():
    result = subprocess.run([sys.executable, "ppo_run.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for flag in ("--num_samples_per_prompt", "--kl_coef", "--reward_source", "--lora.r", "--max_prompt_length"):
        assert flag in result.stdout


@pytest.mark.skipif(
    importlib.util.find_spec("retroformer.training.reward") is None, reason="the reward-model stage is not installed"
)
def test_ppo_run_as_a_subprocess(tiny_models, tmp_path):
    args = base_args(tiny_models, tmp_path, num_iterations=1)
    result = subprocess.run([sys.executable, "ppo_run.py", *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iteration 1/1" in result.stderr
    assert (tmp_path / "ppo" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------- errors


def test_errors_before_any_model_is_loaded(tiny_models, tmp_path, stub_rm, monkeypatch):
    import retroformer.training.ppo_stage as ppo

    def no_model(cfg):  # every error below must come before this
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ppo, "build_policy", no_model)
    main = load_ppo_run().main
    with pytest.raises(DataError, match="does not exist"):
        main(base_args(tiny_models, tmp_path, dataset=str(tmp_path / "nowhere")))
    no_prompt = make_dataset(tmp_path / "no_prompt", columns=("reflection", "rating"))
    with pytest.raises(DataError, match=r"lacks columns \['prompt'\]"):
        main(base_args(tiny_models, tmp_path, dataset=no_prompt))
    empty = make_dataset(tmp_path / "empty", rows=[])
    with pytest.raises(DataError, match="has no rows"):
        main(base_args(tiny_models, tmp_path, dataset=empty))
    with pytest.raises(ConfigError, match="is a LlamaForCausalLM, not a reward model"):
        main(base_args(tiny_models, tmp_path, reward_model=str(tiny_models["lm"])))
    two_labels = tmp_path / "rm2"
    shutil.copytree(tiny_models["rm"], two_labels)
    config = json.loads((two_labels / "config.json").read_text())
    config["id2label"] = {"0": "bad", "1": "good"}
    config["label2id"] = {"bad": 0, "good": 1}
    (two_labels / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="num_labels=2; a reward model must output one scalar"):
        main(base_args(tiny_models, tmp_path, reward_model=str(two_labels)))
    with pytest.raises(ConfigError, match="reward_source=rm needs reward_model"):
        main(base_args(tiny_models, tmp_path, reward_model="null"))
    with pytest.raises(ConfigError, match="model=.* does not exist"):
        main(base_args(tiny_models, tmp_path, model=str(tmp_path / "no_model")))
    with pytest.raises(ConfigError, match="env_run_dir=.* does not exist"):
        main(base_args(tiny_models, tmp_path, reward_source="env", env_run_dir=str(tmp_path / "no_run")))
    env_only = make_dataset(tmp_path / "env_only", columns=("prompt", "reflection"))
    (tmp_path / "run").mkdir()
    with pytest.raises(DataError, match=r"lacks columns \['task_id', 'trial', 'return_before'\]"):
        main(base_args(tiny_models, tmp_path, reward_source="env", env_run_dir=str(tmp_path / "run"), dataset=env_only))
    with pytest.raises(ConfigError, match="unknown option .--kl_coeff."):
        main(base_args(tiny_models, tmp_path) + ["--kl_coeff", "0.1"])


def test_env_reward_source_closes_an_in_process_actor_on_its_own_loop(tiny_models, tmp_path):
    """The online reward with an ``hf`` actor: close() stops the actor's micro-batcher before the loop closes, so
    nothing complains when it is garbage-collected (it used to print "Event loop is closed" at the end of PPO)."""
    import gc

    from datasets import load_from_disk

    from retroformer.config import from_dict
    from retroformer.training.rewards import EnvRewardSource
    from retroformer.trials import TrialsConfig, dataset_path, run_trials

    llm = {"backend": "hf", "model": str(tiny_models["lm"]), "max_tokens": 8, "device": "cpu"}
    cfg = from_dict(TrialsConfig, {
        "run_name": "t", "runs_dir": str(tmp_path / "runs"), "trials": 2,
        "env": {"name": "synthetic", "options": {"num_tasks": 2, "num_doors": 3}},
        "actor": {"kind": "react", "llm": llm},
        "reflector": {"llm": {"backend": "scripted", "scripted_policy": "synthetic-clue"}},
    })  # fmt: skip
    result = run_trials(cfg, progress=False)
    rows = list(load_from_disk(str(dataset_path(result.run_dir))))
    assert rows
    unraisable = []
    old_hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        source = EnvRewardSource.from_run_dir(str(result.run_dir))
        backend = source.scorer.actor.llm
        while hasattr(backend, "inner"):  # metered / cached wrappers
            backend = backend.inner
        source.score([r["prompt"] for r in rows], ["Open the red door."] * len(rows), rows)
        assert backend._worker is not None  # the micro-batcher ran on the source's loop
        source.close()
        assert backend._worker is None
        del source
        gc.collect()
    finally:
        sys.unraisablehook = old_hook
    assert not unraisable, [str(u.exc_value) for u in unraisable]


def test_sigterm_finishes_the_iteration_saves_a_checkpoint_and_a_rerun_resumes(tiny_models, tmp_path):
    # A cluster's preemption or time limit sends SIGTERM: the iteration in progress (its rollout may be paid calls)
    # is finished and checkpointed instead of lost, and the process exits 143.
    import os
    import signal

    out = tmp_path / "ppo"
    argv = base_args(tiny_models, tmp_path, num_iterations=500, save_steps=1000)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "ppo_run.py"), *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stderr:  # wait until an iteration has finished: training is under way
        lines.append(line)
        if "iteration 1/500" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    err = "".join(lines) + rest
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    stopped = re.search(r"stopped by SIGTERM after iteration (\d+)/500", err)
    assert stopped, err[-2000:]
    step = int(stopped.group(1))
    assert step < 500 and (out / f"checkpoint-{step}" / "training_state.pt").is_file()

    again = subprocess.run([*cmd, "--num_iterations", str(step + 1)], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ppo/resumed_from"] == step and metrics["ppo/iterations"] == step + 1
