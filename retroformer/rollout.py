"""One episode of an actor in an environment, and the online scorer of reflections used by ``ppo_run.py``.

Every way an episode can end is named in :data:`retroformer.types.END_REASONS`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retroformer.agents.actor import FORMAT_ERROR, ActContext, Actor
from retroformer.agents.memory import memory_window
from retroformer.envs.base import EnvPrompts, EnvSuite, Outcome, Task, TextEnv
from retroformer.errors import DataError, EnvError, LLMError
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


async def run_episode(
    suite: EnvSuite,
    env: TextEnv,
    actor: Actor,
    task: Task,
    memory: list[str],
    max_steps: int | None = None,
    trial: int = 0,
) -> EpisodeResult:
    """Run ``actor`` on ``task`` until the env says done or the step budget runs out.

    Environment calls run in a worker thread so that slow environments (HTTP, planners) do not block other
    episodes. An LLM failure after its retries ends the episode as ``llm_error`` (errored: no success, no rating).
    """
    prompts = prompts_for(suite, task)
    description = await asyncio.to_thread(env.reset, task)
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
        usage.add(step_usage)
        if action is None:
            invalid += 1
            ctx.steps.append(Step(thought=thought, action="", observation=FORMAT_ERROR, valid=False))
            continue
        try:
            result = await asyncio.to_thread(env.step, action)
        except EnvError as exc:
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
    outcome = await asyncio.to_thread(env.outcome)
    if outcome.success:
        end_reason = "success"
    elif end_reason is None:
        end_reason = "done"
    return EpisodeResult(description, ctx.steps, outcome, end_reason, invalid, usage)


class OnlineReflectionScorer:
    """Scores reflections by running the next attempt (paper eq. for the rating: ``G[k,i+1] - G[k,i]``).

    Built from a trials run directory: the resolved trial config gives the environment and the actor; the records
    give each task's earlier reflections. ``score(rows, reflections)`` runs, for each rated-dataset row, the actor's
    next attempt with the new reflection appended to the memory, and returns the return difference.
    """

    def __init__(self, suite: EnvSuite, actor: Actor, memory_size: int, records: list[Any], concurrency: int = 8):
        self.suite = suite
        self.actor = actor
        self.memory_size = memory_size
        self.tasks = {t.task_id: t for t in suite.tasks()}
        self.concurrency = concurrency
        # Each task's reflections in trial order, indexed once: score() is called on every PPO iteration.
        self._reflections: dict[str, list[tuple[int, str]]] = {}
        for r in sorted(records, key=lambda r: r.trial):
            if r.reflection is not None:
                self._reflections.setdefault(r.task_id, []).append((r.trial, r.reflection.text))

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, api_key: str | None = None) -> OnlineReflectionScorer:
        from retroformer.config import from_dict, read_yaml
        from retroformer.records import read_records
        from retroformer.trials import TrialsConfig, build_actor, build_suite, config_path, records_path

        run_dir = Path(run_dir)
        if not config_path(run_dir).is_file():
            raise DataError(
                f"{run_dir} is not a trials run directory (no {config_path(run_dir).relative_to(run_dir)}); "
                "pass the directory that `retroformer trials` wrote (runs/<run_name>)"
            )
        cfg = from_dict(TrialsConfig, read_yaml(config_path(run_dir)))
        suite = build_suite(cfg)
        actor = build_actor(cfg, suite, api_key=api_key)
        return cls(suite, actor, cfg.memory_size, read_records(records_path(run_dir)), cfg.concurrency)

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
                env = await asyncio.to_thread(self.suite.make)
                try:
                    result = await run_episode(self.suite, env, self.actor, task, memory, trial=int(row["trial"]) + 1)
                finally:
                    await asyncio.to_thread(env.close)
            if result.end_reason in ERRORED_END_REASONS:
                return 0.0  # an errored attempt carries no signal about the reflection
            return result.outcome.return_ - float(row["return_before"])

        return list(await asyncio.gather(*(one(r, y) for r, y in zip(rows, reflections, strict=True))))
