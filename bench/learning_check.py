"""Does training improve the reflector? The demo pipeline over several seeds, side by side.

    python bench/learning_check.py [--seeds 0 1 2] [--workdir runs/learning-check]

For each seed the demo's own steps run (experiments/demo/run_demo.py ``pipeline()``) in ``<workdir>/seed<N>``, emptied
first (the steps resume what they find, which would measure an older recipe's results again): fresh
tiny models, rated reflections collected on a different environment seed (100 + N), SFT, PPO (online environment
reward, see experiments/demo/ppo.yaml) and evaluation on the same 32 held-out tasks (env seed 1) of: no reflections
(ReAct), the untrained tiny reflector, the SFT adapter, and the SFT + PPO adapter. The reward-model step is skipped:
the recipe's PPO does not read it.

Measured per reflector: the mean rating of the reflections written after trial 0 (next return minus this one, so the
fraction that carried the clue) and the per-attempt success at trial 1. Written: ``bench/LEARNING.md`` (mean ± std
across seeds, per-seed values, command, machine, date, wall time) and ``bench/learning.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
REFLECTORS = {  # eval run name -> label
    "eval-none": "none (ReAct, no reflection)",
    "eval-base": "untrained tiny reflector",
    "eval-sft": "SFT",
    "eval-retroformer": "SFT + PPO",
}


#: What the PPO rows mean and what was tried; no measured numbers here (those are all computed above).
NOTES = """\
How to read it. The rating is measured greedily (temperature 0), as the demo evaluates; PPO samples at a temperature
and raises the reward of what it samples. A rising sampled reward with an unchanged greedy rating means PPO sharpened
the SFT policy around choices it already ranked first, without changing which door it names when it is wrong.

What was tried on the demo's PPO step (one seed, a deliberately under-trained SFT adapter of 400 steps as the start,
greedy carry rate on 96 held-out tasks before and after; probes not kept in the repository): the correctness of the
loop (the log-probabilities the update starts from equal those of the sampled tokens, ratio exactly 1, and one step
raises the log-probability of positive-advantage reflections: tests/test_ppo.py), temperature 0.5 / 0.7 / 1.0,
learning rate 3e-4 / 5e-4 / 1e-3 / 2e-3, kl_coef 0 / 0.05 / 0.1, 20 / 40 / 60 iterations, 4 or 8 samples per prompt,
8 or 16 prompts per iteration, and the reward model (reward_source rm) instead of the environment. Learning rates of
1e-3 and above let the policy drift from the SFT adapter (KL of many nats) and lowered the held-out carry rate, down to
collapse at 2e-3; temperature 1.0 samples mostly malformed door names, so few samples are rewarded. The reward model
rates malformed reflections almost as highly as correct ones, so PPO against it raised its reward and lowered the
held-out carry rate (reward hacking): the demo's PPO uses the environment reward. At learning rate 3e-4, temperature
0.7 and 60 iterations (the recipe), the sampled reward rose and the held-out greedy carry rate did not move. Shortening
SFT so that PPO has more to fix does not help either: PPO did not raise the greedy carry rate of the 400-step adapter,
so the demo keeps SFT at 1000 steps.
"""


def load_demo():
    spec = importlib.util.spec_from_file_location("run_demo", ROOT / "experiments" / "demo" / "run_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seed_steps(demo, workdir: str, seed: int) -> list[tuple[str, list[str]]]:
    return [(title, argv) for title, argv in demo.pipeline(workdir, seed) if title != "reward model"]


def metrics_of(report: dict) -> dict[str, dict[str, float | None]]:
    out = {}
    for run, summary in report["runs"].items():
        out[run] = {
            "rating_after_trial0": summary["mean_rating_after_trial"][0],
            "success_trial1": summary["per_attempt_success"][1],
        }
    return out


def ppo_curve(history_path: Path) -> dict[str, float]:
    """PPO's sampled reward (the environment's rating of each sampled reflection) early and late in training."""
    history = json.loads(history_path.read_text())
    rewards = [m["rollout/reward_mean"] for m in history]
    q = max(len(rewards) // 4, 1)
    return {
        "iterations": len(rewards),
        "reward_first_quarter": statistics.fmean(rewards[:q]),
        "reward_last_quarter": statistics.fmean(rewards[-q:]),
        "kl_last": history[-1]["ppo/kl"],
    }


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(m: float | None, s: float | None) -> str:
    return "-" if m is None else f"{m:.3f} ± {s:.3f}"


def markdown(result: dict) -> str:
    seeds = result["seeds"]
    deltas = [
        result["per_seed"][str(s)]["eval-retroformer"]["rating_after_trial0"]
        - result["per_seed"][str(s)]["eval-sft"]["rating_after_trial0"]
        for s in seeds
    ]
    lines = [
        "# Learning check: does training improve the reflector?",
        "",
        "Written by `bench/learning_check.py`; every number below comes from its run. Held-out: 32 vault tasks "
        "(env seed 1), the same for every seed. Per seed N: tiny models rebuilt, training data collected on env seed "
        "100 + N (scripted reflector carrying the clue half of the time), SFT and PPO seeded with N. The recipes are "
        "experiments/demo/{sft,ppo}.yaml and the tiny-model flags in experiments/demo/run_demo.py.",
        "",
        "- rating after trial 0: mean of next return minus this return over the reflections written after the first "
        "failed attempt (= the fraction that carried the clue, since the right door is never the first)",
        "- success at trial 1: per-attempt success of the second attempt, the one that reads the reflection",
        "",
        f"Seeds: {', '.join(map(str, seeds))}. Mean ± std across seeds.",
        "",
        "| reflector | rating after trial 0 | success at trial 1 | per seed (rating) |",
        "|---|---|---|---|",
    ]
    for run, label in REFLECTORS.items():
        agg = result["aggregate"][run]
        per_seed = ", ".join(
            "-" if result["per_seed"][str(s)][run]["rating_after_trial0"] is None
            else f"{result['per_seed'][str(s)][run]['rating_after_trial0']:.3f}"
            for s in seeds
        )  # fmt: skip
        lines.append(f"| {label} | {fmt(*agg['rating_after_trial0'])} | {fmt(*agg['success_trial1'])} | {per_seed} |")
    lines += [
        "",
        "The none (ReAct) baseline writes no reflections, so it has no rating; the right door is never the first, so "
        "it never succeeds.",
        "",
        "## Does the PPO step add anything?",
        "",
        f"SFT + PPO minus SFT, rating after trial 0, per seed: {', '.join(f'{d:+.3f}' for d in deltas)} "
        f"(mean {statistics.fmean(deltas):+.3f}). "
        + (
            "PPO raised the held-out rating over SFT in every seed."
            if all(d > 0 for d in deltas)
            else "PPO does not improve the reflector beyond SFT on this demo: its held-out rating is not above SFT's "
            "in every seed."
        ),
        "",
        "PPO's own training signal: the mean environment reward of its sampled reflections (temperature of "
        "experiments/demo/ppo.yaml) over the first and the last quarter of its iterations, and the KL to the SFT "
        "adapter at the end (nats per reflection):",
        "",
        "| seed | iterations | sampled reward, first quarter | sampled reward, last quarter | KL at the end |",
        "|---|---|---|---|---|",
        *(
            f"| {s} | {c['iterations']} | {c['reward_first_quarter']:.3f} | {c['reward_last_quarter']:.3f} | "
            f"{c['kl_last']:.2f} |"
            for s, c in ((s, result["ppo_curve"][str(s)]) for s in seeds)
        ),
        "",
        NOTES,
        "",
        "Step wall times (s, per seed): "
        + "; ".join(f"seed {s}: " + ", ".join(f"{t} {v:.0f}" for t, v in result["timings"][str(s)]) for s in seeds),
        "",
        f"Command: `{result['command']}`",
        f"Machine: {result['machine']}",
        f"Date: {result['date']}",
        f"Wall time: {result['wall_time_s']:.0f} s",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", default="runs/learning-check", help="one run directory per seed under it")
    parser.add_argument("--out", default=str(HERE / "LEARNING.md"), help="markdown; the JSON goes beside it")
    args = parser.parse_args(argv)
    demo = load_demo()
    t0 = time.perf_counter()
    per_seed, timings, curves = {}, {}, {}
    for seed in args.seeds:
        workdir = f"{args.workdir}/seed{seed}"
        # every step resumes what it finds (trials records, SFT and PPO checkpoints): start from nothing, so that no
        # result of an older recipe is measured again
        shutil.rmtree(ROOT / workdir, ignore_errors=True)
        timings[str(seed)] = demo.run_steps(seed_steps(demo, workdir, seed), log=print)
        report = json.loads((ROOT / workdir / "report" / "report.json").read_text())
        per_seed[str(seed)] = metrics_of(report)
        curves[str(seed)] = ppo_curve(ROOT / workdir / "ppo" / "history.json")
        print(f"seed {seed}: {json.dumps(per_seed[str(seed)])}", flush=True)
    aggregate = {
        run: {
            key: mean_std([per_seed[str(s)][run][key] for s in args.seeds])
            for key in ("rating_after_trial0", "success_trial1")
        }
        for run in REFLECTORS
    }
    result = {
        "seeds": args.seeds,
        "per_seed": per_seed,
        "aggregate": aggregate,
        "timings": timings,
        "ppo_curve": curves,
        "command": " ".join(["python", "bench/learning_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "wall_time_s": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.write_text(markdown(result))
    out.with_name("learning.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
