"""Where one PPO iteration of the real retrospective model spends its time: sampling, log-probabilities, update.

    OMP_NUM_THREADS=1 python bench/ppo_iteration.py --sft-adapter runs/reflector/seed0/sft \
        --dataset runs/reflector/seed0/collect/datasets/rated_reflections [--iterations 3] [--out bench/ppo_iteration.json]

SmolLM2-135M-Instruct with a LoRA adapter (the SFT adapter of bench/real_reflector.py) and the recipe
experiments/reflector/ppo.yaml: 8 prompts x 4 samples, one epoch of minibatches of 8. Each iteration is timed in
its parts, with the samples of a prompt run as one group (the prompt's keys and values computed once and repeated,
``token_logprobs(group_size=4)``) and, row by row (``group_size=1``, the previous code path),
in alternating order. The reward is a constant here (the update's cost does not depend on it); the adapter is not
changed (the optimizer step is skipped) so that every iteration measures the same policy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retroformer.config import from_dict  # noqa: E402
from retroformer.training.ppo import (  # noqa: E402
    PPORunConfig,
    build_policy,
    clipped_surrogate_loss,
    minibatch_order,
    reference_model,
    sample_reflections,
    token_logprobs,
)
from retroformer.training.ppo_stage import load_prompts  # noqa: E402


def time_iteration(model, tokenizer, prompts: list[str], cfg: PPORunConfig, group: int) -> dict:
    """Seconds spent in each part of one iteration, with the samples of a prompt run as groups of ``group``."""
    import torch

    out: dict = {}
    size = cfg.num_samples_per_prompt
    t0 = time.perf_counter()
    sampled = sample_reflections(model, tokenizer, [p for p in prompts for _ in range(size)], cfg, group_size=group)
    input_ids, attention_mask, mask, texts = sampled
    out["sample_s"] = time.perf_counter() - t0
    length = mask.shape[1]
    t0 = time.perf_counter()
    with torch.no_grad():
        old, _ = token_logprobs(model, input_ids, attention_mask, length, cfg.temperature, group_size=group)
        with reference_model(model):
            token_logprobs(model, input_ids, attention_mask, length, cfg.temperature, group_size=group)
    out["logprobs_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    advantages = torch.linspace(-1, 1, len(texts))
    order = minibatch_order(len(texts), group)  # one order per epoch: each row in exactly one minibatch
    for mb_start in range(0, len(texts), cfg.minibatch_size):
        mb = order[mb_start : mb_start + cfg.minibatch_size]
        new, _ = token_logprobs(model, input_ids[mb], attention_mask[mb], length, cfg.temperature, group_size=group)
        loss, _, _ = clipped_surrogate_loss(new, old[mb], advantages[mb], mask[mb], cfg.clip_range)
        loss.backward()
        model.zero_grad()
    out["update_s"] = time.perf_counter() - t0
    out["tokens_per_sample"] = float(mask.sum(1).float().mean())
    out["prompt_tokens"] = int(input_ids.shape[1] - length)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-adapter", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--recipe", default=str(ROOT / "experiments" / "reflector" / "ppo.yaml"))
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "ppo_iteration.json"))
    args = parser.parse_args(argv)
    import torch

    recipe = yaml.safe_load(Path(args.recipe).read_text())
    recipe.update(sft_adapter=args.sft_adapter, dataset=[args.dataset], reward_source="rm", reward_model="unused")
    recipe.pop("env_run_dir", None)
    cfg = from_dict(PPORunConfig, recipe, "recipe")
    model, tokenizer = build_policy(cfg)
    model.eval()
    prompts, _ = load_prompts(cfg)
    rows = []
    for i in range(args.iterations):
        batch = prompts[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        grouped = time_iteration(model, tokenizer, batch, cfg, cfg.num_samples_per_prompt)
        whole = time_iteration(model, tokenizer, batch, cfg, 1)
        rows.append({"iteration": i, "grouped": grouped, "row_by_row": whole})
        print(json.dumps(rows[-1]), flush=True)

    def med(path: str, key: str) -> float:
        return statistics.median(r[path][key] for r in rows)

    summary = {
        path: {k: med(path, k) for k in ("sample_s", "logprobs_s", "update_s")} for path in ("grouped", "row_by_row")
    }
    for path in summary:
        summary[path]["total_s"] = sum(summary[path].values())
    result = {
        "command": " ".join(["python", "bench/ppo_iteration.py", *(argv or sys.argv[1:])]),
        "samples_per_iteration": cfg.batch_size * cfg.num_samples_per_prompt,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {platform.system()}, cpus={__import__('os').cpu_count()}",
        "median": summary,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
