"""Policy gradient beats imitation in the demo's setting (one seed of the learning check, fewer held-out tasks).

Runs the whole check once: several minutes on a CPU, hence ``slow``. A PPO that did nothing would leave the SFT
adapter's success, and fail the comparison.
"""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_ppo_beats_sft_in_the_vault(tmp_path):
    spec = importlib.util.spec_from_file_location("learning_check", ROOT / "bench" / "learning_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    out = tmp_path / "LEARNING.md"
    argv = ["--seeds", "0", "--workdir", str(tmp_path / "runs"), "--out", str(out), "--eval-tasks", "128"]
    assert check.main(argv) == 0
    (seed,) = json.loads(out.with_name("learning.json").read_text())["seeds"]
    success = seed["success_trial1"]
    assert abs(success["none"] - 1 / 3) < 0.15  # blind retries: chance
    assert success["ppo_env"] > success["sft"] + 0.1
    assert seed["p_ppo_env_vs_sft"] < 0.05
