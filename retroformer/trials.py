"""The trial loop: N tasks x T trials, reflections between failed attempts, every episode recorded, resumable.

    retroformer trials --config experiments/demo/trials.yaml

For task ``k`` and trial ``i`` (paper section 4): the actor runs one episode with the last ``m`` reflections in its
prompt; if it failed and trials remain, the retrospective model writes a reflection, which joins the memory. Episodes
of different tasks run concurrently (asyncio, bounded); trials of one task run in order. Each finished episode is
appended to ``<runs_dir>/<run_name>/trials/episodes.jsonl`` and flushed, so a killed run loses at most the episodes
in flight; running the same command again resumes and never records a (task, trial) twice. At the end the rated
reflections are exported as a Hugging Face dataset (``datasets/rated_reflections``).

A run can be split into shards that run side by side, in processes or on machines sharing the run directory
(DESIGN section 5)::

    for i in 0 1 2 3; do retroformer trials --config X.yaml --shard $i/4 & done; wait

Shard ``I/N`` runs the tasks whose stable hash of the task id falls in shard I (:func:`~retroformer.records.shard_of`),
with its own records file and lock, and resumes on its own. The shard that finishes the run last merges the shards into
the dataset and ``trials/summary.json``; :func:`merge_run` (``retroformer merge runs/<name>``) does it at any time.
Resume and export stream the records: memory holds a few fields per (task, trial), not the episodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from retroformer.agents.actor import Actor
from retroformer.agents.memory import memory_window
from retroformer.agents.reflector import Reflector
from retroformer.builders import (
    ActorSection,
    EnvSection,
    ReflectorSection,
    build_actor,
    build_reflector,
    build_suite,
    check_model_paths,
    select_tasks,
)
from retroformer.config import doc, from_dict, read_yaml, save_config, to_dict, write_atomic
from retroformer.dataset import export_rated_reflections
from retroformer.envs.base import EnvSuite, Outcome, Task, get_env_class
from retroformer.errors import BudgetExceeded, ConfigError, DataError, EnvError, LLMError, StorageError
from retroformer.llm.cost import DEFAULT_PRICES, Budget, CostLedger, Price, is_local_model, price_for
from retroformer.records import (
    GroupCommit,
    RecordEntry,
    RecordWriter,
    RunLock,
    Shard,
    config_lock_path,
    config_path,
    dataset_path,
    effective_entries,
    exclusive_lock,
    index_records,
    iter_entries,
    iter_records,
    iter_records_at,
    merge_lock_path,
    parse_shard,
    read_record_at,
    read_task_ids,
    record_files,
    records_path,
    shard_files,
    shard_of,
    summary_path,
    write_task_ids,
)
from retroformer.report import summarize_entries
from retroformer.rollout import prompts_for, run_new_episode
from retroformer.types import ERRORED_END_REASONS, EpisodeRecord, Reflection, Usage

logger = logging.getLogger(__name__)


#: Most attempts per task a config may ask for (the paper: 4-15).
MAX_TRIALS = 1000


@dataclass
class BudgetSection:
    max_tokens: int | None = doc(
        "most tokens (all roles) the run may use, never passed: each call reserves its worst case (its prompt at one "
        "token per byte, plus its max_tokens) before it is sent, and the run stops cleanly when the next call no "
        "longer fits; None: no limit",
        None,
    )
    max_usd: float | None = doc(
        "most estimated cost in USD, never passed (each call reserves its worst case at its price, as for max_tokens); "
        "None: no limit. Every remote model needs a price (built-in examples or `prices`)",
        None,
    )
    prices: dict = doc(
        "USD per million tokens by model name, added to (and overriding) the built-in example table, e.g. "
        "{my-model: {prompt_per_m: 0.5, completion_per_m: 1.5}}; dated snapshots (name-2024-07-18) match their name",
        default_factory=dict,
    )

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"budget.max_tokens must be >= 1 or null, got {self.max_tokens}")
        if self.max_usd is not None and self.max_usd <= 0:
            raise ConfigError(f"budget.max_usd must be > 0 or null, got {self.max_usd}")
        for name, price in self.prices.items():
            ok = isinstance(price, dict) and set(price) == {"prompt_per_m", "completion_per_m"}
            if not ok or any(not isinstance(v, (int, float)) or v < 0 for v in price.values()):
                raise ConfigError(
                    f"budget.prices.{name} must be {{prompt_per_m: <USD >= 0>, completion_per_m: <USD >= 0>}}, "
                    f"got {price!r}"
                )

    def price_table(self) -> dict[str, Price]:
        return {
            **DEFAULT_PRICES,
            **{k: Price(float(v["prompt_per_m"]), float(v["completion_per_m"])) for k, v in self.prices.items()},
        }


@dataclass
class TrialsConfig:
    """Run tasks x trials with an actor and a retrospective model; record every episode; export rated reflections."""

    run_name: str = doc("name of the run; outputs go to <runs_dir>/<run_name>/", "demo")
    runs_dir: str = doc("parent directory of all runs", "runs")
    seed: int = doc("seed recorded with every episode and passed to sampling backends", 0)
    trials: int = doc("attempts per task (paper: HotPotQA 5, ALFWorld 10-15, WebShop 4)", 3)
    memory_size: int = doc("last m reflections in the actor's prompt (paper: 3)", 3)
    concurrency: int = doc("episodes of different tasks in flight at once", 8)
    shard: str | None = doc(
        "run only shard 'I/N' of the tasks (0 <= I < N; a task's shard is a stable hash of its id), e.g. 0/4, so that "
        "N processes or machines fill one run directory side by side, each with its own records file and lock; the "
        "shard that finishes the run last merges the dataset (or `retroformer merge runs/<name>`). The budget applies "
        "to each shard on its own. null: the whole run in one process",
        None,
    )
    max_consecutive_errors: int = doc(
        "this many failed attempts in a row, e.g. an API outage, pause the run (see outage_wait_s) instead of "
        "erroring every task. 0: never pause or stop",
        10,
    )
    outage_wait_s: float = doc(
        "when max_consecutive_errors attempts in a row fail, pause new episodes and probe the endpoint with one "
        "episode at a time (backoff from 2 s to 60 s) for up to this many seconds, then go on and re-attempt the "
        "failed episodes; past it the run stops (exit code 3). 0: stop at once",
        600.0,
    )
    stop_on_success: bool = doc("stop a task's trials once it succeeds (Reflexion protocol)", True)
    cache_dir: str | None = doc("on-disk response cache for deterministic LLM calls; None disables it", None)
    export_dataset: bool = doc("export the rated-reflection dataset when the run ends", True)
    # Read by the `retroformer trials` command (retroformer/cli.py), not by the loop itself.
    data_dir: str | None = doc(
        "data folder: environment data is looked for below it (hotpotqa/, alfworld/) and the rated reflections are "
        "copied to <data_dir>/rated_reflections, where the training stages read them by default; null: DATA_DIR from "
        ".env, else none",
        None,
    )
    training_data: bool = doc(
        "copy this run's rated reflections to <data_dir>/rated_reflections (evaluation recipes set false)", True
    )
    report_to: str = doc(
        "experiment tracker(s) for success per trial (cumulative, per attempt) and cost, comma-separated: none, "
        "tensorboard (<run>/tensorboard/trials), wandb, ...",
        "none",
    )
    env: EnvSection = doc("environment", default_factory=EnvSection)
    actor: ActorSection = doc("actor", default_factory=ActorSection)
    reflector: ReflectorSection = doc("retrospective model", default_factory=ReflectorSection)
    budget: BudgetSection = doc("token / cost budget", default_factory=BudgetSection)

    def __post_init__(self) -> None:
        if not 1 <= self.trials <= MAX_TRIALS:
            raise ConfigError(
                f"trials must be in 1..{MAX_TRIALS} (the paper uses at most 15 attempts per task), got {self.trials}"
            )
        if self.memory_size < 0:
            raise ConfigError(f"memory_size must be >= 0, got {self.memory_size}")
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.shard is not None:
            parse_shard(self.shard)
        if not (math.isfinite(self.outage_wait_s) and self.outage_wait_s >= 0):
            raise ConfigError(
                f"outage_wait_s must be a finite number of seconds >= 0 (0: stop at once), got {self.outage_wait_s}"
            )
        if self.max_consecutive_errors < 0:
            raise ConfigError(f"max_consecutive_errors must be >= 0 (0: never stop), got {self.max_consecutive_errors}")
        if self.actor.kind == "plan" and self.env.name != "synthetic":
            raise ConfigError(
                f"actor.kind=plan works only with env.name=synthetic (got {self.env.name!r}); use actor.kind=react"
            )
        if (
            not self.run_name.strip()
            or self.run_name != self.run_name.strip()
            or "/" in self.run_name
            or "\\" in self.run_name
            or self.run_name in (".", "..")
        ):
            raise ConfigError(
                f"run_name must be a plain directory name (not blank, '.' or '..', no '/' or '\\', no spaces at either "
                f"end), got {self.run_name!r}"
            )

    @property
    def shard_spec(self) -> Shard | None:
        """``shard`` as ``(I, N)``, or None for the whole run."""
        return None if self.shard is None else parse_shard(self.shard)


def run_dir(cfg: TrialsConfig) -> Path:
    return Path(cfg.runs_dir) / cfg.run_name


@dataclass
class TrialsResult:
    """What one run (or one shard) did. Its records stay on disk: :meth:`iter_records` streams them."""

    run_dir: Path
    #: The file this run appended to (``episodes.jsonl``, or the shard's own file).
    records_file: Path
    new_episodes: int
    wall_time_s: float
    shard: Shard | None = None
    stopped_by_budget: bool = False
    #: The rated reflections: exported by an unsharded run, or by the shard that finished the run last.
    dataset_path: Path | None = None
    #: Success per trial of this run's tasks (of this shard's tasks, for a shard).
    summary: dict = field(default_factory=dict)
    #: Why the run stopped before its end because calls kept failing (the circuit breaker), None if it did not.
    stopped_by_errors: str | None = None
    #: The signal that stopped the run ("SIGTERM", "SIGINT"), None if none did: the episodes in flight were finished
    #: and saved.
    stopped_by_signal: str | None = None
    #: The merge of every shard, when this shard finished the run last (see :func:`merge_run`).
    merged: MergeResult | None = None

    def iter_records(self) -> Iterator[EpisodeRecord]:
        """This run's records, history included, one at a time: its file, and for a shard also the lines of its tasks
        in the run's unsharded file (a run started whole and continued in shards)."""
        if self.shard is not None:
            index, count = self.shard
            for rec in iter_records(records_path(self.run_dir), repair=False, skip_partial=True):
                if shard_of(rec.task_id, count) == index:
                    yield rec
        yield from iter_records(self.records_file, repair=False, skip_partial=True)

    def iter_entries(self) -> Iterator[RecordEntry]:
        """The :class:`RecordEntry` of each of :meth:`iter_records` (faster: the steps are not built)."""
        if self.shard is not None:
            index, count = self.shard
            yield from (e for e in iter_entries(records_path(self.run_dir)) if shard_of(e.task_id, count) == index)
        yield from iter_entries(self.records_file)

    @property
    def records(self) -> list[EpisodeRecord]:
        """All of :meth:`iter_records` in a list, read from disk (memory grows with the run: for tests and checks)."""
        return list(self.iter_records())


@dataclass
class MergeResult:
    """The merge of a run's records files (its shards): summary, dataset, and how many tasks still have work left."""

    run_dir: Path
    summary: dict
    #: Tasks of the run's task list that a run (or shard) would still run or complete.
    remaining_tasks: int
    dataset_path: Path | None = None
    #: The record files merged, name -> size in bytes (the merge of the same files is not redone).
    record_files: dict[str, int] = field(default_factory=dict)


#: Fields that change what a record means; a resumed run must match the first run on each of them. A server's URL may
#: change (a restart on another port); the model name and ``revision`` say which model it serves.
_LLM_IDENTITY = (
    "backend",
    "model",
    "adapter",
    "revision",
    "style",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "max_prompt_tokens",
    "scripted_policy",
    "scripted_options",
    "scripted_replies",
)
RESUME_FIXED = (
    "run_name",
    "seed",
    "memory_size",
    "stop_on_success",
    "env.name",
    "env.max_tasks",
    "actor.kind",
    "actor.max_observation_chars",
    "actor.max_prompt_chars",
    *(f"actor.llm.{k}" for k in _LLM_IDENTITY),
    "reflector.kind",
    "reflector.max_chars",
    *(f"reflector.llm.{k}" for k in _LLM_IDENTITY),
)


def _dotted(data: dict, key: str):
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


#: Environment options that say only where a server or cache is, or how long to wait and how often to retry: a resumed
#: run may change them. Every other option defines the tasks (which questions, how many doors, which clues).
ENV_OPTIONS_FREE = frozenset(
    {
        "cache_dir",
        "url",
        "timeout_s",
        "max_retries",
        "retry_backoff_s",
        "wikipedia_timeout_s",
        "wikipedia_retries",
        "wikipedia_backoff_s",
        "wikipedia_user_agent",
    }
)


def _env_options(name: str | None, options: dict | None) -> dict:
    """``options`` with the environment's defaults filled in (an option left out equals its default given), as
    written; an environment that cannot be loaded here is compared as written."""
    options = dict(options or {})
    try:
        return to_dict(from_dict(get_env_class(str(name)).Config, options, where="env.options"))
    except (ConfigError, ImportError):
        return options


def _changed_fields(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(field, old value, new value) of every field that changes what a record means (see :data:`RESUME_FIXED`)."""
    changed = [(k, _dotted(old, k), _dotted(new, k)) for k in RESUME_FIXED if _dotted(old, k) != _dotted(new, k)]
    if _dotted(old, "env.name") == _dotted(new, "env.name"):
        name = _dotted(new, "env.name")
        before, after = _env_options(name, _dotted(old, "env.options")), _env_options(name, _dotted(new, "env.options"))
        for key in sorted((set(before) | set(after)) - ENV_OPTIONS_FREE):
            if before.get(key) != after.get(key):
                changed.append((f"env.options.{key}", before.get(key), after.get(key)))
    return changed


def check_resume_config(cfg: TrialsConfig, path: Path) -> None:
    """Refuse to resume the run whose config is at ``path`` with a config that changes what its records mean.

    ``trials`` may change (a run can be extended), and so may what only affects speed or limits (concurrency, retries,
    timeouts, budget, cache, the environment's :data:`ENV_OPTIONS_FREE`). Every other environment option defines the
    tasks: a changed one is refused like a changed model. The task ids are also checked, by fingerprint.
    """
    if not path.is_file():
        return
    changed = _changed_fields(read_yaml(path), to_dict(cfg))
    if changed:
        details = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed)
        raise ConfigError(
            f"{run_dir(cfg)} was started with another config ({details}); these fields change what a record "
            "means, so a run cannot be resumed with new values. Restore them, or give the new config another run_name"
        )


def _resume_index(
    sources: list[tuple[Path, bool]],
    fingerprint: str,
    run_name: str,
    task_ids: set[str],
    ledger: _Ledger,
) -> dict[str, dict[int, RecordEntry]]:
    """Each task's current record per trial, as a compact :class:`RecordEntry` (steps stay on disk): the last line
    of each (task, trial); earlier lines are history. Streams ``sources`` (path, whether this run owns it: an owned
    file is repaired, another is only read); counts every line of ``task_ids`` in ``ledger``.

    A (task, trial) may have several lines only when each earlier one was replaced for a reason: its episode errored,
    its reflection failed, or it lacked the reflection a later trial needs.
    """
    by_task: dict[str, dict[int, RecordEntry]] = defaultdict(dict)
    for path, own in sources:
        for offset, rec in iter_records_at(path, repair=own, skip_partial=not own):
            if rec.task_fingerprint != fingerprint:
                raise DataError(
                    f"{path} holds episodes of another task list (fingerprint {rec.task_fingerprint}, this run "
                    f"{fingerprint}); use a new run_name or restore the original environment options"
                )
            if rec.run_name != run_name:
                raise DataError(
                    f"{path} holds episodes of run {rec.run_name!r}, not {run_name!r} (was the directory renamed?); "
                    f"ratings pair episodes by run name: run it as run_name={rec.run_name!r}"
                )
            if rec.task_id not in task_ids:
                continue  # a task of another shard, in the run's unsharded file
            prev = by_task[rec.task_id].get(rec.trial)
            if prev is not None and not (prev.errored or (not prev.success and not prev.has_reflection)):
                raise DataError(
                    f"{path} records task {rec.task_id!r} trial {rec.trial} twice; remove the duplicate line"
                )
            by_task[rec.task_id][rec.trial] = RecordEntry.of(rec, path, offset, keep_text=True)
            ledger.add("actor", rec.actor_id, rec.actor_usage)
            if rec.reflection is not None:
                ledger.add("reflector", rec.reflection.reflector_id, rec.reflection.usage)
    return by_task


def _check_shard_layout(out: Path, shard: Shard | None) -> None:
    """One run directory, one way of splitting it: shards of one N (their tasks do not overlap), and no unsharded run
    once shards exist (the readers take the unsharded file first, so its later lines would lose to older ones)."""
    found = shard_files(out)
    names = ", ".join(p.name for p in found.values())
    if shard is None and found:
        counts = sorted({n for _, n in found})
        raise ConfigError(
            f"shard: {out} was run in shards ({names}), got shard=null; continue it shard by shard with "
            f"--shard I/{counts[0]} for I in 0..{counts[0] - 1}, or give this run another run_name"
        )
    if shard is not None:
        other = sorted({n for _, n in found if n != shard[1]})
        if other:
            raise ConfigError(
                f"shard: {out} holds shards of {other[0]} ({names}), got shard={shard[0]}/{shard[1]}; every shard of "
                f"a run uses the same N: run --shard I/{other[0]}, or give this run another run_name"
            )


class _Ledger:
    """Token accounting per (role, model) with an optional budget; uses retroformer.llm.cost where available."""

    def __init__(self, budget: BudgetSection) -> None:
        self.ledger = CostLedger(prices=budget.price_table())
        #: What our own agents' calls reserve and settle (see :class:`~retroformer.llm.cost.Budget`).
        self.budget = Budget(self.ledger, budget.max_tokens, budget.max_usd)

    def add(self, role: str, model_id: str, usage: Usage) -> None:
        self.ledger.add(role, model_id, usage)

    def check(self) -> None:
        self.budget.check()

    def exceeded(self) -> bool:
        try:
            self.check()
        except BudgetExceeded as exc:
            logger.warning("%s", exc)
            return True
        return False

    def summary(self) -> dict:
        return self.ledger.summary()


#: Seconds before the first probe of an outage, and the longest wait between two probes (doubling in between).
OUTAGE_PROBE_S = (2.0, 60.0)


def _failed(record: EpisodeRecord) -> bool:
    """An attempt that failed for a reason outside the task: an LLM or environment failure, or its reflector's."""
    return record.end_reason in ("llm_error", "env_error") or (record.error or "").startswith("reflector:")


class _Breaker:
    """The circuit breaker: ``limit`` failed attempts in a row (an outage) pause the run instead of erroring every task.

    While it is open no episode starts but one probe at a time: the first after ``OUTAGE_PROBE_S[0]`` seconds, each
    later one after twice the wait before (at most ``OUTAGE_PROBE_S[1]``). Any episode that does not fail closes it and
    the run goes on; both are logged. Once ``wait_s`` have passed since it opened, or at once when ``wait_s`` is 0,
    the run stops: ``message`` says why, ``stop`` is set (the command exits 3; a rerun resumes).
    """

    def __init__(self, limit: int, wait_s: float, stop: asyncio.Event) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self.stop = stop
        self.failures = 0
        self.message: str | None = None
        #: Outages ridden out so far (the breaker opened, then an episode succeeded).
        self.recoveries = 0
        self._opened_at: float | None = None
        self._last = ""
        self._delay = OUTAGE_PROBE_S[0]
        self._probe_allowed = False
        self._probing = False
        self._timer: asyncio.TimerHandle | None = None
        self._changed = asyncio.Event()

    @property
    def is_open(self) -> bool:
        """Whether an outage is on: episodes wait, and one at a time probes."""
        return self._opened_at is not None

    async def admit(self) -> Literal["go", "probe"] | None:
        """Wait until an episode may start: "go", "probe" (the one episode let through during an outage), or None
        once the run stops."""
        while not self.stop.is_set():
            if self._opened_at is None:
                return "go"
            if self._probe_allowed and not self._probing:
                self._probe_allowed, self._probing = False, True
                return "probe"
            changed, stopped = asyncio.ensure_future(self._changed.wait()), asyncio.ensure_future(self.stop.wait())
            try:
                await asyncio.wait({changed, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
                stopped.cancel()
        return None

    def observe(self, record: EpisodeRecord, probe: bool = False) -> None:
        if not _failed(record):
            self.failures = 0
            if self._opened_at is not None:
                self._close()
            return
        self.failures += 1
        self._last = f"task {record.task_id} trial {record.trial}: {record.error}"
        if self._opened_at is not None:
            if probe:
                self._probing = False
                self._next_probe()
        elif self.limit and self.failures >= self.limit and self.message is None:
            if self.wait_s <= 0:
                self._give_up(f"{self.failures} attempts in a row failed (last: {self._last})")
                return
            self._opened_at, self._delay = time.monotonic(), OUTAGE_PROBE_S[0]
            logger.warning(
                "%d attempts in a row failed (last: %s); pausing new episodes and probing with one at a time for up "
                "to %g s (outage_wait_s)",
                self.failures,
                self._last,
                self.wait_s,
            )
            self._next_probe()

    def _next_probe(self) -> None:
        assert self._opened_at is not None
        left = self._opened_at + self.wait_s - time.monotonic()
        if left <= 0:
            self._give_up(
                f"{self.failures} attempts in a row failed over {self.wait_s:g} s of outage (outage_wait_s; last: "
                f"{self._last})"
            )
            return
        delay, self._delay = min(self._delay, left), min(self._delay * 2, OUTAGE_PROBE_S[1])
        logger.info("outage: next probe in %.1f s (%.0f s of outage_wait_s left)", delay, left)
        self._timer = asyncio.get_running_loop().call_later(delay, self._allow_probe)

    def _allow_probe(self) -> None:
        self._probe_allowed = True
        self._notify()

    def _close(self) -> None:
        assert self._opened_at is not None
        logger.warning(
            "the endpoint answers again after %.1f s of outage; resuming", time.monotonic() - self._opened_at
        )
        self._opened_at, self._probe_allowed, self._probing = None, False, False
        self.recoveries += 1
        self.close()
        self._notify()

    def _give_up(self, what: str) -> None:
        self.message = (
            f"{what}; the run stopped to spare the other tasks. Fix the cause (is the server up, the quota left?), "
            "then run the same command again: it resumes and re-attempts the failed episodes"
        )
        logger.error("%s", self.message)
        self.stop.set()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def close(self) -> None:
        """Cancel a probe that is due later (the run ends, or the outage did)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _needs_run(rec: RecordEntry | None) -> bool:
    return rec is None or rec.end_reason in ERRORED_END_REASONS


def _needs_reflection(done: dict[int, RecordEntry], rec: RecordEntry, trials: int, has_reflector: bool) -> bool:
    """A failed attempt lacks the reflection the next trial needs (its reflector failed, or ``trials`` was raised)."""
    nxt = done.get(rec.trial + 1)
    return (
        has_reflector
        and not rec.success
        and not rec.has_reflection
        and rec.trial + 1 < trials
        and (nxt is None or nxt.end_reason in ERRORED_END_REASONS)
    )


def _has_work(done: dict[int, RecordEntry], trials: int, stop_on_success: bool, has_reflector: bool) -> bool:
    """Whether a run would still run an episode or write a reflection for a task (as ``run_task`` walks it)."""
    for trial in range(trials):
        rec = done.get(trial)
        if _needs_run(rec) or _needs_reflection(done, rec, trials, has_reflector):
            return True
        if rec.errored:
            return False  # a reflector failure the next trial already ran past: the loop goes no further either
        if stop_on_success and rec.success:
            return False
    return False


#: The signals that stop a run gently: a cluster's preemption or time limit (SIGTERM), Ctrl-C (SIGINT).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def _stop_on_signals(
    loop: asyncio.AbstractEventLoop, stop: asyncio.Event, wind_down: Callable[[], None]
) -> Iterator[list[str]]:
    """While the trial loop runs: a first SIGTERM (a cluster's preemption or time limit, ``kill``) or Ctrl-C starts no
    more episodes and lets those in flight finish and be saved, so that their calls are not paid for twice, within
    about one LLM timeout (``wind_down``: no retries, no call that could not end by then); a second one ends the run at
    once. Yields the list the signal's name is appended to. A loop outside the main thread cannot take signals: they
    then keep their default (records on disk are safe either way; a rerun resumes)."""
    received: list[str] = []
    previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}

    def on_signal(sig: signal.Signals) -> None:
        if received:  # the second one: no more waiting
            for other in _STOP_SIGNALS:
                loop.remove_signal_handler(other)
            if sig == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), sig)
            return
        received.append(sig.name)
        what = "Ctrl-C" if sig == signal.SIGINT else sig.name
        logger.warning(
            "%s: starting no more episodes; the ones in flight finish within one LLM timeout, without retries, and "
            "are saved (press Ctrl-C again, or send SIGTERM again, to stop now). Run the same command again to resume",
            what,
        )
        stop.set()
        wind_down()

    installed = []
    for sig in _STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
        except (RuntimeError, ValueError, NotImplementedError):  # not the main thread, or no signals here
            break
    try:
        yield received
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
            if previous[sig] is not None:  # the handler the caller had (asyncio would leave the default)
                signal.signal(sig, previous[sig])


@dataclass
class _Plan:
    """What a run works on, built once before its first episode: the suite, the tasks, what is on disk, the agents."""

    suite: EnvSuite
    executor: ThreadPoolExecutor
    path: Path
    all_tasks: list[Task]
    tasks: list[Task]
    fingerprint: str
    ledger: _Ledger
    by_task: dict[str, dict[int, RecordEntry]]
    actor: Actor
    refl: Reflector | None
    #: Whether the actor / reflector count usage per call themselves (our own agents); given ones count per episode.
    metered: tuple[bool, bool]


def _plan_run(
    cfg: TrialsConfig,
    cleanup: contextlib.ExitStack,
    api_keys: dict[str, str | None],
    actor: Actor | None,
    reflector: Reflector | None | Literal["auto"],
) -> _Plan:
    """Check the run directory and the config against it, build the suite, index what is recorded, save the config and
    the task list, build the agents. Everything that must fail does so here, before any episode."""
    out, shard = run_dir(cfg), cfg.shard_spec
    check_model_paths(
        cfg, tuple(r for r, given in (("actor", actor), ("reflector", reflector)) if given in (None, "auto"))
    )
    _check_shard_layout(out, shard)
    check_resume_config(cfg, config_path(out))
    path = records_path(out, shard)
    suite = build_suite(cfg)
    cleanup.callback(suite.close)
    # Environment calls and record writes get threads of their own, as many as episodes run at once (asyncio's
    # default pool holds only min(32, cpus + 4) threads).
    executor = ThreadPoolExecutor(max_workers=cfg.concurrency + 2, thread_name_prefix="trials")
    cleanup.callback(executor.shutdown, wait=False, cancel_futures=True)
    all_tasks = select_tasks(cfg, suite)
    # The fingerprint of the whole task list: every shard records the same one, so their records merge.
    fingerprint = suite.fingerprint(all_tasks)
    tasks = all_tasks if shard is None else [t for t in all_tasks if shard_of(t.task_id, shard[1]) == shard[0]]
    ledger = _Ledger(cfg.budget)
    # A shard also reads (never writes) the run's unsharded file: a run started whole may go on in shards.
    sources = [(records_path(out), False)] if shard is not None else []
    by_task = _resume_index([*sources, (path, True)], fingerprint, cfg.run_name, {t.task_id for t in tasks}, ledger)
    with exclusive_lock(config_lock_path(out)):  # shards starting together: one checks and writes at a time
        check_resume_config(cfg, config_path(out))
        save_config(dataclasses.replace(cfg, shard=None), config_path(out))
    write_task_ids(out, [t.task_id for t in all_tasks])
    # Our own agents count usage per call and check the budget before each call; given ones count per episode.
    metered = (actor is None, reflector == "auto")
    actor = actor if actor is not None else build_actor(cfg, suite, api_key=api_keys.get("actor"), meter=ledger)
    refl = build_reflector(cfg, api_key=api_keys.get("reflector"), meter=ledger) if reflector == "auto" else reflector
    check_prices(cfg, actor, refl)
    return _Plan(suite, executor, path, all_tasks, tasks, fingerprint, ledger, by_task, actor, refl, metered)


class _TrialLoop:
    """The episodes of one run: each task's trials in order (:meth:`run_task`), tasks side by side up to
    ``cfg.concurrency``. :meth:`attempt` runs one episode and its reflection, :meth:`add_reflection` writes a missing
    one, :meth:`save` counts and records what either produced. ``stop`` is set by a budget, the circuit breaker, a
    failed write or a signal: no episode starts after it, those in flight end and are saved."""

    def __init__(self, cfg: TrialsConfig, plan: _Plan, progress: bool) -> None:
        self.cfg = cfg
        self.plan = plan
        self.suite, self.actor, self.refl, self.ledger = plan.suite, plan.actor, plan.refl, plan.ledger
        self.reflector_id = plan.refl.reflector_id if plan.refl is not None else "none"
        self.stop = asyncio.Event()
        self.breaker = _Breaker(cfg.max_consecutive_errors, cfg.outage_wait_s, self.stop)
        if self.ledger.exceeded():
            self.stop.set()
        self.sem = asyncio.Semaphore(cfg.concurrency)
        self.writer = RecordWriter(plan.path)
        self.commit = GroupCommit(self.writer, plan.executor)
        self.new_episodes = 0
        self.storage_errors: list[StorageError] = []
        #: Records of this run whose reflector failed: the whole record, for a pass after an outage to reflect on.
        self.unreflected: dict[tuple[str, int], EpisodeRecord] = {}
        #: The signal that stopped the run, once one did (see :func:`_stop_on_signals`).
        self.signalled: list[str] = []
        self.bar = self._progress_bar() if progress else None

    def _progress_bar(self):
        from tqdm.auto import tqdm

        cfg, shard = self.cfg, self.cfg.shard_spec
        todo = 0
        for t in self.plan.tasks:
            done = self.plan.by_task.get(t.task_id, {})
            if any(r.success for r in done.values()) and cfg.stop_on_success:
                continue
            todo += sum(1 for i in range(cfg.trials) if _needs_run(done.get(i)))
        where = cfg.run_name if shard is None else f"{cfg.run_name} shard {shard[0]}/{shard[1]}"
        return tqdm(total=todo, desc=f"trials {where}", unit="episode", leave=False)

    async def run(self) -> str | None:
        """Run every task; returns the name of the signal that stopped the run, None if none did."""
        loop = asyncio.get_running_loop()
        try:
            with _stop_on_signals(loop, self.stop, self._wind_down) as self.signalled:
                await self._run_passes()
        finally:
            self.breaker.close()
            self.writer.close()
            if self.bar is not None:
                self.bar.close()
            for llm_owner in (getattr(self.actor, "llm", None), getattr(self.refl, "llm", None)):
                if llm_owner is not None:
                    await llm_owner.aclose()
        if self.storage_errors:
            raise self.storage_errors[0]
        return self.signalled[0] if self.signalled else None

    async def _run_passes(self) -> None:
        """Every task; then, as long as an outage was ridden out in the pass before, the tasks whose attempts failed
        during it (they stopped at their failed trial, as a rerun would)."""
        tasks = self.plan.tasks
        while tasks:
            recoveries = self.breaker.recoveries
            await asyncio.gather(*(self.run_task(t) for t in tasks))
            if self.stop.is_set() or (self.breaker.recoveries == recoveries and not self.breaker.is_open):
                return
            cfg, has_reflector = self.cfg, self.refl is not None
            by_task = self.plan.by_task
            tasks = [
                t
                for t in self.plan.tasks
                if _has_work(by_task.get(t.task_id, {}), cfg.trials, cfg.stop_on_success, has_reflector)
            ]
            logger.info("re-attempting %d tasks whose attempts failed during an outage", len(tasks))

    def _wind_down(self) -> None:
        for llm in (getattr(self.actor, "llm", None), getattr(self.refl, "llm", None)):
            wind_down = getattr(llm, "wind_down", None)
            if wind_down is not None:
                wind_down()

    async def run_task(self, task: Task) -> None:
        done = self.plan.by_task.get(task.task_id, {})
        reflections: list[str] = []
        for trial in range(self.cfg.trials):
            if self.stop.is_set():
                return
            rec = done.get(trial)
            if _needs_run(rec):
                rec = await self.attempt(task, trial, reflections)
            elif _needs_reflection(done, rec, self.cfg.trials, self.refl is not None):
                rec = await self.add_reflection(task, rec, reflections)
            if rec is None or rec.errored:
                return  # stopped, or failed: a rerun re-attempts it
            if rec.reflection_text is not None:
                reflections.append(rec.reflection_text)
            if self.cfg.stop_on_success and rec.success:
                return

    async def attempt(self, task: Task, trial: int, reflections: list[str]) -> RecordEntry | None:
        """Trial ``trial`` of ``task``: one episode, then its reflection when it failed and trials remain."""
        cfg = self.cfg
        memory = memory_window(reflections, cfg.memory_size)
        async with self.sem:
            # Admitted within the slot: during an outage the tasks holding slots wait here, and the probe is one of them.
            admitted = await self.breaker.admit()
            if admitted is None:
                return None
            t0 = time.perf_counter()
            result = await run_new_episode(
                self.suite, self.actor, task, memory, executor=self.plan.executor, trial=trial
            )
            reflection: Reflection | None = None
            error = result.error
            failed = result.end_reason not in ERRORED_END_REASONS and not result.outcome.success
            if self.refl is not None and failed and trial + 1 < cfg.trials:
                reflection, error = await self.reflect(
                    task, result.description, result.steps, result.outcome, reflections
                )
        record = EpisodeRecord(
            run_name=cfg.run_name,
            task_id=task.task_id,
            trial=trial,
            env_name=cfg.env.name,
            env_version=self.suite.version,
            seed=cfg.seed,
            actor_id=self.actor.actor_id,
            reflector_id=self.reflector_id,
            actor_prompt_hash=self.actor.prompt_hash,
            memory=memory,
            steps=result.steps,
            return_=result.outcome.return_,
            success=result.outcome.success,
            end_reason=result.end_reason,
            metrics=dict(result.outcome.metrics),
            num_invalid_actions=result.num_invalid_actions,
            reflection=reflection,
            actor_usage=result.usage,
            error=_capped(error),
            task_fingerprint=self.plan.fingerprint,
            wall_time_s=round(time.perf_counter() - t0, 4),
            created_at=_now(),
        )
        entry = await self.save(record, probe=admitted == "probe")
        if self.bar is not None and entry is not None:
            self.bar.update(1)
        return entry

    async def reflect(
        self, task: Task, description, steps, outcome, reflections
    ) -> tuple[Reflection | None, str | None]:
        """The reflection on a failed attempt, or None and why not. The episode itself is valid either way; without
        its reflection the task waits for a rerun, which writes it."""
        assert self.refl is not None
        try:
            prompts = prompts_for(self.suite, task)
            return await self.refl.reflect(prompts, description, steps, outcome, reflections), None
        except LLMError as exc:
            logger.warning("task %s: reflector failed: %s", task.task_id, exc)
            return None, f"reflector: {exc}"
        except BudgetExceeded as exc:
            return None, f"reflection not written: {exc}"

    async def add_reflection(self, task: Task, entry: RecordEntry, reflections: list[str]) -> RecordEntry | None:
        """Write the reflection ``entry`` lacks, as a line that replaces it (its actor tokens were counted already)."""
        loop, executor = asyncio.get_running_loop(), self.plan.executor
        async with self.sem:
            admitted = await self.breaker.admit()
            if admitted is None:
                return None
            t0 = time.perf_counter()
            # The whole record (its steps) is read back from its line only here: resume keeps an index. A record of
            # this run that lacks its reflection (its reflector failed in an outage) is still in memory.
            rec = self.unreflected.pop((task.task_id, entry.trial), None)
            if rec is None:
                rec = await loop.run_in_executor(executor, read_record_at, entry.path, entry.offset)
            try:
                description = await loop.run_in_executor(executor, _description_of, self.suite, task)
            except (EnvError, OSError) as exc:
                reflection, error = None, f"reflector: the environment failed to give the task description: {exc}"
            else:
                outcome = Outcome(rec.return_, rec.success, dict(rec.metrics))
                reflection, error = await self.reflect(task, description, rec.steps, outcome, reflections)
        record = dataclasses.replace(
            rec,
            reflection=reflection,
            reflector_id=self.reflector_id,
            error=None if reflection is not None else _capped(error),
            actor_usage=Usage(),
            wall_time_s=round(time.perf_counter() - t0, 4),
            created_at=_now(),
        )
        return await self.save(record, probe=admitted == "probe")

    async def save(self, record: EpisodeRecord, probe: bool = False) -> RecordEntry | None:
        """Count ``record`` (budget, breaker; ``probe``: the episode let through during an outage) and append it to
        the records file; None when it could not be saved."""
        metered = self.plan.metered
        # Count first (no await in between), so that a waiting episode already sees a stop this record causes.
        self.new_episodes += 1
        if not metered[0]:
            self.ledger.add("actor", self.actor.actor_id, record.actor_usage)
        if not metered[1] and record.reflection is not None:
            self.ledger.add("reflector", record.reflection.reflector_id, record.reflection.usage)
        if not self.signalled:  # calls cut short by a stop are not an outage
            self.breaker.observe(record, probe)
        if self.ledger.exceeded():
            self.stop.set()
        # On disk before the episode counts as done; fsync takes milliseconds, so it is done off the event loop and
        # shared by the records that arrive meanwhile.
        try:
            await self.commit.save(record)
        except StorageError as exc:
            # Records cannot be saved (a full disk): start no more episodes, whose calls would be paid for and lost;
            # those in flight end, and the run then fails with this error. A rerun resumes.
            self.new_episodes -= 1
            self.storage_errors.append(exc)
            self.stop.set()
            return None
        entry = RecordEntry.of(record, keep_text=True)  # the loop keeps only this much of it
        self.plan.by_task.setdefault(record.task_id, {})[record.trial] = entry  # for a pass after an outage
        if _failed(record) and record.end_reason not in ERRORED_END_REASONS:
            self.unreflected[(record.task_id, record.trial)] = record  # its reflection may be written in that pass
        return entry


#: Most characters of an error kept in a record: what failed and why is at the start; a server's megabyte of error
#: text is not worth storing per attempt.
MAX_ERROR_CHARS = 4096


def _capped(error: str | None) -> str | None:
    if error is None or len(error) <= MAX_ERROR_CHARS:
        return error
    return f"{error[:MAX_ERROR_CHARS]}... ({len(error) - MAX_ERROR_CHARS} more characters not kept)"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _finish(cfg: TrialsConfig, plan: _Plan, loop: _TrialLoop, signal_name: str | None, start: float) -> TrialsResult:
    """The run's result: its summary, streamed from disk; the dataset exported (or the shards merged) unless a signal
    stopped it (the rerun that finishes the run exports it)."""
    out, shard = run_dir(cfg), cfg.shard_spec
    stopped_by_budget = loop.stop.is_set() and loop.breaker.message is None and signal_name is None
    result = TrialsResult(out, plan.path, loop.new_episodes, time.perf_counter() - start, shard, stopped_by_budget)
    result.stopped_by_errors = loop.breaker.message
    result.stopped_by_signal = signal_name
    # Streamed from disk: what was there plus what this run appended, indexed once for the summary and the export.
    entries, lines = effective_entries(result.iter_entries())
    result.summary = summarize_entries(entries, lines, cfg.trials, num_tasks=len(plan.tasks))
    result.summary["cost"] = plan.ledger.summary()
    result.summary["stopped_by_budget"] = stopped_by_budget
    result.summary["stopped_by_errors"] = loop.breaker.message
    result.summary["stopped_by_signal"] = signal_name
    if signal_name is not None:
        return result
    if cfg.export_dataset and shard is None:
        result.dataset_path = export_rated_reflections([plan.path], dataset_path(out), index=entries)
    elif cfg.export_dataset and not loop.stop.is_set():
        merged = merge_run(
            out,
            trials=cfg.trials,
            stop_on_success=cfg.stop_on_success,
            has_reflector=plan.refl is not None,
            task_ids=[t.task_id for t in plan.all_tasks],
            only_if_complete=True,
        )
        if merged is not None:
            result.merged = merged
            result.dataset_path = merged.dataset_path
    return result


async def run_trials_async(
    cfg: TrialsConfig,
    api_keys: dict[str, str | None] | None = None,
    actor: Actor | None = None,
    reflector: Reflector | None | Literal["auto"] = "auto",
    progress: bool = True,
) -> TrialsResult:
    """Run (or resume) the trials of ``cfg``.

    ``api_keys`` maps a role (``actor``, ``reflector``) to the key of its OpenAI-compatible server; each role gets only
    its own key. ``actor``/``reflector`` override the configured ones (tests, custom agents).

    Resuming runs, for each task, every trial that has no record or whose record errored (the errored line stays as
    history), and writes a reflection that a later trial needs but that is missing (reflector failure, or ``trials``
    raised). Only one run at a time may use a run directory (:class:`~retroformer.records.RunLock`).
    """
    start = time.perf_counter()
    # The lock first: a run that is refused must be refused at once, before any other work.
    with RunLock(run_dir(cfg), cfg.shard_spec), contextlib.ExitStack() as cleanup:
        plan = _plan_run(cfg, cleanup, api_keys or {}, actor, reflector)
        loop = _TrialLoop(cfg, plan, progress)
        signal_name = await loop.run()
        return _finish(cfg, plan, loop, signal_name, start)


def merge_run(
    run: str | Path,
    trials: int | None = None,
    stop_on_success: bool | None = None,
    has_reflector: bool | None = None,
    task_ids: list[str] | None = None,
    only_if_complete: bool = False,
) -> MergeResult | None:
    """Merge every records file of a run (its shards, and the unsharded file): the rated-reflection dataset
    (``datasets/rated_reflections``, as an unsharded run exports it) and ``trials/summary.json``, each task once.

    ``trials``, ``stop_on_success``, ``has_reflector`` and ``task_ids`` default to the run's saved config and task
    list. With ``only_if_complete`` (a shard that has finished) nothing is merged, and None returned, while a task still
    has work left, or when the same files were merged already (two shards finishing together). Merges take a lock
    of their own, so two never write at once; shards may keep running meanwhile (their partial last lines are skipped).
    """
    run = Path(run)
    saved = read_yaml(config_path(run)) if config_path(run).is_file() else {}
    trials = trials if trials is not None else int(saved.get("trials") or 0) or None
    stop_on_success = stop_on_success if stop_on_success is not None else bool(saved.get("stop_on_success", True))
    if has_reflector is None:
        has_reflector = (saved.get("reflector") or {}).get("kind", "llm") != "none"
    task_ids = task_ids if task_ids is not None else read_task_ids(run)
    with exclusive_lock(merge_lock_path(run)):
        files = record_files(run)
        if not files:
            raise DataError(
                f"{run} has no records ({records_path(run).name} or episodes.shard-I-of-N.jsonl in trials/); pass a "
                "run directory written by `retroformer trials`"
            )
        entries, lines = index_records(files)
        done: dict[str, dict[int, RecordEntry]] = defaultdict(dict)
        for e in entries:
            done[e.task_id][e.trial] = e
        ids = task_ids if task_ids is not None else sorted(done)
        n_trials = trials if trials is not None else max((e.trial for e in entries), default=-1) + 1
        remaining = sum(1 for t in ids if _has_work(done.get(t, {}), n_trials, stop_on_success, has_reflector))
        sizes = {p.name: p.stat().st_size for p in files}
        if only_if_complete:
            if remaining:
                logger.info(
                    "%d tasks of %s have work left in other shards; their last shard merges the run", remaining, run
                )
                return None
            previous = json.loads(summary_path(run).read_text()) if summary_path(run).is_file() else {}
            merged_before = previous.get("record_files") == sizes and previous.get("remaining_tasks") == 0
            if merged_before and dataset_path(run).is_dir():
                return None  # another shard merged these very files a moment ago
        elif remaining:
            logger.warning(
                "%s: %d of %d tasks still have work left (a shard not run, stopped or still running); merging what "
                "is recorded. Run the missing shards, then merge again",
                run,
                remaining,
                len(ids),
            )
        summary = summarize_entries(entries, lines, trials, num_tasks=len(ids))
        exported = export_rated_reflections(files, dataset_path(run), index=entries)
        write_atomic(
            summary_path(run),
            json.dumps({**summary, "remaining_tasks": remaining, "record_files": sizes}, indent=2) + "\n",
        )
    logger.info("merged %s: %d files, %d episodes, %d tasks left", run, len(files), len(entries), remaining)
    return MergeResult(run, summary, remaining, exported, sizes)


def _description_of(suite: EnvSuite, task: Task) -> str:
    """The task description an episode started from (reset of a fresh env), for a reflection written later."""
    env = suite.make()
    try:
        return env.reset(task)
    finally:
        env.close()


def check_prices(cfg: TrialsConfig, actor: Actor, refl: Reflector | None) -> None:
    """With ``budget.max_usd`` set, every remote model must have a price, or the budget could never stop the run."""
    if cfg.budget.max_usd is None:
        return
    prices = cfg.budget.price_table()
    for role, llm in (("actor", getattr(actor, "llm", None)), ("reflector", getattr(refl, "llm", None))):
        if llm is None:
            continue
        model_id = llm.model_id
        if not is_local_model(model_id) and price_for(model_id, prices) is None:
            raise ConfigError(
                f"budget.max_usd is set but the {role} model {model_id!r} has no price, so its cost would count as $0 "
                f"and the budget would never stop the run; add it to budget.prices "
                f"(e.g. {{{model_id.split('@')[0]}: {{prompt_per_m: 0.15, completion_per_m: 0.6}}}}) or use "
                "budget.max_tokens"
            )


def run_trials(cfg: TrialsConfig, **kwargs) -> TrialsResult:
    """Synchronous wrapper of :func:`run_trials_async`."""
    return asyncio.run(run_trials_async(cfg, **kwargs))
