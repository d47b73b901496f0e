"""The time to write ``report.html``, its size, and the time a browser takes to open and filter it, for 1,000 and
10,000 tasks x 4 conditions.

    OMP_NUM_THREADS=1 .venv/bin/python bench/report_html.py --tasks 1000 10000 --out bench/report_html.json

For each size, four synthetic runs (``retroformer.testing.report_runs``: the project's own record types; 3 trials,
each attempt solved with probability 0.2, 0.3, 0.4, 0.5 by condition, trials stop at a success, a reflection after
each failure but the last; ``--steps`` steps per episode, observations of ``--obs_chars`` characters) are written to
disk, then ``retroformer report`` runs on them in a fresh process, with and without ``--html``, ``--repeats`` times
each, interleaved: wall time and peak RSS (``ru_maxrss``) of the process, and the size of ``report.html``. With
``chromium`` on PATH (Debian's package), the page is then opened in headless Chromium with a script that drives its
controls: the time from the start of the navigation until the page is ready (reading and parsing the file, the
page's script), the time of the page's own start-up script, of a filter change, of a text search (the first, which
lower-cases the data once, and a second), of opening a page of 20 tasks, and the wall time of the whole browser run
(start-up, parse, script, DOM dump).

Everything is written below ``--workdir`` (default: a temporary folder) and deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retroformer.testing.report_runs import random_outcomes, write_run  # noqa: E402

TRIALS = 3
P_SUCCESS = (0.2, 0.3, 0.4, 0.5)

# Drives the page's controls and writes how long each took into the DOM.
HARNESS = """<script>
(function () {
  const $ = (id) => document.getElementById(id);
  const time = (f) => { const t = performance.now(); f(); return performance.now() - t; };
  const set = (id, v) => { $(id).value = String(v); $(id).dispatchEvent(new Event("change")); };
  const search = (q) => { $("rf-q").value = q; $("rf-q").dispatchEvent(new KeyboardEvent("keydown", {key: "Enter"})); };
  const root = document.documentElement;
  const out = { open_ms: +root.dataset.openMs, load_ms: +root.dataset.loadMs };
  out.filter_ms = time(() => { set("rf-a", 3); set("rf-b", 0); set("rf-outcome", "a_not_b"); });
  out.filter_count = +$("rf-status").dataset.count;
  out.reflection_filter_ms = time(() => { set("rf-outcome", "any"); set("rf-refl", "fixed"); });
  set("rf-refl", "any");
  out.first_search_ms = time(() => search("wrong door"));
  out.search_ms = time(() => search("step 4)"));
  out.search_count = +$("rf-status").dataset.count;
  search("");
  out.open_page_ms = time(() => $("rf-open").click());
  out.errors = root.dataset.errors || "";
  $("rf-tasks").remove();  // so that the DOM dump does not copy the data back
  const pre = document.createElement("pre"); pre.id = "bench"; pre.textContent = JSON.stringify(out);
  document.body.append(pre);
})();
</script>"""


def write_runs(workdir: Path, tasks: int, steps: int, obs_chars: int) -> list[Path]:
    ids = [f"task-{i:05d}" for i in range(tasks)]
    return [
        write_run(workdir / f"cond{c}", random_outcomes(ids, TRIALS, p, seed=c), TRIALS, ids, steps, obs_chars, seed=c)
        for c, p in enumerate(P_SUCCESS)
    ]


def run_report(runs: list[Path], out: Path, html_page: bool) -> dict:
    """``retroformer report`` in a fresh process: wall time and peak RSS."""
    cmd = [sys.executable, "-m", "retroformer.cli", "report", *map(str, runs), "--out", str(out)]
    cmd.append("--html" if html_page else "--no-html")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    proc.stderr.close()
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def browser(page: Path, workdir: Path) -> dict | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium is not installed: no browser figures", file=sys.stderr)
        return None
    driven = workdir / "driven.html"
    with page.open(encoding="utf-8") as src, driven.open("w", encoding="utf-8") as dst:
        shutil.copyfileobj(src, dst)
        dst.write(HARNESS)  # after </html>: the parser still runs it, last
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={workdir / 'profile'}", "--dump-dom", driven.as_uri()]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    found = re.search(r'<pre id="bench">(.*?)</pre>', proc.stdout, re.S)
    if found is None:
        raise SystemExit(f"the page did not finish its script; chromium said:\n{proc.stderr[-3000:]}")
    result = json.loads(html.unescape(found[1]))
    driven.unlink()
    return {"browser_wall_s": round(wall, 2), **{k: round(v) if isinstance(v, float) else v for k, v in result.items()}}


def measure(workdir: Path, tasks: int, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    runs = write_runs(workdir / f"runs-{tasks}", tasks, args.steps, args.obs_chars)
    records = sum((r / "trials" / "episodes.jsonl").stat().st_size for r in runs)
    lines = sum(sum(1 for _ in (r / "trials" / "episodes.jsonl").open()) for r in runs)
    print(f"{tasks} tasks x 4: {lines} records, {records / 1e6:.1f} MB, written in {time.perf_counter() - t0:.1f} s")
    rows: dict[str, list] = {"html": [], "no_html": []}
    for _ in range(args.repeats):
        for key in rows:
            rows[key].append(run_report(runs, workdir / f"report-{tasks}-{key}", key == "html"))
            print(f"  {key}: {rows[key][-1]}")
    page = workdir / f"report-{tasks}-html" / "report.html"
    result = {
        "tasks": tasks,
        "conditions": len(runs),
        "records": lines,
        "records_mb": round(records / 1e6, 1),
        "html_mb": round(page.stat().st_size / 1e6, 2),
        "report": rows,
        "browser": browser(page, workdir) if args.browser else None,
    }
    print(f"  html {result['html_mb']} MB; browser: {result['browser']}")
    return result


def table(results: list[dict]) -> str:
    lines = [
        "| tasks x conditions | records (MB) | report.html (MB) | `report` with html (s) | without (s) | peak RSS with / "
        "without (MB) | browser: run (s) | open (s) | page script (ms) | filter (ms) | search, first / next (ms) | "
        "open 20 (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        w = [x["wall_s"] for x in r["report"]["html"]]
        wo = [x["wall_s"] for x in r["report"]["no_html"]]
        rss = max(x["peak_rss_mb"] for x in r["report"]["html"]), max(x["peak_rss_mb"] for x in r["report"]["no_html"])
        b = r["browser"] or {}
        lines.append(
            f"| {r['tasks']:,} x {r['conditions']} | {r['records']:,} ({r['records_mb']}) | {r['html_mb']} | "
            f"{min(w)}-{max(w)} | {min(wo)}-{max(wo)} | {rss[0]} / {rss[1]} | {b.get('browser_wall_s', '-')} | "
            f"{b['open_ms'] / 1000 if b else '-'} | "
            f"{b.get('load_ms', '-')} | {b.get('filter_ms', '-')} | {b.get('first_search_ms', '-')} / "
            f"{b.get('search_ms', '-')} | {b.get('open_page_ms', '-')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--steps", type=int, default=5, help="steps per episode")
    parser.add_argument("--obs_chars", type=int, default=200, help="characters of each observation")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--browser", default=True, action=argparse.BooleanOptionalAction)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, deleted at the end")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="report-html-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = [measure(workdir, n, args) for n in args.tasks]
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(table(results))
    if args.out:
        meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg(), "args": vars(args)}
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
