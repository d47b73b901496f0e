"""Helpers shared by the three training stages (SFT, reward model, PPO).

Everything here checks its input before any model is loaded, so that a wrong path or a dataset of the wrong shape
fails in seconds with an error that says what to fix. Heavy libraries (``datasets``, ``peft``, ``transformers``) are
imported inside the functions that need them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retroformer.config import doc, to_dict
from retroformer.errors import ConfigError, DataError, Interrupted
from retroformer.tracking import check_report_to

logger = logging.getLogger(__name__)

#: A Hugging Face Hub id: ``org/name`` (one slash, no leading ``.``, ``/`` or ``~``).


@dataclass
class LoraSettings:
    """LoRA adapter shape (Hu et al., 2021). The paper trains the retrospective model with LoRA of rank 1-4."""

    r: int = doc("LoRA rank; Retroformer used rank 1-4 on a 7B model (paper, section 5)", 4)
    alpha: int = doc("LoRA scaling numerator: the update is scaled by alpha / r", 16)
    dropout: float = doc("dropout on the LoRA input", 0.05)
    target_modules: list[str] = doc(
        "module names that get an adapter; ['all-linear'] adapts every linear layer except the output head",
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r={self.r} must be >= 1; the paper used 1-4")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha={self.alpha} must be > 0 (e.g. 2 * lora.r)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if not self.target_modules:
            raise ConfigError("lora.target_modules is empty; name at least one module, e.g. [q_proj, v_proj]")


def build_lora_config(settings: LoraSettings, task_type: str, modules_to_save: Sequence[str] | None = None):
    """A ``peft.LoraConfig`` from :class:`LoraSettings`.

    ``task_type`` is ``"CAUSAL_LM"`` for the retrospective model and ``"SEQ_CLS"`` for a reward model: with any other
    task type a new classification head stays frozen at its random initialisation.
    """
    from peft import LoraConfig

    targets: str | list[str] = list(settings.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        task_type=task_type,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        bias="none",
    )


def dataset_paths(paths: str | Sequence[str]) -> list[str]:
    """Normalise a dataset field (one path or a list of paths) to a non-empty list."""
    out = [paths] if isinstance(paths, str) else list(paths)
    if not out or any(not p for p in out):
        raise ConfigError("dataset is empty; pass the path written by the trial loop, e.g. runs/demo/datasets/...")
    return out


def check_dataset_paths(paths: str | Sequence[str], field_name: str = "dataset") -> list[str]:
    """Fail fast on a dataset path that does not exist or was not written by ``Dataset.save_to_disk``."""
    out = dataset_paths(paths)
    for p in out:
        path = Path(p)
        if not path.exists():
            got = "does not exist"
        elif not path.is_dir():
            got = f"is a file ({path.suffix or 'no suffix'}), not a dataset directory"
        elif not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
            got = "is a directory but not a saved Hugging Face dataset (no dataset_info.json)"
        else:
            continue
        raise DataError(
            f"{field_name}: {p!r} {got}; pass a dataset directory: the rated reflections a trials run exports "
            "(runs/<run>/datasets/rated_reflections, or <data_dir>/rated_reflections), or one made from a file of "
            "rated reflections with `retroformer import-ratings FILE --out DIR`"
        )
    return out


def load_rated_dataset(paths: str | Sequence[str], required_columns: Sequence[str]):
    """Load one or more saved rated-reflection datasets, concatenated, and check they hold ``required_columns``.

    Raises :class:`DataError` for a missing path, a path that is not a saved dataset, a dataset without the needed
    columns, or a dataset with no rows. A saved ``DatasetDict`` contributes its ``train`` split.
    """
    from datasets import DatasetDict, concatenate_datasets, load_from_disk

    parts = []
    for p in check_dataset_paths(paths):
        state = Path(p) / "state.json"
        # datasets cannot load a saved dataset without rows (it has no data files): say so plainly.
        if state.is_file() and not json.loads(state.read_text()).get("_data_files", [None]):
            raise DataError(f"dataset {p!r} has no rows; run more trials before training")
        ds = load_from_disk(p)
        if isinstance(ds, DatasetDict):
            if "train" not in ds:
                raise DataError(f"dataset {p!r} is a DatasetDict without a 'train' split (splits: {list(ds)})")
            ds = ds["train"]
        missing = [c for c in required_columns if c not in ds.column_names]
        if missing:
            raise DataError(
                f"dataset {p!r} lacks columns {missing}; it has {ds.column_names}. Export rated reflections with "
                "the trial loop (columns: retroformer.types.RATED_REFLECTION_COLUMNS)"
            )
        parts.append(ds.select_columns(list(required_columns)))
    ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    if len(ds) == 0:
        raise DataError(f"dataset {list(dataset_paths(paths))} has no rows; run more trials before training")
    logger.info("loaded %d rated reflections from %s", len(ds), dataset_paths(paths))
    return ds


#: The file each kind of checkpoint writes last: the HF Trainer's state, and our PPO loop's state. A checkpoint-N
#: without it was cut off mid-write (a kill during a save) and cannot be resumed from.
CHECKPOINT_COMPLETE_MARKERS = ("trainer_state.json", "training_state.pt")


def resume_checkpoint(output_dir: str | Path) -> str | None:
    """The last complete ``checkpoint-N`` directory in ``output_dir``, to resume from automatically, or None."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    complete: list[tuple[int, Path]] = []
    for d in out.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if not match or not d.is_dir():
            continue
        if any((d / marker).is_file() for marker in CHECKPOINT_COMPLETE_MARKERS):
            complete.append((int(match.group(1)), d))
        else:
            logger.warning(
                "ignoring %s: it has none of %s, so its save was cut off; resuming from an earlier checkpoint "
                "(delete the directory to silence this)",
                d,
                list(CHECKPOINT_COMPLETE_MARKERS),
            )
    if not complete:
        return None
    last = str(max(complete)[1])
    logger.info("resuming from checkpoint %s", last)
    return last


def checkpoint_step(checkpoint: str | None) -> int | None:
    """The step number N of a ``checkpoint-N`` path (None for None)."""
    if checkpoint is None:
        return None
    match = re.search(r"checkpoint-(\d+)$", str(checkpoint).rstrip("/"))
    return int(match.group(1)) if match else None


class StopOnSigterm:
    """While a training loop runs: a first SIGTERM (a cluster's preemption or time limit) is noted in ``received``, so
    that the loop finishes its current iteration, saves a checkpoint and stops (its rollouts' paid calls are kept); a
    second one ends the process at once. Outside the main thread signals cannot be caught and SIGTERM keeps its
    default."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None
        self._installed = False

    def _on_sigterm(self, signum, frame) -> None:
        if self.received:  # the second one: no more waiting
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.received = True
        logger.warning(
            "SIGTERM: finishing the step in progress, then saving a checkpoint and stopping (a second SIGTERM ends the "
            "process now)"
        )

    def __enter__(self) -> StopOnSigterm:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


def any_process(accelerator, flag: bool) -> bool:
    """Whether ``flag`` is set on any process (all of them must stop at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    import torch

    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "max").item())


def train_until_sigterm(trainer, resume: str | None):
    """``trainer.train(resume_from_checkpoint=resume)``; on SIGTERM the step in progress ends, a checkpoint is saved
    and :class:`~retroformer.errors.Interrupted` says where (a rerun resumes from it)."""
    from transformers import TrainerCallback

    with StopOnSigterm() as sigterm:

        class _StopAtSigterm(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if any_process(trainer.accelerator, sigterm.received):
                    control.should_save = True
                    control.should_training_stop = True
                return control

        callback = _StopAtSigterm()
        trainer.add_callback(callback)
        try:
            result = trainer.train(resume_from_checkpoint=resume)
        finally:
            trainer.remove_callback(callback)
    state = trainer.state
    if sigterm.received and state.global_step < state.max_steps:
        checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{state.global_step}"
        raise Interrupted(
            f"stopped by SIGTERM at step {state.global_step}/{state.max_steps}; {checkpoint} is saved: run the same "
            "command again to resume"
        )
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Write namespaced metrics (``sft/train_loss``, ...) as sorted JSON; NaN/inf become null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: _jsonable(v) for k, v in metrics.items()}
    path.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")


def namespaced(prefix: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """``{"train_loss": x}`` -> ``{"<prefix>/train_loss": x}``; keys that already hold a ``/`` are kept as they are."""
    return {(k if "/" in k else f"{prefix}/{k}"): v for k, v in metrics.items()}


def log_config(cfg: Any, name: str) -> None:
    """Log the resolved config at the start of a stage (it is also saved beside the outputs)."""
    logger.info("%s config:\n%s", name, json.dumps(to_dict(cfg), indent=2, default=str))


def setup_logging(level: str = "INFO") -> None:
    """Logging for the stage scripts (the library itself only creates loggers)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # PEFT reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model (LoRA adapters): a
    # warning on every stage's console that is not ours to act on.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


@dataclass(kw_only=True)
class TrainerSettings:
    """Optimisation and bookkeeping fields shared by the stage configs (they subclass it).

    Defaults suit a CPU: bf16 and gradient checkpointing are off (TRL turns both on; on a CPU that made SFT ~2.7x
    slower) and nothing is reported to an experiment tracker.
    """

    learning_rate: float = doc("peak learning rate (AdamW, linear decay)", 1e-4)
    num_train_epochs: float = doc("epochs over the dataset; ignored when max_steps > 0", 1.0)
    max_steps: int = doc("total optimizer steps; -1 uses num_train_epochs", -1)
    per_device_train_batch_size: int = doc("examples per device per step", 4)
    gradient_accumulation_steps: int = doc("micro-batches accumulated per optimizer step", 1)
    warmup_steps: int = doc("linear warm-up steps", 0)
    seed: int = doc("seed for data order, LoRA init, new heads and the held-out split", 0)
    logging_steps: int = doc("log the loss every N optimizer steps", 10)
    save_steps: int = doc("write output_dir/checkpoint-N every N steps; a rerun resumes from the last one", 100)
    save_total_limit: int | None = doc("keep at most this many checkpoints (null: keep all)", 2)
    bf16: bool = doc("bfloat16 mixed precision (GPU); keep off on a CPU", False)
    gradient_checkpointing: bool = doc("recompute activations to save memory (large models on a GPU)", False)
    report_to: str = doc("experiment tracker(s) for the trainer logs, comma-separated (tensorboard, wandb, trackio, "
                         "...; TensorBoard: <output_dir>/tensorboard/); none: console and files", "none")  # fmt: skip

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be > 0")
        if self.max_steps <= 0 and self.max_steps != -1:
            raise ConfigError(f"max_steps={self.max_steps} must be > 0, or -1 to train for num_train_epochs")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ConfigError(f"num_train_epochs={self.num_train_epochs} must be > 0 (or set max_steps)")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps} must be >= 0")
        check_report_to(self.report_to)  # a tracker that is not installed fails here, before any model loads
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(
                f"save_total_limit={self.save_total_limit} must be >= 1, or null to keep every checkpoint"
            )


def trainer_kwargs(cfg: TrainerSettings, output_dir: str) -> dict[str, Any]:
    """Keyword arguments for ``transformers.TrainingArguments`` (or a TRL config) from :class:`TrainerSettings`."""
    return {
        "output_dir": output_dir,
        "learning_rate": cfg.learning_rate,
        "num_train_epochs": cfg.num_train_epochs,
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "warmup_steps": cfg.warmup_steps,
        "seed": cfg.seed,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "bf16": cfg.bf16,
        # transformers 5 renamed it; setting the old name (TRL's configs default it to True) warns it is deprecated.
        "activation_checkpointing": cfg.gradient_checkpointing,
        # Trackers are fed by retroformer.tracking.trainer_callback, which namespaces the metrics (sft/..., reward/...).
        "report_to": "none",
        # Pinned memory only helps copies to an accelerator; on a CPU the data loader warns that it is unused.
        "dataloader_pin_memory": _has_accelerator(),
    }


def _has_accelerator() -> bool:
    """What torch's data loader asks before pinning memory (a GPU or another accelerator)."""
    import torch

    return torch.accelerator.is_available()
