"""The PPO stage (``ppo_run.py``): check inputs, load the prompts, dispatch to our PPO loop or to TRL's trainers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from retroformer.config import check_model_path, save_config
from retroformer.errors import DataError
from retroformer.training.common import load_rated_dataset, log_config, write_metrics
from retroformer.training.ppo import PPORunConfig, build_policy, sample_reflections, train_ppo
from retroformer.training.rewards import build_reward_source, check_reward_source, reward_columns
from retroformer.training.trl_pg import train_trl

logger = logging.getLogger(__name__)

#: A next attempt succeeds when its return reaches 1.0: exact match (HotPotQA), won (ALFWorld), score 1.0 (WebShop),
#: the vault opened (synthetic).
SUCCESS_RETURN = 1.0


def required_columns(cfg: PPORunConfig) -> list[str]:
    """Dataset columns the run needs: ``prompt``, plus what the reward source and the prompt filter read."""
    cols = ["prompt", *reward_columns(cfg.reward_source)]
    if cfg.only_failed:
        cols.append("success_after")
    return list(dict.fromkeys(cols))


def load_prompts(cfg: PPORunConfig, dataset: list[str] | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """The unique prompts of the dataset(s) (``cfg.dataset`` unless given) and, for each, its first row (the reward
    source may read it)."""
    dataset = cfg.dataset if dataset is None else dataset
    ds = load_rated_dataset(dataset, required_columns(cfg))
    seen: dict[str, dict[str, Any]] = {}
    for row in ds:
        if cfg.only_failed and row["success_after"]:
            continue
        seen.setdefault(row["prompt"], row)
    if not seen:
        raise DataError(
            f"no prompts left in {dataset} (rows: {len(ds)}, only_failed={cfg.only_failed}); "
            "every logged reflection already led to success; set --only_failed false or add data"
        )
    logger.info("%d unique prompts from %d rows", len(seen), len(ds))
    return list(seen), list(seen.values())


def held_out_evaluator(cfg: PPORunConfig, tokenizer, reward):
    """``evaluate(policy) -> {"eval/reward_mean": ..., "eval/success": ...}`` on the unique prompts of
    ``cfg.eval_dataset``: one sampled reflection per prompt, scored by ``reward``; ``eval/success`` (reward source
    ``env``) is the fraction of prompts whose next attempt reaches a return of 1.0 with that reflection."""
    eval_prompts, eval_rows = load_prompts(cfg, cfg.eval_dataset)
    chunk = cfg.batch_size * cfg.num_samples_per_prompt

    def evaluate(policy) -> dict[str, float]:
        policy.eval()
        texts: list[str] = []
        for start in range(0, len(eval_prompts), chunk):
            texts += sample_reflections(policy, tokenizer, eval_prompts[start : start + chunk], cfg)[3]
        rewards = reward.score(eval_prompts, texts, eval_rows)
        out = {"eval/reward_mean": sum(rewards) / len(rewards), "eval/num_prompts": float(len(rewards))}
        if cfg.reward_source == "env":
            reached = [
                float(row["return_before"]) + r >= SUCCESS_RETURN for row, r in zip(eval_rows, rewards, strict=True)
            ]
            out["eval/success"] = sum(reached) / len(reached)
        return out

    return evaluate


def check_inputs(cfg: PPORunConfig) -> tuple[list[str], list[dict[str, Any]]]:
    """Everything that can be checked before a model is loaded: paths, dataset shape, reward source."""
    check_model_path(cfg.model, "model")
    if cfg.sft_adapter:
        check_model_path(cfg.sft_adapter, "sft_adapter")
    check_reward_source(cfg)
    if cfg.eval_steps:
        load_prompts(cfg, cfg.eval_dataset)  # the held-out set is checked before any model loads too
    return load_prompts(cfg)


def run(cfg: PPORunConfig, api_key: str | None = None, sources: dict[str, str] | None = None) -> dict[str, Any]:
    """The whole stage: check, load, train with ``cfg.algorithm``, save adapter + tokenizer + config + metrics.

    ``api_key``: for ``reward_source: env`` with an actor behind an OpenAI-compatible API, that endpoint's key (the
    script reads it from the environment variable the trial run's ``actor.llm.api_key_env`` names). ``sources``
    (where config values came from) heads the saved config.
    """
    log_config(cfg, "ppo")
    prompts, rows = check_inputs(cfg)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, output_dir / "config.yaml", sources)
    reward = build_reward_source(cfg, api_key=api_key)
    try:
        if cfg.algorithm == "ppo":
            model, tokenizer = build_policy(cfg)
            evaluate = held_out_evaluator(cfg, tokenizer, reward) if cfg.eval_steps else None
            metrics = train_ppo(model, tokenizer, prompts, rows, reward.score, cfg, evaluate=evaluate)
        else:
            metrics = train_trl(cfg, prompts, rows, reward)
    finally:
        reward.close()
    write_metrics(output_dir / "metrics.json", metrics)
    logger.info("ppo metrics: %s", metrics)
    return metrics
