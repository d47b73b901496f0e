"""The trial loop: every way an episode ends, memory, ratings, export schema, resume without loss or duplicates."""

from __future__ import annotations

import json
import re

import pytest

from retroformer.agents.actor import FORMAT_ERROR, parse_action
from retroformer.agents.memory import memory_window
from retroformer.agents.reflector import clean_reflection
from retroformer.config import from_dict
from retroformer.dataset import rated_reflection_rows
from retroformer.errors import ConfigError, DataError, LLMError
from retroformer.llm import ScriptedLLM
from retroformer.records import config_path, read_records
from retroformer.trials import TrialsConfig, dataset_path, records_path, run_trials
from retroformer.types import RATED_REFLECTION_COLUMNS


def make_cfg(tmp_path, **over) -> TrialsConfig:
    data = {
        "run_name": "t",
        "runs_dir": str(tmp_path / "runs"),
        "trials": 3,
        "env": {"name": "synthetic", "options": {"num_tasks": 4, "num_doors": 3}},
        "actor": {"kind": "plan"},
        "reflector": {
            "llm": {"backend": "scripted", "scripted_policy": "synthetic-clue", "scripted_options": {"carry_prob": 1.0}}
        },
    }
    for key, value in over.items():
        node = data
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return from_dict(TrialsConfig, data)


def doors_of(prompt: str) -> list[str]:
    doors = re.search(r"with \d+ doors: ([a-z, ]+)\.", prompt.split("Task: ")[-1]).group(1).split(", ")
    return doors


# --- parsing and memory -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "thought", "action"),
    [
        (" I should look.\nAction: look", "I should look.", "look"),
        ("Thought: go\nAction 2: open[jade]\n", "go", "open[jade]"),
        ("action: Search[Foo Bar]", "", "Search[Foo Bar]"),
        ("I have no idea", "I have no idea", None),
        ("Thought: x\nAction:   ", "x", None),
    ],
)
def test_parse_action(text, thought, action):
    assert parse_action(text) == (thought, action)


def test_memory_window_keeps_newest_non_empty():
    assert memory_window(["a", "", "b", "c", "d"], 3) == ["b", "c", "d"]
    assert memory_window(["a"], 0) == []


def test_clean_reflection_cuts_and_caps():
    assert clean_reflection("  Plan: open[jade].\n\nTask: junk", 100) == "Plan: open[jade]."
    long = "First sentence here. " * 20
    out = clean_reflection(long, 50)
    assert len(out) <= 50 and out.endswith(".")


# --- every way an episode ends ------------------------------------------------------------------------------------


def test_success_after_reflection_and_ratings(tmp_path):
    res = run_trials(make_cfg(tmp_path), progress=False)
    recs = res.records
    # The right door is never first: trial 0 always fails, the carried clue makes trial 1 succeed.
    assert all(not r.success and r.end_reason == "done" for r in recs if r.trial == 0)
    assert all(r.success and r.end_reason == "success" for r in recs if r.trial == 1)
    assert len(recs) == 8  # stop_on_success: no trial 2
    rows = rated_reflection_rows(recs)
    assert len(rows) == 4 and all(row["rating"] == 1.0 for row in rows)
    assert res.summary["cumulative_success"] == [0.0, 1.0, 1.0]
    # memory at trial 1 is the reflection written after trial 0
    for r in recs:
        if r.trial == 1:
            prev = next(p for p in recs if p.task_id == r.task_id and p.trial == 0)
            assert r.memory == [prev.reflection.text]


def test_useless_reflections_rate_zero_and_no_reflector_never_succeeds(tmp_path):
    res = run_trials(make_cfg(tmp_path, **{"reflector.llm.scripted_options": {"carry_prob": 0.0}}), progress=False)
    assert not any(r.success for r in res.records)
    assert {row["rating"] for row in rated_reflection_rows(res.records)} == {0.0}
    assert all(r.reflection is None for r in res.records if r.trial == 2)  # no reflection after the last trial
    res = run_trials(make_cfg(tmp_path, run_name="none", **{"reflector.kind": "none"}), progress=False)
    assert res.summary["cumulative_success"] == [0.0, 0.0, 0.0]
    assert all(r.reflection is None and r.reflector_id == "none" for r in res.records)


def test_react_actor_step_limit_and_invalid_actions(tmp_path):
    cfg = make_cfg(tmp_path, **{"actor.kind": "react", "reflector.kind": "none", "trials": 1, "env.max_tasks": 1})
    # "look" never ends the episode; the format error and the unknown door are invalid actions.
    actor_llm = ScriptedLLM(
        ["Thought: hm\nAction: look", "no action here", "Thought: x\nAction: open[nowhere]"], cycle=True
    )
    from retroformer.agents.actor import ReActActor
    from retroformer.envs.synthetic import PROMPTS

    actor = ReActActor(actor_llm, PROMPTS, cfg.actor.llm.sampling())
    res = run_trials(cfg, actor=actor, progress=False)
    for r in res.records:
        assert r.end_reason == "step_limit" and not r.success
        assert len(r.steps) == 3
        assert r.steps[1].observation == FORMAT_ERROR and not r.steps[1].valid
        assert r.steps[2].observation.startswith("Invalid action") and not r.steps[2].valid
        assert r.num_invalid_actions == 2
    # the actor's prompt carries instructions, examples, the task and the scratchpad
    assert "Here are examples:" in actor_llm.prompts[1] and "Observation: You are in a vault" in actor_llm.prompts[1]


def test_react_actor_success_uses_memory(tmp_path):
    cfg = make_cfg(tmp_path, **{"actor.kind": "react"})

    def policy(prompt: str) -> str:
        from retroformer.envs.synthetic import planned_door

        memory = prompt.split("Reflections on your earlier attempts")[-1] if "Reflections on" in prompt else ""
        doors = doors_of(prompt)
        plan = planned_door([memory.split("Task:")[0]], doors)
        return f"Thought: go\nAction: open[{plan or doors[0]}]"

    from retroformer.agents.actor import ReActActor
    from retroformer.envs.synthetic import PROMPTS

    actor = ReActActor(ScriptedLLM(policy, model_id="policy"), PROMPTS, cfg.actor.llm.sampling())
    res = run_trials(cfg, actor=actor, progress=False)
    assert res.summary["per_attempt_success"][:2] == [0.0, 1.0]
    assert all(r.actor_id == "policy" for r in res.records)


def test_llm_failure_after_retries_is_an_errored_episode(tmp_path):
    cfg = make_cfg(tmp_path, **{"actor.kind": "react"})
    from retroformer.agents.actor import ReActActor
    from retroformer.envs.synthetic import PROMPTS

    actor = ReActActor(
        ScriptedLLM([LLMError("server kept answering 500")], cycle=True), PROMPTS, cfg.actor.llm.sampling()
    )
    res = run_trials(cfg, actor=actor, progress=False)
    assert len(res.records) == 4  # one errored episode per task, then the task stops
    for r in res.records:
        assert r.end_reason == "llm_error" and r.errored and not r.success
        assert r.reflection is None and "500" in r.error
    assert res.summary["errored_episodes"] == 4
    assert res.summary["per_attempt_success"][0] is None  # errored episodes are neither success nor failure
    assert rated_reflection_rows(res.records) == []


def test_reflector_failure_keeps_the_episode_and_stops_the_task(tmp_path):
    cfg = make_cfg(tmp_path)
    from retroformer.agents.reflector import Reflector

    refl = Reflector(ScriptedLLM([LLMError("timeout")], cycle=True), cfg.reflector.llm.sampling())
    res = run_trials(cfg, reflector=refl, progress=False)
    assert len(res.records) == 4
    assert all(r.end_reason == "done" and r.error.startswith("reflector:") for r in res.records)


# --- export, resume ----------------------------------------------------------------------------------------------


def test_export_schema_and_provenance(tmp_path):
    from datasets import load_from_disk

    res = run_trials(make_cfg(tmp_path, **{"reflector.llm.scripted_options": {"carry_prob": 0.5}}), progress=False)
    ds = load_from_disk(str(dataset_path(res.run_dir)))
    assert tuple(ds.column_names) == RATED_REFLECTION_COLUMNS
    assert len(ds) == len(rated_reflection_rows(res.records)) > 0
    row = ds[0]
    assert row["prompt"].endswith("Reflection:")
    assert row["env_name"] == "synthetic" and row["actor_id"] == "plan-following-actor"
    assert row["reflector_id"] == "scripted-clue-p0.5" and len(row["task_fingerprint"]) == 16
    assert row["rating"] == row["return_after"] - row["return_before"]


def test_resume_after_crash_no_loss_no_duplicates(tmp_path, caplog):
    cfg = make_cfg(tmp_path, **{"reflector.llm.scripted_options": {"carry_prob": 0.0}})
    full = run_trials(cfg, progress=False)
    path = records_path(full.run_dir)
    lines = path.read_bytes().split(b"\n")
    kept = lines[:5]
    # a crash during the 6th write: 5 whole lines and half of the next
    path.write_bytes(b"\n".join(kept) + b"\n" + lines[5][: len(lines[5]) // 2])
    before = [json.loads(line) for line in kept]
    res = run_trials(cfg, progress=False)
    assert "partial last line" in caplog.text
    keys = [(r.task_id, r.trial) for r in res.records]
    assert len(keys) == len(set(keys)) == 12
    assert res.new_episodes == 7
    after = [json.loads(line) for line in path.read_text().splitlines()[:5]]
    assert after == before  # recorded episodes are untouched
    # a third run has nothing left to do
    assert run_trials(cfg, progress=False).new_episodes == 0


def test_corrupt_line_in_the_middle_is_a_clear_error(tmp_path):
    cfg = make_cfg(tmp_path)
    res = run_trials(cfg, progress=False)
    path = records_path(res.run_dir)
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:20]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"episodes\.jsonl:2: not valid JSON"):
        read_records(path)


def test_resume_refuses_a_different_task_list(tmp_path):
    first = run_trials(make_cfg(tmp_path), progress=False)
    other = make_cfg(tmp_path, **{"env.options": {"num_tasks": 5, "num_doors": 3}})
    with pytest.raises(ConfigError, match=r"env.options.num_tasks: \d+ -> 5"):
        run_trials(other, progress=False)
    # Without the saved config the records' own fingerprint still tells the task lists apart.
    config_path(first.run_dir).unlink()
    with pytest.raises(DataError, match="another task list"):
        run_trials(other, progress=False)


def test_environment_failure_is_an_errored_episode_and_the_run_continues(tmp_path, monkeypatch):
    from retroformer.envs import synthetic
    from retroformer.errors import EnvError

    real_step = synthetic.VaultEnv.step

    def flaky_step(self, action):
        if self.task.task_id.endswith("001"):
            raise EnvError("server at http://127.0.0.1:1 stayed down after 3 attempts")
        return real_step(self, action)

    monkeypatch.setattr(synthetic.VaultEnv, "step", flaky_step)
    res = run_trials(make_cfg(tmp_path), progress=False)
    bad = [r for r in res.records if r.task_id.endswith("001")]
    assert len(bad) == 1 and bad[0].end_reason == "env_error" and bad[0].errored and "stayed down" in bad[0].error
    assert res.summary["errored_episodes"] == 1
    assert res.summary["cumulative_success"][1] == 0.75  # the other three tasks ran as usual
