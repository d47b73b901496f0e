"""SIGKILL mid-run then resume; the CLI's errors; the report's side-by-side table and its fingerprint check."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from retroformer.cli import main
from retroformer.errors import DataError
from retroformer.records import read_records
from retroformer.report import write_report

SLOW_RUNNER = textwrap.dedent(
    """
    import asyncio, sys
    from retroformer.envs.synthetic import ClueReflector
    from retroformer.llm import register_scripted_policy

    @register_scripted_policy("slow-clue")
    class SlowClue(ClueReflector):
        async def generate(self, request):
            await asyncio.sleep(0.15)
            return await super().generate(request)

    from retroformer.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def trial_args(runs: Path, name: str, *extra: str) -> list[str]:
    return [
        "trials", "--runs_dir", str(runs), "--run_name", name, "--trials", "3", "--concurrency", "2",
        "--env.options", "{num_tasks: 8, num_doors: 3}", "--actor.kind", "plan",
        "--reflector.llm.backend", "scripted", "--reflector.llm.scripted_policy", "slow-clue",
        "--reflector.llm.scripted_options", "{carry_prob: 0.5}", *extra,
    ]  # fmt: skip


def test_sigkill_mid_run_then_resume_records_each_episode_once(tmp_path):
    script = tmp_path / "runner.py"
    script.write_text(SLOW_RUNNER)
    runs = tmp_path / "runs"
    records = runs / "crash" / "trials" / "episodes.jsonl"
    env = {**os.environ, "RETROFORMER_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [sys.executable, str(script), *trial_args(runs, "crash")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        if records.exists() and records.read_text().count("\n") >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    n_before = len(read_records(records))
    assert 4 <= n_before < 20, "the kill should land mid-run"
    done = subprocess.run(
        [sys.executable, str(script), *trial_args(runs, "crash")], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    recs = read_records(records)
    keys = [(r.task_id, r.trial) for r in recs]
    assert len(keys) == len(set(keys)), "no (task, trial) twice"
    for task in {r.task_id for r in recs}:
        trials = sorted(r.trial for r in recs if r.task_id == task)
        assert trials == list(range(len(trials)))  # no gap
        last = max((r for r in recs if r.task_id == task), key=lambda r: r.trial)
        assert last.success or last.trial == 2  # every task ran to success or to its last trial
    assert "rated reflections:" in done.stdout


def test_cli_help_and_errors(tmp_path, capsys):
    assert main(["--help"]) == 0
    assert "trials" in capsys.readouterr().out
    assert main(["trails"]) == 2
    assert "Did you mean 'trials'" in capsys.readouterr().err
    assert main(["trials", "--runs_dir", str(tmp_path), "--env.name", "hotpotqaa"]) == 2
    assert "unknown environment 'hotpotqaa'. Did you mean 'hotpotqa'?" in capsys.readouterr().err
    assert main(["trials", "--runs_dir", str(tmp_path), "--env.options", "{num_dors: 3}"]) == 2
    assert "num_dors" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["trials", "--help"])
    assert exc.value.code == 0
    assert "--reflector.llm.adapter" in capsys.readouterr().out


def _run(runs: Path, name: str, *extra: str) -> None:
    args = [
        "trials", "--runs_dir", str(runs), "--run_name", name, "--env.options", "{num_tasks: 6}",
        "--actor.kind", "plan", "--reflector.llm.backend", "scripted", "--reflector.llm.scripted_policy",
        "synthetic-clue", *extra,
    ]  # fmt: skip
    assert main(args) == 0


def test_report_side_by_side_and_fingerprint_refusal(tmp_path, capsys):
    runs = tmp_path / "runs"
    _run(runs, "none", "--reflector.kind", "none")
    _run(runs, "half", "--reflector.llm.scripted_options", "{carry_prob: 0.5}")
    _run(runs, "other", "--env.options", "{num_tasks: 6, seed: 1}")
    out = write_report([runs / "none", runs / "half"], tmp_path / "report")
    assert out["png"].stat().st_size > 1000
    text = out["text"]
    assert "none: 6 tasks" in text and "half: 6 tasks" in text
    import json

    data = json.loads(out["json"].read_text())
    assert data["runs"]["none"]["cumulative_success"] == [0.0, 0.0, 0.0]
    assert data["runs"]["half"]["cumulative_success"][-1] > 0
    with pytest.raises(DataError, match="different task lists"):
        write_report([runs / "none", runs / "other"], tmp_path / "report2")
    assert main(["report", str(runs / "none"), str(runs / "half"), "--out", str(tmp_path / "r3")]) == 0
    assert "plot:" in capsys.readouterr().out


def test_actor_api_key_comes_from_the_variable_the_trial_run_names(tmp_path, monkeypatch):
    from retroformer.cli import actor_api_key
    from retroformer.config import from_dict, save_config
    from retroformer.trials import TrialsConfig, config_path

    run = tmp_path / "run"
    cfg = from_dict(TrialsConfig, {"actor": {"llm": {"backend": "openai", "model": "m", "api_key_env": "ACTOR_KEY"}}})
    save_config(cfg, config_path(run))
    monkeypatch.setenv("ACTOR_KEY", "sk-actor-sentinel")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-other")
    assert actor_api_key(str(run)) == "sk-actor-sentinel"
    save_config(from_dict(TrialsConfig, {"actor": {"kind": "plan"}}), config_path(run))
    assert actor_api_key(str(run)) is None  # an in-process or plan actor needs no key
    assert actor_api_key(str(tmp_path / "missing")) is None
