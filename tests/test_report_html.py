"""report.html: self-contained, the paired comparisons (also in report.json and report.md), the per-task data, the
reflection statistics, and the page itself in headless Chromium: it loads without script errors and its filters,
search and pages show the tasks they should."""

from __future__ import annotations

import html
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from retroformer.cli import main
from retroformer.errors import ConfigError, DataError
from retroformer.report import write_report
from retroformer.report_html import HtmlReportConfig
from retroformer.stats import paired_bootstrap_diff, paired_bootstrap_diff_grouped, paired_comparison
from retroformer.testing.report_runs import write_run

REPO = Path(__file__).resolve().parents[1]
TRIALS = 3
TRICKY = 'a </script><script>window.pwned=1</script> <!-- "quoted" ünïcode'
# Outcomes per task and trial of three conditions over 12 tasks (True solved, False failed, None errored).
BASE = {f"t{i:02d}": [False, False, False] for i in range(12)}
BASE.update({"t00": [True], "t01": [False, True], "t02": [True]})
RETRY = {f"t{i:02d}": [False, False, False] for i in range(12)}
RETRY.update({"t00": [True], "t03": [True], "t04": [False, True], "t05": [False, False, True], "t06": [None, False]})
REFLECT = {f"t{i:02d}": [False, True] for i in range(11)}  # t11: no records in this condition
REFLECT.update({"t00": [True], "t07": [False, False, False]})
CONDITIONS = {"base": BASE, "retry": RETRY, "reflect": REFLECT}


def solved_by(outcomes: dict[str, list], trial: int) -> set[str]:
    return {t for t, r in outcomes.items() if any(r[: trial + 1])}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The three conditions' runs and their report (one task of ``retry`` says something tricky)."""
    root = tmp_path_factory.mktemp("report_html")
    ids = sorted(BASE)
    runs = [write_run(root / name, outcomes, TRIALS, task_ids=ids) for name, outcomes in CONDITIONS.items()]
    records = runs[1] / "trials" / "episodes.jsonl"
    lines = records.read_text().splitlines()
    data = json.loads(lines[0])
    data["steps"][0]["thought"] = TRICKY
    records.write_text("\n".join([json.dumps(data), *lines[1:]]) + "\n")
    out = write_report(runs, root / "report", html_config=HtmlReportConfig(page_size=5, max_field_chars=200))
    return root, out


def page_parts(page: str) -> tuple[dict, list[list]]:
    index = json.loads(re.search(r'<script id="rf-index" type="application/json">(.*?)</script>', page, re.S)[1])
    block = re.search(r'<script id="rf-tasks" type="text/plain">(.*?)</script>', page, re.S)[1]
    return index, [json.loads(line) for line in block.splitlines()]


def test_paired_bootstrap_grouped_matches_the_task_resampling_one():
    a = [i % 3 == 0 for i in range(300)]
    b = [i % 2 == 0 for i in range(300)]
    slow = paired_bootstrap_diff(a, b, resamples=4000, seed=1)
    fast = paired_bootstrap_diff_grouped(a, b, resamples=4000, seed=1)
    assert fast[0] == pytest.approx(slow[0])
    assert fast[1] == pytest.approx(slow[1], abs=0.015) and fast[2] == pytest.approx(slow[2], abs=0.015)
    assert paired_bootstrap_diff_grouped(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="equal, non-zero lengths"):
        paired_bootstrap_diff_grouped([], [])


def test_paired_comparison():
    c = paired_comparison([True, False, False, False], [True, True, True, False])
    assert (c["n"], c["rate_a"], c["rate_b"], c["diff"], c["a_only"], c["b_only"]) == (4, 0.25, 0.75, 0.5, 0, 2)
    assert c["p"] == pytest.approx(0.5) and c["ci_low"] <= 0.5 <= c["ci_high"]
    empty = paired_comparison([], [])
    assert empty["n"] == 0 and empty["diff"] is None and empty["p"] == 1.0


def test_comparisons_in_json_and_markdown(report):
    _, out = report
    data = json.loads(out["json"].read_text())
    comps = {c["condition"]: c for c in data["comparisons"]}
    assert set(comps) == {"retry", "reflect"} and all(c["baseline"] == "base" for c in comps.values())
    last = comps["reflect"]["trials"][TRIALS - 1]["cumulative"]
    # reflect has no records of t11: the other 11 tasks are paired.
    both = sorted(set(BASE) & set(REFLECT))
    a, b = solved_by(BASE, TRIALS - 1), solved_by(REFLECT, TRIALS - 1)
    assert last["n"] == len(both)
    assert (last["a_only"], last["b_only"]) == (len((a - b) & set(both)), len((b - a) & set(both)))
    assert last["diff"] == pytest.approx((len(b & set(both)) - len(a & set(both))) / len(both))
    assert last["ci_low"] <= last["diff"] <= last["ci_high"]
    # The errored trial 0 of t06 under retry: its outcome at trial 0 is unknown, so t06 is left out there.
    assert comps["retry"]["trials"][0]["per_attempt"]["n"] == 11
    lo, hi = data["runs"]["base"]["cumulative_success_ci"][0]
    assert lo < 2 / 12 < hi
    md = out["md"].read_text()
    assert "### reflect vs base" in md and "McNemar p" in md and "Wilson 95% intervals" in md
    assert "## Reflections" in md


def test_page_is_self_contained_and_its_data_is_the_records(report):
    _, out = report
    page = out["html"].read_text()
    # Nothing is fetched: no external scripts, styles, images or fonts.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<link" not in page and "@import" not in page and "<svg" in page
    # The tricky text cannot close the data block: the only </script> are the page's own.
    assert page.count("</script>") == page.count("<script")
    index, tasks = page_parts(page)
    assert index["conditions"] == ["base", "retry", "reflect"] and index["ids"] == sorted(BASE)
    assert [t[0] for t in tasks] == index["ids"]
    by_id = dict(zip(index["ids"], tasks, strict=True))
    strings, (base, retry, reflect) = by_id["t00"][1], by_id["t00"][2]
    assert strings[retry[0][4][0][0]] == TRICKY  # trial 0, step 0, thought
    assert [tr[2] for tr in base] == [1] and [tr[2] for tr in reflect] == [1]
    t01 = by_id["t01"]
    assert t01[1][t01[2][0][0][5]].startswith("I opened the wrong door")  # base's reflection after trial 0
    assert by_id["t11"][2][2] is None  # reflect never ran t11
    assert index["first"][2][index["ids"].index("t11")] == -2


def test_long_texts_and_episodes_are_cut_in_the_page(tmp_path):
    run = write_run(tmp_path / "long", {"t0": [False, False]}, 2, steps=9, obs_chars=500)
    out = write_report([run], tmp_path / "report", html_config=HtmlReportConfig(max_field_chars=100, max_steps=4))
    _, tasks = page_parts(out["html"].read_text())
    strings, trial = tasks[0][1], tasks[0][2][0][0]
    cut = [s for s in strings if "more characters not shown" in s]
    assert cut and all(len(s.split("…")[0]) == 100 for s in cut)
    steps = trial[4]
    assert len(steps) == 5 and steps[2][1] == 5 and strings[steps[2][0]] == "… 5 steps not shown …"
    assert strings[steps[1][0]].startswith("Step 1 of") and strings[steps[3][0]].startswith("Step 7 of")
    with pytest.raises(ConfigError, match="max_field_chars must be an integer of 2 or more"):
        HtmlReportConfig(max_field_chars=0)
    assert main(["report", str(run), "--out", str(tmp_path / "cli"), "--html_max_steps", "2"]) == 0
    _, tasks = page_parts((tmp_path / "cli" / "report.html").read_text())
    assert len(tasks[0][2][0][0][4]) == 3


def test_reflection_statistics(report):
    _, out = report
    stats = json.loads(out["json"].read_text())["reflections"]
    # reflect: 9 tasks fail at trial 0 then succeed; t07 fails thrice (two reflections, the last trial writes none).
    assert stats["reflect"]["reflections"] == 11
    assert stats["reflect"]["next_attempt_success"] == pytest.approx(9 / 11)
    assert stats["reflect"]["distinct"] <= 6 and stats["reflect"]["most_common"][0]["count"] >= 2
    assert stats["base"]["mean_chars"] > 20


def test_report_command_writes_and_names_the_html(report, tmp_path, capsys):
    root, _ = report
    assert main(["report", str(root / "base"), str(root / "retry"), "--out", str(tmp_path / "r")]) == 0
    assert f"html: {tmp_path / 'r' / 'report.html'}" in capsys.readouterr().out
    assert main(["report", str(root / "base"), "--out", str(tmp_path / "r2"), "--no-html"]) == 0
    assert not (tmp_path / "r2" / "report.html").exists() and (tmp_path / "r2" / "report.md").exists()
    with pytest.raises(DataError, match="the same name"):
        write_report([root / "base", root / "retry"], tmp_path / "r3", labels=["x", "x"])


# ---- the page in a real browser -------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)",
)

# Drives the page's own controls, as a user would, and writes what the page shows into the DOM. ("<" is written
# \u003c in its strings: "</script>" would end the harness's own script.)
HARNESS = """<script>
(function () {
  const out = {};
  const $ = (id) => document.getElementById(id);
  const status = () => { const s = $("rf-status"); return { count: +s.dataset.count, page: +s.dataset.page,
    shown: s.dataset.shown ? s.dataset.shown.split("\\n") : [] }; };
  const set = (id, v) => { $(id).value = String(v); $(id).dispatchEvent(new Event("change")); };
  const search = (q) => { $("rf-q").value = q; $("rf-q").dispatchEvent(new KeyboardEvent("keydown", {key: "Enter"})); };
  out.first = status();
  $("rf-next").click(); out.next = status();
  set("rf-size", 100); out.all = status();
  set("rf-a", 2); set("rf-b", 0); set("rf-outcome", "a_not_b"); out.reflect_not_base = status();
  set("rf-by", 0); out.reflect_not_base_by0 = status();
  set("rf-by", 2); set("rf-outcome", "b_not_a"); out.base_not_reflect = status();
  set("rf-outcome", "any"); set("rf-refl", "fixed"); set("rf-rc", 1); out.fixed_retry = status();
  set("rf-rc", "any"); out.fixed_any = status();
  set("rf-refl", "any"); search("T04"); out.search_id = status();
  search('"quoted" \u00fcn\u00efcode'); out.search_text = status();
  search("\\u003c/script>\\u003cscript>"); out.search_tag = status();
  $("rf-open").click();
  out.opened = document.querySelectorAll("details.task[open] .trial").length;
  out.tricky_shown = $("rf-list").textContent.includes(%s);
  out.pwned = window.pwned === 1;
  out.hash = location.hash;
  search(""); out.cleared = status();
  const pre = document.createElement("pre"); pre.id = "rf-test"; pre.textContent = JSON.stringify(out);
  document.body.append(pre);
})();
</script>"""


def chromium_dom(url: str, tmp_path: Path) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path}",
           "--dump-dom", url]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def root_attrs(dom: str) -> dict[str, str]:
    tag = re.search(r"<html[^>]*>", dom)[0]
    return {k: html.unescape(v) for k, v in re.findall(r'([\w-]+)="([^"]*)"', tag)}


@needs_chromium
def test_page_filters_in_headless_chromium(report, tmp_path):
    _, out = report
    page = out["html"].read_text()
    driven = tmp_path / "driven.html"
    driven.write_text(page.replace("</body>", HARNESS % json.dumps(TRICKY).replace("<", "\\u003c") + "\n</body>"))
    dom = chromium_dom(driven.as_uri(), tmp_path / "profile")
    attrs = root_attrs(dom)
    assert attrs.get("data-ready") == "1" and "data-errors" not in attrs, attrs.get("data-errors")
    got = json.loads(html.unescape(re.search(r'<pre id="rf-test">(.*?)</pre>', dom, re.S)[1]))
    ids = sorted(BASE)
    assert got["first"] == {"count": 12, "page": 0, "shown": ids[:5]}
    assert got["next"]["shown"] == ids[5:10] and got["all"]["shown"] == ids
    paired = set(BASE) & set(REFLECT)
    assert set(got["reflect_not_base"]["shown"]) == (solved_by(REFLECT, 2) - solved_by(BASE, 2)) & paired
    assert set(got["reflect_not_base_by0"]["shown"]) == (solved_by(REFLECT, 0) - solved_by(BASE, 0)) & paired
    assert set(got["base_not_reflect"]["shown"]) == (solved_by(BASE, 2) - solved_by(REFLECT, 2)) & paired == set()
    assert got["fixed_retry"]["shown"] == ["t04", "t05"]  # t03 solved at once; t06's first attempt errored
    fixed_any = {t for t in ids if any(o.get(t, [None])[1:2] == [True] for o in CONDITIONS.values())} | {"t05"}
    assert set(got["fixed_any"]["shown"]) == fixed_any
    assert got["search_id"]["shown"] == ["t04"]
    assert got["search_text"]["shown"] == ["t00"] and got["search_tag"]["shown"] == ["t00"]
    assert got["opened"] == 3 and got["tricky_shown"] and not got["pwned"]
    assert "q=" in got["hash"] and got["cleared"]["count"] == 12


@needs_chromium
def test_page_state_from_the_url_hash_and_errors_are_seen(report, tmp_path):
    _, out = report
    url = out["html"].as_uri() + "#outcome=differ&a=0&b=1&size=100&open=1"
    dom = chromium_dom(url, tmp_path / "profile")
    attrs = root_attrs(dom)
    assert attrs.get("data-ready") == "1" and "data-errors" not in attrs
    shown = html.unescape(re.search(r'data-shown="([^"]*)"', dom)[1]).split("\n")
    assert set(shown) == solved_by(BASE, 2) ^ solved_by(RETRY, 2)
    assert dom.count('class="trial ') > len(shown)  # the tasks were opened and their trials drawn
    # The check above would see a script error: a page whose script throws says so.
    broken = tmp_path / "broken.html"
    broken.write_text(out["html"].read_text().replace("</body>", "<script>throw new Error('boom')</script></body>"))
    assert "boom" in root_attrs(chromium_dom(broken.as_uri(), tmp_path / "profile2")).get("data-errors", "")


def test_demo_prints_the_html_report_path(report, tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("run_demo", REPO / "experiments" / "demo" / "run_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    root, _ = report
    steps = demo.pipeline(str(tmp_path), 0, None)
    assert steps[-1][0] == "report" and "--no-html" not in steps[-1][1]

    def run_report_step(steps, log_dir, **kwargs):  # the demo's own report step, on the runs of this test
        write_report([root / "base", root / "reflect"], tmp_path / "report")
        return []

    monkeypatch.setattr(demo, "run_steps", run_report_step)
    assert demo.main(["--workdir", str(tmp_path)]) == 0
    html_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("html: "))
    assert (
        Path(html_line.split()[1]) == tmp_path / "report" / "report.html"
        and (tmp_path / "report" / "report.html").is_file()
    )


@needs_chromium
def test_page_numbers_steps_around_those_left_out(tmp_path):
    run = write_run(tmp_path / "long", {"t0": [False, False]}, 2, steps=9)
    out = write_report([run], tmp_path / "report", html_config=HtmlReportConfig(max_steps=4))
    dom = chromium_dom(out["html"].as_uri() + "#open=1", tmp_path / "profile")
    assert "data-errors" not in root_attrs(dom)
    start = dom.index('class="trial ')
    first_trial = dom[start : dom.index('class="reflection"', start)]
    assert re.findall(r'<li[^>]*value="(\d+)"', first_trial) == ["1", "2", "8", "9"]
    assert '<li class="k note">… 5 steps not shown …</li>' in first_trial


def test_a_lone_surrogate_in_a_record_is_kept_as_its_json_escape(tmp_path):
    run = write_run(tmp_path / "odd", {"t0": [True]}, 1)
    records = run / "trials" / "episodes.jsonl"
    records.write_text(records.read_text().replace("Step 0 of", "\\ud800 Step 0 of"))
    out = write_report([run], tmp_path / "report")
    _, tasks = page_parts(out["html"].read_text(encoding="utf-8"))
    assert "\ud800 Step 0 of trial 0 of t0: I look for the" in tasks[0][1][0]
