"""Reliability of the trial loop against an OpenAI-compatible server: faults, the response cache, the token budget,
and SIGKILL during each training stage followed by a resume.

The actor and the reflector are real :class:`~retroformer.llm.openai_backend.OpenAIBackend` clients talking HTTP to
:class:`~retroformer.testing.FakeOpenAIServer`, whose reply function plays the vault: the actor opens the door its
newest reflection names (else the first door) and the reflector carries the clue forward. So every task fails trial
0, gets one reflection and succeeds at trial 1: three calls per task.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_training import load_script, write_rated_dataset

from retroformer.config import from_dict
from retroformer.dataset import rated_reflection_rows
from retroformer.records import effective_records, read_records
from retroformer.testing import FakeOpenAIServer, Fault
from retroformer.testing.vault_policy import vault_reply
from retroformer.trials import TrialsConfig, records_path, run_trials


def server_cfg(tmp_path, base_url: str, run_name: str = "r", **over) -> TrialsConfig:
    """Four vault tasks, three trials, actor and reflector over ``base_url`` with tiny timeouts and retries."""
    llm = {"backend": "openai", "base_url": base_url, "model": "fake-model", "style": "chat", "timeout_s": 0.5}
    llm.update(over.pop("llm", {}))
    data = {
        "run_name": run_name,
        "runs_dir": str(tmp_path / "runs"),
        "trials": 3,
        "concurrency": 1,
        "env": {"name": "synthetic", "options": {"num_tasks": 4, "num_doors": 3}},
        "actor": {"kind": "react", "llm": dict(llm)},
        "reflector": {"llm": dict(llm, max_tokens=64)},
    }
    for key, value in over.items():
        node = data
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return from_dict(TrialsConfig, data)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    """Retry delays of milliseconds (LLMConfig has no backoff field; the backend takes it as a constructor argument)."""
    from retroformer.llm import openai_backend

    monkeypatch.setattr(openai_backend.OpenAIBackend, "_backoff", lambda self, retry: 0.01)


# --- faults through the loop --------------------------------------------------------------------------------------

FAULTS = [
    pytest.param(Fault("timeout"), id="timeout"),
    pytest.param(Fault("429", retry_after="0.05"), id="429-retry-after"),
    pytest.param(Fault("500"), id="500"),
    pytest.param(Fault("503"), id="503"),
    pytest.param(Fault("reset"), id="connection-reset"),
    pytest.param(Fault("malformed"), id="malformed-json"),
    pytest.param(Fault("empty"), id="empty-completion"),
    pytest.param(Fault("null_content"), id="null-content"),
]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_few_faults_are_retried_and_the_run_completes(tmp_path, fault, caplog):
    caplog.set_level("INFO", logger="retroformer")
    server = FakeOpenAIServer(reply=vault_reply, faults=[fault, fault], timeout_hold_s=5)
    with server as url:
        res = run_trials(server_cfg(tmp_path, url, llm={"max_retries": 2}), progress=False)
    assert server.faults_left == 0
    posts = [r for r in server.requests if r.method == "POST"]
    assert [r.fault for r in posts[:2]] == [fault.kind, fault.kind]
    assert len(posts) == 12 + 2  # 3 calls per task, plus the two failed attempts
    assert res.summary["errored_episodes"] == 0
    assert res.summary["cumulative_success"] == [0.0, 1.0, 1.0]
    assert all(r.error is None for r in res.records)
    assert caplog.text.count("retrying in") == 2
    if fault.kind == "429":
        assert "retrying in 0.050 s" in caplog.text  # Retry-After replaces the backoff


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_past_the_retry_budget_errors_one_episode_and_the_run_goes_on(tmp_path, fault):
    # concurrency 1: the first request is task 0's first action, so exactly that episode meets the faults.
    server = FakeOpenAIServer(reply=vault_reply, faults=[fault] * 2, timeout_hold_s=5)
    with server as url:
        res = run_trials(server_cfg(tmp_path, url, llm={"max_retries": 1}), progress=False)
    first, *others = sorted({r.task_id for r in res.records})
    bad = [r for r in res.records if r.task_id == first]
    assert len(bad) == 1  # an errored episode ends its task: no reflection, no further trial
    (rec,) = bad
    assert rec.end_reason == "llm_error" and rec.errored and not rec.success and rec.reflection is None
    assert "failed after 2 attempt(s)" in rec.error
    assert res.summary["errored_episodes"] == 1
    assert res.summary["end_reasons"]["llm_error"] == 1
    # neither success nor failure: trial 0's per-attempt rate counts only the 3 valid (failed) episodes
    assert res.summary["per_attempt_success"][:2] == [0.0, 1.0]
    assert res.summary["cumulative_success"][1] == 0.75
    for task in others:
        assert [(r.trial, r.success) for r in res.records if r.task_id == task] == [(0, False), (1, True)]
    # a rerun re-attempts the errored episode (the errored line stays as history) and finishes that task
    with FakeOpenAIServer(reply=vault_reply) as url2:
        again = run_trials(server_cfg(tmp_path, url2, llm={"max_retries": 1}), progress=False)
    assert again.new_episodes == 2
    current = effective_records(again.records)
    assert [(r.trial, r.success) for r in current if r.task_id == first] == [(0, False), (1, True)]
    assert again.summary["errored_episodes"] == 0 and again.summary["replaced_attempts"] == 1
    assert again.summary["cumulative_success"] == [0.0, 1.0, 1.0]
    assert len(rated_reflection_rows(again.records)) == 4  # one per task: the errored attempt gives no row


def test_a_reflector_fault_past_the_retry_budget_keeps_the_episode_and_stops_only_that_task(tmp_path):
    # concurrency 1: request 1 is task 0's action, request 2 its reflection (which meets the faults).
    server = FakeOpenAIServer(reply=vault_reply, faults=[None, "500", "503"])
    with server as url:
        res = run_trials(server_cfg(tmp_path, url, llm={"max_retries": 1}), progress=False)
    first = min(r.task_id for r in res.records)
    (rec,) = [r for r in res.records if r.task_id == first]
    # the attempt itself is a valid failure (counted per attempt); no reflection means no further trial
    assert rec.end_reason == "done" and rec.reflection is None and rec.error.startswith("reflector:")
    assert "HTTP 503" in rec.error
    assert res.summary["errored_episodes"] == 1 and res.summary["per_attempt_success"][:2] == [0.0, 1.0]
    assert res.summary["cumulative_success"][1] == 0.75


# --- response cache through the loop ------------------------------------------------------------------------------

VOLATILE = ("created_at", "wall_time_s", "run_name", "actor_usage")


def comparable(records) -> list[dict]:
    out = []
    for rec in sorted(records, key=lambda r: (r.task_id, r.trial)):
        d = dataclasses.asdict(rec)
        for key in VOLATILE:
            d.pop(key)
        if d["reflection"] is not None:
            d["reflection"].pop("usage")
        out.append(d)
    return out


def test_cache_makes_a_second_identical_run_call_nothing_and_record_the_same(tmp_path):
    server = FakeOpenAIServer(reply=vault_reply)
    cache = str(tmp_path / "cache")
    with server as url:
        first = run_trials(server_cfg(tmp_path, url, "first", cache_dir=cache, concurrency=4), progress=False)
        calls_first = len(server.requests)
        second = run_trials(server_cfg(tmp_path, url, "second", cache_dir=cache, concurrency=4), progress=False)
        assert len(server.requests) == calls_first == 12  # the second run made no call at all
    assert comparable(first.records) == comparable(second.records)
    assert len(first.records) == len(second.records) == 8
    # accounting: the second run spent no tokens, and says how many calls the cache answered
    used = second.summary["cost"]
    assert used["calls"] == 0 and used["total_tokens"] == 0 and used["cached_calls"] == 12
    assert first.summary["cost"]["calls"] == 12


# --- token budget -------------------------------------------------------------------------------------------------


def test_budget_stops_cleanly_then_a_larger_budget_resumes_without_duplicates(tmp_path):
    server = FakeOpenAIServer(reply=vault_reply)
    with server as url:
        # A call's worst case (its prompt at a token per byte, plus max_tokens) is about 800 tokens here.
        small = run_trials(server_cfg(tmp_path, url, concurrency=2, **{"budget.max_tokens": 1200}), progress=False)
        calls_small = len(server.requests)
        assert small.stopped_by_budget and small.summary["stopped_by_budget"]
        recs = read_records(records_path(small.run_dir), repair=False)  # every line whole
        assert 1 <= len(recs) < 8 and len(recs) == small.new_episodes
        # every call the server answered belongs to a kept episode: nothing in flight was dropped
        spent = sum(r.actor_usage.calls + (r.reflection.usage.calls if r.reflection else 0) for r in recs)
        assert spent == calls_small
        assert 0 < small.summary["cost"]["total_tokens"] <= 1200

        big = run_trials(server_cfg(tmp_path, url, concurrency=2, **{"budget.max_tokens": 100_000}), progress=False)
    assert not big.stopped_by_budget
    # an episode the budget cut short is errored ("budget"): kept as history, re-attempted by the resumed run
    cut = [r for r in recs if r.end_reason == "budget"]
    # a failed attempt whose reflection the budget refused gets it from the resumed run, as a line of its own
    unreflected = [r for r in recs if (r.error or "").startswith("reflection not written")]
    keys = [(r.task_id, r.trial) for r in effective_records(big.records)]
    assert len(keys) == len(set(keys)) == 8
    assert big.new_episodes == 8 - len(recs) + len(cut) + len(unreflected)
    assert big.summary["errored_episodes"] == 0
    assert big.summary["replaced_attempts"] == len(cut) + len(unreflected)
    assert big.summary["cumulative_success"] == [0.0, 1.0, 1.0]
    lines = records_path(big.run_dir).read_text().splitlines()
    assert [json.loads(x) for x in lines[: len(recs)]] == [json.loads(r.to_json()) for r in recs]


# --- SIGKILL during each training stage, then resume ---------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def stage_argv(stage: str, models: dict[str, str], data: str, out: Path, steps: int, save_steps: int) -> list[str]:
    """Command line of one training stage on the tiny models: ``steps`` optimizer steps (PPO: iterations)."""
    models = {k: str(v) for k, v in models.items()}
    if stage in ("sft", "reward"):
        model = models["lm"] if stage == "sft" else models["rm"]
        argv = [f"{stage}_run.py", "--model", model, "--max_steps", str(steps), "--max_length", "96"]
        argv += ["--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_total_limit", "null"]
        if stage == "reward":
            argv += ["--min_pairs", "4", "--eval_fraction", "0"]
    else:
        argv = ["ppo_run.py", "--model", models["lm"], "--reward_model", models["rm"], "--algorithm", stage]
        argv += ["--num_iterations", str(steps), "--batch_size", "2", "--num_samples_per_prompt", "2"]
        argv += ["--minibatch_size", "2", "--ppo_epochs", "1", "--max_new_tokens", "6", "--max_prompt_length", "48"]
        argv += ["--lora.target_modules", "q_proj,v_proj"]
    return [*argv, "--dataset", data, "--output_dir", str(out), "--save_steps", str(save_steps)]


def complete_checkpoints(out: Path) -> list[int]:
    """Steps of the checkpoints whose last file is written (HF: trainer_state.json; our PPO: training_state.pt)."""
    steps = []
    for d in out.glob("checkpoint-*"):
        if (d / "trainer_state.json").is_file() or (d / "training_state.pt").is_file():
            steps.append(int(d.name.split("-")[1]))
    return sorted(steps)


STAGES = ["sft", "reward", "ppo", "grpo"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_during_a_training_stage_then_the_rerun_resumes_and_finishes(stage, tmp_path, tiny_models):
    data = write_rated_dataset(tmp_path / "data")
    out = tmp_path / stage
    steps, save_steps = 40, 2
    argv = [sys.executable, *stage_argv(stage, tiny_models, data, out, steps, save_steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not complete_checkpoints(out) and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, f"{stage} ended (rc {proc.returncode}) before it could be killed"
        assert complete_checkpoints(out), f"{stage} wrote no checkpoint within the deadline"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    saved = complete_checkpoints(out)[-1]
    assert saved < steps and not (out / "metrics.json").exists()

    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    resumed = re.findall(r"resuming from checkpoint \S*checkpoint-(\d+)", done.stderr)
    assert resumed and int(resumed[0]) >= saved, done.stderr[-4000:]
    assert complete_checkpoints(out)[-1] == steps  # the last step was reached and saved
    metrics = json.loads((out / "metrics.json").read_text())
    key = {"sft": "sft/resumed_from_step", "reward": "reward/resumed_from_step", "ppo": "ppo/resumed_from"}.get(stage)
    if key is not None:
        assert metrics[key] == int(resumed[0])


@pytest.mark.parametrize(
    "stage",
    STAGES,
)
def test_a_half_written_last_checkpoint_is_skipped_on_resume(stage, tmp_path, tiny_models):
    """A kill while checkpoint-N is being written leaves it without its last file; resume must use the one before."""
    data = write_rated_dataset(tmp_path / "data")
    out = tmp_path / stage
    script = {"sft": "sft_run", "reward": "reward_run"}.get(stage, "ppo_run")
    main = load_script(script).main
    main(stage_argv(stage, tiny_models, data, out, 2, 2)[1:])
    assert complete_checkpoints(out) == [2]
    half = out / "checkpoint-4"
    if stage == "ppo":  # ours writes .tmp-checkpoint-N and renames it when whole
        half = out / ".tmp-checkpoint-4"
    shutil.copytree(out / "checkpoint-2", half)
    for name in ("trainer_state.json", "training_state.pt"):
        (half / name).unlink(missing_ok=True)
    (out / "metrics.json").unlink()
    metrics = main(stage_argv(stage, tiny_models, data, out, 6, 2)[1:])
    assert complete_checkpoints(out)[-1] == 6
    key = {"sft": "sft/resumed_from_step", "reward": "reward/resumed_from_step", "ppo": "ppo/resumed_from"}.get(stage)
    if key is not None:
        assert metrics[key] == 2
