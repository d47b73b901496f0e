"""The vault setting in which imitation and policy gradient part ways: random blind retries, plans that work, the
behaviour reflector's mix, and the rates that the fixed-point argument in retroformer/envs/synthetic.py predicts."""

from __future__ import annotations

import asyncio
import statistics
import threading

import pytest

from retroformer.agents.actor import ActContext
from retroformer.config import from_dict
from retroformer.dataset import rated_reflection_rows
from retroformer.envs.synthetic import (
    CLUE_TEMPLATE,
    GENERIC_REFLECTION,
    LOOK_REFLECTION,
    ClueReflector,
    PlanFollowingActor,
    SyntheticSuite,
    VaultEnv,
)
from retroformer.errors import ConfigError
from retroformer.llm.base import GenerationRequest, SamplingParams
from retroformer.rollout import run_episode, run_new_episode
from retroformer.stats import binomial_two_sided, mcnemar_exact, paired_bootstrap_diff, wilson_interval
from retroformer.trials import TrialsConfig, run_trials


def episode(memory: list[str], trial: int, retry: str = "random", seed: int = 0, wall_clue: bool = True, task=None):
    suite = SyntheticSuite(SyntheticSuite.Config(num_tasks=4, wall_clue=wall_clue))
    task = task or suite.tasks()[0]
    actor = PlanFollowingActor(retry=retry, seed=seed)
    return asyncio.run(run_episode(suite, suite.make(), actor, task, memory, trial=trial)), task


def test_blind_retries_are_random_among_the_other_doors():
    suite = SyntheticSuite(SyntheticSuite.Config(num_tasks=1))
    task = suite.tasks()[0]
    actor = PlanFollowingActor(retry="random", seed=0)
    first = asyncio.run(actor.act(ActContext(task=task, description="", memory=[], trial=0)))[1]
    assert first == f"open[{task.payload['doors'][0]}]"
    retries = [asyncio.run(actor.act(ActContext(task=task, description="", memory=["hm"], trial=1)))[1]
               for _ in range(300)]  # fmt: skip
    opened = {a[5:-1] for a in retries}
    assert opened == set(task.payload["doors"][1:])  # never the first guess again, every other door
    same = PlanFollowingActor(retry="first")
    assert asyncio.run(same.act(ActContext(task=task, description="", memory=["hm"], trial=1)))[1] == first


@pytest.mark.parametrize("blocking", [True, False])
def test_environment_calls_run_in_worker_threads_unless_the_suite_says_they_do_not_block(blocking):
    threads: dict[str, int] = {}

    class Vault(VaultEnv):
        def reset(self, task):
            threads["reset"] = threading.get_ident()
            return super().reset(task)

        def step(self, action):
            threads["step"] = threading.get_ident()
            return super().step(action)

        def outcome(self):
            threads["outcome"] = threading.get_ident()
            return super().outcome()

        def close(self):
            threads["close"] = threading.get_ident()

    class Suite(SyntheticSuite):
        def make(self):
            threads["make"] = threading.get_ident()
            return Vault()

    Suite.blocking = blocking
    suite = Suite(SyntheticSuite.Config(num_tasks=1))
    result = asyncio.run(run_new_episode(suite, PlanFollowingActor(), suite.tasks()[0], []))
    assert result.end_reason == "done" and set(threads) == {"make", "reset", "step", "outcome", "close"}
    on_the_loop = {name for name, ident in threads.items() if ident == threading.get_ident()}
    assert on_the_loop == (set() if blocking else set(threads))
    assert SyntheticSuite.blocking is False  # the vault is in memory


def test_plans_that_work_and_plans_that_do_not():
    suite = SyntheticSuite(SyntheticSuite.Config(num_tasks=1, wall_clue=True))
    task = suite.tasks()[0]
    answer = task.payload["answer"]
    wrong = next(d for d in task.payload["doors"] if d != answer)
    assert episode([CLUE_TEMPLATE.format(door=answer)], 1, task=task)[0].outcome.success
    assert not episode([CLUE_TEMPLATE.format(door=wrong)], 1, task=task)[0].outcome.success
    looked, _ = episode([LOOK_REFLECTION], 1, task=task)
    assert looked.outcome.success and [s.action for s in looked.steps] == ["look", f"open[{answer}]"]
    # without the clue on the wall, looking shows nothing to act on: a blind retry follows
    blind, _ = episode([LOOK_REFLECTION], 1, retry="first", wall_clue=False, task=task)
    assert not blind.outcome.success and blind.steps[0].action == "look"
    # the newest reflection with a plan decides
    assert episode([CLUE_TEMPLATE.format(door=wrong), LOOK_REFLECTION], 2, task=task)[0].outcome.success


def test_behaviour_reflector_mix_and_its_errors():
    suite = SyntheticSuite(SyntheticSuite.Config(num_tasks=1))
    task = suite.tasks()[0]
    env = suite.make()
    env.reset(task)
    obs = env.step(f"open[{task.payload['doors'][0]}]").observation
    prompt = f"Task: You are in a vault with 4 doors: {', '.join(task.payload['doors'])}. Exactly one leads out.\n"
    kinds = {"clue": 0, "wrong": 0, "look": 0, "generic": 0}
    for seed in range(2000):
        refl = ClueReflector(carry_prob=0.1, wrong_prob=0.2, look_prob=0.3, seed=seed)
        text = asyncio.run(refl.generate(GenerationRequest(prompt + obs, SamplingParams()))).text
        if text == LOOK_REFLECTION:
            kinds["look"] += 1
        elif text == GENERIC_REFLECTION:
            kinds["generic"] += 1
        else:
            kinds["clue" if text == CLUE_TEMPLATE.format(door=task.payload["answer"]) else "wrong"] += 1
    for kind, p in (("clue", 0.1), ("wrong", 0.2), ("look", 0.3), ("generic", 0.4)):
        assert abs(kinds[kind] / 2000 - p) < 0.04, kinds
    with pytest.raises(ConfigError, match="sum to at most 1"):
        ClueReflector(carry_prob=0.5, wrong_prob=0.3, look_prob=0.3)


def test_oracle_reflector_writes_its_template_with_the_attempts_own_clue_only():
    from retroformer.agents.reflector import build_reflection_prompt
    from retroformer.envs.base import Outcome
    from retroformer.types import Step

    suite = SyntheticSuite(SyntheticSuite.Config(num_tasks=1))
    task = suite.tasks()[0]
    env = suite.make()
    description = env.reset(task)
    oracle = ClueReflector(carry_prob=1.0, template="Open the {door} door: open[{door}].")

    def reflect(action: str) -> str:
        env.reset(task)
        step = Step("", action, env.step(action).observation)
        prompt = build_reflection_prompt(suite.prompts, description, [step], Outcome(0.0, False), [])
        assert "the way out is the ochre door" in prompt  # the prompt's example holds a clue of its own
        return asyncio.run(oracle.generate(GenerationRequest(prompt, SamplingParams()))).text

    answer = task.payload["answer"]
    assert reflect(f"open[{task.payload['doors'][0]}]") == f"Open the {answer} door: open[{answer}]."
    # An attempt that revealed nothing (an invalid action) gets no door, not the example's.
    assert "door:" not in reflect("open[nowhere]")
    assert oracle.model_id != ClueReflector(carry_prob=1.0).model_id  # another wording is another reflector
    with pytest.raises(ConfigError, match=r"template must be a sentence holding \{door\}"):
        ClueReflector(template="Open the right door.")


def test_ratings_have_the_shape_the_fixed_point_argument_assumes(tmp_path):
    # a generic reflection is rewarded one time in three (a lucky blind retry), a working plan always, a wrong door
    # never: so most rewarded reflections are generic ones
    cfg = from_dict(TrialsConfig, {
        "run_name": "mix", "runs_dir": str(tmp_path), "trials": 2, "concurrency": 16,
        "env": {"name": "synthetic", "options": {"num_tasks": 600, "wall_clue": True, "seed": 7}},
        "actor": {"kind": "plan", "retry": "random"},
        "reflector": {"llm": {"backend": "scripted", "scripted_policy": "synthetic-clue",
                              "scripted_options": {"carry_prob": 0.05, "look_prob": 0.05, "wrong_prob": 0.15}}},
    })  # fmt: skip
    rows = rated_reflection_rows(run_trials(cfg, progress=False).records)
    answers = {
        t.task_id: t.payload["answer"] for t in SyntheticSuite(SyntheticSuite.Config(num_tasks=600, seed=7)).tasks()
    }
    by_kind: dict[str, list[float]] = {"plan": [], "wrong": [], "generic": []}
    for row in rows:
        text = row["reflection"]
        working = (LOOK_REFLECTION, CLUE_TEMPLATE.format(door=answers[row["task_id"]]))
        kind = "generic" if text == GENERIC_REFLECTION else "plan" if text in working else "wrong"
        by_kind[kind].append(row["rating"])
    assert set(by_kind["plan"]) == {1.0} and set(by_kind["wrong"]) == {0.0}
    assert abs(statistics.fmean(by_kind["generic"]) - 1 / 3) < 0.07
    rewarded = [k for k, v in by_kind.items() for r in v if r > 0]
    assert rewarded.count("generic") / len(rewarded) > 0.6  # imitation of the rewarded ones writes generic


def test_blind_retries_do_not_depend_on_how_concurrent_episodes_interleave(tmp_path):
    def outcomes(concurrency: int) -> dict[tuple[str, int], bool]:
        cfg = from_dict(TrialsConfig, {
            "run_name": f"c{concurrency}", "runs_dir": str(tmp_path), "trials": 3, "concurrency": concurrency,
            "env": {"name": "synthetic", "options": {"num_tasks": 60, "seed": 3}},
            "actor": {"kind": "plan", "retry": "random"},
            "reflector": {"llm": {"backend": "scripted", "scripted_policy": "synthetic-clue",
                                  "scripted_options": {"carry_prob": 0.0}}},
        })  # fmt: skip
        return {(r.task_id, r.trial): r.success for r in run_trials(cfg, progress=False).records}

    one, many = outcomes(1), outcomes(16)
    assert one == many
    assert 0 < sum(one.values()) < len(one)  # blind retries that sometimes work, not a constant


def test_paired_statistics():
    assert binomial_two_sided(0, 10) == pytest.approx(2 / 1024)
    assert binomial_two_sided(5, 10) == 1.0
    a = [True] * 20 + [False] * 80
    b = [True] * 20 + [True] * 30 + [False] * 50
    test = mcnemar_exact(a, b)
    assert (test["a_only"], test["b_only"]) == (0, 30) and test["p"] < 1e-8
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    diff, lo, hi = paired_bootstrap_diff([float(x) for x in a], [float(x) for x in b])
    assert diff == pytest.approx(0.3) and lo < 0.3 < hi and lo > 0.15
