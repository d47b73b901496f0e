"""Success per trial (cumulative and per attempt), mean rating, cost; tables, a PNG plot and a JSON file.

    retroformer report runs/eval-react runs/eval-reflexion runs/eval-retroformer --out runs/report

Runs are put side by side only if they ran the same task list (same fingerprint).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from retroformer.config import read_yaml
from retroformer.errors import DataError
from retroformer.records import (
    RecordEntry,
    config_path,
    effective_entries,
    index_records,
    read_task_ids,
    record_files,
    records_path,
)
from retroformer.stats import wilson_interval
from retroformer.types import ERRORED_END_REASONS, EpisodeRecord

logger = logging.getLogger(__name__)


def summarize(
    records: Iterable[EpisodeRecord], trials: int | None = None, num_tasks: int | None = None
) -> dict[str, Any]:
    """Success per trial, both ways (DESIGN section 1):

    - ``cumulative[i]``: fraction of tasks solved at some trial <= i (a solved task stays solved; the paper's plots).
    - ``per_attempt[i]``: successes among the episodes run at trial i (errored episodes excluded).
    - ``mean_rating[i]``: mean ``G[i+1] - G[i]`` of the reflections written after trial i.

    Attempts that a later line of the same (task, trial) replaced are history: counted only in ``replaced_attempts``.
    ``records`` may be a stream: each is reduced to a :class:`~retroformer.records.RecordEntry` as it comes.
    """
    entries, lines = effective_entries(RecordEntry.of(r) for r in records)
    return summarize_entries(entries, lines, trials, num_tasks)


def summarize_files(
    files: Sequence[str | Path], trials: int | None = None, num_tasks: int | None = None
) -> dict[str, Any]:
    """:func:`summarize` of records files (read only), streamed; e.g. every file of a sharded run."""
    entries, lines = index_records(files)
    return summarize_entries(entries, lines, trials, num_tasks)


def summarize_entries(
    records: list[RecordEntry], all_lines: int, trials: int | None = None, num_tasks: int | None = None
) -> dict[str, Any]:
    """:func:`summarize` of the effective entries of a run (the last line of each (task, trial)), ``all_lines`` lines
    read in all."""
    tasks = sorted({r.task_id for r in records})
    n_tasks = num_tasks if num_tasks is not None else len(tasks)
    n_trials = trials if trials is not None else (max((r.trial for r in records), default=-1) + 1)
    by_trial: dict[int, list[RecordEntry]] = defaultdict(list)
    for r in records:
        by_trial[r.trial].append(r)
    first_success: dict[str, int] = {}
    for r in sorted(records, key=lambda r: r.trial):
        if r.success and r.task_id not in first_success:
            first_success[r.task_id] = r.trial
    # The ratings of the rated-reflection rows (retroformer.dataset): G[i+1] - G[i] where the next attempt finished.
    by_key = {(r.run_name, r.task_id, r.trial): r for r in records}
    ratings: dict[int, list[float]] = defaultdict(list)
    for r in records:
        nxt = by_key.get((r.run_name, r.task_id, r.trial + 1))
        if r.has_reflection and nxt is not None and nxt.end_reason not in ERRORED_END_REASONS:
            ratings[r.trial].append(float(nxt.return_ - r.return_))
    cumulative, per_attempt, episodes, mean_rating, num_rated = [], [], [], [], []
    for i in range(n_trials):
        ran = [r for r in by_trial.get(i, []) if r.end_reason not in ERRORED_END_REASONS]
        cumulative.append(sum(1 for t in first_success.values() if t <= i) / n_tasks if n_tasks else 0.0)
        per_attempt.append(sum(r.success for r in ran) / len(ran) if ran else None)
        episodes.append(len(ran))
        rs = ratings.get(i, [])
        mean_rating.append(sum(rs) / len(rs) if rs else None)
        num_rated.append(len(rs))
    all_ratings = [x for i in sorted(ratings) for x in ratings[i]]
    end_reasons: dict[str, int] = defaultdict(int)
    for r in records:
        end_reasons[r.end_reason] += 1
    return {
        "num_tasks": n_tasks,
        "num_episodes": len(records),
        "trials": n_trials,
        "cumulative_success": cumulative,
        "per_attempt_success": per_attempt,
        "episodes_per_trial": episodes,
        "mean_rating_after_trial": mean_rating,
        "rated_reflections_per_trial": num_rated,
        "mean_rating": sum(all_ratings) / len(all_ratings) if all_ratings else None,
        "num_rated_reflections": len(all_ratings),
        "positive_ratings": sum(1 for x in all_ratings if x > 0),
        "errored_episodes": sum(1 for r in records if r.errored),
        "replaced_attempts": all_lines - len(records),
        "invalid_actions": sum(r.num_invalid_actions for r in records),
        "end_reasons": dict(end_reasons),
        "solved_tasks": len(first_success),
        "task_fingerprint": records[0].task_fingerprint if records else "",
    }


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "  -  "
    return f"{100 * x:5.1f}%" if pct else f"{x:+.3f}"


def format_summary(name: str, s: dict[str, Any]) -> str:
    """A small text table of one run's summary."""
    lines = [
        f"{name}: {s['num_tasks']} tasks, {s['num_episodes']} episodes, {s['solved_tasks']} solved, "
        f"{s['errored_episodes']} errored, {s['invalid_actions']} invalid actions",
        "trial | cumulative | per-attempt | episodes | reflections rated | mean rating",
    ]
    for i in range(s["trials"]):
        lines.append(
            f"{i:5d} | {_fmt(s['cumulative_success'][i]):>10} | {_fmt(s['per_attempt_success'][i]):>11} | "
            f"{s['episodes_per_trial'][i]:8d} | {s['rated_reflections_per_trial'][i]:17d} | "
            f"{_fmt(s['mean_rating_after_trial'][i], pct=False):>11}"
        )
    if s.get("cost"):
        c = s["cost"]
        lines.append(f"tokens: {c.get('total_tokens', 0)}, estimated cost: ${c.get('total_usd', 0.0):.4f}")
    return "\n".join(lines)


def load_run(run: str | Path) -> tuple[str, dict[str, Any]]:
    """Summary of a trials run directory (``runs/<name>``), across its shards (each task once), streamed."""
    run = Path(run)
    files = record_files(run)
    if not files:
        raise DataError(
            f"{run} has no {records_path(run).relative_to(run)} (nor shard files beside it); pass a directory "
            "written by `retroformer trials`"
        )
    trials = None
    if config_path(run).is_file():
        trials = int(read_yaml(config_path(run)).get("trials", 0)) or None
    # Read only: the run may be running, and its last line may be in the middle of being written.
    entries, lines = index_records(files)
    if not entries:
        raise DataError(f"{', '.join(map(str, files))} hold no episodes yet; run the trials first")
    # The run's own task list, so tasks a stopped run never reached count as unsolved (older runs: tasks with records).
    task_ids = read_task_ids(run)
    num_tasks = len(task_ids) if task_ids is not None else len({e.task_id for e in entries})
    return run.name, summarize_entries(entries, lines, trials, num_tasks=num_tasks)


def write_report(runs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> dict[str, Any]:
    """Compare runs side by side: ``report.json``, ``report.md`` and ``success.png`` in ``out``.

    ``labels`` name the runs in the table and the plot (e.g. ReAct, Reflexion, Retroformer); default: directory names.
    """
    if labels is not None and len(labels) != len(runs):
        raise DataError(f"got {len(labels)} labels for {len(runs)} runs; pass one label per run, in the same order")
    loaded = [load_run(r) for r in runs]
    if labels is not None:
        loaded = [(label, s) for label, (_, s) in zip(labels, loaded, strict=True)]
    fingerprints = {s["task_fingerprint"] for _, s in loaded}
    if len(fingerprints) > 1:
        detail = ", ".join(f"{name}={s['task_fingerprint']}" for name, s in loaded)
        raise DataError(
            f"runs were made on different task lists ({detail}); only runs on the same tasks can be compared. "
            "Run every reflector with the same env options (and max_tasks)."
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"task_fingerprint": fingerprints.pop() if fingerprints else "", "runs": dict(loaded)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    text = "\n\n".join(format_summary(name, s) for name, s in loaded)
    (out / "report.md").write_text("```\n" + text + "\n```\n")
    plot_success(loaded, out / "success.png")
    return {"text": text, "json": out / "report.json", "png": out / "success.png", "md": out / "report.md"}


def plot_success(loaded: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    styles, markers = ("-", "--", "-.", ":"), ("o", "s", "^", "D", "v", "P")
    for i, (name, s) in enumerate(loaded):
        # A small horizontal offset per run and distinct line styles keep identical curves visible side by side.
        xs = [t + 0.03 * (i - (len(loaded) - 1) / 2) for t in range(s["trials"])]
        style = {"linestyle": styles[i % len(styles)], "marker": markers[i % len(markers)], "label": name}
        n_tasks = s["num_tasks"]
        cum = s["cumulative_success"]
        line = axes[0].plot(xs, [100 * v for v in cum], **style)[0]
        bands = [wilson_interval(v * n_tasks, n_tasks) for v in cum]
        axes[0].fill_between(xs, [100 * lo for lo, _ in bands], [100 * hi for _, hi in bands], color=line.get_color(),
                             alpha=0.1, linewidth=0)  # fmt: skip
        per = s["per_attempt_success"]
        axes[1].plot(xs, [float("nan") if v is None else 100 * v for v in per], color=line.get_color(), **style)
        bands = [
            None if v is None else wilson_interval(v * n, n) for v, n in zip(per, s["episodes_per_trial"], strict=True)
        ]
        axes[1].fill_between(xs, [float("nan") if b is None else 100 * b[0] for b in bands],
                             [float("nan") if b is None else 100 * b[1] for b in bands], color=line.get_color(),
                             alpha=0.1, linewidth=0)  # fmt: skip
    for ax, title in zip(axes, ("cumulative success (95% CI)", "per-attempt success (95% CI)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("trial")
        ax.set_xticks(range(max(s["trials"] for _, s in loaded)))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("success rate (%)")
    axes[1].legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
