"""``report_to: tensorboard``: each stage and `retroformer trials` write event files with namespaced metrics, read
back here with TensorBoard's own event reader; a tracker that is named but not installed fails before any model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_training import load_script, tiny_models, write_rated_dataset  # noqa: F401
from test_ppo_run import FakeScorer, base_args, make_dataset, stub_rm  # noqa: F401

from retroformer.config import load_config
from retroformer.errors import ConfigError
from retroformer.tracking import TRACKERS, check_report_to, flat_config, parse_report_to
from retroformer.training.ppo import PPORunConfig
from retroformer.training.sft import SFTStageConfig

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def scalars(logdir: Path) -> dict[str, list[int]]:
    """Every scalar tag under ``logdir`` (all runs below it) -> the steps it was logged at."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    out: dict[str, list[int]] = {}
    for run, tags in mux.Runs().items():
        for tag in tags["scalars"]:
            out.setdefault(tag, []).extend(e.step for e in mux.Scalars(run, tag))
    return {tag: sorted(steps) for tag, steps in out.items()}


def stage_argv(script: str, model: str, dataset: str, out: Path) -> list[str]:
    recipe = REPO / "experiments" / "recipes" / f"{script}.yaml"
    argv = ["--config", str(recipe), "--model", model, "--dataset", dataset, "--output_dir", str(out),
            "--max_steps", "3", "--save_steps", "3", "--logging_steps", "1", "--max_length", "96",
            "--per_device_train_batch_size", "4", "--report_to", "tensorboard"]  # fmt: skip
    return argv + (["--min_pairs", "4"] if script == "reward" else [])


def test_sft_writes_namespaced_scalars(tmp_path, tiny_models):  # noqa: F811
    dataset = write_rated_dataset(tmp_path / "rated", num_prompts=8, reflections_per_prompt=4)
    out = tmp_path / "sft"
    load_script("sft_run").main(stage_argv("sft", tiny_models["lm"], dataset, out))
    tags = scalars(out / "tensorboard")
    assert tags["sft/loss"] == [1, 2, 3]
    assert tags["sft/learning_rate"] == [1, 2, 3] and tags["sft/grad_norm"] == [1, 2, 3]
    assert tags["sft/train_loss"] == [3]  # the trainer's summary at the end
    assert all(tag.startswith("sft/") for tag in tags)


def test_reward_writes_namespaced_scalars_and_held_out_metrics(tmp_path, tiny_models):  # noqa: F811
    dataset = write_rated_dataset(tmp_path / "rated", num_prompts=10, reflections_per_prompt=4)
    out = tmp_path / "reward"
    metrics = load_script("reward_run").main(stage_argv("reward", tiny_models["lm"], dataset, out))
    tags = scalars(out / "tensorboard")
    assert tags["reward/loss"] == [1, 2, 3]
    assert tags["reward/eval_pairwise_accuracy"] == [3]  # held-out metrics, after training
    assert metrics["reward/eval_num_rows"] > 0
    assert all(tag.startswith("reward/") for tag in tags)


def test_ppo_loop_logs_every_iteration(tmp_path, tiny_models, stub_rm):  # noqa: F811
    ppo_run = load_script("ppo_run")
    ppo_run.main(base_args(tiny_models, tmp_path, num_iterations=3, report_to="tensorboard"))
    tags = scalars(tmp_path / "ppo" / "tensorboard")
    for tag in ("rollout/reward_mean", "rollout/reward_std", "ppo/kl", "ppo/clipfrac", "ppo/approx_kl",
                "ppo/learning_rate", "ppo/loss"):  # fmt: skip
        assert tags[tag] == [1, 2, 3], tag
    assert (tmp_path / "ppo" / "tensorboard" / "ppo").is_dir()


def test_ppo_logs_held_out_success_when_configured(tmp_path, tiny_models, monkeypatch):  # noqa: F811
    import sys
    import types

    module = types.ModuleType("retroformer.rollout")
    module.OnlineReflectionScorer = FakeScorer  # the next attempt succeeds iff the reflection names the clue's door
    monkeypatch.setitem(sys.modules, "retroformer.rollout", module)
    (tmp_path / "run").mkdir()
    held_out = make_dataset(tmp_path / "held-out", num_prompts=2)
    argv = base_args(tiny_models, tmp_path, reward_source="env", env_run_dir=str(tmp_path / "run"), reward_model="null",
                     num_iterations=3, eval_dataset=held_out, eval_steps=2, report_to="tensorboard")  # fmt: skip
    load_script("ppo_run").main(argv)
    tags = scalars(tmp_path / "ppo" / "tensorboard")
    assert tags["eval/success"] == [2, 3] and tags["eval/reward_mean"] == [2, 3]  # every 2 iterations and the last
    assert tags["rollout/reward_mean"] == [1, 2, 3]
    with pytest.raises(ConfigError, match="eval_steps=2 with eval_dataset=.*set both"):
        PPORunConfig(model="m", dataset=["d"], reward_model="r", eval_steps=2)


def test_trl_algorithm_reports_under_ppo(tmp_path, tiny_models, stub_rm):  # noqa: F811
    load_script("ppo_run").main(base_args(tiny_models, tmp_path, algorithm="grpo", report_to="tensorboard"))
    tags = scalars(tmp_path / "ppo" / "tensorboard")
    assert tags["ppo/loss"] == [1, 2] and all(tag.startswith("ppo/") for tag in tags)


def test_trials_report_success_per_trial_and_cost(tmp_path):
    from retroformer.cli import main

    recipe = REPO / "experiments" / "demo" / "collect.yaml"
    argv = ["trials", "--config", str(recipe), "--runs_dir", str(tmp_path), "--run_name", "r",
            "--env.options", "{num_tasks: 8, num_doors: 4, seed: 100}", "--report_to", "tensorboard"]  # fmt: skip
    assert main(argv) == 0
    tags = scalars(tmp_path / "r" / "tensorboard")
    assert tags["trials/cumulative_success"] == [0, 1, 2]
    assert tags["trials/per_attempt_success"][0] == 0 and tags["trials/tokens"] == [0, 1, 2]
    assert tags["trials/total_tokens"] == [2] and tags["trials/total_usd"] == [2]


# ----------------------------------------------------------------------------------------------------------- errors


def test_report_to_names_are_parsed():
    assert parse_report_to("none") == [] and parse_report_to("") == []
    assert parse_report_to("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert check_report_to("tensorboard") == ["tensorboard"]
    assert flat_config({"a": {"b": 1}, "c": [1, 2], "d": None}) == {"a.b": 1, "c": "[1, 2]", "d": "null"}


def test_unknown_tracker_is_rejected():
    with pytest.raises(ConfigError, match=r"unknown tracker 'tensorbord'.*tensorboard"):
        load_config(
            SFTStageConfig, ["--model", "m", "--dataset", "d", "--output_dir", "o", "--report_to", "tensorbord"]
        )


def test_missing_tracker_fails_before_any_model_loads(tmp_path, monkeypatch, tiny_models):  # noqa: F811
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert TRACKERS["wandb"][1] == "wandb"
    with pytest.raises(ConfigError, match=r"the wandb tracker needs the 'wandb' package.*pip install wandb"):
        load_config(SFTStageConfig, ["--model", "m", "--dataset", "d", "--output_dir", "o", "--report_to", "wandb"])
    with pytest.raises(ConfigError, match=r"pip install wandb"):
        PPORunConfig(model="m", dataset=["d"], reward_model="r", report_to="tensorboard,wandb")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the tracker was checked")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_model)
    dataset = write_rated_dataset(tmp_path / "rated", num_prompts=2, reflections_per_prompt=2)
    argv = stage_argv("sft", tiny_models["lm"], dataset, tmp_path / "sft")
    with pytest.raises(ConfigError, match="pip install wandb"):
        load_script("sft_run").main([*argv, "--report_to", "wandb"])
    from retroformer.cli import main

    trials = ["trials", "--config", str(REPO / "experiments" / "demo" / "collect.yaml"), "--runs_dir", str(tmp_path),
              "--report_to", "wandb"]  # fmt: skip
    assert main(trials) == 2 and not (tmp_path / "collect").exists()
