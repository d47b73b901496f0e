"""The PPO stage (``ppo_run.py``): check inputs, load the prompts, dispatch to our PPO loop or to TRL's trainers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from retroformer.config import save_config
from retroformer.errors import DataError
from retroformer.training.common import check_model_path, load_rated_dataset, log_config, write_metrics
from retroformer.training.ppo import PPORunConfig, build_policy, train_ppo
from retroformer.training.rewards import build_reward_source, check_reward_source, reward_columns
from retroformer.training.trl_pg import train_trl

logger = logging.getLogger(__name__)


def required_columns(cfg: PPORunConfig) -> list[str]:
    """Dataset columns the run needs: ``prompt``, plus what the reward source and the prompt filter read."""
    cols = ["prompt", *reward_columns(cfg.reward_source)]
    if cfg.only_failed:
        cols.append("success_after")
    return list(dict.fromkeys(cols))


def load_prompts(cfg: PPORunConfig) -> tuple[list[str], list[dict[str, Any]]]:
    """The unique prompts of the dataset(s) and, for each, its first row (the reward source may read it)."""
    ds = load_rated_dataset(cfg.dataset, required_columns(cfg))
    seen: dict[str, dict[str, Any]] = {}
    for row in ds:
        if cfg.only_failed and row["success_after"]:
            continue
        seen.setdefault(row["prompt"], row)
    if not seen:
        raise DataError(
            f"no prompts left in {cfg.dataset} (rows: {len(ds)}, only_failed={cfg.only_failed}); "
            "every logged reflection already led to success; set --only_failed false or add data"
        )
    logger.info("%d unique prompts from %d rows", len(seen), len(ds))
    return list(seen), list(seen.values())


def check_inputs(cfg: PPORunConfig) -> tuple[list[str], list[dict[str, Any]]]:
    """Everything that can be checked before a model is loaded: paths, dataset shape, reward source."""
    check_model_path(cfg.model, "model")
    if cfg.sft_adapter:
        check_model_path(cfg.sft_adapter, "sft_adapter")
    check_reward_source(cfg)
    return load_prompts(cfg)


def run(cfg: PPORunConfig, api_key: str | None = None) -> dict[str, Any]:
    """The whole stage: check, load, train with ``cfg.algorithm``, save adapter + tokenizer + config + metrics.

    ``api_key``: for ``reward_source: env`` with an actor behind an OpenAI-compatible API, that endpoint's key (the
    script reads it from the environment variable the trial run's ``actor.llm.api_key_env`` names).
    """
    log_config(cfg, "ppo")
    prompts, rows = check_inputs(cfg)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, output_dir / "config.yaml")
    reward = build_reward_source(cfg, api_key=api_key)
    try:
        if cfg.algorithm == "ppo":
            model, tokenizer = build_policy(cfg)
            metrics = train_ppo(model, tokenizer, prompts, rows, reward.score, cfg)
        else:
            metrics = train_trl(cfg, prompts, rows, reward)
    finally:
        reward.close()
    write_metrics(output_dir / "metrics.json", metrics)
    logger.info("ppo metrics: %s", metrics)
    return metrics
