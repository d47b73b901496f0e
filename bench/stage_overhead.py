"""Overhead of our stage scripts over a bare TRL trainer on the same tiny model, data and number of steps.

    .venv/bin/python bench/stage_overhead.py --steps 30 --repeats 2

For each stage, two fresh processes run one after the other (their order alternates between repeats):

* ``ours``: ``sft_run.py`` / ``reward_run.py`` / ``ppo_run.py --algorithm grpo`` with their command-line flags;
* ``bare``: this file with ``--bare STAGE``: the TRL trainer built by hand (``SFTTrainer`` / ``RewardTrainer`` /
  ``GRPOTrainer``) with the same LoRA shape, batch size, steps, learning rate and no checkpoints.

Two wall times per run: **process** (start of the Python process to its exit: imports, checks, data preparation,
model load, training, saving) and **train** (``trainer.train()`` alone: HF's ``train_runtime`` metric, which both
sides report). Our own PPO loop (``--algorithm ppo``) has no bare TRL counterpart (TRL >= 1.13 has no PPO): its
iterations per second are reported alone.

Data: ``tests/helpers_training.rated_rows`` (vault prompts, reflections rated 1.0 or 0.0), saved as a rated dataset
for our scripts; the bare trainers get the same rows in their own format (SFT: prompt/completion of the rows rated
above 0; reward: chosen/rejected pairs of the same prompt; GRPO: the unique prompts, rewarded by the same tiny reward
model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LORA = {"r": 4, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
BATCH = 4
LR = 1e-4
MAX_LENGTH = 192  # longer than every prompt + reflection (155 tokens): neither side truncates


def rows() -> dict[str, list]:
    sys.path.insert(0, str(REPO / "tests"))
    from helpers_training import rated_rows

    return rated_rows(num_prompts=16, reflections_per_prompt=4)


# --- bare TRL trainers (child process) ----------------------------------------------------------------------------


def bare(stage: str, models: dict[str, str], out: str, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = rows()
    common = dict(
        output_dir=out,
        max_steps=steps,
        learning_rate=LR,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        bf16=False,
        gradient_checkpointing=False,
        seed=0,
    )
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        keep = [i for i, r in enumerate(data["rating"]) if r > 0]
        ds = Dataset.from_dict(
            {"prompt": [data["prompt"][i] for i in keep], "completion": [" " + data["reflection"][i] for i in keep]}
        )
        tok = AutoTokenizer.from_pretrained(models["lm"])
        tok.pad_token = tok.pad_token or tok.eos_token
        args = SFTConfig(**common, per_device_train_batch_size=BATCH, max_length=MAX_LENGTH, completion_only_loss=True)
        trainer = SFTTrainer(
            model=models["lm"],
            args=args,
            train_dataset=ds,
            processing_class=tok,
            peft_config=LoraConfig(**LORA, task_type="CAUSAL_LM"),
        )
    elif stage == "reward":
        from trl import RewardConfig, RewardTrainer

        by_prompt: dict[str, dict[float, list[str]]] = {}
        for p, y, r in zip(data["prompt"], data["reflection"], data["rating"], strict=True):
            by_prompt.setdefault(p, {}).setdefault(r, []).append(y)
        pairs = {"chosen": [], "rejected": []}
        for p, groups in by_prompt.items():
            for good in groups.get(1.0, []):
                for badr in groups.get(0.0, []):
                    pairs["chosen"].append(p + " " + good)
                    pairs["rejected"].append(p + " " + badr)
        tok = AutoTokenizer.from_pretrained(models["rm"])
        tok.pad_token = tok.pad_token or tok.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(models["rm"], num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        args = RewardConfig(**common, per_device_train_batch_size=BATCH, max_length=MAX_LENGTH)
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict(pairs),
            processing_class=tok,
            peft_config=LoraConfig(**LORA, task_type="SEQ_CLS"),
        )
    else:
        from transformers import AutoModelForCausalLM
        from trl import GRPOConfig, GRPOTrainer

        prompts = sorted(set(data["prompt"]))
        tok = AutoTokenizer.from_pretrained(models["lm"])
        tok.pad_token = tok.pad_token or tok.eos_token
        rm_tok = AutoTokenizer.from_pretrained(models["rm"])
        rm_tok.pad_token = rm_tok.pad_token or rm_tok.eos_token
        rm = AutoModelForSequenceClassification.from_pretrained(models["rm"], num_labels=1).eval()
        rm.config.pad_token_id = rm_tok.pad_token_id

        def reward(prompts, completions, **kwargs):
            with torch.no_grad():
                enc = rm_tok([p + c for p, c in zip(prompts, completions, strict=True)], return_tensors="pt",
                             padding=True, truncation=True, max_length=MAX_LENGTH)  # fmt: skip
                return rm(**enc).logits[:, 0].tolist()

        args = GRPOConfig(
            **common,
            per_device_train_batch_size=2,
            generation_batch_size=4,
            num_generations=2,
            max_completion_length=6,
            temperature=1.0,
            top_k=0,
        )
        trainer = GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(models["lm"], dtype=torch.float32),
            reward_funcs=reward,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tok,
            peft_config=LoraConfig(**LORA, task_type="CAUSAL_LM"),
        )
    result = trainer.train()
    trainer.save_model(out)
    return {"train_runtime": result.metrics["train_runtime"], "global_step": trainer.state.global_step}


# --- our scripts --------------------------------------------------------------------------------------------------


def ours_argv(stage: str, models: dict[str, str], data: str, out: str, steps: int) -> list[str]:
    lora = ["--lora.r", str(LORA["r"]), "--lora.alpha", str(LORA["lora_alpha"])]
    if stage == "sft":
        return ["sft_run.py", "--model", models["lm"], "--max_steps", str(steps), "--max_length", str(MAX_LENGTH),
                "--per_device_train_batch_size", str(BATCH), "--learning_rate", str(LR), "--logging_steps", "10",
                "--save_steps", str(10 * steps), "--dataset", data, "--output_dir", out, *lora]  # fmt: skip
    if stage == "reward":
        return ["reward_run.py", "--model", models["rm"], "--mode", "pairwise", "--eval_fraction", "0",
                "--max_steps", str(steps), "--max_length", str(MAX_LENGTH), "--merge_lora", "false",
                "--per_device_train_batch_size", str(BATCH), "--learning_rate", str(LR), "--logging_steps", "10",
                "--save_steps", str(10 * steps), "--dataset", data, "--output_dir", out, *lora]  # fmt: skip
    algorithm = "grpo" if stage == "grpo" else "ppo"
    return ["ppo_run.py", "--algorithm", algorithm, "--model", models["lm"], "--reward_model", models["rm"],
            "--num_iterations", str(steps), "--batch_size", "2", "--num_samples_per_prompt", "2",
            "--minibatch_size", "2", "--ppo_epochs", "1", "--max_new_tokens", "6", "--max_prompt_length", str(MAX_LENGTH),
            "--learning_rate", str(LR), "--save_steps", str(10 * steps), "--logging_steps", "10",
            "--dataset", data, "--output_dir", out, *lora]  # fmt: skip


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall s, CPU s user+sys, stdout) of one child process. CPU time is less disturbed by other load than wall."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def train_runtime(metrics: dict, stage: str) -> float | None:
    for key in (f"{stage}/train_runtime", "ppo/train_runtime", "train_runtime"):
        if key in metrics:
            return float(metrics[key])
    return None


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps (grpo/ppo: iterations)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stages", nargs="+", default=["sft", "reward", "grpo", "ppo"])
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--bare", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--models", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.bare:  # child: one bare trainer run, metrics on stdout
        import torch

        torch.set_num_threads(1)
        print(json.dumps(bare(args.bare, json.loads(args.models), args.out, args.steps)))
        return []

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-stages-"))
    from datasets import Dataset

    from retroformer.tiny import TinyModelConfig, build_tiny_models

    models = {k: str(v) for k, v in build_tiny_models(TinyModelConfig(out=str(work / "tiny"))).items()}
    data = str(work / "data")
    Dataset.from_dict(rows()).save_to_disk(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "RETROFORMER_LOG_LEVEL": "WARNING"}  # fmt: skip
    results: list[dict] = []
    for rep in range(args.repeats):
        for stage in args.stages:
            sides = ["ours", "bare"] if stage != "ppo" else ["ours"]
            if rep % 2:
                sides.reverse()
            for side in sides:
                out = str(work / f"{stage}-{side}-{rep}")
                if side == "ours":
                    wall, cpu, _ = timed(ours_argv(stage, models, data, out, args.steps), env)
                    metrics = json.loads((Path(out) / "metrics.json").read_text())
                    train = train_runtime(metrics, stage)
                    extra = {"iterations_per_s": metrics.get("ppo/iterations_per_second")} if stage == "ppo" else {}
                else:
                    child = [str(Path(__file__).resolve()), "--bare", stage, "--models", json.dumps(models),
                             "--out", out, "--steps", str(args.steps)]  # fmt: skip
                    wall, cpu, stdout = timed(child, env)
                    train = json.loads(stdout.strip().splitlines()[-1])["train_runtime"]
                    extra = {}
                results.append(
                    {"repeat": rep, "stage": stage, "side": side, "process_s": wall, "process_cpu_s": cpu,
                     "train_s": train, **extra}
                )  # fmt: skip
                print(json.dumps(results[-1]), flush=True)

    print(f"\nsteps {args.steps}, load {os.getloadavg()[0]:.2f} (1-min avg at the end)")
    print(
        "| rep | stage | ours process s | bare process s | process ratio | ours train s | bare train s | train ratio "
        "| ours process CPU s | bare process CPU s | CPU ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rep in range(args.repeats):
        for stage in args.stages:
            o = next(r for r in results if r["repeat"] == rep and r["stage"] == stage and r["side"] == "ours")
            if stage == "ppo":
                print(f"| {rep} | ppo (ours only) | {o['process_s']:.1f} | - | - | - | - | "
                      f"{o.get('iterations_per_s') or float('nan'):.2f} it/s | {o['process_cpu_s']:.1f} | - | - |")  # fmt: skip
                continue
            b = next(r for r in results if r["repeat"] == rep and r["stage"] == stage and r["side"] == "bare")
            tr = f"{o['train_s'] / b['train_s']:.2f}" if o["train_s"] and b["train_s"] else "n/a"
            ot = f"{o['train_s']:.1f}" if o["train_s"] else "n/a"
            print(f"| {rep} | {stage} | {o['process_s']:.1f} | {b['process_s']:.1f} | "
                  f"{o['process_s'] / b['process_s']:.2f} | {ot} | {b['train_s']:.1f} | {tr} | "
                  f"{o['process_cpu_s']:.1f} | {b['process_cpu_s']:.1f} | {o['process_cpu_s'] / b['process_cpu_s']:.2f} |")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
