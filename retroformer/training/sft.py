"""Stage 1: supervised fine-tuning of the retrospective model on its own well-rated reflections.

The training pairs are ``(prompt, completion)`` = (reflection prompt ``x``, reflection ``y``) of the rated reflections
whose rating ``G[i+1] - G[i]`` is *strictly greater* than ``min_rating`` (default 0: only reflections after which the
next attempt improved). The loss is on the completion only. The completion is ``" " + reflection`` followed by the
tokenizer's end-of-sequence token, so the model learns to stop (prompts end with ``"Reflection:"``).

Sequences longer than ``max_length`` tokens lose the *start of the prompt*: the end of a reflection prompt holds the
failed attempt and its clue, which the reflection must use. TRL 1.16 supports only ``truncation_mode="keep_start"``
(``keep_end`` is deprecated), so prompts are cut from the left here, by tokens, before the trainer sees them.

Where this departs from the paper: the paper fine-tunes on reflections rated by a separate pass; here the ratings come
straight from the trial loop's dataset (same definition, section 4.1), and rows can be de-duplicated.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retroformer.config import check_model_path, doc, save_config, to_dict
from retroformer.errors import ConfigError, DataError
from retroformer.tracking import trainer_callback
from retroformer.training import mixing
from retroformer.training.common import (
    LoraSettings,
    TrainerSettings,
    build_lora_config,
    checkpoint_step,
    load_rated_dataset,
    log_config,
    namespaced,
    resume_checkpoint,
    train_until_sigterm,
    trainer_kwargs,
    write_metrics,
)

logger = logging.getLogger(__name__)

#: Columns of the rated-reflection dataset this stage reads.
SFT_COLUMNS = ("prompt", "reflection", "rating")
CONFIG_FILE = "sft_config.yaml"
METRICS_FILE = "metrics.json"


@dataclass(kw_only=True)
class SFTStageConfig(TrainerSettings):
    """Supervised fine-tuning of the retrospective model (LoRA) on well-rated reflections."""

    model: str = doc("base retrospective model: a local directory or a Hub id (org/name)")
    dataset: list[str] = doc(
        "rated-reflection dataset(s) written by Dataset.save_to_disk (runs/<run>/datasets/rated_reflections); "
        "several paths are concatenated"
    )
    output_dir: str = doc("where the adapter, tokenizer, checkpoints, sft_config.yaml and metrics.json go")
    min_rating: float = doc(
        "keep rows whose rating (next return minus this return) is strictly greater than this; 0 keeps reflections "
        "after which the next attempt improved",
        0.0,
    )
    dedup: bool = doc("drop repeated (prompt, reflection) rows before training", True)
    env_weights: dict[str, float] = doc(mixing.ENV_WEIGHTS_HELP + " (after the rating threshold)", default_factory=dict)
    balance_envs: bool = doc(mixing.BALANCE_ENVS_HELP + " (after the rating threshold)", False)
    max_length: int = doc(
        "longest training sequence in tokens; longer prompts lose their start (left truncation)", 1024
    )
    learning_rate: float = doc("peak learning rate (AdamW, linear decay)", 2e-4)
    lora: LoraSettings = doc("LoRA adapter of the retrospective model", default_factory=LoraSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.dataset, str):
            self.dataset = [self.dataset]
        if not self.dataset:
            raise ConfigError("dataset is empty; pass the rated reflections, e.g. runs/demo/datasets/rated_reflections")
        if not self.output_dir:
            raise ConfigError("output_dir is empty; pass a directory, e.g. runs/demo/sft")
        if self.max_length < 16:
            raise ConfigError(f"max_length={self.max_length} is too short for a prompt and a reflection; use >= 16")
        mixing.check_env_mixing(self.env_weights, self.balance_envs)


def format_completion(reflection: str) -> str:
    """The SFT completion for a reflection: a leading space (prompts end with ``"Reflection:"``), no trailing space.

    The end-of-sequence token is appended by the trainer.
    """
    return " " + reflection.strip()


def select_sft_examples(dataset, min_rating: float, dedup: bool):
    """Rows with ``rating > min_rating`` as a ``prompt``/``completion`` dataset (plus ``env_name`` where the rated
    dataset has it); :class:`DataError` if none is left."""
    from datasets import Dataset

    ratings = dataset["rating"]
    envs = dataset[mixing.ENV_COLUMN] if mixing.ENV_COLUMN in dataset.column_names else None
    prompts, completions, kept_envs, seen = [], [], [], set()
    for i, (prompt, reflection, rating) in enumerate(
        zip(dataset["prompt"], dataset["reflection"], ratings, strict=True)
    ):
        if rating is None or not rating > min_rating:
            continue
        key = (prompt, reflection.strip())
        if dedup and key in seen:
            continue
        seen.add(key)
        prompts.append(prompt)
        completions.append(format_completion(reflection))
        kept_envs.append(envs[i] if envs is not None else None)
    if not prompts:
        observed = f"ratings range from {min(ratings)} to {max(ratings)}" if ratings else "no ratings"
        raise DataError(
            f"no reflections with rating > min_rating={min_rating} among {len(ratings)} rows ({observed}); lower "
            "min_rating or collect more trials"
        )
    logger.info(
        "SFT on %d of %d rated reflections (rating > %g, dedup=%s)", len(prompts), len(ratings), min_rating, dedup
    )
    columns = {"prompt": prompts, "completion": completions}
    if envs is not None:
        columns[mixing.ENV_COLUMN] = kept_envs
    return Dataset.from_dict(columns)


def mix_sft_examples(examples, cfg: SFTStageConfig):
    """``examples`` resampled to the environment shares of ``cfg`` (:func:`retroformer.training.mixing.mix_indices`)
    and the per-environment counts ``sft/<env>/num_examples`` (and ``sft/<env>/num_selected`` before mixing)."""
    if mixing.ENV_COLUMN not in examples.column_names:
        return examples, {}
    info = mixing.count_metrics("sft", "num_selected", examples[mixing.ENV_COLUMN])
    if mixing.mixing_enabled(cfg.env_weights, cfg.balance_envs):
        examples = examples.select(
            mixing.mix_indices(examples[mixing.ENV_COLUMN], cfg.env_weights, cfg.balance_envs, cfg.seed)
        )
    info.update(mixing.count_metrics("sft", "num_examples", examples[mixing.ENV_COLUMN]))
    logger.info("SFT examples per environment: %s", info)
    return examples, info


def truncate_prompt_left(tokenizer, prompt: str, completion: str, max_length: int) -> str | None:
    """Cut ``prompt`` from the left, by tokens, until ``prompt + completion + eos`` fits ``max_length`` tokens.

    Returns None when the completion alone does not fit (such a row teaches nothing useful and is dropped).
    """
    eos = tokenizer.eos_token or ""

    def length(p: str) -> int:
        return len(tokenizer(p + completion + eos)["input_ids"])

    total = length(prompt)
    if total <= max_length:
        return prompt
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    cut = total - max_length
    # Re-tokenising decoded text can merge differently at the cut, so check and cut a little more if needed.
    for _ in range(8):
        if cut >= len(prompt_ids):
            return None
        kept = tokenizer.decode(prompt_ids[cut:])
        over = length(kept) - max_length
        if over <= 0:
            return kept
        cut += over
    return None


def truncate_prompts(dataset, tokenizer, max_length: int):
    """Apply :func:`truncate_prompt_left` to every row; drop rows whose completion alone is too long."""
    from datasets import Dataset

    prompts, completions, cut, dropped = [], [], 0, 0
    for prompt, completion in zip(dataset["prompt"], dataset["completion"], strict=True):
        kept = truncate_prompt_left(tokenizer, prompt, completion, max_length)
        if kept is None:
            dropped += 1
            continue
        cut += kept != prompt
        prompts.append(kept)
        completions.append(completion)
    if cut or dropped:
        logger.warning(
            "max_length=%d: cut the start of %d prompts, dropped %d rows whose reflection alone is too long",
            max_length,
            cut,
            dropped,
        )
    if not prompts:
        raise DataError(f"every reflection is longer than max_length={max_length} tokens; raise max_length")
    return Dataset.from_dict({"prompt": prompts, "completion": completions}), {"truncated": cut, "dropped": dropped}


def check_inputs(cfg: SFTStageConfig):
    """Every check that needs no model: model path, dataset paths and columns, rows left after the threshold, the
    environment mixture. Returns ``(examples, number of rated rows, per-environment counts)``."""
    check_model_path(cfg.model, "model")
    with_env = mixing.has_env_column(cfg.dataset) or mixing.mixing_enabled(cfg.env_weights, cfg.balance_envs)
    rated = load_rated_dataset(cfg.dataset, (*SFT_COLUMNS, mixing.ENV_COLUMN) if with_env else SFT_COLUMNS)
    examples, info = mix_sft_examples(select_sft_examples(rated, cfg.min_rating, cfg.dedup), cfg)
    return examples, len(rated), info


def build_sft_trainer(cfg: SFTStageConfig):
    """Check the inputs (before any model is loaded), then build the ``SFTTrainer``. Returns ``(trainer, info)``."""
    examples, num_rated, env_info = check_inputs(cfg)  # fail fast, before any model is loaded

    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples, trunc = truncate_prompts(examples, tokenizer, cfg.max_length)

    args = SFTConfig(
        **trainer_kwargs(cfg, cfg.output_dir),
        max_length=cfg.max_length,
        completion_only_loss=True,
        packing=False,
    )
    trainer = SFTTrainer(
        model=cfg.model,
        args=args,
        train_dataset=examples,
        processing_class=tokenizer,
        peft_config=build_lora_config(cfg.lora, task_type="CAUSAL_LM"),
    )
    callback = trainer_callback(cfg.report_to, "sft", cfg.output_dir, to_dict(cfg))
    if callback is not None:
        trainer.add_callback(callback)
    info = {
        "sft/num_examples": len(examples),
        "sft/num_rated_rows": num_rated,
        "sft/num_prompts_truncated": trunc["truncated"],
        "sft/num_rows_dropped_too_long": trunc["dropped"],
        **env_info,
    }
    return trainer, info


def run_sft(cfg: SFTStageConfig, sources: dict[str, str] | None = None) -> dict[str, Any]:
    """Train the LoRA adapter; write adapter, tokenizer, ``sft_config.yaml`` and ``metrics.json`` to ``output_dir``.

    Resumes from the last ``checkpoint-N`` in ``output_dir`` if there is one. Returns the metrics. ``sources`` (where
    config values came from; see :func:`retroformer.config.resolve_config`) heads the saved config.
    """
    log_config(cfg, "sft")
    trainer, info = build_sft_trainer(cfg)
    if trainer.is_world_process_zero():
        save_config(cfg, Path(cfg.output_dir) / CONFIG_FILE, sources)

    resume = resume_checkpoint(cfg.output_dir)
    start = time.perf_counter()
    result = train_until_sigterm(trainer, resume)
    wall = time.perf_counter() - start
    trainer.save_model(cfg.output_dir)  # PEFT: adapter_config.json + adapter weights + tokenizer at the top level

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = namespaced("sft", dict(result.metrics))
    metrics.update(info)
    metrics.update(
        {
            "sft/global_step": trainer.state.global_step,
            "sft/resumed_from_step": checkpoint_step(resume),
            "sft/first_logged_loss": losses[0] if losses else None,
            "sft/last_logged_loss": losses[-1] if losses else None,
            "sft/wall_time_s": wall,
        }
    )
    if trainer.is_world_process_zero():
        write_metrics(Path(cfg.output_dir) / METRICS_FILE, metrics)
        logger.info("sft done: %s", {k: metrics[k] for k in ("sft/train_loss", "sft/num_examples", "sft/global_step")})
    return metrics
