"""Memory of resume + export over many large records, and the throughput of one run split into shards.

    OMP_NUM_THREADS=1 .venv/bin/python bench/shards_memory.py --records 5000 50000 --baseline_src ../before --procs 1 2 4

(a) **Peak RSS of resume + export.** Writes ``--records`` synthetic ALFWorld-sized episode records (about 34 KB each
on disk: 10 trials per task, about 64 steps of ALFWorld-like thoughts, actions and observations, a reflection prompt
that holds the trajectory) for synthetic-vault task ids, then runs ``retroformer trials`` on them in a fresh
subprocess: the resume (index, budget count, nothing left to run), the summary and the export of the rated-reflection
dataset. The subprocess reports its ``ru_maxrss``. ``--baseline_src DIR`` runs the same command with the package from
another checkout (e.g. a ``git worktree`` of the commit before streaming) on the sizes of ``--baseline_records``.

(b) **Shards.** One 400-task synthetic run (plan actor, scripted clue reflector whose every call waits ``--latency``
seconds, as an API would) as 1 process and as 2 and 4 shards (``retroformer trials --shard I/N``, each its own
process with ``--concurrency`` episodes in flight), started together, and as one process with as many episodes in
flight as the shards together (``--single_concurrency``): wall time from the start of the first process to the exit of
the last (imports included), episodes/s, and the ratio to the first setup; also the same inside ``run_trials`` (the
slowest process's own time, imports excluded).

Everything is written below ``--workdir`` (default: a temporary folder) and deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRIALS = 10  # ALFWorld: 10-15 trials per task (paper)


def recipe(runs_dir: Path, run_name: str, tasks: int, trials: int, concurrency: int = 8) -> dict:
    return {
        "run_name": run_name,
        "runs_dir": str(runs_dir),
        "trials": trials,
        "concurrency": concurrency,
        "stop_on_success": False,
        "env": {"name": "synthetic", "options": {"num_tasks": tasks, "num_doors": 3}},
        "actor": {"kind": "plan"},
        "reflector": {
            "llm": {"backend": "scripted", "scripted_policy": "slow-clue", "scripted_options": {"carry_prob": 0.5}}
        },
    }


def write_records(path: Path, run_name: str, tasks: int, seed: int = 0) -> tuple[int, int]:
    """``tasks x TRIALS`` ALFWorld-sized records, every task complete (failed trials but the last have a reflection);
    returns (records, bytes)."""
    from retroformer.envs.synthetic import SyntheticSuite

    suite = SyntheticSuite(SyntheticSuite.Config(num_tasks=tasks, num_doors=3))
    task_list = suite.tasks()
    fingerprint = suite.fingerprint(task_list)
    rng = random.Random(seed)
    places = [f"{p} {i}" for p in ("countertop", "cabinet", "drawer", "shelf", "fridge", "sinkbasin") for i in range(8)]
    things = [
        f"{t} {i}" for t in ("apple", "bowl", "knife", "mug", "plate", "spatula", "egg", "kettle") for i in range(4)
    ]

    def step() -> dict:
        place = rng.choice(places)
        seen = ", ".join(f"a {x}" for x in rng.sample(things, 12))
        return {
            "thought": f"To solve the task, I need to find and take the object, then put it in the right place. "
            f"First I check {place}.",
            "action": f"go to {place}",
            "observation": f"You arrive at {place}. On the {place}, you see {seen}.",
            "reward": 0.0,
            "valid": True,
        }

    pool = [step() for _ in range(2000)]  # drawn from, so that writing 50,000 records takes seconds, not minutes
    instructions = "Interact with a household to solve a task. " * 40
    n = size = 0
    with path.open("w", encoding="utf-8") as fh:
        for task in task_list:
            won_at = rng.choice([*range(1, TRIALS), None, None])
            for trial in range(TRIALS):
                steps = rng.sample(pool, 64)
                success = won_at == trial
                failed_before_last = not success and trial + 1 < TRIALS
                trajectory = "\n".join(f"> {s['action']}\n{s['observation']}" for s in steps[:40])
                record = {
                    "run_name": run_name,
                    "task_id": task.task_id,
                    "trial": trial,
                    "env_name": "synthetic",
                    "env_version": suite.version,
                    "seed": 0,
                    "actor_id": "gpt-4o-mini",
                    "reflector_id": "scripted-clue-p0.5",
                    "actor_prompt_hash": "0123456789abcdef",
                    "memory": [],
                    "steps": steps,
                    "return_": float(success),
                    "success": success,
                    "end_reason": "success" if success else "step_limit",
                    "metrics": {},
                    "num_invalid_actions": 1,
                    "reflection": {
                        "prompt": f"{instructions}\nTask: {task.task_id}\n{trajectory}\nReflection:",
                        "text": "I searched every cabinet before the countertops. Next time I will go to countertop 1.",
                        "reflector_id": "scripted-clue-p0.5",
                        "prompt_hash": "fedcba9876543210",
                        "usage": {"prompt_tokens": 3000, "completion_tokens": 40, "calls": 1, "cached_calls": 0},
                    }
                    if failed_before_last
                    else None,
                    "actor_usage": {"prompt_tokens": 90000, "completion_tokens": 900, "calls": 45, "cached_calls": 0},
                    "error": None,
                    "task_fingerprint": fingerprint,
                    "wall_time_s": 12.5,
                    "created_at": "2026-01-01T00:00:00+00:00",
                    "schema_version": 1,
                }
                line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
                fh.write(line)
                n += 1
                size += len(line.encode("utf-8"))
    return n, size


#: Run in a fresh interpreter (with the package of the checkout under test first on the path): resume + export.
MEASURE = """
import json, resource, sys, time
import retroformer
print("package:", retroformer.__file__, file=sys.stderr)
from retroformer.config import from_dict
from retroformer.trials import TrialsConfig, run_trials
t0 = time.perf_counter()
res = run_trials(from_dict(TrialsConfig, json.loads(sys.argv[1])), progress=False)
assert res.new_episodes == 0, res.new_episodes
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "wall_s": time.perf_counter() - t0, "episodes": res.summary["num_episodes"]}))
"""


def measure_memory(workdir: Path, records: int, src: Path) -> dict:
    tasks = records // TRIALS
    runs = workdir / "mem"
    shutil.rmtree(runs, ignore_errors=True)
    path = runs / "mem" / "trials" / "episodes.jsonl"
    path.parent.mkdir(parents=True)
    t0 = time.perf_counter()
    n, size = write_records(path, "mem", tasks)
    written_s = time.perf_counter() - t0
    cfg = recipe(runs, "mem", tasks, TRIALS)
    cfg["reflector"]["llm"]["scripted_policy"] = "synthetic-clue"  # nothing is left to reflect on
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "RETROFORMER_LOG_LEVEL": "WARNING"}
    # cwd: the scratch folder, so that `python -c` (which puts the working directory first on the path) imports the
    # package of `src`, not one that happens to be in the working directory.
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(cfg)], cwd=workdir, env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"measurement failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["package"] = str(Path(out.stderr.split("package: ", 1)[1].split()[0]).parent)
    shutil.rmtree(runs, ignore_errors=True)
    return {"records": n, "file_mb": size / 2**20, "kb_per_record": size / n / 1000, "write_s": written_s, **result}


#: The command the shard processes run: the scripted clue reflector with a fixed latency per call, then the CLI.
WORKER = """
import asyncio, os, sys
from retroformer.envs.synthetic import ClueReflector
from retroformer.llm import register_scripted_policy

@register_scripted_policy("slow-clue")
class SlowClue(ClueReflector):
    async def generate(self, request):
        await asyncio.sleep(float(os.environ["BENCH_LATENCY_S"]))
        return await super().generate(request)

from retroformer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def measure_shards(workdir: Path, procs: int, tasks: int, concurrency: int, latency: float, src: Path) -> dict:
    runs = workdir / "shards"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    config = runs / "recipe.json"
    cfg = recipe(runs, f"p{procs}", tasks, trials=3, concurrency=concurrency)
    cfg["stop_on_success"] = True
    import yaml

    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "BENCH_LATENCY_S": str(latency), "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    env["RETROFORMER_LOG_LEVEL"] = "WARNING"
    shard_args = [[]] if procs == 1 else [["--shard", f"{i}/{procs}"] for i in range(procs)]
    t0 = time.perf_counter()
    running = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, "trials", "--config", str(config), *extra],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for extra in shard_args
    ]
    outs = [p.communicate() for p in running]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in running):
        raise SystemExit("a shard failed:\n" + "\n".join(err[-2000:] for _, err in outs))
    found = [re.search(r"\((\d+) new episodes, ([\d.]+) s\)", out) for out, _ in outs]
    episodes = sum(int(m.group(1)) for m in found)
    loop_s = max(float(m.group(2)) for m in found)
    # Checked, not assumed: every (task, trial) recorded once across the shards, and the merged dataset is there.
    from retroformer.records import dataset_path, iter_run_records

    keys = [(r.task_id, r.trial) for r in iter_run_records(runs / f"p{procs}")]
    tasks_seen = {task for task, _ in keys}
    if len(keys) != len(set(keys)) or len(keys) != episodes or len(tasks_seen) != tasks:
        raise SystemExit(f"{procs} processes: {len(keys)} records, {len(set(keys))} distinct, {len(tasks_seen)} tasks")
    if not dataset_path(runs / f"p{procs}").is_dir():
        raise SystemExit(f"{procs} processes: no merged dataset")
    shutil.rmtree(runs, ignore_errors=True)
    return {
        "procs": procs,
        "concurrency": concurrency,
        "episodes": episodes,
        "wall_s": wall,
        "episodes_per_s": episodes / wall,
        "loop_s": loop_s,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="*", default=[5000, 50000], help="(a): records per measurement")
    parser.add_argument("--baseline_src", default=None, help="(a): a checkout whose package is measured as 'before'")
    parser.add_argument("--baseline_records", type=int, nargs="*", default=[5000], help="(a): sizes for the baseline")
    parser.add_argument("--procs", type=int, nargs="*", default=[1, 2, 4], help="(b): processes (1: unsharded)")
    parser.add_argument("--tasks", type=int, default=400, help="(b): tasks of the run")
    parser.add_argument("--concurrency", type=int, default=8, help="(b): episodes in flight per process")
    parser.add_argument(
        "--single_concurrency",
        type=int,
        nargs="*",
        default=[16, 32],
        help="(b): also one process at these concurrencies (as many episodes in flight as 2 and 4 shards)",
    )
    parser.add_argument("--latency", type=float, default=0.2, help="(b): seconds per reflector call")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one); emptied at the end")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="shards-bench-"))
    here = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(here))  # this checkout's package, not another one installed in the environment
    figures: dict = {"memory": [], "shards": []}
    try:
        runs = [("after", n, here) for n in args.records]
        if args.baseline_src:
            runs = [("before", n, Path(args.baseline_src).resolve()) for n in args.baseline_records] + runs
        for label, n, src in runs:
            row = {"code": label, **measure_memory(workdir, n, src)}
            figures["memory"].append(row)
            print(json.dumps(row), flush=True)
        setups = [(p, args.concurrency) for p in args.procs] + [(1, c) for c in args.single_concurrency]
        for procs, concurrency in setups:
            row = measure_shards(workdir, procs, args.tasks, concurrency, args.latency, here)
            figures["shards"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print("\n| code | records | file (MB) | KB per record | peak RSS (MB) | resume + export (s) |")
    print("|---|---|---|---|---|---|")
    for r in figures["memory"]:
        print(
            f"| {r['code']} | {r['records']} | {r['file_mb']:.0f} | {r['kb_per_record']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['wall_s']:.1f} |"
        )
    if figures["shards"]:
        base = figures["shards"][0]
        print(
            "\n| processes | concurrency each | episodes | wall (s) | episodes/s | vs first row | slowest `run_trials` "
            "(s) | episodes/s in `run_trials` | vs first row |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in figures["shards"]:
            print(
                f"| {r['procs']} | {r['concurrency']} | {r['episodes']} | {r['wall_s']:.2f} | {r['episodes_per_s']:.1f} | "
                f"{r['episodes_per_s'] / base['episodes_per_s']:.2f} | {r['loop_s']:.2f} | "
                f"{r['episodes'] / r['loop_s']:.1f} | {base['loop_s'] / r['loop_s']:.2f} |"
            )
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
