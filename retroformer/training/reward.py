"""Stage 2: a scalar reward model ``RM(x, y)`` that predicts how much a reflection ``y`` helps after prompt ``x``.

The paper (section 4.2) rates a reflection by the return difference of the next attempt, ``G[i+1] - G[i]``, and learns
a reward model from these ratings for the PPO stage. Two ways to learn it from the rated-reflection dataset:

- ``pairwise``: TRL's ``RewardTrainer`` (Bradley-Terry loss) on pairs of reflections *of the same prompt* with
  different ratings; the higher-rated one is ``chosen``. Pairs only arise where a prompt was reflected on more than
  once (several sampled reflections, several runs).
- ``regression``: mean squared error between the scalar output and the rating, with a plain ``transformers.Trainer``.
  Works with one reflection per prompt.
- ``auto`` (default): ``pairwise`` when the training split holds at least ``min_pairs`` pairs, else ``regression``.

Input format, the same at training and at scoring time (:func:`format_rm_input`, :func:`encode_rm_input`)::

    prompt + " " + reflection.strip()  + <eos>

tokenized and cut from the *left* to ``max_length`` tokens (the end of the prompt holds the failed attempt; a leading
BOS token is kept). The model is a sequence-classification model with ``num_labels=1`` (a causal LM directory gets a
new ``score`` head). Held-out tasks (``eval_fraction``, split by ``task_id`` so that no prompt is on both sides) give
``reward/eval_pairwise_accuracy``, ``reward/eval_pearson`` and ``reward/eval_spearman``.

Outputs: a model directory that :func:`load_reward_model` turns into a callable ``(prompts, reflections) -> scores``.
With LoRA (``task_type="SEQ_CLS"``, the head trained in full) the adapter is merged into the base by default
(``merge_lora``), so the directory is a plain model; otherwise it holds the adapter and head.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
REWARD_COLUMNS = ("prompt", "reflection", "rating", "task_id")
CONFIG_FILE = "reward_config.yaml"
METRICS_FILE = "metrics.json"
#: Written beside the model: how inputs were formatted, so that scoring matches training.
MODEL_INFO_FILE = "reward_model.json"


@dataclass(kw_only=True)
class RewardStageConfig(TrainerSettings):
    """A scalar reward model of reflections, trained on their ratings (next return minus this return)."""

    model: str = doc(
        "base model: a sequence-classification model with one output, or a causal LM (a new score head is added); "
        "a local directory or a Hub id (org/name)"
    )
    dataset: list[str] = doc(
        "rated-reflection dataset(s) written by Dataset.save_to_disk (runs/<run>/datasets/rated_reflections); "
        "several paths are concatenated"
    )
    output_dir: str = doc("where the model, tokenizer, checkpoints, reward_config.yaml and metrics.json go")
    mode: Literal["auto", "pairwise", "regression"] = doc(
        "pairwise: Bradley-Terry loss on same-prompt pairs with different ratings (TRL RewardTrainer); regression: "
        "MSE on the rating; auto: pairwise if the training split has >= min_pairs pairs, else regression",
        "auto",
    )
    min_pairs: int = doc("auto mode: fewest training pairs for which pairwise training is chosen", 16)
    max_pairs_per_prompt: int = doc("cap on pairs drawn from one prompt (a seeded sample), so no prompt dominates", 16)
    eval_fraction: float = doc("fraction of tasks (task_id) held out for evaluation; 0 disables evaluation", 0.2)
    max_length: int = doc("longest input in tokens; longer inputs lose the start of the prompt (left truncation)", 512)
    use_lora: bool = doc(
        "train a LoRA adapter (task_type SEQ_CLS, score head trained in full); false: full fine-tune", True
    )
    merge_lora: bool = doc("save the LoRA adapter merged into the base, so output_dir is a plain model", True)
    eval_batch_size: int = doc("batch size for scoring the held-out rows", 16)
    env_weights: dict[str, float] = doc(mixing.ENV_WEIGHTS_HELP + " (training pairs or rows)", default_factory=dict)
    balance_envs: bool = doc(mixing.BALANCE_ENVS_HELP + " (training pairs or rows)", False)
    lora: LoraSettings = doc("LoRA adapter of the reward model", default_factory=LoraSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.dataset, str):
            self.dataset = [self.dataset]
        if not self.dataset:
            raise ConfigError("dataset is empty; pass the rated reflections, e.g. runs/demo/datasets/rated_reflections")
        if not self.output_dir:
            raise ConfigError("output_dir is empty; pass a directory, e.g. runs/demo/reward")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction={self.eval_fraction} must be in [0, 1); 0 disables evaluation")
        if self.min_pairs < 1:
            raise ConfigError(f"min_pairs={self.min_pairs} must be >= 1")
        if self.max_pairs_per_prompt < 1:
            raise ConfigError(f"max_pairs_per_prompt={self.max_pairs_per_prompt} must be >= 1")
        if self.max_length < 8:
            raise ConfigError(f"max_length={self.max_length} is too short for a prompt and a reflection; use >= 8")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size={self.eval_batch_size} must be >= 1")
        mixing.check_env_mixing(self.env_weights, self.balance_envs)


# ---------------------------------------------------------------------------------------------------------------------
# Input format


def format_rm_input(prompt: str, reflection: str) -> str:
    """The reward model's input text: ``prompt + " " + reflection.strip()`` (EOS is added by :func:`encode_rm_input`)."""
    return prompt + " " + reflection.strip()


def encode_rm_input(tokenizer, prompt: str, reflection: str, max_length: int) -> list[int]:
    """Token ids of :func:`format_rm_input` plus EOS, cut from the left to ``max_length`` (a leading BOS is kept)."""
    ids = list(tokenizer(format_rm_input(prompt, reflection))["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    if len(ids) > max_length:
        bos = tokenizer.bos_token_id
        if bos is not None and ids[0] == bos:
            ids = [bos] + ids[len(ids) - max_length + 1 :]
        else:
            ids = ids[-max_length:]
    return ids


# ---------------------------------------------------------------------------------------------------------------------
# Data: held-out split and pairs


@dataclass
class RatedRow:
    prompt: str
    reflection: str
    rating: float
    task_id: str
    env_name: str | None = None


def rows_from_dataset(dataset) -> list[RatedRow]:
    envs = dataset[mixing.ENV_COLUMN] if mixing.ENV_COLUMN in dataset.column_names else [None] * len(dataset)
    return [
        RatedRow(p, r, float(s), str(t or ""), e)
        for p, r, s, t, e in zip(
            dataset["prompt"], dataset["reflection"], dataset["rating"], dataset["task_id"], envs, strict=True
        )
        if s is not None
    ]


def split_key(row: RatedRow) -> str:
    """What keeps rows on one side of the held-out split: the task, or the prompt for rows without a task id
    (imported rating files), so that no prompt is on both sides."""
    return row.task_id or f"prompt:{row.prompt}"


def split_by_task(rows: list[RatedRow], eval_fraction: float, seed: int) -> tuple[list[RatedRow], list[RatedRow]]:
    """Hold out a seeded ``eval_fraction`` of the task ids (at least one), so no prompt is in both splits; rows without
    a task id are held out by prompt (:func:`split_key`)."""
    if eval_fraction == 0:
        return rows, []
    tasks = sorted({split_key(r) for r in rows})
    if len(tasks) < 2:
        raise DataError(
            f"eval_fraction={eval_fraction} needs rows of at least 2 tasks (task_id, or prompts where it is empty) to "
            f"hold one out, found {len(tasks)}; collect more tasks or set eval_fraction 0"
        )
    random.Random(seed).shuffle(tasks)
    n_eval = min(len(tasks) - 1, max(1, round(eval_fraction * len(tasks))))
    held_out = set(tasks[:n_eval])
    return [r for r in rows if split_key(r) not in held_out], [r for r in rows if split_key(r) in held_out]


def build_pairs(rows: list[RatedRow], max_pairs_per_prompt: int, seed: int) -> list[tuple[RatedRow, RatedRow]]:
    """``(chosen, rejected)`` pairs of reflections of the same prompt whose ratings differ; chosen rates higher."""
    rng = random.Random(seed)
    by_prompt: dict[str, list[RatedRow]] = defaultdict(list)
    for row in rows:
        by_prompt[row.prompt].append(row)
    pairs = []
    for group in by_prompt.values():
        seen, candidates = set(), []
        for a in group:
            for b in group:
                key = (a.reflection.strip(), b.reflection.strip())
                if a.rating > b.rating and key not in seen:
                    seen.add(key)
                    candidates.append((a, b))
        if len(candidates) > max_pairs_per_prompt:
            candidates = rng.sample(candidates, max_pairs_per_prompt)
        pairs.extend(candidates)
    return pairs


def choose_mode(mode: str, num_pairs: int, min_pairs: int) -> str:
    if mode == "auto":
        return "pairwise" if num_pairs >= min_pairs else "regression"
    if mode == "pairwise" and num_pairs == 0:
        raise DataError(
            "mode=pairwise but the training split has no pairs (reflections of the same prompt with different "
            "ratings); sample several reflections per prompt, or use mode=regression"
        )
    return mode


# ---------------------------------------------------------------------------------------------------------------------
# Metrics (numpy only)


def _ranks(x):
    import numpy as np

    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = np.asarray(x)[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0  # ties share their average rank
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; None when either side is constant or there are fewer than 2 points."""
    import numpy as np

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (Pearson of average ranks); None when undefined."""
    if len(x) < 2:
        return None
    return pearson(_ranks(list(x)), _ranks(list(y)))


def pairwise_accuracy(scores: dict[int, float], pairs: list[tuple[int, int]]) -> float | None:
    """Fraction of ``(chosen, rejected)`` index pairs whose chosen scores strictly higher."""
    if not pairs:
        return None
    return sum(scores[c] > scores[r] for c, r in pairs) / len(pairs)


def evaluate_scores(
    rows: list[RatedRow], scores: list[float], max_pairs_per_prompt: int, seed: int, prefix: str = "reward"
) -> dict[str, Any]:
    """Held-out metrics: pairwise accuracy on same-prompt pairs with different ratings, Pearson, Spearman, MSE."""
    ratings = [r.rating for r in rows]
    index = {id(r): i for i, r in enumerate(rows)}
    pairs = [(index[id(c)], index[id(r)]) for c, r in build_pairs(rows, max_pairs_per_prompt, seed)]
    return {
        f"{prefix}/eval_pairwise_accuracy": pairwise_accuracy(dict(enumerate(scores)), pairs),
        f"{prefix}/eval_num_pairs": len(pairs),
        f"{prefix}/eval_num_rows": len(rows),
        f"{prefix}/eval_pearson": pearson(scores, ratings),
        f"{prefix}/eval_spearman": spearman(scores, ratings),
        f"{prefix}/eval_mse": sum((s - t) ** 2 for s, t in zip(scores, ratings, strict=True)) / len(rows),
        f"{prefix}/eval_score_mean": sum(scores) / len(scores),
    }


def evaluate_per_env(rows: list[RatedRow], scores: list[float], max_pairs_per_prompt: int, seed: int) -> dict[str, Any]:
    """:func:`evaluate_scores` on each environment's held-out rows (``reward/<env>/eval_...``), when there are several."""
    envs = sorted({r.env_name for r in rows if r.env_name})
    out: dict[str, Any] = {}
    for env in envs if len(envs) > 1 else []:
        picked = [(r, s) for r, s in zip(rows, scores, strict=True) if r.env_name == env]
        sub_rows, sub_scores = [r for r, _ in picked], [s for _, s in picked]
        out.update(evaluate_scores(sub_rows, sub_scores, max_pairs_per_prompt, seed, prefix=f"reward/{env}"))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Model checks, scoring and loading


def check_reward_model(path: str) -> None:
    """Fail before training on a sequence-classification model whose config has ``num_labels != 1``.

    Reads only the model's config. Other architectures (a causal LM) get a new one-output ``score`` head when loaded.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    architectures = config.architectures or []
    is_classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    if is_classifier and config.num_labels != 1:
        raise ConfigError(
            f"model={path!r} is a sequence classifier with num_labels={config.num_labels}; a reward model outputs "
            "one scalar. Pass a model with num_labels=1, or its causal LM (a one-output score head is added)"
        )


@dataclass
class RewardScorer:
    """A loaded reward model: ``scorer(prompts, reflections) -> list[float]`` (one score per pair, batched)."""

    model: Any
    tokenizer: Any
    max_length: int
    batch_size: int = 16

    def __call__(self, prompts: Sequence[str], reflections: Sequence[str]) -> list[float]:
        import torch

        if len(prompts) != len(reflections):
            raise ValueError(f"got {len(prompts)} prompts and {len(reflections)} reflections; pass one per prompt")
        scores: list[float] = []
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                ids = [
                    {"input_ids": encode_rm_input(self.tokenizer, p, r, self.max_length)}
                    for p, r in zip(
                        prompts[start : start + self.batch_size],
                        reflections[start : start + self.batch_size],
                        strict=True,
                    )
                ]
                batch = self.tokenizer.pad(ids, return_tensors="pt").to(device)
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                scores.extend(logits.squeeze(-1).float().cpu().tolist())
        self.model.train(was_training)
        return scores


def load_reward_model(
    path: str, device: str | None = None, batch_size: int = 16, max_length: int | None = None
) -> RewardScorer:
    """Load a reward model written by ``reward_run.py`` as a callable ``(prompts, reflections) -> list[float]``.

    ``path`` is the stage's ``output_dir``: a plain sequence-classification model (full fine-tune, or LoRA merged) or
    a LoRA adapter with its score head (``merge_lora: false``; the base is read from ``adapter_config.json``). The
    input format and ``max_length`` are those of training (``reward_model.json``) unless ``max_length`` is given.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_model_path(path, "reward model")
    root = Path(path)
    info = json.loads((root / MODEL_INFO_FILE).read_text()) if (root / MODEL_INFO_FILE).is_file() else {}
    tokenizer = AutoTokenizer.from_pretrained(path)
    if (root / "adapter_config.json").is_file():
        from peft import PeftConfig, PeftModel

        base_path = PeftConfig.from_pretrained(path).base_model_name_or_path
        base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1)
        model = PeftModel.from_pretrained(base, path)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    model.eval()
    return RewardScorer(model, tokenizer, max_length or int(info.get("max_length", 512)), batch_size)


# ---------------------------------------------------------------------------------------------------------------------
# Training


def _regression_trainer_cls():
    import torch.nn.functional as F
    from transformers import Trainer

    class RegressionRewardTrainer(Trainer):
        """``transformers.Trainer`` with an MSE loss between the model's one output and the rating."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = F.mse_loss(outputs.logits.squeeze(-1).float(), labels.float())
            return (loss, outputs) if return_outputs else loss

    return RegressionRewardTrainer


@dataclass
class RewardData:
    train: list[RatedRow]
    eval: list[RatedRow]
    pairs: list[tuple[RatedRow, RatedRow]]
    mode: str
    tracker: Any = None  # the report_to callback (retroformer.tracking), kept open for the held-out metrics
    env_info: dict[str, Any] = field(default_factory=dict)  # reward/<env>/num_train_... counts


def mix_reward_data(data: RewardData, cfg: RewardStageConfig) -> None:
    """Resample what the chosen mode trains on (pairs: by the chosen reflection's environment; rows) to the
    environment shares of ``cfg``, and count it per environment (``reward/<env>/num_train_pairs`` or ``_rows``)."""
    items: list[Any] = data.pairs if data.mode == "pairwise" else data.train
    envs = [(item[0] if data.mode == "pairwise" else item).env_name for item in items]
    if any(env is None for env in envs):
        return
    if mixing.mixing_enabled(cfg.env_weights, cfg.balance_envs):
        items = [items[i] for i in mixing.mix_indices(envs, cfg.env_weights, cfg.balance_envs, cfg.seed)]
        envs = [(item[0] if data.mode == "pairwise" else item).env_name for item in items]
    if data.mode == "pairwise":
        data.pairs = items
    else:
        data.train = items
    data.env_info = mixing.count_metrics(
        "reward", "num_train_pairs" if data.mode == "pairwise" else "num_train_rows", envs
    )


def prepare_reward_data(cfg: RewardStageConfig) -> RewardData:
    """Every check that needs no model weights: paths, columns, split, pairs, mode, environment mixture, num_labels."""
    check_model_path(cfg.model, "model")
    with_env = mixing.has_env_column(cfg.dataset) or mixing.mixing_enabled(cfg.env_weights, cfg.balance_envs)
    rows = rows_from_dataset(
        load_rated_dataset(cfg.dataset, (*REWARD_COLUMNS, mixing.ENV_COLUMN) if with_env else REWARD_COLUMNS)
    )
    train, held_out = split_by_task(rows, cfg.eval_fraction, cfg.seed)
    pairs = build_pairs(train, cfg.max_pairs_per_prompt, cfg.seed)
    mode = choose_mode(cfg.mode, len(pairs), cfg.min_pairs)
    check_reward_model(cfg.model)
    logger.info(
        "reward model: mode=%s, %d training rows (%d pairs), %d held-out rows",
        mode,
        len(train),
        len(pairs),
        len(held_out),
    )
    data = RewardData(train, held_out, pairs, mode)
    mix_reward_data(data, cfg)
    return data


def build_reward_trainer(cfg: RewardStageConfig):
    """Check the inputs, load the model (LoRA if asked) and build the trainer. Returns ``(trainer, data)``."""
    data = prepare_reward_data(cfg)  # fail fast, before any model is loaded

    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    set_seed(cfg.seed)  # a new score head is initialised at random
    # A local base is recorded by absolute path in adapter_config.json, so the saved adapter loads from anywhere.
    model_path = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.use_lora:
        from peft import get_peft_model

        heads = [name for name in ("score", "classifier") if hasattr(model, name)]
        model = get_peft_model(model, build_lora_config(cfg.lora, task_type="SEQ_CLS", modules_to_save=heads))

    def encode(prompt: str, reflection: str) -> list[int]:
        return encode_rm_input(tokenizer, prompt, reflection, cfg.max_length)

    common = trainer_kwargs(cfg, cfg.output_dir)
    if data.mode == "pairwise":
        train_ds = Dataset.from_dict(
            {
                "chosen_ids": [encode(c.prompt, c.reflection) for c, _ in data.pairs],
                "rejected_ids": [encode(r.prompt, r.reflection) for _, r in data.pairs],
            }
        )
        args = RewardConfig(**common, max_length=cfg.max_length)
        trainer = RewardTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer)
    else:
        from transformers import TrainingArguments

        train_ds = Dataset.from_dict(
            {
                "input_ids": [encode(r.prompt, r.reflection) for r in data.train],
                "labels": [r.rating for r in data.train],
            }
        )
        args = TrainingArguments(**common, remove_unused_columns=False)
        trainer = _regression_trainer_cls()(
            model=model,
            args=args,
            train_dataset=train_ds,
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
        )
    callback = trainer_callback(cfg.report_to, "reward", cfg.output_dir, to_dict(cfg), close_on_train_end=False)
    if callback is not None:
        trainer.add_callback(callback)
    data.tracker = callback
    return trainer, data


def save_reward_model(trainer, cfg: RewardStageConfig) -> None:
    """Write the model (merged, adapter + head, or full), tokenizer and ``reward_model.json`` to ``output_dir``."""
    out = Path(cfg.output_dir)
    model = trainer.model
    if cfg.use_lora and cfg.merge_lora:
        model = model.merge_and_unload()
    model.save_pretrained(out)
    trainer.processing_class.save_pretrained(out)
    info = {
        "input_format": 'prompt + " " + reflection.strip() + eos, cut from the left',
        "max_length": cfg.max_length,
        "adapter": bool(cfg.use_lora and not cfg.merge_lora),
    }
    (out / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def run_reward(cfg: RewardStageConfig, sources: dict[str, str] | None = None) -> dict[str, Any]:
    """Train the reward model, evaluate on held-out tasks, save model, config and ``metrics.json``. Returns metrics.

    ``sources`` (where config values came from) heads the saved config."""
    log_config(cfg, "reward")
    trainer, data = build_reward_trainer(cfg)
    if trainer.is_world_process_zero():
        save_config(cfg, Path(cfg.output_dir) / CONFIG_FILE, sources)

    resume = resume_checkpoint(cfg.output_dir)
    start = time.perf_counter()
    result = train_until_sigterm(trainer, resume)
    wall = time.perf_counter() - start

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics: dict[str, Any] = namespaced("reward", dict(result.metrics))
    metrics.update(
        {
            "reward/mode": data.mode,
            "reward/num_train_rows": len(data.train),
            "reward/num_train_pairs": len(data.pairs),
            "reward/global_step": trainer.state.global_step,
            "reward/resumed_from_step": checkpoint_step(resume),
            "reward/first_logged_loss": losses[0] if losses else None,
            "reward/last_logged_loss": losses[-1] if losses else None,
            "reward/wall_time_s": wall,
            **data.env_info,
        }
    )
    if data.eval:
        scorer = RewardScorer(trainer.model, trainer.processing_class, cfg.max_length, cfg.eval_batch_size)
        scores = scorer([r.prompt for r in data.eval], [r.reflection for r in data.eval])
        held_out = evaluate_scores(data.eval, scores, cfg.max_pairs_per_prompt, cfg.seed)
        held_out.update(evaluate_per_env(data.eval, scores, cfg.max_pairs_per_prompt, cfg.seed))
        metrics.update(held_out)
        if data.tracker is not None:
            data.tracker.report(held_out, step=trainer.state.global_step)
    if data.tracker is not None:
        data.tracker.close()
    if trainer.is_world_process_zero():
        save_reward_model(trainer, cfg)
        write_metrics(Path(cfg.output_dir) / METRICS_FILE, metrics)
        shown = ("reward/mode", "reward/train_loss", "reward/eval_pairwise_accuracy", "reward/eval_spearman")
        logger.info("reward done: %s", {k: metrics.get(k) for k in shown})
    return metrics
