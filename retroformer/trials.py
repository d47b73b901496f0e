"""The trial loop: N tasks x T trials, reflections between failed attempts, every episode recorded, resumable.

    retroformer trials --config experiments/demo/trials.yaml

For task ``k`` and trial ``i`` (paper section 4): the actor runs one episode with the last ``m`` reflections in its
prompt; if it failed and trials remain, the retrospective model writes a reflection, which joins the memory. Episodes
of different tasks run concurrently (asyncio, bounded); trials of one task run in order. Each finished episode is
appended to ``<runs_dir>/<run_name>/trials/episodes.jsonl`` and flushed, so a killed run loses at most the episodes
in flight; running the same command again resumes and never records a (task, trial) twice. At the end the rated
reflections are exported as a Hugging Face dataset (``datasets/rated_reflections``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from retroformer.agents.actor import Actor, ReActActor
from retroformer.agents.memory import memory_window
from retroformer.agents.reflector import Reflector
from retroformer.config import doc, save_config
from retroformer.envs.base import EnvSuite, Task, make_suite
from retroformer.errors import BudgetExceeded, ConfigError, DataError, LLMError
from retroformer.llm import LLMConfig, build_llm
from retroformer.records import RecordWriter, config_path, dataset_path, read_records, records_path
from retroformer.rollout import prompts_for, run_episode
from retroformer.types import ERRORED_END_REASONS, EpisodeRecord, Reflection, Usage

logger = logging.getLogger(__name__)


@dataclass
class EnvSection:
    name: str = doc("registered environment: synthetic, textworld, hotpotqa, alfworld, webshop", "synthetic")
    options: dict = doc(
        "the environment's own options (its Config fields; unknown keys are rejected)", default_factory=dict
    )
    max_tasks: int | None = doc("use only the first N tasks of the environment's list", None)


@dataclass
class ActorSection:
    kind: Literal["react", "plan"] = doc(
        "react: an LLM with a ReAct prompt; plan: the synthetic env's plan-following actor (no LLM)",
        "react",
    )
    llm: LLMConfig = doc("the actor's LLM (ignored for kind=plan)", default_factory=LLMConfig)
    retry: Literal["first", "random"] = doc(
        "kind=plan: the door it opens on a retry whose memory names none. first: its first guess again "
        "(deterministic); random: a fresh uniform draw among the other doors, like a sampling LLM actor that a "
        "useless reflection sometimes leaves lucky",
        "first",
    )
    max_observation_chars: int = doc("observations longer than this are truncated in the actor's prompt", 1500)
    max_prompt_chars: int = doc("oldest scratchpad steps are dropped beyond this prompt length", 24000)


@dataclass
class ReflectorSection:
    kind: Literal["llm", "none"] = doc(
        "llm: write reflections with `llm`; none: no reflections (ReAct baseline)", "llm"
    )
    llm: LLMConfig = doc(
        "the retrospective model (base + optional LoRA adapter, or a server); completion style by default, the "
        "format sft_run.py trains on",
        default_factory=lambda: LLMConfig(max_tokens=64, style="completion"),
    )
    max_chars: int = doc("reflections are cut to this many characters (at a sentence end where possible)", 600)


@dataclass
class BudgetSection:
    max_tokens: int | None = doc("stop cleanly once this many tokens (all roles) were used; None: no limit", None)
    max_usd: float | None = doc("stop cleanly once this estimated cost in USD is reached; None: no limit", None)


@dataclass
class TrialsConfig:
    """Run tasks x trials with an actor and a retrospective model; record every episode; export rated reflections."""

    run_name: str = doc("name of the run; outputs go to <runs_dir>/<run_name>/", "demo")
    runs_dir: str = doc("parent directory of all runs", "runs")
    seed: int = doc("seed recorded with every episode and passed to sampling backends", 0)
    trials: int = doc("attempts per task (paper: HotPotQA 5, ALFWorld 10-15, WebShop 4)", 3)
    memory_size: int = doc("last m reflections in the actor's prompt (paper: 3)", 3)
    concurrency: int = doc("episodes of different tasks in flight at once", 8)
    stop_on_success: bool = doc("stop a task's trials once it succeeds (Reflexion protocol)", True)
    cache_dir: str | None = doc("on-disk response cache for deterministic LLM calls; None disables it", None)
    export_dataset: bool = doc("export the rated-reflection dataset when the run ends", True)
    env: EnvSection = doc("environment", default_factory=EnvSection)
    actor: ActorSection = doc("actor", default_factory=ActorSection)
    reflector: ReflectorSection = doc("retrospective model", default_factory=ReflectorSection)
    budget: BudgetSection = doc("token / cost budget", default_factory=BudgetSection)

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"trials must be >= 1, got {self.trials}")
        if self.memory_size < 0:
            raise ConfigError(f"memory_size must be >= 0, got {self.memory_size}")
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.actor.kind == "plan" and self.env.name != "synthetic":
            raise ConfigError(
                f"actor.kind=plan works only with env.name=synthetic (got {self.env.name!r}); use actor.kind=react"
            )
        if not self.run_name or "/" in self.run_name or "\\" in self.run_name or self.run_name in (".", ".."):
            raise ConfigError(
                f"run_name must be a plain directory name (not '.' or '..', no '/' or '\\'), got {self.run_name!r}"
            )


def run_dir(cfg: TrialsConfig) -> Path:
    return Path(cfg.runs_dir) / cfg.run_name


def check_model_paths(cfg: TrialsConfig, roles: tuple[str, ...] = ("actor", "reflector")) -> None:
    """Fail before any episode on an in-process model or adapter path that does not exist (hub ids pass)."""
    from retroformer.training.common import check_model_path

    sections = {
        "actor": (cfg.actor, cfg.actor.kind != "plan"),
        "reflector": (cfg.reflector, cfg.reflector.kind != "none"),
    }
    for role in roles:
        section, used = sections[role]
        if used and section.llm.backend == "hf":
            check_model_path(section.llm.model, f"{role}.llm.model")
            if section.llm.adapter:
                check_model_path(section.llm.adapter, f"{role}.llm.adapter")


def build_suite(cfg: TrialsConfig) -> EnvSuite:
    return make_suite(cfg.env.name, cfg.env.options)


def select_tasks(cfg: TrialsConfig, suite: EnvSuite) -> list[Task]:
    tasks = suite.tasks()
    if cfg.env.max_tasks is not None:
        tasks = tasks[: cfg.env.max_tasks]
    ids = [t.task_id for t in tasks]
    if len(set(ids)) != len(ids):
        raise DataError(f"environment {cfg.env.name!r} returned duplicate task ids; task ids must be unique")
    return tasks


def _wrap_cache(llm, cfg: TrialsConfig):
    if cfg.cache_dir is None:
        return llm
    from retroformer.llm.cache import CachedLLM

    return CachedLLM(llm, cfg.cache_dir)


def build_actor(cfg: TrialsConfig, suite: EnvSuite, api_key: str | None = None) -> Actor:
    if cfg.actor.kind == "plan":
        from retroformer.envs.synthetic import PlanFollowingActor

        return PlanFollowingActor(retry=cfg.actor.retry, seed=cfg.seed)
    llm = _wrap_cache(build_llm(cfg.actor.llm, api_key=api_key), cfg)
    return ReActActor(
        llm,
        suite.prompts,
        cfg.actor.llm.sampling(),
        max_observation_chars=cfg.actor.max_observation_chars,
        max_prompt_chars=cfg.actor.max_prompt_chars,
    )


def build_reflector(cfg: TrialsConfig, api_key: str | None = None) -> Reflector | None:
    if cfg.reflector.kind == "none":
        return None
    llm = _wrap_cache(build_llm(cfg.reflector.llm, api_key=api_key), cfg)
    return Reflector(llm, cfg.reflector.llm.sampling(), max_chars=cfg.reflector.max_chars)


@dataclass
class TrialsResult:
    run_dir: Path
    records: list[EpisodeRecord]
    new_episodes: int
    wall_time_s: float
    stopped_by_budget: bool = False
    dataset_path: Path | None = None
    summary: dict = field(default_factory=dict)


def _check_resume(existing: list[EpisodeRecord], fingerprint: str, path: Path) -> dict[str, list[EpisodeRecord]]:
    by_task: dict[str, list[EpisodeRecord]] = defaultdict(list)
    seen: set[tuple[str, int]] = set()
    for rec in existing:
        if rec.task_fingerprint != fingerprint:
            raise DataError(
                f"{path} holds episodes of another task list (fingerprint {rec.task_fingerprint}, this run "
                f"{fingerprint}); use a new run_name or restore the original environment options"
            )
        key = (rec.task_id, rec.trial)
        if key in seen:
            raise DataError(f"{path} records task {rec.task_id!r} trial {rec.trial} twice; remove the duplicate line")
        seen.add(key)
        by_task[rec.task_id].append(rec)
    for recs in by_task.values():
        recs.sort(key=lambda r: r.trial)
    return by_task


class _Ledger:
    """Token accounting per (role, model) with an optional budget; uses retroformer.llm.cost where available."""

    def __init__(self, budget: BudgetSection) -> None:
        from retroformer.llm.cost import CostLedger

        self.ledger = CostLedger()
        self.budget = budget

    def add(self, role: str, model_id: str, usage: Usage) -> None:
        self.ledger.add(role, model_id, usage)

    def exceeded(self) -> bool:
        try:
            self.ledger.check(self.budget.max_tokens, self.budget.max_usd)
        except BudgetExceeded as exc:
            logger.warning("%s", exc)
            return True
        return False

    def summary(self) -> dict:
        return self.ledger.summary()


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
    """
    api_keys = api_keys or {}
    check_model_paths(
        cfg, tuple(r for r, given in (("actor", actor), ("reflector", reflector)) if given in (None, "auto"))
    )
    start = time.perf_counter()
    out = run_dir(cfg)
    suite = build_suite(cfg)
    tasks = select_tasks(cfg, suite)
    fingerprint = suite.fingerprint(tasks)
    save_config(cfg, config_path(out))
    path = records_path(out)
    existing = read_records(path)
    by_task = _check_resume(existing, fingerprint, path)
    actor = actor if actor is not None else build_actor(cfg, suite, api_key=api_keys.get("actor"))
    refl = build_reflector(cfg, api_key=api_keys.get("reflector")) if reflector == "auto" else reflector
    reflector_id = refl.reflector_id if refl is not None else "none"
    ledger = _Ledger(cfg.budget)
    for rec in existing:
        ledger.add("actor", rec.actor_id, rec.actor_usage)
        if rec.reflection is not None:
            ledger.add("reflector", rec.reflection.reflector_id, rec.reflection.usage)
    stop = asyncio.Event()
    if ledger.exceeded():
        stop.set()

    todo = sum(_remaining(cfg, by_task.get(t.task_id, [])) for t in tasks)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=todo, desc=f"trials {cfg.run_name}", unit="episode", leave=False)
    sem = asyncio.Semaphore(cfg.concurrency)
    new_records: list[EpisodeRecord] = []
    writer = RecordWriter(path)

    async def run_task(task: Task) -> None:
        done = by_task.get(task.task_id, [])
        reflections = [r.reflection.text for r in done if r.reflection is not None]
        trial = len(done)
        if done and (done[-1].errored or (cfg.stop_on_success and done[-1].success)):
            return
        prompts = prompts_for(suite, task)
        while trial < cfg.trials and not stop.is_set():
            memory = memory_window(reflections, cfg.memory_size)
            async with sem:
                if stop.is_set():
                    return
                t0 = time.perf_counter()
                env = await asyncio.to_thread(suite.make)
                try:
                    result = await run_episode(suite, env, actor, task, memory, trial=trial)
                finally:
                    await asyncio.to_thread(env.close)
                reflection: Reflection | None = None
                error = result.error
                end_reason = result.end_reason
                if refl is not None and end_reason not in ERRORED_END_REASONS and not result.outcome.success:
                    if trial + 1 < cfg.trials:
                        try:
                            reflection = await refl.reflect(
                                prompts, result.description, result.steps, result.outcome, reflections
                            )
                        except LLMError as exc:
                            # The episode itself is valid; the task stops here because no reflection exists.
                            logger.warning("task %s trial %d: reflector failed: %s", task.task_id, trial, exc)
                            error = f"reflector: {exc}"
            record = EpisodeRecord(
                run_name=cfg.run_name,
                task_id=task.task_id,
                trial=trial,
                env_name=cfg.env.name,
                env_version=suite.version,
                seed=cfg.seed,
                actor_id=actor.actor_id,
                reflector_id=reflector_id,
                actor_prompt_hash=actor.prompt_hash,
                memory=memory,
                steps=result.steps,
                return_=result.outcome.return_,
                success=result.outcome.success,
                end_reason=end_reason,
                metrics=dict(result.outcome.metrics),
                num_invalid_actions=result.num_invalid_actions,
                reflection=reflection,
                actor_usage=result.usage,
                error=error,
                task_fingerprint=fingerprint,
                wall_time_s=round(time.perf_counter() - t0, 4),
                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            )
            # fsync takes milliseconds: off the event loop, so that other episodes keep running meanwhile.
            await asyncio.to_thread(writer.append, record)
            new_records.append(record)
            ledger.add("actor", actor.actor_id, result.usage)
            if reflection is not None:
                ledger.add("reflector", reflection.reflector_id, reflection.usage)
                reflections.append(reflection.text)
            if bar is not None:
                bar.update(1)
            if ledger.exceeded():
                stop.set()
            if record.errored or (cfg.stop_on_success and record.success):
                return
            trial += 1

    try:
        await asyncio.gather(*(run_task(t) for t in tasks))
    finally:
        writer.close()
        if bar is not None:
            bar.close()
        suite.close()
        for llm_owner in (getattr(actor, "llm", None), getattr(refl, "llm", None)):
            if llm_owner is not None:
                await llm_owner.aclose()

    records = existing + new_records  # everything on disk now: what was there plus what this run appended
    result = TrialsResult(out, records, len(new_records), time.perf_counter() - start, stop.is_set())
    from retroformer.report import summarize

    result.summary = summarize(records, cfg.trials, num_tasks=len(tasks))
    result.summary["cost"] = ledger.summary()
    result.summary["stopped_by_budget"] = stop.is_set()
    if cfg.export_dataset:
        from retroformer.dataset import export_rated_reflections

        result.dataset_path = export_rated_reflections(records, dataset_path(out))
    return result


def _remaining(cfg: TrialsConfig, done: list[EpisodeRecord]) -> int:
    if done and (done[-1].errored or (cfg.stop_on_success and done[-1].success)):
        return 0
    return max(cfg.trials - len(done), 0)


def run_trials(cfg: TrialsConfig, **kwargs) -> TrialsResult:
    """Synchronous wrapper of :func:`run_trials_async`."""
    return asyncio.run(run_trials_async(cfg, **kwargs))
