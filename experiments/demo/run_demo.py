"""The whole Retroformer pipeline, offline on a CPU, in a few minutes (``make demo``).

    python experiments/demo/run_demo.py [--workdir runs/demo] [--seed 0]

Each step is the command a user would type; they are printed as they run:

1. build tiny models (a tokenizer trained here, random weights; nothing is downloaded)
2. collect rated reflections on the synthetic vault environment, four behaviour samples per task (a plan-following
   actor whose blind retries are random; a scripted behaviour reflector that gives a plan that works 10% of the time)
3. SFT the retrospective model on the reflections that helped (LoRA)
4. train a reward model on the ratings (pairs of reflections of the same prompt)
5. PPO from the SFT adapter with the online environment reward (LoRA, KL to the SFT adapter; see ppo.yaml)
6-9. evaluate four reflectors on the same held-out tasks: none (ReAct), the frozen base model (Reflexion-style),
   the SFT adapter, the SFT + PPO adapter (Retroformer)
10. report: success per trial side by side, paired comparisons, a PNG plot, a JSON file and an HTML page

The synthetic environment and its actor are there so that learning can be *shown* on a CPU in minutes: the actor is
not an LLM, and what its next attempt does depends only on what the reflection says. In it, imitating the reflections
that were followed by success (SFT) and maximising their effect (PPO) lead to different reflectors: a blind retry is
lucky one time in three, so most rewarded reflections are generic ones (retroformer/envs/synthetic.py has the
argument; bench/LEARNING.md measures it). See README.md.
"""

from __future__ import annotations

import argparse
import os
import re
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
#: LoRA adapter to make the model confident.
TINY_FLAGS = ["--initializer_range", "0.2"]
#: Training tasks (env seed 100 + seed) and behaviour samples per task: each sample is one collect run over the same
#: tasks with its own reflector and actor seed, so the first reflection prompt of a task is shared by the samples
#: (the reward model's within-prompt pairs).
NUM_TASKS = 1024
NUM_SAMPLES = 4
#: The behaviour reflector: the clue with probability CARRY, "look around first" with LOOK (both plans that work), a
#: wrong door with WRONG, a generic sentence otherwise.
CARRY, LOOK, WRONG = 0.05, 0.05, 0.15
#: The vault's options: four doors, the clue also on the wall (where `look` shows it).
VAULT = "num_doors: 4, wall_clue: true"
#: Held-out tasks (env seed 1000 + seed, never trained on).
EVAL_TASKS = 256
#: The demo trains with a smaller budget than its recipes (which bench/learning_check.py runs as they are), so that it
#: fits in five minutes on two cores: SFT's loss has flattened by step 400 and PPO's held-out success reaches 1.0 by
#: iteration 15 in the learning check.
DEMO_BUDGET = {"sft": ("--max_steps", "400", "--save_steps", "400"), "reward": ("--max_steps", "200", "--save_steps", "200"),
               "ppo": ("--num_iterations", "30", "--save_steps", "30")}  # fmt: skip


def collect_steps(workdir: str, seed: int) -> list[tuple[str, list[str]]]:
    """One ``retroformer trials`` run per behaviour sample: ``<workdir>/collect-<k>``."""
    steps = []
    for k in range(NUM_SAMPLES):
        sample_seed = 10 * seed + k
        steps.append((
            f"collect rated reflections ({k + 1}/{NUM_SAMPLES})",
            [sys.executable, "-m", "retroformer.cli", "trials", "--config", str(HERE / "collect.yaml"),
             "--runs_dir", workdir, "--run_name", f"collect-{k}", "--seed", str(sample_seed),
             "--env.options", f"{{num_tasks: {NUM_TASKS}, {VAULT}, seed: {100 + seed}}}",
             "--reflector.llm.scripted_options",
             f"{{carry_prob: {CARRY}, look_prob: {LOOK}, wrong_prob: {WRONG}, seed: {sample_seed}}}"],
        ))  # fmt: skip
    return steps


def datasets(workdir: str) -> str:
    """The rated-reflection datasets of every behaviour sample, as a YAML list for ``--dataset``."""
    return "[" + ", ".join(f"{workdir}/collect-{k}/datasets/rated_reflections" for k in range(NUM_SAMPLES)) + "]"


def sft_step(workdir: str, seed: int, tiny: str, out: str = "sft", extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "sft_run.py", "--config", str(HERE / "sft.yaml"), "--model", f"{tiny}/lm",
            "--dataset", datasets(workdir), "--output_dir", f"{workdir}/{out}", "--seed", str(seed), *extra]  # fmt: skip


def reward_step(workdir: str, seed: int, tiny: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "reward_run.py", "--config", str(HERE / "reward.yaml"), "--model", f"{tiny}/rm",
            "--dataset", datasets(workdir), "--output_dir", f"{workdir}/reward", "--seed", str(seed), *extra]  # fmt: skip


def ppo_step(workdir: str, seed: int, tiny: str, source: str = "env", out: str = "ppo",
             extra: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    """PPO from the SFT adapter on the prompts of the first behaviour sample (whose run the env reward replays)."""
    return [sys.executable, "ppo_run.py", "--config", str(HERE / "ppo.yaml"), "--model", f"{tiny}/lm",
            "--sft_adapter", f"{workdir}/sft", "--reward_source", source, "--reward_model", f"{workdir}/reward",
            "--env_run_dir", f"{workdir}/collect-0", "--dataset", f"[{workdir}/collect-0/datasets/rated_reflections]",
            "--output_dir", f"{workdir}/{out}", "--seed", str(seed), *extra]  # fmt: skip


def eval_step(workdir: str, seed: int, tiny: str, run_name: str, adapter: str | None = None,
              reflector: str = "llm", extra: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    """The held-out evaluation run ``<workdir>/<run_name>``: ``adapter`` on the tiny base, or no reflector."""
    argv = [sys.executable, "-m", "retroformer.cli", "trials", "--config", str(HERE / "eval.yaml"),
            "--runs_dir", workdir, "--run_name", run_name, "--seed", str(seed),
            "--env.options", f"{{num_tasks: {EVAL_TASKS}, {VAULT}, seed: {1000 + seed}}}",
            "--reflector.llm.model", f"{tiny}/lm"]  # fmt: skip
    if reflector == "none":
        argv += ["--reflector.kind", "none"]
    if adapter:
        argv += ["--reflector.llm.adapter", adapter]
    return argv + list(extra)


def pipeline(workdir: str, seed: int, tiny: str | None = None) -> list[tuple[str, list[str]]]:
    """The demo's steps as (title, argv) pairs; paths are relative to the repository root.

    ``tiny`` defaults to ``<workdir>/tiny``; the tiny models are rebuilt every time (seconds), so a stale shape left
    there by an older recipe is never used.
    """
    tiny = tiny or f"{workdir}/tiny"
    py = sys.executable
    return [
        ("tiny models", [py, "-m", "retroformer.cli", "tiny-models", "--out", tiny, *TINY_FLAGS, "--seed", str(seed),
                         "--force", "true"]),
        *collect_steps(workdir, seed),
        ("SFT", sft_step(workdir, seed, tiny, extra=DEMO_BUDGET["sft"])),
        ("reward model", reward_step(workdir, seed, tiny, DEMO_BUDGET["reward"])),
        ("PPO", ppo_step(workdir, seed, tiny, extra=DEMO_BUDGET["ppo"])),
        ("evaluate: no reflections (ReAct)", eval_step(workdir, seed, tiny, "eval-none", reflector="none")),
        ("evaluate: frozen base reflector (Reflexion)", eval_step(workdir, seed, tiny, "eval-base")),
        ("evaluate: SFT reflector", eval_step(workdir, seed, tiny, "eval-sft", f"{workdir}/sft")),
        ("evaluate: trained reflector (Retroformer)",
         eval_step(workdir, seed, tiny, "eval-retroformer", f"{workdir}/ppo")),
        ("report", [py, "-m", "retroformer.cli", "report", f"{workdir}/eval-none", f"{workdir}/eval-base",
                    f"{workdir}/eval-sft", f"{workdir}/eval-retroformer", "--out", f"{workdir}/report",
                    "--labels", "ReAct (no reflection),Reflexion (frozen base),SFT,Retroformer (SFT + PPO)"]),
    ]  # fmt: skip


def offline_env(**extra: str) -> dict[str, str]:
    """The process environment of a step: offline, quiet tokenizers, the log level of ``RETROFORMER_LOG_LEVEL``."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RETROFORMER_LOG_LEVEL": os.environ.get("RETROFORMER_LOG_LEVEL", "WARNING"),
        **extra,
    }


def run_logged(argv: list[str], path: Path, env: dict[str, str], mode: str = "w") -> tuple[int, str, str]:
    """Run ``argv`` from the repository root with its output in ``path`` (after the command line); returns the exit
    code, the command as shown, and the last 40 lines of the log."""
    shown = " ".join(shlex.quote(a) for a in argv).replace(sys.executable, "python")
    with path.open(mode, encoding="utf-8") as out:
        out.write(f"$ {shown}\n")
        out.flush()
        proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    tail = (
        "" if proc.returncode == 0 else "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-40:])
    )
    return proc.returncode, shown, tail


def run_steps(
    steps: list[tuple[str, list[str]]], log_dir: str | Path, log=print, progress: bool = True
) -> list[tuple[str, float]]:
    """Run each step as a subprocess; its output goes to ``<log_dir>/<NN>-<title>.log``, the console gets one line.

    A failed step shows the end of its log and stops the run (a rerun resumes: every step continues what it finds).
    """
    from tqdm.auto import tqdm

    env = offline_env()
    log_dir = ROOT / log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    timings = []
    bar = tqdm(total=len(steps), unit="step", disable=not progress, leave=False)
    say = bar.write if progress else log
    for i, (title, argv) in enumerate(steps, start=1):
        path = log_dir / f"{i:02d}-{re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')}.log"
        bar.set_description(title)
        t0 = time.perf_counter()
        code, shown, tail = run_logged(argv, path, env)
        if code != 0:
            bar.close()
            raise SystemExit(f"{tail}\n\nstep {i} ({title}) failed with exit code {code}: the end of its "
                             f"log is above, the whole log in {path}\n$ {shown}")  # fmt: skip
        timings.append((title, time.perf_counter() - t0))
        say(f"step {i:2d}/{len(steps)}  {title:<45s} {timings[-1][1]:6.1f} s")
        bar.update(1)
    bar.close()
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
    print(f"demo in {args.workdir}: each step's command and output go to {args.workdir}/logs/")
    run_steps(pipeline(args.workdir, args.seed, args.tiny), f"{args.workdir}/logs")
    total = time.perf_counter() - t0
    print(f"total {total:.1f} s\n")
    report = Path(args.workdir) / "report"
    print((ROOT / report / "report.md").read_text(encoding="utf-8"))
    print(f"plot: {report / 'success.png'}\njson: {report / 'report.json'}")
    print(f"html: {report / 'report.html'} (open it in a browser: the runs side by side, task by task)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
