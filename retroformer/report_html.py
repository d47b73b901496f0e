"""``report.html``: one self-contained page for comparing reflectors (styles, script, plot and data inline).

At the top, the tables of ``report.json`` (success per trial with Wilson 95% intervals, the paired comparisons of each
condition against the first) and the plot as inline SVG; then the reflection statistics of each condition; then a
per-task view with the conditions side by side: each trial's steps (thought, action, observation), its return and the
reflection written after it, with filters (solved by one condition and not another, a reflection that turned a
failure into a success, search by task id or text) and pages.

Large runs stay usable: each task's trials are one line of compact JSON (arrays, its repeated strings once) in a
``<script type="text/plain">`` block that the browser does not parse; the page reads a small index of outcomes to
filter, and parses the lines of the tasks it shows, a page at a time. The records are read one task at a time
(:class:`RecordReader`, from the byte offsets of the run's index), so memory holds the index and one task, not the
run. Texts longer than :attr:`HtmlReportConfig.max_field_chars` are cut in the page (never in the records).
"""

from __future__ import annotations

import html
import json
import logging
import re
import statistics
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any

from retroformer.config import doc
from retroformer.errors import ConfigError, DataError
from retroformer.records import RecordEntry
from retroformer.types import EpisodeRecord

logger = logging.getLogger(__name__)

ASSETS = "report_assets"
#: A page larger than this (bytes) gets a warning that says how to make it smaller.
LARGE_PAGE = 300_000_000
#: The bits of the per-task reflection code in the page's index.
REFLECTED, FIXED, UNFIXED = 1, 2, 4


@dataclass
class HtmlReportConfig:
    """What the HTML report shows, and how much of it."""

    page_size: int = doc("tasks per page of the per-task view (the page offers 10, 20, 50, 100 too)", 20)
    max_field_chars: int = doc(
        "longest thought, action, observation or reflection shown whole; a longer one is cut, with a note saying how "
        "much, so that a run of long episodes still opens in a browser (the records keep everything)",
        4000,
    )
    max_steps: int | None = doc(
        "most steps of one episode shown: the first half and the last half of them, with a note of how many are left "
        "out between (long ALFWorld episodes of many tasks make a page too large to open); None: every step",
        None,
    )
    top_reflections: int = doc("how many of each condition's most common reflections the page lists", 10)

    def __post_init__(self) -> None:
        for name in ("page_size", "max_field_chars", "max_steps", "top_reflections"):
            value = getattr(self, name)
            if name == "max_steps" and value is None:
                continue
            if not isinstance(value, int) or value < 2:
                raise ConfigError(f"HtmlReportConfig.{name} must be an integer of 2 or more, got {value!r}; e.g. 20")


@dataclass
class Condition:
    """One condition of the report: its label and the effective index entries of its run (with path and offset)."""

    name: str
    entries: list[RecordEntry]
    by_task: dict[str, list[RecordEntry]] = field(init=False)

    def __post_init__(self) -> None:
        self.by_task = {}
        for entry in self.entries:
            self.by_task.setdefault(entry.task_id, []).append(entry)
        for trials in self.by_task.values():
            trials.sort(key=lambda e: e.trial)


class RecordReader:
    """Reads whole records back from the byte offsets of an index, keeping each file open once."""

    def __init__(self) -> None:
        self._files: dict[Path, IO[bytes]] = {}

    def read(self, entry: RecordEntry) -> EpisodeRecord:
        if entry.path is None or entry.offset < 0:
            raise DataError(f"index entry of task {entry.task_id!r} trial {entry.trial} has no file offset")
        fh = self._files.get(entry.path)
        if fh is None:
            fh = self._files[entry.path] = entry.path.open("rb")
        fh.seek(entry.offset)
        line = fh.readline()
        try:
            return EpisodeRecord.from_dict(json.loads(line.decode("utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError):
            raise DataError(
                f"{entry.path}: no whole record at byte {entry.offset}; was the file changed while the report was "
                "written? Write the report again"
            ) from None

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()


class ReflectionStats:
    """Statistics of one condition's reflections: how many, how long, how many distinct, the most common ones, and how
    often the next attempt succeeded."""

    def __init__(self) -> None:
        self.chars: list[int] = []
        self.words: list[int] = []
        self.texts: Counter[str] = Counter()
        self.followed = 0  # reflections whose next attempt ran (not errored)
        self.fixed = 0  # ... and succeeded

    def add(self, text: str, next_success: bool | None) -> None:
        self.chars.append(len(text))
        self.words.append(len(text.split()))
        self.texts[text.strip()] += 1
        if next_success is not None:
            self.followed += 1
            self.fixed += next_success

    def result(self, top: int) -> dict[str, Any]:
        n = len(self.chars)
        return {
            "reflections": n,
            "distinct": len(self.texts),
            "distinct_share": len(self.texts) / n if n else None,
            "mean_chars": sum(self.chars) / n if n else None,
            "median_chars": statistics.median(self.chars) if n else None,
            "max_chars": max(self.chars, default=0),
            "mean_words": sum(self.words) / n if n else None,
            "followed_by_attempt": self.followed,
            "next_attempt_success": self.fixed / self.followed if self.followed else None,
            "most_common": [{"text": t, "count": c} for t, c in self.texts.most_common(top)],
        }


class TaskPacker:
    """One task's trials under every condition as one compact JSON line, and its code for the page's index.

    Line: ``[task_id, strings, conditions]``; a condition is null (no records) or a list of trials
    ``[trial, return, success, end_reason, steps, reflection, memory_size, error]`` where texts are indices into
    ``strings`` (each distinct text once), a step is ``[thought, action, observation]`` (a fourth element 0 marks an
    invalid action; a step ``[note, count]`` stands for ``count`` steps left out, :attr:`HtmlReportConfig.max_steps`) and ``reflection`` is -1 when none was written.
    """

    def __init__(self, max_chars: int, max_steps: int | None = None) -> None:
        self.max_chars = max_chars
        self.max_steps = max_steps
        self._strings: list[str] = []
        self._ids: dict[str, int] = {}

    def text(self, s: str) -> int:
        if len(s) > self.max_chars:
            s = f"{s[: self.max_chars]}… [{len(s) - self.max_chars} more characters not shown]"
        i = self._ids.get(s)
        if i is None:
            i = self._ids[s] = len(self._strings)
            self._strings.append(s)
        return i

    def trial(self, rec: EpisodeRecord) -> list[Any]:
        steps = [
            [self.text(s.thought), self.text(s.action), self.text(s.observation)] + ([] if s.valid else [0])
            for s in rec.steps
        ]
        if self.max_steps is not None and len(steps) > self.max_steps:
            head = self.max_steps // 2
            tail = self.max_steps - head
            hidden = len(steps) - self.max_steps
            note = [self.text(f"… {hidden} steps not shown …"), hidden]
            steps = steps[:head] + [note] + steps[-tail:]
        reflection = self.text(rec.reflection.text) if rec.reflection is not None else -1
        error = self.text(rec.error) if rec.error else -1
        return [rec.trial, rec.return_, int(rec.success), rec.end_reason, steps, reflection, len(rec.memory), error]

    def line(self, task_id: str, conditions: list[list[list[Any]] | None]) -> str:
        data = json.dumps([task_id, self._strings, conditions], ensure_ascii=False, separators=(",", ":"))
        return script_safe(data)


def script_safe(json_text: str) -> str:
    """JSON text that can sit inside a ``<script>`` element: every ``<`` escaped (``</script>`` and ``<!--`` then
    cannot occur), which JSON allows inside strings, the only place it can appear."""
    return json_text.replace("<", "\\u003c")


def task_codes(records: list[EpisodeRecord]) -> tuple[int, int]:
    """(first trial solved, -1 if none; the reflection bits) of one task's records under one condition."""
    first = next((r.trial for r in records if r.success), -1)
    by_trial = {r.trial: r for r in records}
    code = 0
    for r in records:
        if r.reflection is None:
            continue
        code |= REFLECTED
        nxt = by_trial.get(r.trial + 1)
        if nxt is not None and not nxt.errored:
            code |= FIXED if nxt.success else UNFIXED
    return first, code


class TaskData:
    """Streams every task's line to a temporary file while it builds the page's index and the reflection statistics."""

    def __init__(self, conditions: Sequence[Condition], task_ids: Sequence[str], cfg: HtmlReportConfig) -> None:
        self.conditions = conditions
        self.task_ids = list(task_ids)
        self.cfg = cfg
        self.first: list[list[int]] = [[] for _ in conditions]
        self.codes: list[list[int]] = [[] for _ in conditions]
        self.stats = [ReflectionStats() for _ in conditions]

    def write(self, out: IO[str]) -> None:
        reader = RecordReader()
        try:
            for task_id in self.task_ids:
                out.write(self._task_line(reader, task_id))
                out.write("\n")
        finally:
            reader.close()

    def _task_line(self, reader: RecordReader, task_id: str) -> str:
        packer = TaskPacker(self.cfg.max_field_chars, self.cfg.max_steps)
        packed: list[list[list[Any]] | None] = []
        for c, cond in enumerate(self.conditions):
            entries = cond.by_task.get(task_id)
            if not entries:
                packed.append(None)
                self.first[c].append(-2)
                self.codes[c].append(0)
                continue
            records = [reader.read(e) for e in entries]
            first, code = task_codes(records)
            self.first[c].append(first)
            self.codes[c].append(code)
            self._add_reflections(c, records)
            packed.append([packer.trial(r) for r in records])
        return packer.line(task_id, packed)

    def _add_reflections(self, c: int, records: list[EpisodeRecord]) -> None:
        by_trial = {r.trial: r for r in records}
        for r in records:
            if r.reflection is not None:
                nxt = by_trial.get(r.trial + 1)
                self.stats[c].add(r.reflection.text, None if nxt is None or nxt.errored else nxt.success)

    def index(self, trials: int) -> dict[str, Any]:
        return {
            "conditions": [c.name for c in self.conditions],
            "trials": trials,
            "ids": self.task_ids,
            "first": self.first,
            "refl": self.codes,
            "pageSize": self.cfg.page_size,
        }


# ---- the static tables ----------------------------------------------------------------------------------------------


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _ci(lo: float | None, hi: float | None, pct: bool = True) -> str:
    if lo is None or hi is None:
        return ""
    return f"[{100 * lo:.1f}, {100 * hi:.1f}]" if pct else f"[{lo:+.3f}, {hi:+.3f}]"


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table from already escaped cells."""
    thead = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{thead}</tr></thead><tbody>{body}</tbody></table>'


def overview_table(runs: dict[str, dict[str, Any]], sources: dict[str, str]) -> str:
    head = ["condition", "run", "tasks", "episodes", "solved", "errored", "invalid actions", "mean rating"]
    rows = []
    for name, s in runs.items():
        rating = "–" if s.get("mean_rating") is None else f"{s['mean_rating']:+.3f}"
        rows.append([_e(name), f"<code>{_e(sources.get(name, ''))}</code>", _e(s["num_tasks"]),
                     _e(s["num_episodes"]), _e(s["solved_tasks"]), _e(s["errored_episodes"]),
                     _e(s["invalid_actions"]), rating])  # fmt: skip
    return _table(head, rows, "num")


def success_table(runs: dict[str, dict[str, Any]], way: str) -> str:
    """Success per trial (``way``: ``cumulative`` or ``per_attempt``) of every condition, with Wilson 95% intervals."""
    trials = max((s["trials"] for s in runs.values()), default=0)
    rows = []
    for i in range(trials):
        row = [str(i)]
        for s in runs.values():
            if i >= s["trials"]:
                row.append("–")
                continue
            rate, (lo, hi) = s[f"{way}_success"][i], s[f"{way}_success_ci"][i]
            n = s["num_tasks"] if way == "cumulative" else s["episodes_per_trial"][i]
            row.append(f'{_pct(rate)} <span class="ci">{_ci(lo, hi)} n={n}</span>')
        rows.append(row)
    return _table(["trial", *(_e(n) for n in runs)], rows, "num")


def comparison_table(comp: dict[str, Any]) -> str:
    """One condition against the baseline, per trial: cumulative, then per attempt; paired on the tasks both ran."""
    head = ["trial", "tasks", _e(comp["baseline"]), _e(comp["condition"]), "difference [95% CI]",
            "only baseline / only condition", "McNemar p", "tasks ran both", "per-attempt difference [95% CI]",
            "McNemar p"]  # fmt: skip
    rows = []
    for t in comp["trials"]:
        cum, per = t["cumulative"], t["per_attempt"]
        rows.append([str(t["trial"]), str(cum["n"]), _pct(cum["rate_a"]), _pct(cum["rate_b"]), _diff_cell(cum),
                     f"{cum['a_only']} / {cum['b_only']}", _p(cum["p"]), str(per["n"]), _diff_cell(per),
                     _p(per["p"])])  # fmt: skip
    return _table(head, rows, "num")


def _diff_cell(c: dict[str, Any]) -> str:
    if c["diff"] is None:
        return "–"
    cls = ' class="sig"' if c["ci_low"] > 0 or c["ci_high"] < 0 else ""
    return f'<span{cls}>{100 * c["diff"]:+.1f} pts</span> <span class="ci">{_ci(c["ci_low"], c["ci_high"])}</span>'


def _p(p: float) -> str:
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def reflections_section(stats: dict[str, dict[str, Any]]) -> str:
    head = ["condition", "reflections", "distinct", "mean chars", "median chars", "max chars", "mean words",
            "next attempt succeeded"]  # fmt: skip
    rows = []
    for name, s in stats.items():
        n = s["reflections"]
        mean = "–" if s["mean_chars"] is None else f"{s['mean_chars']:.0f}"
        median = "–" if s["median_chars"] is None else f"{s['median_chars']:.0f}"
        words = "–" if s["mean_words"] is None else f"{s['mean_words']:.1f}"
        succ = f"{_pct(s['next_attempt_success'])} of {s['followed_by_attempt']}"
        rows.append([_e(name), str(n), f"{s['distinct']} ({_pct(s['distinct_share'])})", mean, median,
                     str(s["max_chars"]), words, succ])  # fmt: skip
    parts = [_table(head, rows, "num")]
    for name, s in stats.items():
        items = "".join(
            f'<li><span class="count">{c["count"]}×</span> {_e(_clip(c["text"], 400))}</li>' for c in s["most_common"]
        )
        parts.append(
            f'<details><summary>most common reflections: {_e(name)}</summary><ol class="common">{items}</ol></details>'
        )
    return "\n".join(parts)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + "…"


# ---- the page -------------------------------------------------------------------------------------------------------


def _asset(name: str) -> str:
    return resources.files("retroformer").joinpath(ASSETS, name).read_text(encoding="utf-8")


def render_head(report: dict[str, Any], svg: str, stats: dict[str, dict[str, Any]], sources: dict[str, str]) -> str:
    """The page's static sections (everything above the per-task view), as HTML."""
    runs = report["runs"]
    comparisons = (
        "\n".join(
            f"<h3>{_e(c['condition'])} vs {_e(c['baseline'])}</h3>\n{comparison_table(c)}"
            for c in report["comparisons"]
        )
        or "<p>One condition only: nothing to compare.</p>"
    )
    boot = report.get("bootstrap", {})
    return "\n".join([
        "<h2>Conditions</h2>", overview_table(runs, sources),
        "<h2>Success per trial</h2>",
        "<p>Wilson 95% intervals in brackets. Cumulative: a task solved at some trial up to this one; n = all tasks of "
        "the run (tasks never reached count as unsolved). Per attempt: successes among the episodes run at this "
        "trial; n = those episodes.</p>",
        "<h3>Cumulative</h3>", success_table(runs, "cumulative"),
        "<h3>Per attempt</h3>", success_table(runs, "per_attempt"),
        f'<div class="plot">{svg}</div>',
        "<h2>Paired comparisons against the baseline</h2>",
        f"<p>Each condition against the first ({_e(next(iter(runs), ''))}), on the tasks both ran: cumulative on the "
        "tasks whose outcome by that trial is known in both runs; per attempt on the tasks both ran at that trial. "
        f"Differences in percentage points with a paired bootstrap 95% interval ({_e(boot.get('resamples', ''))} "
        "resamples of tasks) and McNemar's exact p; bold where the interval excludes 0.</p>",
        comparisons,
        "<h2>Reflections</h2>", reflections_section(stats),
    ])  # fmt: skip


def write_html_report(
    path: str | Path,
    report: dict[str, Any],
    conditions: Sequence[Condition],
    task_ids: Sequence[str],
    svg: str,
    sources: dict[str, str] | None = None,
    cfg: HtmlReportConfig | None = None,
) -> dict[str, dict[str, Any]]:
    """Write ``report.html``: ``report`` is what ``report.json`` holds (``runs``, ``comparisons``), ``conditions`` the
    runs' index entries in the same order, ``task_ids`` the tasks of the per-task view in order, ``svg`` the plot,
    ``sources`` the run directory of each condition. Returns the reflection statistics of each condition."""
    cfg = cfg or HtmlReportConfig()
    path = Path(path)
    data = TaskData(conditions, task_ids, cfg)
    trials = max((s["trials"] for s in report["runs"].values()), default=0)
    # A lone surrogate (a record's JSON may hold one, e.g. "\\ud800") cannot be encoded: it is written as its JSON
    # escape, which is what it is inside the page's JSON strings.
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="backslashreplace", dir=path.parent) as lines:
        data.write(lines)
        stats = {c.name: s.result(cfg.top_reflections) for c, s in zip(conditions, data.stats, strict=True)}
        parts = {
            "title": _e(" vs ".join(report["runs"])),
            "style": _asset("report.css"),
            "script": _asset("report.js"),
            "head": render_head(report, svg, stats, sources or {}),
            "index": script_safe(json.dumps(data.index(trials), ensure_ascii=False, separators=(",", ":"))),
        }
        before, marker, after = _asset("report.html").partition("{{tasks}}")
        if not marker:
            raise DataError(f"the template {ASSETS}/report.html lacks its {{{{tasks}}}} slot; reinstall retroformer")
        lines.seek(0)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8", errors="backslashreplace") as out:
            out.write(_fill(before, parts))
            while chunk := lines.read(1 << 20):
                out.write(chunk)
            out.write(_fill(after, parts))
        tmp.replace(path)
    size = path.stat().st_size
    if size > LARGE_PAGE:
        logger.warning(
            "%s is %.0f MB: browsers slow down or give up on pages of a few hundred MB. Show less of each episode "
            "(retroformer report --html_max_steps 20 --html_max_chars 1000) or report fewer runs at once",
            path, size / 1e6,
        )  # fmt: skip
    return stats


def _fill(template: str, parts: dict[str, str]) -> str:
    """Replace each ``{{name}}`` of ``template`` once (a single pass: inserted text is never scanned again)."""
    return re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m.group(1)], template)
