"""Reward-model stage: both objectives on tiny models, held-out metrics, reload, resume, fail-fast errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_training import load_script, rated_rows, tiny_models, write_rated_dataset  # noqa: F401

from retroformer.config import load_config
from retroformer.errors import ConfigError, DataError
from retroformer.training.reward import (
    RatedRow,
    RewardStageConfig,
    build_pairs,
    encode_rm_input,
    load_reward_model,
    pearson,
    prepare_reward_data,
    rows_from_dataset,
    spearman,
    split_by_task,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "reward_run.py"
RECIPE = REPO / "experiments" / "recipes" / "reward.yaml"

torch.set_num_threads(1)
reward_run = load_script("reward_run")


def rm_argv(model: str, dataset: str, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(RECIPE), "--model", model, "--dataset", dataset, "--output_dir", str(out),
        "--max_steps", "3", "--save_steps", "3", "--logging_steps", "1", "--max_length", "96",
        "--per_device_train_batch_size", "4", "--min_pairs", "4", *extra,
    ]  # fmt: skip


@pytest.fixture
def dataset(tmp_path) -> str:
    return write_rated_dataset(tmp_path / "rated", num_prompts=10, reflections_per_prompt=4, wrong_door=True)


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        reward_run.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--mode", "--eval_fraction", "--use_lora", "--merge_lora", "--lora.r", "--report_to"):
        assert flag in out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _held_out(dataset: str, seed: int = 0, eval_fraction: float = 0.2) -> list[RatedRow]:
    from datasets import load_from_disk

    return split_by_task(rows_from_dataset(load_from_disk(dataset)), eval_fraction, seed)[1]


def test_pairwise_lora_adapter_trains_and_reloads(tmp_path, tiny_models, dataset):  # noqa: F811
    out = tmp_path / "rm"
    metrics = reward_run.main(rm_argv(tiny_models["rm"], dataset, out, "--mode", "pairwise", "--merge_lora", "false"))

    assert metrics["reward/mode"] == "pairwise"
    assert math.isfinite(metrics["reward/train_loss"]) and metrics["reward/first_logged_loss"] is not None
    assert metrics["reward/num_train_pairs"] > 0 and metrics["reward/eval_num_pairs"] > 0
    assert 0.0 <= metrics["reward/eval_pairwise_accuracy"] <= 1.0
    assert json.loads((out / "metrics.json").read_text())["reward/mode"] == "pairwise"
    assert (out / "reward_config.yaml").is_file() and (out / "adapter_config.json").is_file()

    # LoRA B starts at zero and the score head is a trained copy: both must have moved.
    adapter = _weights(out / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    head = next(v for k, v in adapter.items() if "score" in k)
    base_head = next(v for k, v in _weights(Path(tiny_models["rm"]) / "model.safetensors").items() if "score" in k)
    assert not torch.allclose(head, base_head)

    # The reloaded scorer reproduces the held-out metrics computed at the end of training.
    scorer = load_reward_model(str(out))
    rows = _held_out(dataset)
    scores = scorer([r.prompt for r in rows], [r.reflection for r in rows])
    assert len(scores) == len(rows) and all(isinstance(s, float) for s in scores)
    assert pearson(scores, [r.rating for r in rows]) == pytest.approx(metrics["reward/eval_pearson"], abs=1e-4)


def test_regression_full_finetune_trains_and_reloads(tmp_path, tiny_models, dataset):  # noqa: F811
    out = tmp_path / "rm"
    metrics = reward_run.main(rm_argv(tiny_models["rm"], dataset, out, "--mode", "regression", "--use_lora", "false"))
    assert metrics["reward/mode"] == "regression"
    assert math.isfinite(metrics["reward/train_loss"])
    assert metrics["reward/eval_mse"] is not None
    trained, base = _weights(out / "model.safetensors"), _weights(Path(tiny_models["rm"]) / "model.safetensors")
    assert any(not torch.allclose(trained[k], base[k]) for k in base)
    scorer = load_reward_model(str(out))
    assert len(scorer(["a prompt Reflection:"] * 3, ["x", "y", "z"])) == 3


def test_resume_from_last_checkpoint_and_merged_model_reloads(tmp_path, tiny_models, dataset):  # noqa: F811
    from retroformer.training.reward import run_reward

    out = tmp_path / "rm"
    first = run_reward(load_config(RewardStageConfig, rm_argv(tiny_models["rm"], dataset, out, "--max_steps", "2")))
    assert first["reward/resumed_from_step"] is None and (out / "checkpoint-2").is_dir()
    second = run_reward(load_config(RewardStageConfig, rm_argv(tiny_models["rm"], dataset, out, "--max_steps", "4")))
    assert second["reward/resumed_from_step"] == 2 and second["reward/global_step"] == 4
    assert not (out / "adapter_config.json").exists() and (out / "config.json").is_file()  # LoRA merged
    rows = _held_out(dataset)
    scores = load_reward_model(str(out))([r.prompt for r in rows], [r.reflection for r in rows])
    assert pearson(scores, [r.rating for r in rows]) == pytest.approx(second["reward/eval_pearson"], abs=1e-4)


def test_auto_mode_picks_by_number_of_pairs(tmp_path, tiny_models):  # noqa: F811
    many = write_rated_dataset(tmp_path / "many", num_prompts=10, reflections_per_prompt=4)
    single = write_rated_dataset(tmp_path / "single", num_prompts=10, reflections_per_prompt=1)
    cfg = load_config(RewardStageConfig, rm_argv(tiny_models["rm"], many, tmp_path / "o"))
    assert prepare_reward_data(cfg).mode == "pairwise"
    cfg = load_config(RewardStageConfig, rm_argv(tiny_models["rm"], single, tmp_path / "o"))
    assert prepare_reward_data(cfg).mode == "regression"
    cfg = load_config(RewardStageConfig, rm_argv(tiny_models["rm"], single, tmp_path / "o", "--mode", "pairwise"))
    with pytest.raises(DataError, match="mode=pairwise but the training split has no pairs"):
        prepare_reward_data(cfg)


def test_pairs_come_from_one_prompt_and_split_does_not_leak():
    rows = [RatedRow(p, f"{p}-{j}", float(j % 2), f"task-{p}") for p in "abcdefghij" for j in range(3)]
    pairs = build_pairs(rows, max_pairs_per_prompt=16, seed=0)
    assert len(pairs) == 20  # per prompt: ratings 0, 1, 0 -> two pairs
    assert all(c.prompt == r.prompt and c.rating > r.rating for c, r in pairs)
    assert len(build_pairs(rows, max_pairs_per_prompt=1, seed=0)) == 10
    train, held_out = split_by_task(rows, 0.2, seed=0)
    assert len(held_out) == 6 and not {r.prompt for r in train} & {r.prompt for r in held_out}
    assert split_by_task(rows, 0.2, seed=0) == (train, held_out)  # seeded


def test_correlations_match_known_values():
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [1, 1, 1]) is None
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their average rank: ranks [0.5, 0.5, 2, 3] against [0, 1, 2, 3]
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(pearson([0.5, 0.5, 2, 3], [0, 1, 2, 3]))


def test_input_is_cut_from_the_left_and_ends_with_eos(tiny_models):  # noqa: F811
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["rm"])
    row = rated_rows(num_prompts=1)
    ids = encode_rm_input(tokenizer, row["prompt"][0], row["reflection"][0], 24)
    assert len(ids) == 24 and ids[-1] == tokenizer.eos_token_id
    text = row["prompt"][0] + " " + row["reflection"][0]
    kept = tokenizer.decode(ids[:-1])
    assert len(kept) < len(text) and text.endswith(kept)  # the start is cut, the end kept
    full = encode_rm_input(tokenizer, row["prompt"][0], row["reflection"][0], 10_000)
    assert tokenizer.decode(full[:-1]) == row["prompt"][0] + " " + row["reflection"][0]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Input errors must surface before any tokenizer or model weights are loaded."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the inputs were checked")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", refuse)


def test_missing_dataset_fails_fast(tmp_path, tiny_models, no_model_loading):  # noqa: F811
    with pytest.raises(DataError, match="does not exist"):
        reward_run.main(rm_argv(tiny_models["rm"], str(tmp_path / "nope"), tmp_path / "out"))


def test_dataset_without_task_id_fails_fast(tmp_path, tiny_models, no_model_loading):  # noqa: F811
    from datasets import Dataset

    rows = rated_rows(num_prompts=2)
    del rows["task_id"]
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"lacks columns \['task_id'\]"):
        reward_run.main(rm_argv(tiny_models["rm"], str(tmp_path / "bad"), tmp_path / "out"))


def test_empty_dataset_fails_fast(tmp_path, tiny_models, no_model_loading):  # noqa: F811
    from datasets import Dataset

    rows = {k: v[:0] for k, v in rated_rows(num_prompts=1).items()}
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="has no rows"):
        reward_run.main(rm_argv(tiny_models["rm"], str(tmp_path / "empty"), tmp_path / "out"))


def test_single_task_cannot_be_split(tmp_path, tiny_models, no_model_loading):  # noqa: F811
    one = write_rated_dataset(tmp_path / "one", num_prompts=1, reflections_per_prompt=4)
    with pytest.raises(DataError, match="needs rows of at least 2 tasks"):
        reward_run.main(rm_argv(tiny_models["rm"], one, tmp_path / "out"))


def test_missing_model_fails_fast(tmp_path, dataset, no_model_loading):
    with pytest.raises(ConfigError, match=r"model='.*/missing' does not exist"):
        reward_run.main(rm_argv(str(tmp_path / "missing"), dataset, tmp_path / "out"))


def test_classifier_with_two_labels_is_rejected(tmp_path, tiny_models, dataset, no_model_loading):  # noqa: F811
    two = tmp_path / "two_labels"
    shutil.copytree(tiny_models["rm"], two)
    config = json.loads((two / "config.json").read_text())
    config["id2label"] = {"0": "LABEL_0", "1": "LABEL_1"}
    config["label2id"] = {"LABEL_0": 0, "LABEL_1": 1}
    (two / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="num_labels=2; a reward model outputs one scalar"):
        reward_run.main(rm_argv(str(two), dataset, tmp_path / "out"))


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--mode", "ranking"], r"mode: got 'ranking', expected one of"),
        (["--eval_fraction", "1.0"], r"eval_fraction=1.0 must be in \[0, 1\)"),
        (["--lora.dropout", "1.5"], r"lora\.dropout=1.5 must be in \[0, 1\)"),
        (["--use_lora", "maybe"], r"use_lora: got 'maybe', expected a value of type bool"),
    ],
)
def test_bad_config_is_rejected(tmp_path, flags, match):
    with pytest.raises(ConfigError, match=match):
        load_config(RewardStageConfig, rm_argv("m", "d", tmp_path, *flags))


def test_script_runs_as_subprocess(tmp_path, tiny_models, dataset):  # noqa: F811
    out = tmp_path / "rm"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    argv = rm_argv(tiny_models["rm"], dataset, out, "--max_steps", "2")
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["reward/global_step"] == 2


@pytest.mark.parametrize("mode", ["pairwise", "regression"])
def test_learns_to_prefer_reflections_that_carry_the_clue(tmp_path, tiny_models, mode):  # noqa: F811
    # Bad reflections are generic or name a wrong door, so the model must tie the door to the prompt's clue.
    data = write_rated_dataset(tmp_path / "rated", num_prompts=40, reflections_per_prompt=4, wrong_door=True)
    argv = rm_argv(tiny_models["rm"], data, tmp_path / "rm", "--mode", mode, "--max_steps", "300", "--save_steps",
                   "1000", "--logging_steps", "50", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
                   "--max_length", "128")  # fmt: skip
    metrics = reward_run.main(argv)
    print(mode, {k: v for k, v in metrics.items() if "eval" in k or "loss" in k or "per_second" in k})
    assert metrics["reward/eval_num_pairs"] >= 8
    assert metrics["reward/eval_pairwise_accuracy"] >= 0.75
    assert metrics["reward/eval_spearman"] > 0.3
