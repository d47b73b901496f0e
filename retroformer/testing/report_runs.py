"""Trials run directories written from given outcomes, without running an environment: for the report's tests and its
benchmark (``bench/report_html.py``). Each task's episodes follow the trial loop's protocol: trials stop after a
success, a reflection follows each failure but the last."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from retroformer.config import write_atomic
from retroformer.records import RecordWriter, config_path, records_path, write_task_ids
from retroformer.types import EpisodeRecord, Reflection, Step

FILLER = (
    "You see a cabinet, a drawer, a countertop and a shelf. On the countertop: an apple, a bowl, a knife, a mug, a "
    "plate, a spatula, an egg and a kettle. The drawer is closed. The shelf holds a vase and a book."
)


def episode(
    run_name: str, task_id: str, trial: int, outcome: bool | None, steps: int, obs_chars: int, reflect: bool, rng
) -> EpisodeRecord:
    """One episode: ``outcome`` True (solved), False (failed) or None (an errored episode, as an LLM failure)."""
    text = (FILLER * (1 + obs_chars // len(FILLER)))[:obs_chars]
    door = rng.choice(("maple", "silver", "ebony", "amber", "coral", "ochre"))
    trajectory = [
        Step(
            thought=f"Step {s} of trial {trial} of {task_id}: I look for the {door} door.",
            action=f"open[{door}]" if s == steps - 1 else f"look[{s}]",
            observation=f"{text} ({task_id}, trial {trial}, step {s})",
        )
        for s in range(steps)
    ]
    reflection = None
    if reflect and outcome is False:
        reflection = Reflection(
            prompt=f"Task {task_id}, trial {trial}: reflect.",
            text=f"I opened the wrong door. Next time I will open the {door} door first.",
            reflector_id="scripted",
            prompt_hash="0" * 16,
        )
    return EpisodeRecord(
        run_name=run_name, task_id=task_id, trial=trial, env_name="synthetic", env_version="1", seed=0,
        actor_id="scripted-actor", reflector_id="scripted", actor_prompt_hash="0" * 16, memory=[], steps=trajectory,
        return_=float(bool(outcome)), success=bool(outcome),
        end_reason="llm_error" if outcome is None else ("success" if outcome else "done"),
        error="the actor's LLM call failed" if outcome is None else None, reflection=reflection,
        task_fingerprint="synthetic-report-tasks",
    )  # fmt: skip


def write_run(
    run_dir: str | Path,
    outcomes: Mapping[str, Sequence[bool | None]],
    trials: int,
    task_ids: Sequence[str] | None = None,
    steps: int = 2,
    obs_chars: int = 80,
    reflect: bool = True,
    seed: int = 0,
) -> Path:
    """A run directory holding, for each task, the episodes of ``outcomes[task]`` (one per trial: True solved, False
    failed, None errored), its task list (``task_ids``, default the keys of ``outcomes``) and a config with
    ``trials``. A reflection follows each failure that another trial follows, where ``reflect``."""
    run_dir = Path(run_dir)
    rng = random.Random(seed)
    with RecordWriter(records_path(run_dir)) as writer:
        for task_id, results in outcomes.items():
            batch = []
            for trial, outcome in enumerate(results):
                last = trial + 1 >= trials
                batch.append(
                    episode(run_dir.name, task_id, trial, outcome, steps, obs_chars, reflect and not last, rng)
                )
            writer.append_many(batch)
    write_task_ids(run_dir, list(task_ids if task_ids is not None else outcomes))
    write_atomic(config_path(run_dir), f"trials: {trials}\n")
    return run_dir


def random_outcomes(task_ids: Sequence[str], trials: int, p_success: float, seed: int) -> dict[str, list[bool]]:
    """Outcomes of a condition whose every attempt succeeds with probability ``p_success``, stopping at a success."""
    rng = random.Random(seed)
    outcomes = {}
    for task_id in task_ids:
        results: list[bool] = []
        while len(results) < trials and not (results and results[-1]):
            results.append(rng.random() < p_success)
        outcomes[task_id] = results
    return outcomes
