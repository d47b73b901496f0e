"""Reward sources for the policy-gradient stage: what a sampled reflection is worth.

Two sources behind one interface, :class:`RewardSource` (``score(prompts, reflections, rows) -> list[float]``):

* ``rm`` (offline, as in the paper, section 4.2): the reward model written by ``reward_run.py`` scores
  ``(prompt, reflection)``; it was trained on ratings ``G[k,i+1] - G[k,i]``.
* ``env`` (online): the actor's next attempt is re-run with the reflection appended to its memory, and the reward is
  the return difference itself, ``G'[k,i+1] - G[k,i]``, by :class:`retroformer.rollout.OnlineReflectionScorer`. It
  needs the dataset row of each prompt (``task_id``, ``trial``, ``return_before``) and the trials run directory.
  With several runs (``env_run_dirs``: HotPotQA, ALFWorld, WebShop, ... for one reflector), :class:`RunRouter`
  sends each row to the scorer of the run that wrote it (the row's ``run_name``): that run's environment, actor
  endpoint and key.

Both are checked (paths, ``num_labels``) before any model is loaded by :func:`check_reward_source`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from retroformer.config import read_yaml
from retroformer.errors import ConfigError, DataError
from retroformer.records import config_path

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


def run_names(run_dirs: Sequence[str]) -> dict[str, str]:
    """``{run name: run directory}`` of trials runs, from the ``run_name`` each saved in its config (the name its
    rows carry); a ConfigError for a directory that is missing, is not a trials run, or repeats a name."""
    out: dict[str, str] = {}
    for run_dir in run_dirs:
        if not Path(run_dir).is_dir():
            raise ConfigError(
                f"env_run_dirs: {run_dir!r} does not exist; pass trials run directories (runs/<run_name>)"
            )
        path = config_path(run_dir)
        if not path.is_file():
            raise ConfigError(
                f"env_run_dirs: {run_dir!r} is not a trials run directory (no {path.name}); pass the directories "
                "`retroformer trials` wrote (runs/<run_name>)"
            )
        name = str(read_yaml(path).get("run_name") or Path(run_dir).name)
        if name in out:
            raise ConfigError(f"env_run_dirs: {out[name]!r} and {run_dir!r} are both run {name!r}; list each run once")
        out[name] = run_dir
    return out


def check_reward_source(cfg) -> None:
    """Checks for ``cfg.reward_source`` (a :class:`retroformer.training.ppo.PPORunConfig`) that need no model."""
    if cfg.reward_source == "rm":
        check_reward_model(cfg.reward_model)
    elif cfg.reward_source == "env":
        if cfg.env_run_dirs:
            run_names(cfg.env_run_dirs)
        elif not Path(cfg.env_run_dir).is_dir():
            raise ConfigError(
                f"env_run_dir={cfg.env_run_dir!r} does not exist; pass the trials run directory (runs/<run_name>)"
            )
    else:
        reward_columns(cfg.reward_source)


def check_env_rows(cfg, rows: Sequence[dict[str, Any]], dataset: Sequence[str]) -> None:
    """Before training with ``reward_source: env``: every row must name a task and trial, and, with ``env_run_dirs``,
    come from one of the listed runs. A DataError says which rows do not and why."""
    if cfg.reward_source != "env":
        return
    untracked = [r for r in rows if not r.get("task_id") or r.get("trial") is None or r.get("return_before") is None]
    if untracked:
        raise DataError(
            f"{len(untracked)} of {len(rows)} prompts in {list(dataset)} have no task id, trial or return before "
            "(rows of a rating file from `retroformer import-ratings` have none): reward_source=env re-runs the "
            "task's next attempt in the trials run that wrote the row, so it cannot score them. Train on them with "
            "reward_source rm, or use rated reflections exported by `retroformer trials`"
        )
    if not cfg.env_run_dirs:
        return  # one run (env_run_dir): every row is its own
    listed = run_names(cfg.env_run_dirs)
    unlisted: dict[str, int] = {}
    for row in rows:
        if row["run_name"] not in listed:
            unlisted[row["run_name"]] = unlisted.get(row["run_name"], 0) + 1
    if unlisted:
        raise DataError(
            f"prompts of runs {unlisted} (run: prompts) in {list(dataset)} come from no run in env_run_dirs (runs "
            f"{sorted(listed)}); add those runs' directories to env_run_dirs, or leave their datasets out"
        )


def online_scorer(run_dir: str, api_key: str | None):
    """The online scorer of one trials run (:class:`retroformer.rollout.OnlineReflectionScorer`); imported here, as
    it builds environments and actors, which the reward model source does not need."""
    from retroformer.rollout import OnlineReflectionScorer

    return OnlineReflectionScorer.from_run_dir(run_dir, api_key=api_key)


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
        return cls(online_scorer(run_dir, api_key))

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


class RunRouter:
    """An online scorer over several trials runs: each row goes to the scorer of the run that wrote it (the row's
    ``run_name``), the runs' batches concurrently. ``scorers``: ``{run name: scorer}`` (each with ``async score(rows,
    reflections)``, as :class:`retroformer.rollout.OnlineReflectionScorer`)."""

    def __init__(self, scorers: dict[str, Any]) -> None:
        if not scorers:
            raise ConfigError("RunRouter needs at least one run; list the trials run directories in env_run_dirs")
        self.scorers = scorers

    @classmethod
    def from_run_dirs(cls, run_dirs: Sequence[str], api_keys: dict[str, str | None] | None = None) -> RunRouter:
        """``api_keys``: ``{run directory: key of its actor endpoint}`` (the script reads each from the variable the
        run's ``actor.llm.api_key_env`` names); a run without one gets none."""
        keys = api_keys or {}
        return cls({name: online_scorer(d, keys.get(d)) for name, d in run_names(run_dirs).items()})

    async def score(self, rows: list[dict[str, Any]], reflections: list[str]) -> list[float]:
        if len(rows) != len(reflections):
            raise ValueError(f"score() got {len(rows)} rows and {len(reflections)} reflections; expected equal")
        by_run: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            if row.get("run_name") not in self.scorers:
                raise DataError(
                    f"row of task {row.get('task_id')!r} comes from run {row.get('run_name')!r}, which is not in "
                    f"env_run_dirs (runs {sorted(self.scorers)}); add its run directory"
                )
            by_run.setdefault(row["run_name"], []).append(i)
        runs = list(by_run)
        results = await asyncio.gather(
            *(
                self.scorers[run].score([rows[i] for i in by_run[run]], [reflections[i] for i in by_run[run]])
                for run in runs
            )
        )
        out = [0.0] * len(rows)
        for run, scores in zip(runs, results, strict=True):
            for i, score in zip(by_run[run], scores, strict=True):
                out[i] = score
        return out

    async def aclose(self) -> None:
        for scorer in self.scorers.values():
            closer = getattr(scorer, "aclose", None)
            if closer is not None:
                await closer()


def build_reward_source(cfg, api_key: str | None = None, api_keys: dict[str, str | None] | None = None) -> RewardSource:
    """The reward source named by ``cfg.reward_source``; ``api_key`` is the actor's key for ``env`` with one run,
    ``api_keys`` (``{run directory: key}``) those of ``env_run_dirs``."""
    if cfg.reward_source == "rm":
        return RewardModelSource.from_path(cfg.reward_model)
    if cfg.reward_source == "env" and cfg.env_run_dirs:
        return EnvRewardSource(RunRouter.from_run_dirs(cfg.env_run_dirs, api_keys))
    if cfg.reward_source == "env":
        return EnvRewardSource.from_run_dir(cfg.env_run_dir, api_key=api_key)
    raise ConfigError(f"reward_source={cfg.reward_source!r} is unknown; expected one of {sorted(REWARD_COLUMNS)}")
