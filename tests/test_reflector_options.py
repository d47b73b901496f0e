"""The reflector's prompt and stop options, and the memory-blind actor of the negative control."""

from __future__ import annotations

import pytest

from retroformer.agents.reflector import Reflector, build_reflection_prompt
from retroformer.builders import ReflectorSection
from retroformer.config import from_dict
from retroformer.envs.base import Outcome
from retroformer.envs.synthetic import PROMPTS
from retroformer.errors import ConfigError
from retroformer.llm.base import SamplingParams
from retroformer.llm.scripted import ScriptedLLM
from retroformer.trials import TrialsConfig, run_trials
from retroformer.types import Step

STEPS = [Step("I try the first door.", "open[pearl]", "The pearl door is locked. Scratched into it: the way out is "
              "the jade door.", 0.0, True)]  # fmt: skip


def test_zero_shot_prompt_leaves_out_the_example_reflection_only():
    args = (PROMPTS, "You are in a vault with 4 doors: pearl, jade, ochre, maple.", STEPS, Outcome(0.0, False), [])
    few, zero = build_reflection_prompt(*args), build_reflection_prompt(*args, examples=False)
    example = PROMPTS.reflection_examples.strip()
    assert example in few and example not in zero
    assert zero.startswith(PROMPTS.reflection_instructions + "\n\nTask: ")
    assert zero.endswith(few.split("\n\nTask: ", 1)[1]) and zero.endswith("Reflection:")
    llm = ScriptedLLM(replies=["x"])
    hashes = {Reflector(llm, SamplingParams(), examples=e).prompt_hash(PROMPTS) for e in (True, False)}
    assert len(hashes) == 2  # records tell the two prompts apart


def test_reflector_stop_strings_reach_the_llm_and_bad_ones_are_refused():
    with pytest.raises(ConfigError, match=r"reflector.stop must be a list of non-empty strings"):
        ReflectorSection(stop=[""])
    cfg = from_dict(TrialsConfig, {"reflector": {"stop": ["\n"], "llm": {"backend": "scripted",
                                                                          "scripted_replies": ["a"]}}})  # fmt: skip
    from retroformer.builders import build_reflector

    assert "\n" in build_reflector(cfg).params.stop


def _outcomes(tmp_path, name: str, read_memory: bool, reflector: dict) -> dict[str, bool]:
    cfg = from_dict(TrialsConfig, {
        "run_name": name, "runs_dir": str(tmp_path), "trials": 2, "concurrency": 8, "seed": 3,
        "env": {"name": "synthetic", "options": {"num_tasks": 90, "seed": 11}},
        "actor": {"kind": "plan", "retry": "random", "read_memory": read_memory},
        "reflector": reflector,
    })  # fmt: skip
    records = run_trials(cfg, progress=False).records
    return {r.task_id: r.success for r in records if r.trial == 1}


def test_memory_blind_actor_erases_what_the_reflection_does(tmp_path):
    clue = {"llm": {"backend": "scripted", "scripted_policy": "synthetic-clue", "scripted_options": {"carry_prob": 1}}}
    reading = _outcomes(tmp_path, "reading", True, clue)
    blind = _outcomes(tmp_path, "blind", False, clue)
    no_reflection = _outcomes(tmp_path, "none", True, {"kind": "none"})
    assert all(reading.values())  # every reflection names the revealed door, and the actor follows it
    assert blind == no_reflection  # blind to its memory, the actor retries exactly as without reflections
    assert 0 < sum(blind.values()) < len(blind)
