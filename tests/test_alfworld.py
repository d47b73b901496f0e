"""ALFWorld through the real ``alfworld`` package, on the game fixtures shipped with retroformer (offline)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time

import pytest

from retroformer.envs import make_suite
from retroformer.envs.alfworld import (
    FIXTURE_ROOT,
    PROMPTED_TASK_TYPES,
    TASK_TYPES,
    AlfWorldSuite,
    corpus,
    strip_banner,
    translate_put,
)
from retroformer.errors import ConfigError, EnvError

# --- no alfworld needed ------------------------------------------------------------------------------------------------


def test_translate_put_grammar():
    assert translate_put("put mug 1 in/on desk 1") == "move mug 1 to desk 1"
    assert translate_put("put potato 2 in countertop 1") == "move potato 2 to countertop 1"
    assert translate_put("put book 1 on bed 1") == "move book 1 to bed 1"
    assert translate_put("go to desk 1") == "go to desk 1"


def test_strip_banner():
    text = "-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room.\n\nYour task is to: look."
    assert strip_banner(text) == "You are in the middle of a room.\n\nYour task is to: look."


def test_corpus_is_fast_and_does_not_import_alfworld():
    before = "alfworld" in sys.modules
    start = time.perf_counter()
    texts = corpus()
    assert time.perf_counter() - start < 1.0
    assert len(texts) >= 6 and all(texts)
    assert ("alfworld" in sys.modules) == before


def test_config_validation():
    with pytest.raises(ConfigError, match="task_types"):
        AlfWorldSuite.Config(task_types=["pick_and_dance"])
    with pytest.raises(ConfigError, match="repeat_limit"):
        AlfWorldSuite.Config(repeat_limit=1)
    with pytest.raises(ConfigError, match="unknown config key"):
        make_suite("alfworld", {"max_step": 3})


def test_prompts_per_task_type():
    suite = make_suite("alfworld")
    assert suite.prompts.instructions and suite.prompts.reflection_instructions
    for task_type in TASK_TYPES:
        prompts = suite.prompts_for(_task(task_type))
        assert prompts.examples.startswith("Task: ")
        # The 0.4 grammar only: no `put X in/on Y` in our few-shots.
        assert "Action: put " not in prompts.examples
    heat = suite.prompts_for(_task("pick_heat_then_place_in_recep")).examples
    assert "heat " in heat and heat != suite.prompts_for(_task("look_at_obj_in_light")).examples
    assert set(PROMPTED_TASK_TYPES) <= set(TASK_TYPES)


def test_missing_data_path_says_how_to_fix(tmp_path):
    with pytest.raises(EnvError, match="alfworld-download"):
        make_suite("alfworld", {"data_path": str(tmp_path / "nowhere")}).tasks()
    (tmp_path / "json_2.1.1" / "valid_unseen").mkdir(parents=True)
    with pytest.raises(EnvError, match="no playable ALFWorld games"):
        make_suite("alfworld", {"data_path": str(tmp_path)}).tasks()
    with pytest.raises(EnvError, match="split folder"):
        make_suite("alfworld", {"data_path": str(tmp_path), "split": "train"}).tasks()


def test_fixture_tasks_and_filters():
    suite = make_suite("alfworld")
    tasks = suite.tasks()
    assert [t.payload["task_type"] for t in tasks] == [
        "look_at_obj_in_light",
        "pick_and_place_simple",
        "pick_heat_then_place_in_recep",
    ]
    assert all(t.task_id.startswith("valid_unseen/") for t in tasks)
    only = make_suite("alfworld", {"task_types": ["pick_heat_then_place_in_recep"]}).tasks()
    assert [t.payload["task_type"] for t in only] == ["pick_heat_then_place_in_recep"]
    assert len(make_suite("alfworld", {"num_games": 2}).tasks()) == 2


def _task(task_type: str):
    from retroformer.envs import Task

    return Task(task_id=f"x/{task_type}", payload={"task_type": task_type})


# --- through the real alfworld package ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alfworld():
    # Importing alfworld sets ALFWORLD_DATA to ~/.cache/alfworld when unset; keep that out of other tests.
    saved = os.environ.get("ALFWORLD_DATA")
    module = pytest.importorskip("alfworld")
    if saved is None:
        os.environ.pop("ALFWORLD_DATA", None)
    return module


def _expert_plan(game_dir, tmp_path, expert: str) -> list[str]:
    """Play a fixture with alfworld's own expert (as `alfworld-generate` checks solvability); return its actions."""
    from retroformer.envs.alfworld import load_game, make_textworld_env, write_game_file

    work = tmp_path / game_dir.name
    shutil.copytree(game_dir, work)  # the handcoded expert reads traj_data.json next to the game file
    game_file = write_game_file(work)
    env = make_textworld_env(facts=True, expert=expert)
    state = load_game(env, str(game_file))
    plan: list[str] = []
    done = False
    while not done and len(plan) < 60:
        action = state["extra.expert_plan"][0]
        plan.append(action)
        state, _, done = env.step(action)
    assert state["won"], f"{expert} expert did not solve {game_dir}: {plan}"
    return plan


@pytest.mark.parametrize("expert", ["handcoded", "planner"])
def test_expert_plan_wins_each_fixture_through_adapter(alfworld, tmp_path, expert):
    suite = make_suite("alfworld")
    tasks = suite.tasks()
    assert len(tasks) == 3
    for task in tasks:
        from pathlib import Path

        plan = _expert_plan(Path(task.payload["game_dir"]), tmp_path / expert, expert)
        env = suite.make()
        obs = env.reset(task)
        assert obs.startswith("You are in the middle of a room.") and "Your task is to: " in obs
        assert "Welcome" not in obs
        for i, action in enumerate(plan):
            result = env.step(action)
            assert not result.info.get("invalid"), (action, result.observation)
            assert result.done == (i == len(plan) - 1), (action, result)
        outcome = env.outcome()
        assert outcome.success and outcome.return_ == 1.0
        env.close()


def test_old_put_grammar_is_accepted(alfworld):
    suite = make_suite("alfworld", {"task_types": ["pick_and_place_simple"]})
    (task,) = suite.tasks()
    env = suite.make()
    env.reset(task)
    for action in ("go to shelf 1", "take mug 1 from shelf 1", "go to desk 1"):
        assert not env.step(action).info.get("invalid")
    result = env.step("put mug 1 in/on desk 1")
    assert result.observation == "You move the mug 1 to the desk 1."
    assert result.info["translated_to"] == "move mug 1 to desk 1"
    assert result.done and env.outcome().success


def test_old_put_grammar_can_be_turned_off(alfworld):
    suite = make_suite("alfworld", {"task_types": ["pick_and_place_simple"], "accept_put_grammar": False})
    env = suite.make()
    env.reset(suite.tasks()[0])
    for action in ("go to shelf 1", "take mug 1 from shelf 1", "go to desk 1"):
        env.step(action)
    result = env.step("put mug 1 in/on desk 1")
    assert result.observation == "Nothing happens." and result.info["invalid"] and not result.done


def test_invalid_command_and_think(alfworld):
    suite = make_suite("alfworld")
    env = suite.make()
    env.reset(suite.tasks()[0])
    result = env.step("fly to the moon")
    assert result.observation == "Nothing happens."
    assert result.info == {"invalid": True} and not result.done
    result = env.step("think: the book is probably on the bed")
    assert result.observation == "OK." and not result.info.get("invalid") and not result.done
    assert not env.outcome().success and env.outcome().return_ == 0.0


def test_repeated_action_ends_episode(alfworld):
    suite = make_suite("alfworld")
    env = suite.make()
    env.reset(suite.tasks()[0])
    assert not env.step("go to bed 1").done
    assert not env.step("look").done
    result = env.step("look")
    assert result.done and result.info["end_reason"] == "repeat"
    assert not env.outcome().success
    with pytest.raises(EnvError, match="after the episode ended"):
        env.step("look")


def test_repeat_limit_is_configurable(alfworld):
    suite = make_suite("alfworld", {"repeat_limit": 3})
    env = suite.make()
    env.reset(suite.tasks()[0])
    assert not env.step("look").done and not env.step("look").done
    assert env.step("look").info["end_reason"] == "repeat"
    suite = make_suite("alfworld", {"repeat_limit": 0, "max_steps": 50})
    env = suite.make()
    env.reset(suite.tasks()[0])
    assert not any(env.step("look").done for _ in range(5))


def test_step_limit_ends_episode(alfworld):
    suite = make_suite("alfworld", {"max_steps": 3})
    assert suite.max_steps == 3
    env = suite.make()
    env.reset(suite.tasks()[0])
    assert not env.step("go to bed 1").done
    assert not env.step("go to dresser 1").done
    result = env.step("go to drawer 1")
    assert result.done and result.info["end_reason"] == "step_limit"
    assert env.outcome().return_ == 0.0


def test_sys_argv_survives_reset(alfworld, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["retroformer", "trials", "--config", "x.yaml"])
    argv = sys.argv
    suite = make_suite("alfworld")
    env = suite.make()
    for task in suite.tasks():
        env.reset(task)
    assert sys.argv is argv and sys.argv == ["retroformer", "trials", "--config", "x.yaml"]


def test_concurrent_resets_in_threads(alfworld):
    suite = make_suite("alfworld")
    tasks = suite.tasks()
    stdout = sys.stdout
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def play(i: int) -> None:
        try:
            env = suite.make()
            env.reset(tasks[i % len(tasks)])
            for action in ("inventory", "look") * 3:
                results[i] = env.step(action).observation
            env.close()
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=play, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 6 and all(r.startswith("You are in the middle of a room") for r in results.values())
    assert sys.stdout is stdout


def test_shipped_game_file_is_used_when_present(alfworld, tmp_path):
    from retroformer.envs.alfworld import write_game_file

    src = FIXTURE_ROOT / "valid_unseen"
    data = tmp_path / "data" / "json_2.1.1" / "valid_unseen"
    shutil.copytree(src, data)
    games = sorted(p.parent for p in data.rglob("traj_data.json"))
    for game in games:
        write_game_file(game)
    # A game marked unsolvable by alfworld-generate is skipped, as alfworld's own loader does.
    bad = json.loads((games[0] / "game.tw-pddl").read_text())
    bad["solvable"] = False
    (games[0] / "game.tw-pddl").write_text(json.dumps(bad))
    suite = make_suite("alfworld", {"data_path": str(tmp_path / "data")})
    tasks = suite.tasks()
    assert len(tasks) == 2 and all(t.payload["game_file"] for t in tasks)
    env = suite.make()
    assert "Your task is to:" in env.reset(tasks[0])


def test_process_exits_cleanly_after_concurrent_episodes(alfworld, tmp_path):
    """Planner library copies are never unloaded, so the interpreter's exit does not crash (it did, with SIGSEGV)."""
    import subprocess

    script = tmp_path / "play.py"
    script.write_text(
        "import threading\n"
        "from retroformer.envs import make_suite\n"
        "suite = make_suite('alfworld')\n"
        "tasks = suite.tasks()\n"
        "def play(i):\n"
        "    env = suite.make(); env.reset(tasks[i % len(tasks)]); env.step('look'); env.close()\n"
        "threads = [threading.Thread(target=play, args=(i,)) for i in range(3)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "for i in range(3):\n"
        "    play(i)\n"
        "print('played')\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "played" in proc.stdout
