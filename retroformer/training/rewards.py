"""Reward sources for the policy-gradient stage: what a sampled reflection is worth.

Two sources behind one interface, :class:`RewardSource` (``score(prompts, reflections, rows) -> list[float]``):

* ``rm`` (offline, as in the paper, section 4.2): the reward model written by ``reward_run.py`` scores
  ``(prompt, reflection)``; it was trained on ratings ``G[k,i+1] - G[k,i]``.
* ``env`` (online): the actor's next attempt is re-run with the reflection appended to its memory, and the reward is
  the return difference itself, ``G'[k,i+1] - G[k,i]``, by :class:`retroformer.rollout.OnlineReflectionScorer`. It
  needs the dataset row of each prompt (``task_id``, ``trial``, ``return_before``) and the trials run directory.

Both are checked (paths, ``num_labels``) before any model is loaded by :func:`check_reward_source`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Protocol

from retroformer.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

#: Dataset columns each reward source reads from a prompt's row (besides ``prompt``).
REWARD_COLUMNS = {"rm": (), "env": ("task_id", "trial", "return_before")}


class RewardSource(Protocol):
    """Scores reflections; one float per reflection, higher is better."""

    name: str

    def score(self, prompts: list[str], reflections: list[str], rows: list[dict[str, Any]]) -> list[float]: ...

    def close(self) -> None: ...


def reward_columns(source: str) -> tuple[str, ...]:
    """The dataset columns ``source`` needs besides ``prompt``."""
    if source not in REWARD_COLUMNS:
        raise ConfigError(f"reward_source={source!r} is unknown; expected one of {sorted(REWARD_COLUMNS)}")
    return REWARD_COLUMNS[source]


def check_reward_model(path: str) -> None:
    """Fail fast unless ``path`` is a reward model: a sequence classifier with one output (``num_labels == 1``).

    ``path`` is a model directory (``config.json``) or a LoRA adapter with its score head (``adapter_config.json``
    with ``task_type: SEQ_CLS``), as ``reward_run.py`` writes them. Only JSON is read; no weights are loaded.
    """
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"reward_model={path!r} does not exist; pass the output_dir of reward_run.py")
    if not (p / "config.json").is_file() and (p / "adapter_config.json").is_file():
        adapter = json.loads((p / "adapter_config.json").read_text())
        if adapter.get("task_type") != "SEQ_CLS":
            raise ConfigError(
                f"reward_model={path!r} is a LoRA adapter with task_type={adapter.get('task_type')!r}, not a reward "
                "model; pass a SEQ_CLS adapter or merged model written by reward_run.py"
            )
        return
    if not (p / "config.json").is_file():
        raise ConfigError(
            f"reward_model={path!r} holds no config.json or adapter_config.json; pass the output_dir of reward_run.py"
        )
    config = json.loads((p / "config.json").read_text())
    architectures = config.get("architectures") or []
    if architectures and not any("SequenceClassification" in a for a in architectures):
        raise ConfigError(
            f"reward_model={path!r} is a {architectures[0]}, not a reward model; pass a sequence-classification "
            "model with one output (num_labels=1), as written by reward_run.py"
        )
    num_labels = config.get("num_labels", len(config.get("id2label") or {}) or 2)
    if num_labels != 1:
        raise ConfigError(
            f"reward_model={path!r} has num_labels={num_labels}; a reward model must output one scalar "
            "(num_labels=1, a sequence-classification head as written by reward_run.py)"
        )


def check_reward_source(cfg) -> None:
    """Checks for ``cfg.reward_source`` (a :class:`retroformer.training.ppo.PPORunConfig`) that need no model."""
    if cfg.reward_source == "rm":
        check_reward_model(cfg.reward_model)
    elif cfg.reward_source == "env":
        if not Path(cfg.env_run_dir).is_dir():
            raise ConfigError(
                f"env_run_dir={cfg.env_run_dir!r} does not exist; pass the trials run directory (runs/<run_name>)"
            )
    else:
        reward_columns(cfg.reward_source)


class RewardModelSource:
    """``rm``: a scalar reward model's score of ``(prompt, reflection)``.

    ``scorer`` is ``retroformer.training.reward.load_reward_model(path)``: a callable ``(prompts, reflections) ->
    list[float]``; tests pass their own.
    """

    name = "rm"

    def __init__(self, scorer) -> None:
        self.scorer = scorer

    @classmethod
    def from_path(cls, path: str) -> RewardModelSource:
        from retroformer.training.reward import load_reward_model

        check_reward_model(path)
        return cls(load_reward_model(path))

    def score(self, prompts: list[str], reflections: list[str], rows: list[dict[str, Any]]) -> list[float]:
        del rows  # the reward model sees only the text
        return [float(r) for r in self.scorer(list(prompts), list(reflections))]

    def close(self) -> None:
        pass


class EnvRewardSource:
    """``env``: the next attempt's return with the reflection in memory, minus the attempt's return (online).

    ``scorer`` has ``async score(rows, reflections) -> list[float]``
    (:class:`retroformer.rollout.OnlineReflectionScorer`). Its calls run on one event loop owned by this object, so
    that clients bound to a loop (HTTP connection pools) stay usable across training iterations.
    """

    name = "env"

    def __init__(self, scorer) -> None:
        self.scorer = scorer
        self._loop = asyncio.new_event_loop()

    @classmethod
    def from_run_dir(cls, run_dir: str, api_key: str | None = None) -> EnvRewardSource:
        """``api_key``: the key of the run's actor endpoint (an OpenAI-compatible actor), passed in by the script."""
        from retroformer.rollout import OnlineReflectionScorer

        return cls(OnlineReflectionScorer.from_run_dir(run_dir, api_key=api_key))

    def score(self, prompts: list[str], reflections: list[str], rows: list[dict[str, Any]]) -> list[float]:
        del prompts  # the row names the task and trial; the scorer rebuilds the attempt from the run directory
        missing = [c for c in REWARD_COLUMNS["env"] if rows and c not in rows[0]]
        if missing:
            raise DataError(f"reward_source=env needs dataset columns {missing} in every row; got {sorted(rows[0])}")
        return [float(r) for r in self._loop.run_until_complete(self.scorer.score(list(rows), list(reflections)))]

    def close(self) -> None:
        """Close the scorer's clients on their own loop, then the loop: a client left open on a closed loop (the
        ``hf`` backend's micro-batcher, an aiohttp session) would complain when it is garbage-collected."""
        if self._loop.is_closed():
            return
        try:
            closer = getattr(self.scorer, "aclose", None)
            if closer is not None:
                self._loop.run_until_complete(closer())
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        finally:
            self._loop.close()


def build_reward_source(cfg, api_key: str | None = None) -> RewardSource:
    """The reward source named by ``cfg.reward_source``; ``api_key`` is the actor's key for ``env``."""
    if cfg.reward_source == "rm":
        return RewardModelSource.from_path(cfg.reward_model)
    if cfg.reward_source == "env":
        return EnvRewardSource.from_run_dir(cfg.env_run_dir, api_key=api_key)
    raise ConfigError(f"reward_source={cfg.reward_source!r} is unknown; expected one of {sorted(REWARD_COLUMNS)}")
