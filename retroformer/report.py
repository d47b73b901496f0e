"""Success per trial (cumulative and per attempt), mean rating, cost; tables, a PNG plot and a JSON file.

    retroformer report runs/eval-react runs/eval-reflexion runs/eval-retroformer --out runs/report

Runs are put side by side only if they ran the same task list (same fingerprint).
"""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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
from retroformer.report_html import Condition, HtmlReportConfig, write_html_report
from retroformer.stats import paired_comparison, wilson_interval
from retroformer.types import ERRORED_END_REASONS, EpisodeRecord

logger = logging.getLogger(__name__)

#: Resamples of tasks in the paired bootstrap intervals of the report's comparisons.
BOOTSTRAP_RESAMPLES = 2000


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


@dataclass
class RunIndex:
    """A trials run as the report reads it: the effective index entries of its records (with their byte offsets),
    its task list, and its summary."""

    name: str
    path: Path
    entries: list[RecordEntry]
    task_ids: list[str]
    summary: dict[str, Any]


def index_run(run: str | Path) -> RunIndex:
    """The index and summary of a trials run directory (``runs/<name>``), across its shards (each task once), streamed."""
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
    if task_ids is None:
        task_ids = sorted({e.task_id for e in entries})
    summary = summarize_entries(entries, lines, trials, num_tasks=len(task_ids))
    return RunIndex(run.name, run, entries, task_ids, summary)


def load_run(run: str | Path) -> tuple[str, dict[str, Any]]:
    """Summary of a trials run directory (``runs/<name>``), across its shards (each task once), streamed."""
    index = index_run(run)
    return index.name, index.summary


def add_intervals(s: dict[str, Any]) -> dict[str, Any]:
    """Wilson 95% intervals of a summary's success per trial: ``cumulative_success_ci`` (n = the run's tasks) and
    ``per_attempt_success_ci`` (n = the episodes run at that trial; ``[None, None]`` where none ran)."""
    n_tasks = s["num_tasks"]
    s["cumulative_success_ci"] = [list(wilson_interval(round(v * n_tasks), n_tasks)) for v in s["cumulative_success"]]
    s["per_attempt_success_ci"] = [
        [None, None] if v is None else list(wilson_interval(round(v * n), n))
        for v, n in zip(s["per_attempt_success"], s["episodes_per_trial"], strict=True)
    ]
    return s


class Outcomes:
    """A run's outcome of each task by trial, for paired comparisons."""

    def __init__(self, entries: Sequence[RecordEntry]) -> None:
        self.first_success: dict[str, int] = {}
        self.ran: dict[int, dict[str, bool]] = defaultdict(dict)  # trial -> task -> success (errored left out)
        for e in sorted(entries, key=lambda e: e.trial):
            if e.success and e.task_id not in self.first_success:
                self.first_success[e.task_id] = e.trial
            if not e.errored:
                self.ran[e.trial][e.task_id] = e.success

    def cumulative(self, trial: int) -> dict[str, bool]:
        """Solved by ``trial``, for each task whose outcome by then is known: solved at a trial up to it, or run at it."""
        known = dict(self.ran.get(trial, {}))
        known.update({t: True for t, first in self.first_success.items() if first <= trial})
        return known


def paired_comparisons(
    runs: Sequence[tuple[str, Sequence[RecordEntry], int]], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> list[dict[str, Any]]:
    """Each run ``(name, entries, trials)`` after the first against the first (the baseline), at each trial both have:
    cumulative success on the tasks whose outcome by that trial is known in both runs, and per-attempt success on the
    tasks both ran at that trial; each a :func:`~retroformer.stats.paired_comparison` (paired bootstrap interval of
    the difference, McNemar's exact p)."""
    if not runs:
        return []
    base_name, base_entries, base_trials = runs[0]
    base = Outcomes(base_entries)
    comparisons = []
    for name, entries, trials in runs[1:]:
        other = Outcomes(entries)
        per_trial = []
        for i in range(min(base_trials, trials)):
            row: dict[str, Any] = {"trial": i}
            for way, a, b in (
                ("cumulative", base.cumulative(i), other.cumulative(i)),
                ("per_attempt", base.ran.get(i, {}), other.ran.get(i, {})),
            ):
                tasks = sorted(a.keys() & b.keys())
                row[way] = paired_comparison([a[t] for t in tasks], [b[t] for t in tasks], resamples, seed)
            per_trial.append(row)
        comparisons.append({"baseline": base_name, "condition": name, "trials": per_trial})
    return comparisons


def _pts(c: dict[str, Any]) -> str:
    if c["diff"] is None:
        return "-"
    return f"{100 * c['diff']:+.1f} [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]"


def format_comparisons(comparisons: list[dict[str, Any]]) -> str:
    """The paired comparisons as Markdown tables, one per condition."""
    parts = []
    for comp in comparisons:
        lines = [
            f"### {comp['condition']} vs {comp['baseline']}",
            "",
            "| trial | tasks | baseline | condition | difference, pts [95% CI] | only baseline / only condition | "
            "McNemar p | per attempt: tasks | difference, pts [95% CI] | McNemar p |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t in comp["trials"]:
            cum, per = t["cumulative"], t["per_attempt"]
            lines.append(
                f"| {t['trial']} | {cum['n']} | {_fmt(cum['rate_a']).strip()} | {_fmt(cum['rate_b']).strip()} | "
                f"{_pts(cum)} | {cum['a_only']} / {cum['b_only']} | {cum['p']:.3g} | {per['n']} | {_pts(per)} | "
                f"{per['p']:.3g} |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def format_intervals(loaded: list[tuple[str, dict[str, Any]]]) -> str:
    """Success per trial of every run with its Wilson 95% interval, as a Markdown table."""
    trials = max((s["trials"] for _, s in loaded), default=0)
    lines = [
        "| trial | " + " | ".join(f"{name}: cumulative | {name}: per attempt" for name, _ in loaded) + " |",
        "|---:|" + "---:|---:|" * len(loaded),
    ]
    for i in range(trials):
        cells = []
        for _, s in loaded:
            for way in ("cumulative", "per_attempt"):
                if i >= s["trials"] or s[f"{way}_success"][i] is None:
                    cells.append("-")
                    continue
                lo, hi = s[f"{way}_success_ci"][i]
                cells.append(f"{_fmt(s[f'{way}_success'][i]).strip()} [{100 * lo:.1f}, {100 * hi:.1f}]")
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_markdown(text: str, report: dict[str, Any]) -> str:
    """``report.md``: each run's table, success per trial with Wilson intervals, the paired comparisons and the
    reflection statistics (where the HTML report was written)."""
    loaded = list(report["runs"].items())
    parts = ["```\n" + text + "\n```", "## Success per trial, Wilson 95% intervals", format_intervals(loaded)]
    if report["comparisons"]:
        resamples = report["bootstrap"]["resamples"]
        parts += [
            "## Paired comparisons against the baseline",
            f"On the tasks both ran; difference in percentage points with a paired bootstrap 95% interval ({resamples} "
            "resamples of tasks) and McNemar's exact p. Cumulative: tasks whose outcome by that trial is known in both "
            "runs; per attempt: tasks both ran at that trial.",
            format_comparisons(report["comparisons"]),
        ]
    if report.get("reflections"):
        rows = [
            "| condition | reflections | distinct | mean chars | next attempt succeeded |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, r in report["reflections"].items():
            mean = "-" if r["mean_chars"] is None else f"{r['mean_chars']:.0f}"
            rows.append(f"| {name} | {r['reflections']} | {r['distinct']} | {mean} | "
                        f"{_fmt(r['next_attempt_success']).strip()} of {r['followed_by_attempt']} |")  # fmt: skip
        parts += ["## Reflections", "\n".join(rows)]
    return "\n\n".join(parts) + "\n"


def write_report(
    runs: list[str | Path],
    out: str | Path,
    labels: list[str] | None = None,
    html: bool = True,
    html_config: HtmlReportConfig | None = None,
) -> dict[str, Any]:
    """Compare runs side by side: ``report.json``, ``report.md``, ``success.png`` and ``report.html`` in ``out``.

    ``labels`` name the runs in the table and the plot (e.g. ReAct, Reflexion, Retroformer); default: directory names.
    The first run is the baseline of the paired comparisons. ``html=False`` leaves out ``report.html`` (and the
    reflection statistics, which it reads every record for).
    """
    if labels is not None and len(labels) != len(runs):
        raise DataError(f"got {len(labels)} labels for {len(runs)} runs; pass one label per run, in the same order")
    indexed = [index_run(r) for r in runs]
    names = labels if labels is not None else [ix.name for ix in indexed]
    if len(set(names)) != len(names):
        raise DataError(f"two runs have the same name ({', '.join(names)}); name them apart with --labels")
    loaded = [(name, add_intervals(ix.summary)) for name, ix in zip(names, indexed, strict=True)]
    fingerprints = {s["task_fingerprint"] for _, s in loaded}
    if len(fingerprints) > 1:
        detail = ", ".join(f"{name}={s['task_fingerprint']}" for name, s in loaded)
        raise DataError(
            f"runs were made on different task lists ({detail}); only runs on the same tasks can be compared. "
            "Run every reflector with the same env options (and max_tasks)."
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "task_fingerprint": fingerprints.pop() if fingerprints else "",
        "runs": dict(loaded),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": 0, "level": 0.95},
        "comparisons": paired_comparisons(
            [(name, ix.entries, ix.summary["trials"]) for name, ix in zip(names, indexed, strict=True)]
        ),
    }
    svg = plot_success(loaded, out / "success.png")
    paths = {"json": out / "report.json", "png": out / "success.png", "md": out / "report.md"}
    if html:
        conditions = [Condition(name, ix.entries) for name, ix in zip(names, indexed, strict=True)]
        sources = {name: str(ix.path) for name, ix in zip(names, indexed, strict=True)}
        report["reflections"] = write_html_report(
            out / "report.html", report, conditions, report_task_ids(indexed), svg, sources, html_config
        )
        paths["html"] = out / "report.html"
    (out / "report.json").write_text(json.dumps(report, indent=2))
    text = "\n\n".join(format_summary(name, s) for name, s in loaded)
    (out / "report.md").write_text(format_markdown(text, report))
    return {"text": text, **paths}


def report_task_ids(runs: Sequence[RunIndex]) -> list[str]:
    """The tasks of the per-task view: the first run's task list, then any task only a later run has."""
    seen = dict.fromkeys(runs[0].task_ids if runs else [])
    for ix in runs:
        seen.update(dict.fromkeys(ix.task_ids))
        seen.update(dict.fromkeys(e.task_id for e in ix.entries))
    return list(seen)


def plot_success(loaded: list[tuple[str, dict[str, Any]]], path: Path) -> str:
    """Success per trial of each run with Wilson 95% bands: a PNG at ``path``; returns the same plot as SVG text (for
    the HTML report)."""
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
    svg = io.StringIO()
    # Text stays text (smaller than glyph paths); a fixed id salt and no date keep the file the same run to run.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "retroformer"}):
        fig.savefig(svg, format="svg", metadata={"Date": None})
    plt.close(fig)
    text = svg.getvalue()
    return text[text.index("<svg") :]  # the XML declaration and doctype do not belong inside an HTML page
