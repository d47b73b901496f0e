"""Experiment trackers named by a config's ``report_to`` (TensorBoard, Weights & Biases, Trackio, ...).

Every stage and ``retroformer trials`` take ``report_to``: ``none``, or one or more of accelerate's tracker names,
comma-separated (``tensorboard``, ``wandb,tensorboard``). :func:`check_report_to` runs when a config is built, so a
tracker that is named but not installed fails before any model loads, naming the package to install. Trackers are
opened through accelerate's tracker classes, so each one behaves the same in every command. TensorBoard writes its
event files below ``<output dir>/tensorboard/<run name>/`` (open them with ``tensorboard --logdir <output dir>``).

Metric names are namespaced by stage: ``sft/...``, ``reward/...``, ``ppo/...`` and ``rollout/...``, ``trials/...``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from retroformer.errors import ConfigError

logger = logging.getLogger(__name__)

#: Tracker name (accelerate's) -> (module to import, pip package that provides it).
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard==2.21.0"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "aim": ("aim", "aim"),
    "swanlab": ("swanlab", "swanlab"),
}
#: Where TensorBoard event files go, below a stage's output directory or a trials run directory.
TENSORBOARD_DIR = "tensorboard"


def parse_report_to(value: str | Iterable[str]) -> list[str]:
    """``"none"`` -> ``[]``; ``"wandb, tensorboard"`` -> ``["wandb", "tensorboard"]``."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [item.strip() for item in items if item.strip()]
    return [] if names in ([], ["none"]) else names


def check_report_to(value: str, field_name: str = "report_to") -> list[str]:
    """The tracker names in ``value``; a ConfigError for an unknown name or one whose package is not installed."""
    names = parse_report_to(value)
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(
                f"{field_name}={value!r}: unknown tracker {name!r}; use none or a comma-separated list of "
                f"{', '.join(TRACKERS)}"
            )
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"{field_name}={value!r}: the {name} tracker needs the {module!r} package, which is not installed; "
                f"pip install {package} (or set {field_name}: none)"
            )
    return names


def flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"lora.r": 4, "dataset": "['a', 'b']", ...}``: trackers take scalars as hyperparameters."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = "null" if value is None else value
        else:
            out[name] = str(value)
    return out


class Trackers:
    """The trackers named by ``report_to``, opened on the main process; ``log`` sends scalars to each of them.

    ``run_name`` names the run (TensorBoard: the folder below ``logging_dir``; Weights & Biases: the project).
    """

    def __init__(self, report_to: str, run_name: str, logging_dir: str | Path, config: dict[str, Any] | None = None):
        from accelerate.state import PartialState
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        self.names = check_report_to(report_to)
        self.trackers = []
        if not PartialState().is_main_process:
            return
        for name in self.names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            tracker = cls(run_name, str(logging_dir)) if cls.requires_logging_directory else cls(run_name)
            tracker.start()
            if config:
                tracker.store_init_configuration(flat_config(config))
            self.trackers.append(tracker)
        if self.trackers:
            logger.info("reporting %s to %s (logging dir %s)", run_name, ", ".join(self.names), logging_dir)

    def log(self, values: dict[str, Any], step: int) -> None:
        scalars = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(scalars, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def trainer_callback(
    report_to: str, prefix: str, output_dir: str | Path, config: dict[str, Any], close_on_train_end: bool = True
):
    """A ``transformers.TrainerCallback`` that reports the trainer's logs as ``<prefix>/<name>`` (``sft/loss``,
    ``reward/eval_loss``) to the trackers of ``report_to``, at the trainer's global step; None for ``none``.

    The trainer's own reporting integrations stay off (``report_to="none"``): they name metrics ``train/...``. With
    ``close_on_train_end=False`` the trackers stay open for metrics computed after training (``callback.report``),
    until ``callback.close()``.
    """
    if not parse_report_to(report_to):
        return None
    from transformers import TrainerCallback

    def named(values: dict[str, Any]) -> dict[str, Any]:
        return {(k if k.startswith(f"{prefix}/") else f"{prefix}/{k}"): v for k, v in values.items()}

    class NamespacedTrackerCallback(TrainerCallback):
        def __init__(self) -> None:
            self.trackers: Trackers | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero and self.trackers is None:
                self.trackers = Trackers(report_to, prefix, Path(output_dir) / TENSORBOARD_DIR, config)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                self.report(logs, state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if close_on_train_end:
                self.close()

        def report(self, values: dict[str, Any], step: int) -> None:
            if self.trackers is not None:
                self.trackers.log(named(values), step=step)

        def close(self) -> None:
            if self.trackers is not None:
                self.trackers.finish()
                self.trackers = None

    return NamespacedTrackerCallback()
