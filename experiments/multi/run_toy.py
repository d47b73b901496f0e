"""One retrospective model for four environments, offline on a CPU: the toy scale of experiments/multi.

    python experiments/multi/run_toy.py [--workdir runs/multi-toy] [--seed 0] [--fresh]

Each step is the command a user would type (its output goes to ``<workdir>/logs/``):

1. build tiny models (a tokenizer trained here, random weights; nothing is downloaded)
2. collect rated reflections per environment: the synthetic vault (scripted behaviour reflector), the HotPotQA
   fixture, the ALFWorld fixture and our WebShop server (scripted actors, the frozen tiny reflector)
3. SFT of one reflector on all four datasets, environments balanced
4. a reward model on all four datasets, environments balanced (per-environment held-out metrics)
5. PPO from the SFT adapter with the online reward routed to the run each prompt came from (``env_run_dirs``)
6. evaluation per environment and condition: no reflections (ReAct), the frozen tiny base (Reflexion-style), the
   SFT adapter, the SFT + PPO adapter (Retroformer); the vault on held-out tasks, the fixtures on their own tasks
7. a report per environment (``retroformer report``) and one table with a row per environment and condition

The fixture environments' actors are scripted: their replies cycle whatever the memory says, so on HotPotQA, ALFWorld
and WebShop the rows show the plumbing (every stage reads and writes every environment), not learning. The vault is
where a reflection's content decides the next attempt (see experiments/demo and retroformer/envs/synthetic.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TOY = HERE / "toy"

#: Environment -> (collection recipe, evaluation recipe). The fixtures are evaluated on their own (few) tasks.
ENVS = {
    "vault": ("collect_vault.yaml", "eval_vault.yaml"),
    "hotpotqa": ("hotpotqa.yaml", "hotpotqa.yaml"),
    "alfworld": ("alfworld.yaml", "alfworld.yaml"),
    "webshop": ("webshop.yaml", "webshop.yaml"),
}
#: Condition -> its label in the report.
CONDITIONS = {
    "none": "ReAct (no reflection)",
    "base": "Reflexion (frozen base)",
    "sft": "SFT",
    "ppo": "Retroformer (SFT + PPO)",
}
TINY_FLAGS = ["--initializer_range", "0.2"]  # as experiments/demo/run_demo.py (its comment says why)


def load_demo():
    """experiments/demo/run_demo.py, whose ``run_steps`` runs and logs each step."""
    spec = importlib.util.spec_from_file_location("run_demo", ROOT / "experiments" / "demo" / "run_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def yaml_list(items) -> str:
    return "[" + ", ".join(str(i) for i in items) + "]"


def trials(recipe: str, workdir: str, run_name: str, seed: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "retroformer.cli", "trials", "--config", str(TOY / recipe), "--runs_dir", workdir,
            "--run_name", run_name, "--seed", str(seed), *extra]  # fmt: skip


def collect_steps(workdir: str, seed: int, tiny: str) -> list[tuple[str, list[str]]]:
    steps = []
    for env, (recipe, _) in ENVS.items():
        extra = [] if env == "vault" else ["--reflector.llm.model", f"{tiny}/lm"]
        steps.append((f"collect: {env}", trials(recipe, workdir, f"{env}-collect", seed, *extra)))
    return steps


def training_steps(workdir: str, seed: int, tiny: str) -> list[tuple[str, list[str]]]:
    runs = [f"{workdir}/{env}-collect" for env in ENVS]
    data = yaml_list(f"{run}/datasets/rated_reflections" for run in runs)
    common = ["--dataset", data, "--seed", str(seed)]
    py = sys.executable
    return [
        ("SFT (environments balanced)", [py, "sft_run.py", "--config", str(TOY / "sft.yaml"), "--model", f"{tiny}/lm",
                                         "--output_dir", f"{workdir}/sft", *common]),
        ("reward model (environments balanced)", [py, "reward_run.py", "--config", str(TOY / "reward.yaml"), "--model",
                                                  f"{tiny}/rm", "--output_dir", f"{workdir}/reward", *common]),
        ("PPO, online reward routed per run", [py, "ppo_run.py", "--config", str(TOY / "ppo.yaml"), "--model",
                                               f"{tiny}/lm", "--sft_adapter", f"{workdir}/sft", "--env_run_dirs",
                                               yaml_list(runs), "--eval_dataset", data, "--output_dir",
                                               f"{workdir}/ppo", *common]),
    ]  # fmt: skip


def eval_steps(workdir: str, seed: int, tiny: str) -> list[tuple[str, list[str]]]:
    steps = []
    for env, (_, recipe) in ENVS.items():
        for cond in CONDITIONS:
            extra = ["--training_data", "false", "--reflector.llm.model", f"{tiny}/lm"]
            if cond == "none":
                extra += ["--reflector.kind", "none"]
            elif cond in ("sft", "ppo"):
                extra += ["--reflector.llm.adapter", f"{workdir}/{cond}"]
            steps.append((f"evaluate: {env}, {cond}", trials(recipe, workdir, f"{env}-eval-{cond}", seed, *extra)))
    return steps


def report_steps(workdir: str) -> list[tuple[str, list[str]]]:
    labels = ",".join(CONDITIONS.values())
    return [
        (f"report: {env}", [sys.executable, "-m", "retroformer.cli", "report",
                            *(f"{workdir}/{env}-eval-{cond}" for cond in CONDITIONS), "--out",
                            f"{workdir}/report/{env}", "--labels", labels])
        for env in ENVS
    ]  # fmt: skip


def pipeline(workdir: str, seed: int) -> list[tuple[str, list[str]]]:
    """Every step as (title, argv); paths relative to the repository root."""
    tiny = f"{workdir}/tiny"
    build = [sys.executable, "-m", "retroformer.cli", "tiny-models", "--out", tiny, *TINY_FLAGS, "--seed", str(seed),
             "--force", "true"]  # fmt: skip
    return [
        ("tiny models", build),
        *collect_steps(workdir, seed, tiny),
        *training_steps(workdir, seed, tiny),
        *eval_steps(workdir, seed, tiny),
        *report_steps(workdir),
    ]


def table(workdir: str) -> list[dict]:
    """One row per environment and condition: success per trial (cumulative and per attempt) of its evaluation run."""
    from retroformer.report import load_run

    rows = []
    for env in ENVS:
        for cond, label in CONDITIONS.items():
            _, s = load_run(ROOT / workdir / f"{env}-eval-{cond}")
            rows.append({"env": env, "condition": cond, "label": label, "num_tasks": s["num_tasks"],
                         "cumulative_success": s["cumulative_success"],
                         "per_attempt_success": s["per_attempt_success"]})  # fmt: skip
    return rows


def format_table(rows: list[dict]) -> str:
    trials_n = max(len(r["cumulative_success"]) for r in rows)
    head = "| environment | condition | tasks | " + " | ".join(f"trial {i}" for i in range(trials_n)) + " |"
    lines = [head, "|" + "---|" * (3 + trials_n)]
    for r in rows:
        cells = " | ".join(f"{x:.3f}" for x in r["cumulative_success"])
        lines.append(f"| {r['env']} | {r['label']} | {r['num_tasks']} | {cells} |")
    return "\n".join(lines)


def write_report(workdir: str, command: str, timings: list[tuple[str, float]], total: float) -> Path:
    rows = table(workdir)
    out = ROOT / workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    metrics = json.loads((ROOT / workdir / "ppo" / "metrics.json").read_text())
    ppo_env = {k: v for k, v in metrics.items() if k.count("/") == 2}
    summary = {"command": command, "wall_time_s": total, "steps": [{"title": t, "wall_time_s": s} for t, s in timings],
               "rows": rows, "ppo_per_env": ppo_env}  # fmt: skip
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = (f"Success per trial (cumulative), one reflector for four environments\n\n{format_table(rows)}\n\n"
            f"Whole pipeline: {total:.1f} s\n")  # fmt: skip
    (out / "report.md").write_text(text)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workdir", default="runs/multi-toy", help="run directory of every step (relative to the repo)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of collection, training and evaluation")
    parser.add_argument("--fresh", action="store_true", help="delete the workdir first (else every step resumes)")
    args = parser.parse_args(argv)
    if args.fresh and (ROOT / args.workdir).exists():
        import shutil

        shutil.rmtree(ROOT / args.workdir)
    command = "python experiments/multi/run_toy.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"multi-environment toy run in {args.workdir}: each step's command and output go to {args.workdir}/logs/")
    t0 = time.perf_counter()
    timings = load_demo().run_steps(pipeline(args.workdir, args.seed), f"{args.workdir}/logs")
    total = time.perf_counter() - t0
    out = write_report(args.workdir, command.strip(), timings, total)
    print(f"total {total:.1f} s\n")
    print((out / "report.md").read_text(encoding="utf-8"))
    print(f"json: {out / 'report.json'}; per environment: {args.workdir}/report/<env>/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
