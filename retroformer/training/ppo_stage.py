"""The PPO stage (``ppo_run.py``): check inputs, load the prompts, dispatch to our PPO loop or to TRL's trainers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from retroformer.config import check_model_path, save_config
from retroformer.errors import DataError
from retroformer.training.common import load_rated_dataset, log_config, write_metrics
from retroformer.training.mixing import (
    ENV_COLUMN,
    EnvRewardRecorder,
    env_counts,
    env_mean_metrics,
    has_env_column,
    mix_indices,
    mixing_enabled,
)
from retroformer.training.ppo import PPORunConfig, build_policy, sample_reflections, train_ppo
from retroformer.training.rewards import build_reward_source, check_env_rows, check_reward_source, reward_columns
from retroformer.training.trl_pg import train_trl

logger = logging.getLogger(__name__)

#: A next attempt succeeds when its return reaches 1.0: exact match (HotPotQA), won (ALFWorld), score 1.0 (WebShop),
#: the vault opened (synthetic).
SUCCESS_RETURN = 1.0


def required_columns(cfg: PPORunConfig, dataset: list[str] | None = None) -> list[str]:
    """Dataset columns the run needs: ``prompt``, plus what the reward source, the run routing, the prompt filter and
    the metrics per environment read (``env_name`` where every dataset of ``dataset`` has it)."""
    cols = ["prompt", *reward_columns(cfg.reward_source)]
    if cfg.reward_source == "env" and cfg.env_run_dirs:
        cols.append("run_name")
    if cfg.only_failed:
        cols.append("success_after")
    if has_env_column(cfg.dataset if dataset is None else dataset) or mixing_enabled(cfg.env_weights, cfg.balance_envs):
        cols.append(ENV_COLUMN)
    return list(dict.fromkeys(cols))


def load_prompts(
    cfg: PPORunConfig, dataset: list[str] | None = None, mix: bool = False
) -> tuple[list[str], list[dict[str, Any]]]:
    """The unique prompts of the dataset(s) (``cfg.dataset`` unless given) and, for each, its first row (the reward
    source may read it). With ``mix``, the prompts are resampled to the environment shares of ``cfg.env_weights`` /
    ``cfg.balance_envs`` (:func:`retroformer.training.mixing.mix_indices`), so repeats are drawn more often."""
    dataset = cfg.dataset if dataset is None else dataset
    ds = load_rated_dataset(dataset, required_columns(cfg, dataset))
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
    prompts, rows = list(seen), list(seen.values())
    logger.info("%d unique prompts from %d rows", len(prompts), len(ds))
    if mix and mixing_enabled(cfg.env_weights, cfg.balance_envs):
        order = mix_indices([r[ENV_COLUMN] for r in rows], cfg.env_weights, cfg.balance_envs, cfg.seed)
        prompts, rows = [prompts[i] for i in order], [rows[i] for i in order]
        logger.info("prompts per environment after mixing: %s", env_counts([r[ENV_COLUMN] for r in rows]))
    return prompts, rows


def eval_metrics(cfg: PPORunConfig, rows: list[dict[str, Any]], rewards: list[float]) -> dict[str, float]:
    """``eval/reward_mean`` and, for reward source ``env``, ``eval/success``: overall and per environment."""
    out = {"eval/reward_mean": sum(rewards) / len(rewards), "eval/num_prompts": float(len(rewards))}
    out.update(env_mean_metrics("eval", "reward_mean", rewards, rows))
    if cfg.reward_source == "env":
        reached = [float(row["return_before"]) + r >= SUCCESS_RETURN for row, r in zip(rows, rewards, strict=True)]
        out["eval/success"] = sum(reached) / len(reached)
        out.update(env_mean_metrics("eval", "success", [float(x) for x in reached], rows))
    return out


class HeldOutEvaluator:
    """``evaluator(policy) -> {"eval/reward_mean": ..., "eval/success": ..., "eval/<env>/...": ...}`` on the unique
    prompts of ``cfg.eval_dataset``: one sampled reflection per prompt, scored by ``reward``; ``eval/success`` (reward
    source ``env``) is the fraction of prompts whose next attempt reaches a return of 1.0 with that reflection.
    ``last`` holds the latest result (for ``metrics.json``)."""

    def __init__(self, cfg: PPORunConfig, tokenizer, reward) -> None:
        self.cfg, self.tokenizer, self.reward = cfg, tokenizer, reward
        self.prompts, self.rows = load_prompts(cfg, cfg.eval_dataset)
        self.last: dict[str, float] = {}

    def __call__(self, policy) -> dict[str, float]:
        policy.eval()
        chunk = self.cfg.batch_size * self.cfg.num_samples_per_prompt
        texts: list[str] = []
        for start in range(0, len(self.prompts), chunk):
            texts += sample_reflections(policy, self.tokenizer, self.prompts[start : start + chunk], self.cfg)[3]
        self.last = eval_metrics(self.cfg, self.rows, self.reward.score(self.prompts, texts, self.rows))
        return self.last


def held_out_evaluator(cfg: PPORunConfig, tokenizer, reward) -> HeldOutEvaluator:
    """The evaluator of ``cfg.eval_dataset`` (:class:`HeldOutEvaluator`)."""
    return HeldOutEvaluator(cfg, tokenizer, reward)


def check_inputs(cfg: PPORunConfig) -> tuple[list[str], list[dict[str, Any]]]:
    """Everything that can be checked before a model is loaded: paths, dataset shape, reward source, and that the
    online reward can score every row (a task id, a listed run)."""
    check_model_path(cfg.model, "model")
    if cfg.sft_adapter:
        check_model_path(cfg.sft_adapter, "sft_adapter")
    check_reward_source(cfg)
    if cfg.eval_steps:  # the held-out set is checked before any model loads too
        check_env_rows(cfg, load_prompts(cfg, cfg.eval_dataset)[1], cfg.eval_dataset)
    prompts, rows = load_prompts(cfg, mix=True)
    check_env_rows(cfg, rows, cfg.dataset)
    return prompts, rows


def run(
    cfg: PPORunConfig,
    api_key: str | None = None,
    sources: dict[str, str] | None = None,
    api_keys: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    """The whole stage: check, load, train with ``cfg.algorithm``, save adapter + tokenizer + config + metrics.

    ``api_key``: for ``reward_source: env`` with an actor behind an OpenAI-compatible API, that endpoint's key (the
    script reads it from the environment variable the trial run's ``actor.llm.api_key_env`` names); ``api_keys``:
    ``{run directory: key}`` for the runs of ``env_run_dirs``. ``sources`` (where config values came from) heads the
    saved config. ``metrics.json`` also holds ``ppo/<env>/reward_mean`` over the run's rollouts and, with a held-out
    set, the last evaluation (``eval/...``, ``eval/<env>/...``).
    """
    log_config(cfg, "ppo")
    prompts, rows = check_inputs(cfg)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, output_dir / "config.yaml", sources)
    reward = build_reward_source(cfg, api_key=api_key, api_keys=api_keys)
    recorder = EnvRewardRecorder(reward.score)  # the rollouts' rewards per environment (not the held-out ones)
    try:
        if cfg.algorithm == "ppo":
            model, tokenizer = build_policy(cfg)
            evaluate = held_out_evaluator(cfg, tokenizer, reward) if cfg.eval_steps else None
            metrics = train_ppo(model, tokenizer, prompts, rows, recorder.score, cfg, evaluate=evaluate)
            metrics.update(evaluate.last if evaluate is not None else {})
        else:
            metrics = train_trl(cfg, prompts, rows, reward, recorder)
    finally:
        reward.close()
    metrics.update(recorder.totals())
    write_metrics(output_dir / "metrics.json", metrics)
    logger.info("ppo metrics: %s", metrics)
    return metrics
