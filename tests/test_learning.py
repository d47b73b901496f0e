"""The trained tiny reflector carries the clue far more often than the untrained one (one seed of the learning check).

Runs the demo pipeline (minus the reward model) once: a few minutes on a CPU, hence ``slow``.
"""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_training_improves_the_reflector(tmp_path):
    spec = importlib.util.spec_from_file_location("learning_check", ROOT / "bench" / "learning_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    out = tmp_path / "LEARNING.md"
    assert check.main(["--seeds", "0", "--workdir", str(tmp_path / "runs"), "--out", str(out)]) == 0
    seed = json.loads(out.with_name("learning.json").read_text())["per_seed"]["0"]
    base = seed["eval-base"]["rating_after_trial0"]
    assert seed["eval-none"]["success_trial1"] == 0.0
    assert seed["eval-sft"]["rating_after_trial0"] > base + 0.3
    assert seed["eval-retroformer"]["rating_after_trial0"] > base + 0.3
    assert seed["eval-retroformer"]["success_trial1"] > seed["eval-base"]["success_trial1"] + 0.3
