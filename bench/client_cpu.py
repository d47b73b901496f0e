"""Client CPU per call of several code versions, interleaved in the same minutes (``rollout_throughput.py`` per version).

    .venv/bin/python bench/client_cpu.py --versions orig=f343225 after=HEAD --rounds 3 --out bench/client_cpu.json

A machine's speed drifts over a day (the same code has measured 2x apart on different days), so a figure is only
comparable with one measured beside it. Each round runs every version's own ``bench/rollout_throughput.py`` once
(``--repeats 1``) in a detached git worktree of that version, with this checkout's interpreter, one version after the
other; rounds repeat the sequence. Printed: per version and concurrency, the range and median over rounds of client CPU
per call and of throughput as a multiple of c = 1's, and per round the ratio of each version's CPU per call to the
first version's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def _run(path: Path, concurrency: list[int], latency: float) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "bench/rollout_throughput.py", "--repeats", "1", "--latency", str(latency),
               "--concurrency", *map(str, concurrency), "--out", out.name]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(path))
        subprocess.run(cmd, cwd=path, env=env, check=True, capture_output=True, text=True)
        rows = json.loads(Path(out.name).read_text())
    base = next(r["calls_per_s"] for r in rows if r["concurrency"] == 1) if 1 in concurrency else None
    for r in rows:
        r["x_c"] = r["calls_per_s"] / base / r["concurrency"] if base else None
    return rows


def _span(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(min(values))}-{fmt.format(max(values))} ({fmt.format(statistics.median(values))})"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", nargs="+", required=True, help="name=gitref pairs; the first is the reference")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worktrees", default=None, help="where the worktrees go (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="write what was run and every row as JSON here")
    args = parser.parse_args(argv)

    versions = []
    for spec in args.versions:
        name, sep, ref = spec.partition("=")
        if not sep or not name or not ref:
            parser.error(f"--versions takes name=gitref pairs (e.g. orig=f343225 after=HEAD), got {spec!r}")
        versions.append((name, ref))
    where = Path(args.worktrees or tempfile.mkdtemp(prefix="client-cpu-"))
    paths = {name: where / _git("rev-parse", ref)[:12] for name, ref in versions}
    started = dt.datetime.now(dt.timezone.utc)
    rows: list[dict] = []
    created: list[Path] = []
    try:
        for name, ref in versions:
            if not paths[name].exists():
                _git("worktree", "add", "--detach", str(paths[name]), _git("rev-parse", ref))
                created.append(paths[name])
        for rnd in range(args.rounds):
            for name, _ in versions:
                for row in _run(paths[name], args.concurrency, args.latency):
                    rows.append(dict(row, version=name, round=rnd, load1=os.getloadavg()[0]))
                print(f"round {rnd + 1}/{args.rounds} {name} done", file=sys.stderr)
    finally:  # the checkouts made here are throwaway: leave no worktree registered in the repository
        for path in created:
            _git("worktree", "remove", "--force", str(path))
    ended = dt.datetime.now(dt.timezone.utc)

    names = [name for name, _ in versions]
    print(f"latency {args.latency * 1000:.0f} ms; {started:%Y-%m-%d %H:%M}-{ended:%H:%M} UTC; {args.rounds} rounds")
    print("| c | " + " | ".join(f"{n} ms/call" for n in names) + " | " + " | ".join(f"{n} x c" for n in names) + " |")
    print("|---" * (1 + 2 * len(names)) + "|")
    for c in args.concurrency:
        cells = [_span([r["client_cpu_ms_per_call"] for r in rows if r["version"] == n and r["concurrency"] == c])
                 for n in names]  # fmt: skip
        if 1 in args.concurrency:
            cells += [_span([r["x_c"] for r in rows if r["version"] == n and r["concurrency"] == c]) for n in names]
        print(f"| {c} | " + " | ".join(cells) + " |")
    ref = names[0]
    for n in names[1:]:
        for c in args.concurrency:
            ratios = []
            for rnd in range(args.rounds):
                mine = [r for r in rows if r["version"] == n and r["concurrency"] == c and r["round"] == rnd]
                theirs = [r for r in rows if r["version"] == ref and r["concurrency"] == c and r["round"] == rnd]
                ratios.append(mine[0]["client_cpu_ms_per_call"] / theirs[0]["client_cpu_ms_per_call"])
            print(f"{n} / {ref} CPU per call at c = {c}, per round: " + ", ".join(f"{x:.2f}" for x in ratios))
    result = {
        "what": f"bench/client_cpu.py --rounds {args.rounds} --concurrency {' '.join(map(str, args.concurrency))}; "
        f"latency {args.latency * 1000:.0f} ms; {started:%Y-%m-%d %H:%M}-{ended:%H:%M} UTC",
        "versions": dict(versions),
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
