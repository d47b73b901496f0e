"""The whole Retroformer pipeline, offline on a CPU, in a few minutes (``make demo``).

    python experiments/demo/run_demo.py [--workdir runs/demo] [--seed 0]

Each step is the command a user would type; they are printed as they run:

1. build tiny models (a tokenizer trained here, random weights; nothing is downloaded)
2. collect rated reflections on the synthetic vault environment (plan-following actor, scripted behaviour reflector)
3. SFT the retrospective model on the reflections that helped (LoRA)
4. train a reward model on all ratings
5. PPO from the SFT adapter with the online environment reward (LoRA, KL to the SFT adapter; see ppo.yaml)
6-8. evaluate three reflectors on the same held-out tasks: none (ReAct), the frozen base model (Reflexion-style),
   the trained adapter (Retroformer)
9. report: success per trial side by side, a PNG plot and a JSON file

The synthetic environment and its actor are there so that learning can be *shown* on a CPU in minutes: the actor is
not an LLM, and whether its next attempt succeeds depends only on what the reflection says. See README.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


#: Shape of the demo's tiny models (``retroformer tiny-models`` flags). initializer_range 0.2 rather than the default
#: 0.3: at 0.3 the random attention logits are so large (std ~6) that the softmax is saturated and LoRA cannot learn
#: to attend to the clue; at 0.1 the logits are bounded too tightly (tied embeddings behind the final RMSNorm) for a
#: LoRA adapter to make the model confident. See bench/LEARNING.md.
TINY_FLAGS = ["--initializer_range", "0.2"]
#: Tasks collected for training (~3 rated reflections each, about half of them helpful).
NUM_TASKS = 1024


def pipeline(workdir: str, seed: int, tiny: str | None = None) -> list[tuple[str, list[str]]]:
    """The demo's steps as (title, argv) pairs; paths are relative to the repository root.

    ``tiny`` defaults to ``<workdir>/tiny``; the tiny models are rebuilt every time (seconds), so a stale shape left
    there by an older recipe is never used.
    """
    tiny = tiny or f"{workdir}/tiny"
    py = sys.executable
    trials = [py, "-m", "retroformer.cli", "trials"]
    common = ["--runs_dir", workdir, "--seed", str(seed)]
    evaluate = [*trials, "--config", str(HERE / "eval.yaml"), *common, "--reflector.llm.model", f"{tiny}/lm"]
    return [
        ("tiny models", [py, "-m", "retroformer.cli", "tiny-models", "--out", tiny, *TINY_FLAGS, "--force", "true"]),
        ("collect rated reflections",
         [*trials, "--config", str(HERE / "collect.yaml"), *common,
          "--env.options", f"{{num_tasks: {NUM_TASKS}, num_doors: 4, seed: {100 + seed}}}",
          "--reflector.llm.scripted_options", f"{{carry_prob: 0.5, seed: {seed}}}"]),
        ("SFT", [py, "sft_run.py", "--config", str(HERE / "sft.yaml"), "--model", f"{tiny}/lm",
                 "--dataset", f"[{workdir}/collect/datasets/rated_reflections]", "--output_dir", f"{workdir}/sft",
                 "--seed", str(seed)]),
        ("reward model", [py, "reward_run.py", "--config", str(HERE / "reward.yaml"), "--model", f"{tiny}/rm",
                          "--dataset", f"[{workdir}/collect/datasets/rated_reflections]",
                          "--output_dir", f"{workdir}/reward", "--seed", str(seed)]),
        ("PPO", [py, "ppo_run.py", "--config", str(HERE / "ppo.yaml"), "--model", f"{tiny}/lm",
                 "--sft_adapter", f"{workdir}/sft", "--reward_model", f"{workdir}/reward",
                 "--env_run_dir", f"{workdir}/collect",
                 "--dataset", f"[{workdir}/collect/datasets/rated_reflections]", "--output_dir", f"{workdir}/ppo",
                 "--seed", str(seed)]),
        ("evaluate: no reflections (ReAct)", [*evaluate, "--run_name", "eval-none", "--reflector.kind", "none"]),
        ("evaluate: frozen base reflector (Reflexion)", [*evaluate, "--run_name", "eval-base"]),
        ("evaluate: SFT reflector", [*evaluate, "--run_name", "eval-sft", "--reflector.llm.adapter", f"{workdir}/sft"]),
        ("evaluate: trained reflector (Retroformer)",
         [*evaluate, "--run_name", "eval-retroformer", "--reflector.llm.adapter", f"{workdir}/ppo"]),
        ("report", [py, "-m", "retroformer.cli", "report", f"{workdir}/eval-none", f"{workdir}/eval-base",
                    f"{workdir}/eval-sft", f"{workdir}/eval-retroformer", "--out", f"{workdir}/report"]),
    ]  # fmt: skip


def run_steps(steps: list[tuple[str, list[str]]], log=print) -> list[tuple[str, float]]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RETROFORMER_LOG_LEVEL": os.environ.get("RETROFORMER_LOG_LEVEL", "WARNING"),
    }
    timings = []
    for i, (title, argv) in enumerate(steps, start=1):
        shown = " ".join(shlex.quote(a) for a in argv).replace(sys.executable, "python")
        log(f"\n=== step {i}/{len(steps)}: {title}\n$ {shown}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"step {i} ({title}) failed with exit code {proc.returncode}; see the output above")
        timings.append((title, time.perf_counter() - t0))
        log(f"--- {title}: {timings[-1][1]:.1f} s", flush=True)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/demo", help="run directory of every step (relative to the repo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data collection and training")
    parser.add_argument("--tiny", default=None, help="where the tiny models are built (default: <workdir>/tiny)")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="delete the workdir first; without it every step resumes what it finds (a rerun after a crash continues)",
    )
    args = parser.parse_args(argv)
    if args.fresh and Path(args.workdir).exists():
        import shutil

        shutil.rmtree(args.workdir)
    t0 = time.perf_counter()
    timings = run_steps(pipeline(args.workdir, args.seed, args.tiny), log=print)
    total = time.perf_counter() - t0
    print("\n=== timings")
    for title, secs in timings:
        print(f"{secs:7.1f} s  {title}")
    print(f"{total:7.1f} s  total")
    report = Path(args.workdir) / "report"
    print(f"\nreport: {report / 'report.md'}\nplot:   {report / 'success.png'}\njson:   {report / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
