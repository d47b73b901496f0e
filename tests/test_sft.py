"""SFT stage: tiny models, outputs in tmp_path, fail-fast errors, resume, in-process and subprocess runs."""

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
from retroformer.training.common import load_rated_dataset
from retroformer.training.sft import SFTStageConfig, build_sft_trainer, truncate_prompt_left

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "sft_run.py"
RECIPE = REPO / "experiments" / "recipes" / "sft.yaml"

torch.set_num_threads(1)
sft_run = load_script("sft_run")


def sft_argv(model: str, dataset: str, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(RECIPE), "--model", model, "--dataset", dataset, "--output_dir", str(out),
        "--max_steps", "3", "--save_steps", "3", "--logging_steps", "1", "--max_length", "96",
        "--per_device_train_batch_size", "4", *extra,
    ]  # fmt: skip


@pytest.fixture
def dataset(tmp_path) -> str:
    return write_rated_dataset(tmp_path / "rated", num_prompts=8, reflections_per_prompt=4)


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        sft_run.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--min_rating", "--lora.r", "--max_length", "--report_to", "--save_steps"):
        assert flag in out


def test_train_saves_adapter_that_reloads(tmp_path, tiny_models, dataset):  # noqa: F811
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sft"
    metrics = sft_run.main(sft_argv(tiny_models["lm"], dataset, out, "--learning_rate", "5e-3"))

    assert math.isfinite(metrics["sft/train_loss"])
    assert metrics["sft/first_logged_loss"] is not None
    assert metrics["sft/num_examples"] == 8  # one good reflection per prompt after dedup
    assert metrics["sft/global_step"] == 3
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["sft/train_loss"] == pytest.approx(metrics["sft/train_loss"])
    assert (out / "sft_config.yaml").is_file()
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert any("loss" in entry for entry in state["log_history"])

    # LoRA B matrices start at zero: a trained adapter has moved them.
    weights = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)

    base = AutoModelForCausalLM.from_pretrained(tiny_models["lm"])
    model = PeftModel.from_pretrained(base, str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer("Reflection:", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids.shape[1]


def test_resume_from_last_checkpoint(tmp_path, tiny_models, dataset):  # noqa: F811
    from retroformer.training.sft import run_sft

    out = tmp_path / "sft"
    first = run_sft(load_config(SFTStageConfig, sft_argv(tiny_models["lm"], dataset, out, "--max_steps", "2")))
    assert first["sft/resumed_from_step"] is None
    assert (out / "checkpoint-2").is_dir()
    second = run_sft(load_config(SFTStageConfig, sft_argv(tiny_models["lm"], dataset, out, "--max_steps", "4")))
    assert second["sft/resumed_from_step"] == 2
    assert second["sft/global_step"] == 4
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_loss_on_completion_only_and_prompt_cut_from_the_left(tmp_path, tiny_models, dataset):  # noqa: F811
    cfg = load_config(SFTStageConfig, sft_argv(tiny_models["lm"], dataset, tmp_path / "sft", "--max_length", "48"))
    trainer, info = build_sft_trainer(cfg)
    tokenizer = trainer.processing_class
    assert info["sft/num_prompts_truncated"] == 8
    row = trainer.train_dataset[0]
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) <= 48
    first = next(i for i, label in enumerate(labels) if label != -100)
    assert first > 0 and all(label != -100 for label in labels[first:])  # prompt masked, completion trained
    assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
    prompt_text = tokenizer.decode(ids[:first])
    assert prompt_text.endswith("door.\nResult: failed\nReflection:")  # the clue survives the cut
    assert tokenizer.decode(labels[first:-1]).startswith(" I opened the wrong door")


def test_truncate_prompt_left_fits_and_keeps_the_end(tiny_models):  # noqa: F811
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["lm"])
    prompt = rated_rows(num_prompts=1)["prompt"][0]
    completion = " Next time open[jade]."
    kept = truncate_prompt_left(tokenizer, prompt, completion, 30)
    assert kept is not None and prompt.endswith(kept) and len(kept) < len(prompt)
    assert len(tokenizer(kept + completion + tokenizer.eos_token)["input_ids"]) <= 30
    assert truncate_prompt_left(tokenizer, prompt, completion, 10_000) == prompt
    assert truncate_prompt_left(tokenizer, prompt, completion * 20, 30) is None


def test_dataset_list_is_concatenated(tmp_path):
    a = write_rated_dataset(tmp_path / "a", num_prompts=2, reflections_per_prompt=3)
    b = write_rated_dataset(tmp_path / "b", num_prompts=3, reflections_per_prompt=3, seed=1)
    ds = load_rated_dataset([a, b], ("prompt", "reflection", "rating"))
    assert len(ds) == 15 and ds.column_names == ["prompt", "reflection", "rating"]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Input errors must surface before any tokenizer or model is loaded."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the inputs were checked")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_missing_dataset_fails_fast(tmp_path, tiny_models, no_model_loading):  # noqa: F811
    with pytest.raises(DataError, match="does not exist"):
        sft_run.main(sft_argv(tiny_models["lm"], str(tmp_path / "nope"), tmp_path / "out"))


def test_dataset_without_columns_fails_fast(tmp_path, tiny_models, no_model_loading):  # noqa: F811
    from datasets import Dataset

    path = tmp_path / "bad"
    Dataset.from_dict({"prompt": ["x"], "text": ["y"]}).save_to_disk(str(path))
    with pytest.raises(DataError, match=r"lacks columns \['reflection', 'rating'\]"):
        sft_run.main(sft_argv(tiny_models["lm"], str(path), tmp_path / "out"))


def test_nothing_above_threshold_fails_fast(tmp_path, tiny_models, dataset, no_model_loading):  # noqa: F811
    with pytest.raises(DataError, match=r"no reflections with rating > min_rating=1\.0 among 32 rows"):
        sft_run.main(sft_argv(tiny_models["lm"], dataset, tmp_path / "out", "--min_rating", "1.0"))


def test_missing_model_fails_fast(tmp_path, dataset, no_model_loading):
    with pytest.raises(ConfigError, match=r"model='.*/no/such/model' does not exist"):
        sft_run.main(sft_argv(str(tmp_path / "no" / "such" / "model"), dataset, tmp_path / "out"))


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--lora.r", "0"], r"lora\.r=0 must be >= 1"),
        (["--max_steps", "0"], r"max_steps=0 must be > 0"),
        (["--max_length", "4"], r"max_length=4 is too short"),
        (["--lora.rank", "2"], r"unknown option '--lora.rank'"),
    ],
)
def test_bad_config_is_rejected(tmp_path, flags, match):
    with pytest.raises(ConfigError, match=match):
        load_config(SFTStageConfig, sft_argv("m", "d", tmp_path, *flags))


def test_unknown_yaml_key_is_rejected(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.read_text() + "min_ratng: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'min_ratng'.*Did you mean 'min_rating'"):
        load_config(SFTStageConfig, ["--config", str(recipe)])


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_script_runs_as_subprocess(tmp_path, tiny_models, dataset):  # noqa: F811
    out = tmp_path / "sft"
    argv = sft_argv(tiny_models["lm"], dataset, out, "--max_steps", "2")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, env=_env(), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_config.json").is_file()
    assert json.loads((out / "metrics.json").read_text())["sft/global_step"] == 2


@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None, reason="no accelerate")
def test_script_runs_under_accelerate_launch(tmp_path, tiny_models, dataset):  # noqa: F811
    out = tmp_path / "sft"
    accelerate = str(Path(sys.executable).parent / "accelerate")
    argv = sft_argv(tiny_models["lm"], dataset, out, "--max_steps", "2")
    cmd = [accelerate, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(SCRIPT), *argv]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["sft/global_step"] == 2


def test_completion_loss_goes_down(tmp_path, tiny_models, dataset):  # noqa: F811
    argv = sft_argv(tiny_models["lm"], dataset, tmp_path / "sft", "--max_steps", "30", "--logging_steps", "5",
                    "--learning_rate", "1e-2", "--lora.target_modules", "all-linear", "--save_steps", "100")  # fmt: skip
    metrics = sft_run.main(argv)
    assert metrics["sft/last_logged_loss"] < metrics["sft/first_logged_loss"] - 0.5


def _file_size_limit(limit: int):
    """For a child process: no file may grow past ``limit`` bytes (RLIMIT_FSIZE), as on a disk that fills up; the
    write that crosses it fails with EFBIG instead of killing the process."""
    import resource
    import signal

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_is_a_clear_error_and_a_rerun_finishes(tmp_path, tiny_models, dataset):  # noqa: F811
    out = tmp_path / "sft"
    argv = sft_argv(tiny_models["lm"], dataset, out, "--max_steps", "2", "--save_steps", "1")
    cmd = [sys.executable, str(SCRIPT), *argv]
    full = subprocess.run(
        cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, preexec_fn=_file_size_limit(4096)
    )
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    assert "File too large" in full.stderr and "run the same command again to resume" in full.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["sft/global_step"] == 2


def test_sigterm_ends_the_step_saves_a_checkpoint_and_a_rerun_resumes(tmp_path, tiny_models, dataset):  # noqa: F811
    import re
    import signal

    out = tmp_path / "sft"
    argv = sft_argv(tiny_models["lm"], dataset, out, "--max_steps", "400", "--save_steps", "1000")
    cmd = [sys.executable, str(SCRIPT), *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=tmp_path)
    lines = []
    for line in proc.stdout:  # wait until a step has been logged: training is under way
        lines.append(line)
        if "'loss'" in line or '"loss"' in line:
            proc.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + proc.stdout.read()
    proc.wait(timeout=120)
    assert proc.returncode == 143, output[-3000:]
    assert "Traceback" not in output
    stopped = re.search(r"stopped by SIGTERM at step (\d+)/400", output)
    assert stopped, output[-2000:]
    step = int(stopped.group(1))
    assert 0 < step < 400 and (out / f"checkpoint-{step}").is_dir()

    again = subprocess.run(
        [*cmd, "--max_steps", str(step + 1)], capture_output=True, text=True, env=_env(), cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sft/resumed_from_step"] == step and metrics["sft/global_step"] == step + 1


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None, reason="no accelerate")
def test_sigterm_to_two_accelerate_processes_stops_both_at_one_step(tmp_path, tiny_models, dataset):  # noqa: F811
    # SLURM signals every process of a job step; the two ranks must agree on the step, or the next collective hangs.
    import re
    import signal

    out = tmp_path / "sft"
    accelerate = str(Path(sys.executable).parent / "accelerate")
    argv = sft_argv(tiny_models["lm"], dataset, out, "--max_steps", "400", "--save_steps", "1000")
    launch = [accelerate, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", str(SCRIPT)]  # fmt: skip
    proc = subprocess.Popen(
        [*launch, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=tmp_path,
        start_new_session=True,
    )  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "'loss'" in line:
            os.killpg(proc.pid, signal.SIGTERM)
            break
    output = "".join(lines) + proc.stdout.read()
    proc.wait(timeout=120)
    stopped = set(re.findall(r"stopped by SIGTERM at step (\d+)/400", output))
    assert len(stopped) == 1, output[-3000:]  # every rank that says so names the same step
    step = int(stopped.pop())
    assert (out / f"checkpoint-{step}").is_dir()
    again = subprocess.run(
        [*launch, *argv, "--max_steps", str(step + 1)], capture_output=True, text=True, env=_env(), cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sft/resumed_from_step"] == step and metrics["sft/global_step"] == step + 1


def test_the_data_loader_does_not_warn_about_pinned_memory(tmp_path, tiny_models, dataset):  # noqa: F811
    # On a machine without a GPU, pinning memory does nothing and torch says so on every stage's console.
    import warnings

    cfg = load_config(SFTStageConfig, sft_argv(tiny_models["lm"], dataset, tmp_path / "sft"))
    trainer, _ = build_sft_trainer(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        next(iter(trainer.get_train_dataloader()))
    assert not [w for w in caught if "pin_memory" in str(w.message)]
