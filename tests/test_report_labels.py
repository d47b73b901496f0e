"""The report's readable labels, 95% intervals and the paired test helpers of the real-model experiment."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from retroformer.errors import DataError
from retroformer.report import wilson_interval, write_report

REPO = Path(__file__).resolve().parents[1]


def vault_runs(tmp_path) -> list[Path]:
    from retroformer.config import from_dict
    from retroformer.trials import TrialsConfig, run_trials

    runs = []
    for name, carry in (("eval-none", None), ("eval-base", 1.0)):
        reflector = (
            {"kind": "none"}
            if carry is None
            else {
                "llm": {
                    "backend": "scripted",
                    "scripted_policy": "synthetic-clue",
                    "scripted_options": {"carry_prob": carry},
                }
            }
        )
        cfg = from_dict(TrialsConfig, {
            "run_name": name, "runs_dir": str(tmp_path), "trials": 2, "export_dataset": False,
            "env": {"name": "synthetic", "options": {"num_tasks": 6}}, "actor": {"kind": "plan"},
            "reflector": reflector,
        })  # fmt: skip
        runs.append(run_trials(cfg, progress=False).run_dir)
    return runs


def test_labels_name_the_runs_in_every_output(tmp_path):
    runs = vault_runs(tmp_path)
    out = write_report(runs, tmp_path / "report", labels=["ReAct", "Reflexion"])
    report = json.loads(out["json"].read_text())
    assert list(report["runs"]) == ["ReAct", "Reflexion"]
    assert "ReAct:" in out["md"].read_text() and "eval-none" not in out["md"].read_text()
    assert out["png"].stat().st_size > 0
    with pytest.raises(DataError, match="got 1 labels for 2 runs"):
        write_report(runs, tmp_path / "bad", labels=["ReAct"])


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_of_the_real_model_check():
    spec = importlib.util.spec_from_file_location("real_lm_check", REPO / "bench" / "real_lm_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    a = {f"t{i}": i < 12 for i in range(20)}  # 12 solved
    b = {f"t{i}": i < 2 for i in range(20)}  # 2 solved, both also solved by a
    test = module.mcnemar_exact(a, b)
    assert (test["only_first"], test["only_second"], test["n_tasks"]) == (10, 0, 20)
    assert test["p"] == pytest.approx(2 / 2**10)
    assert module.mcnemar_exact(a, a)["p"] == 1.0
