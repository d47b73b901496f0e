"""The built-in TextWorld environment: generated games, cache reuse, walkthrough solves, invalid actions."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("textworld", reason="the textworld package is not installed (pip install textworld)")

from retroformer.envs.base import make_suite  # noqa: E402
from retroformer.envs.textworld_env import TextWorldSuite, clean_feedback, corpus  # noqa: E402
from retroformer.errors import ConfigError  # noqa: E402

# Small games: two rooms, a two-command quest (about 2 s each to generate).
OPTIONS = {"num_tasks": 1, "world_size": 2, "num_objects": 3, "quest_length": 2, "seed": 3}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tw_cache")


@pytest.fixture(scope="module")
def suite(cache_dir):
    s = make_suite("textworld", {**OPTIONS, "cache_dir": str(cache_dir)})
    assert isinstance(s, TextWorldSuite)
    s.tasks()
    return s


def test_walkthrough_wins_with_full_return(suite):
    (task,) = suite.tasks()
    walkthrough = task.payload["walkthrough"]
    assert walkthrough, "a generated game carries its walkthrough"
    env = suite.make()
    first = env.reset(task)
    assert task.payload["objective"] in first
    assert "$$" not in first and "\\" not in first, "the ASCII-art banner is stripped"
    assert not env.outcome().success
    result = None
    for command in walkthrough:
        result = env.step(command)
        assert not result.info.get("invalid"), f"walkthrough command {command!r} was rejected"
    assert result is not None and result.done and result.info["won"]
    assert result.reward > 0
    outcome = env.outcome()
    assert outcome.success and outcome.return_ == pytest.approx(1.0)
    assert outcome.metrics["score"] == outcome.metrics["max_score"] > 0
    env.close()


def test_inadmissible_action_is_rejected_without_stepping(suite):
    (task,) = suite.tasks()
    env = suite.make()
    env.reset(task)
    result = env.step("dance with the moon")
    assert result.info["invalid"] is True and not result.done
    assert "Admissible commands" in result.observation
    assert result.info["admissible_commands"] and result.info["score"] == 0
    # The game did not move: the walkthrough still wins from here.
    for command in task.payload["walkthrough"]:
        result = env.step(command.upper())  # case and spacing do not matter
        assert not result.info.get("invalid")
    assert env.outcome().success
    env.close()


def test_cache_is_reused(suite, cache_dir):
    path = suite.game_path(OPTIONS["seed"])
    mtime = path.stat().st_mtime_ns
    time.sleep(0.01)
    again = make_suite("textworld", {**OPTIONS, "cache_dir": str(cache_dir)})
    assert [t.task_id for t in again.tasks()] == [t.task_id for t in suite.tasks()]
    assert again.generated == 0, "the second suite regenerated a cached game"
    assert path.stat().st_mtime_ns == mtime


def test_same_seed_gives_the_same_game(suite, tmp_path):
    other = make_suite("textworld", {**OPTIONS, "cache_dir": str(tmp_path)})
    (task,) = other.tasks()
    assert other.generated == 1
    (ref,) = suite.tasks()
    assert task.task_id == ref.task_id
    assert task.payload["walkthrough"] == ref.payload["walkthrough"]
    env_a, env_b = suite.make(), other.make()
    assert env_a.reset(ref) == env_b.reset(task)
    env_a.close()
    env_b.close()


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="quest_length must be >= 1"):
        make_suite("textworld", {"quest_length": 0})
    with pytest.raises(ConfigError, match="unknown config key"):
        make_suite("textworld", {"rooms": 3})


def test_corpus_and_feedback_cleaning_are_cheap():
    start = time.perf_counter()
    texts = corpus()
    assert texts and all(isinstance(t, str) and t for t in texts)
    assert time.perf_counter() - start < 1.0
    raw = "\n  ____  \n |  $$ \\\nWelcome! Go east.\n\n> -= Hall =-0/1\nYou scored 1.\nWould you like to RESTART?"
    assert clean_feedback(raw) == "Welcome! Go east.\n\nYou scored 1."
