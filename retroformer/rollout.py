"""One episode of an actor in an environment, and the online scorer of reflections used by ``ppo_run.py``.

Every way an episode can end is named in :data:`retroformer.types.END_REASONS`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retroformer.agents.actor import FORMAT_ERROR, ActContext, Actor
from retroformer.agents.memory import memory_window
from retroformer.builders import build_actor, build_suite, load_run_spec
from retroformer.envs.base import EnvPrompts, EnvSuite, Outcome, Task, TextEnv
from retroformer.errors import BudgetExceeded, DataError, EnvError, LLMError
from retroformer.records import iter_run_records
from retroformer.types import ERRORED_END_REASONS, Step, Usage

logger = logging.getLogger(__name__)


@dataclass
class EpisodeResult:
    description: str
    steps: list[Step]
    outcome: Outcome
    end_reason: str
    num_invalid_actions: int = 0
    usage: Usage = field(default_factory=Usage)
    error: str | None = None


def prompts_for(suite: EnvSuite, task: Task) -> EnvPrompts:
    """The suite's prompts for ``task`` (per-task-type prompts where the suite defines ``prompts_for``)."""
    fn = getattr(suite, "prompts_for", None)
    return fn(task) if callable(fn) else suite.prompts


#: What an environment may raise when it fails (a server that stayed down, a broken pipe); anything else is a bug.
ENV_FAILURES = (EnvError, OSError)


async def _env_call(suite: EnvSuite, executor: Executor | None, fn, *args):
    """``fn(*args)`` in a worker thread of ``executor``, or at once on the event loop for a suite whose calls do not
    block (:attr:`EnvSuite.blocking` is False): a thread hop costs more CPU than an in-memory step."""
    if not suite.blocking:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args))


async def run_episode(
    suite: EnvSuite,
    env: TextEnv,
    actor: Actor,
    task: Task,
    memory: list[str],
    max_steps: int | None = None,
    executor: Executor | None = None,
    trial: int = 0,
) -> EpisodeResult:
    """Run ``actor`` on ``task`` until the env says done or the step budget runs out.

    Environment calls run in worker threads of ``executor`` (None: asyncio's default pool, which holds only
    ``min(32, cpus + 4)`` threads) so that slow environments (HTTP, planners) do not block other episodes; those of a
    suite that declares them non-blocking (in-memory ones) run directly. An LLM
    failure after its retries ends the episode as ``llm_error``, an environment failure in ``reset``, ``step`` or
    ``outcome`` as ``env_error``, a spent budget as ``budget`` (all errored: no success, no rating; a rerun
    re-attempts them).
    """
    prompts = prompts_for(suite, task)
    try:
        description = await _env_call(suite, executor, env.reset, task)
    except ENV_FAILURES as exc:
        logger.warning("task %s: environment reset failed: %s", task.task_id, exc)
        return EpisodeResult("", [], Outcome(0.0, False), "env_error", error=f"reset: {exc}")
    ctx = ActContext(task=task, description=description, memory=list(memory), prompts=prompts, trial=trial)
    usage = Usage()
    invalid = 0
    end_reason: str | None = None
    for _ in range(max_steps or suite.max_steps):
        try:
            thought, action, step_usage = await actor.act(ctx)
        except LLMError as exc:
            logger.warning("task %s: actor LLM failed: %s", task.task_id, exc)
            return EpisodeResult(description, ctx.steps, Outcome(0.0, False), "llm_error", invalid, usage, str(exc))
        except BudgetExceeded as exc:
            return EpisodeResult(description, ctx.steps, Outcome(0.0, False), "budget", invalid, usage, str(exc))
        usage.add(step_usage)
        if action is None:
            invalid += 1
            ctx.steps.append(Step(thought=thought, action="", observation=FORMAT_ERROR, valid=False))
            continue
        try:
            result = await _env_call(suite, executor, env.step, action)
        except ENV_FAILURES as exc:
            logger.warning("task %s: environment failed: %s", task.task_id, exc)
            ctx.steps.append(Step(thought, action, f"[environment error: {exc}]", 0.0, False))
            return EpisodeResult(description, ctx.steps, Outcome(0.0, False), "env_error", invalid, usage, str(exc))
        valid = not result.info.get("invalid", False)
        invalid += 0 if valid else 1
        ctx.steps.append(Step(thought, action, result.observation, float(result.reward), valid))
        if result.done:
            end_reason = result.info.get("end_reason")
            break
    else:
        end_reason = "step_limit"
    try:
        outcome = await _env_call(suite, executor, env.outcome)
    except ENV_FAILURES as exc:
        logger.warning("task %s: environment outcome failed: %s", task.task_id, exc)
        return EpisodeResult(
            description, ctx.steps, Outcome(0.0, False), "env_error", invalid, usage, f"outcome: {exc}"
        )
    if outcome.success:
        end_reason = "success"
    elif end_reason is None:
        end_reason = "done"
    return EpisodeResult(description, ctx.steps, outcome, end_reason, invalid, usage)


async def run_new_episode(
    suite: EnvSuite,
    actor: Actor,
    task: Task,
    memory: list[str],
    executor: Executor | None = None,
    trial: int = 0,
) -> EpisodeResult:
    """:func:`run_episode` in a new environment from ``suite.make()``, closed afterwards; an environment that cannot
    be made ends the episode as ``env_error``, one that fails to close is logged."""
    try:
        env = await _env_call(suite, executor, suite.make)
    except ENV_FAILURES as exc:
        logger.warning("task %s: making the environment failed: %s", task.task_id, exc)
        return EpisodeResult("", [], Outcome(0.0, False), "env_error", error=f"make: {exc}")
    try:
        return await run_episode(suite, env, actor, task, memory, executor=executor, trial=trial)
    finally:
        try:
            await _env_call(suite, executor, env.close)
        except ENV_FAILURES as exc:
            logger.warning("task %s: closing the environment failed: %s", task.task_id, exc)


class OnlineReflectionScorer:
    """Scores reflections by running the next attempt (paper eq. for the rating: ``G[k,i+1] - G[k,i]``).

    Built from a trials run directory: the resolved trial config gives the environment and the actor; the records
    give each task's earlier reflections. ``score(rows, reflections)`` runs, for each rated-dataset row, the actor's
    next attempt with the new reflection appended to the memory, and returns the return difference.
    """

    def __init__(self, suite: EnvSuite, actor: Actor, memory_size: int, records: Iterable[Any], concurrency: int = 8):
        self.suite = suite
        self.actor = actor
        self.memory_size = memory_size
        self.tasks = {t.task_id: t for t in suite.tasks()}
        self.concurrency = concurrency
        # Each task's reflections in trial order, indexed once: score() is called on every PPO iteration.
        self._reflections: dict[str, list[tuple[int, str]]] = {}
        for r in records:  # may be a stream: only the reflections are kept
            if r.reflection is not None:
                self._reflections.setdefault(r.task_id, []).append((r.trial, r.reflection.text))
        for texts in self._reflections.values():
            texts.sort(key=lambda x: x[0])

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, api_key: str | None = None) -> OnlineReflectionScorer:
        spec = load_run_spec(run_dir)
        suite = build_suite(spec)
        actor = build_actor(spec, suite, api_key=api_key)
        return cls(suite, actor, spec.memory_size, iter_run_records(run_dir), spec.concurrency)

    async def aclose(self) -> None:
        """Close the actor's model client (an in-process model's micro-batcher, an HTTP connection pool)."""
        llm = getattr(self.actor, "llm", None)
        if llm is not None:
            await llm.aclose()

    def _earlier(self, task_id: str, trial: int) -> list[str]:
        return [text for t, text in self._reflections.get(task_id, []) if t < trial]

    async def score(self, rows: list[dict[str, Any]], reflections: list[str]) -> list[float]:
        if len(rows) != len(reflections):
            raise ValueError(f"score() got {len(rows)} rows and {len(reflections)} reflections; expected equal")
        sem = asyncio.Semaphore(self.concurrency)

        async def one(row: dict[str, Any], reflection: str) -> float:
            task = self.tasks.get(row["task_id"])
            if task is None:
                raise DataError(f"task {row['task_id']!r} is not in the run's task list; was the run changed?")
            memory = memory_window([*self._earlier(task.task_id, int(row["trial"])), reflection], self.memory_size)
            async with sem:
                result = await run_new_episode(self.suite, self.actor, task, memory, trial=int(row["trial"]) + 1)
            if result.end_reason in ERRORED_END_REASONS:
                return 0.0  # an errored attempt carries no signal about the reflection
            return result.outcome.return_ - float(row["return_before"])

        return list(await asyncio.gather(*(one(r, y) for r, y in zip(rows, reflections, strict=True))))
