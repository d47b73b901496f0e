"""Fault figures of the trial loop, measured against the fake OpenAI-compatible server (offline).

    .venv/bin/python bench/fault_figures.py --tasks 200 --outage_s 30 --out bench/faults.json

Three scenarios, each on synthetic vault tasks whose actor and reflector are played over HTTP by
:func:`retroformer.testing.vault_policy.vault_reply` (trial 0 fails, its reflection names the door, trial 1 succeeds):

1. **Outage**: a total actor outage (every request answered 503) of ``--outage_s`` seconds starts once half of the
   tasks are done. The circuit breaker stops the run; once the outage is over the same run is started again. Reported:
   how long the run took to stop, the errored attempts kept as history, and whether every (task, trial) has exactly
   one successful record afterwards (``lost`` counts pairs without one).
2. **Concurrent starts**: a ``retroformer trials`` process is running; a second one on the same directory is started.
   Reported: its exit code and its wall time from spawn to exit (Python start-up included).
3. **Damaged records**: after a finished run (``stop_on_success: false``, 3 trials), the records lose the line of a
   middle trial for ``--gaps`` tasks and the last line is cut inside a multi-byte character. The run is resumed.
   Reported: episodes re-run, duplicates, and whether the run is complete.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import yaml

from retroformer.config import from_dict, to_dict
from retroformer.errors import RunInUse
from retroformer.records import RunLock, effective_records, lock_path, read_records, records_path
from retroformer.testing import FakeOpenAIServer
from retroformer.testing.vault_policy import vault_reply
from retroformer.trials import TrialsConfig, run_trials, run_trials_async


def config(url: str, runs_dir: str, run_name: str, tasks: int, **over) -> TrialsConfig:
    llm = {"backend": "openai", "base_url": url, "model": "fake-model", "max_retries": 2, "retry_backoff_s": 0.2}
    data = {
        "run_name": run_name,
        "runs_dir": runs_dir,
        "trials": 3,
        "concurrency": 8,
        "export_dataset": False,
        "env": {"name": "synthetic", "options": {"num_tasks": tasks, "num_doors": 3}},
        "actor": {"llm": llm},
        "reflector": {"llm": dict(llm, max_tokens=64)},
        **over,
    }
    return from_dict(TrialsConfig, data)


def check(records, tasks: int, trials: tuple[int, ...]) -> dict:
    """Exactly-once accounting: successful records per expected (task, trial), duplicates, pairs lost."""
    valid = Counter((r.task_id, r.trial) for r in records if not r.errored)
    current = effective_records(records)
    expected = {(f"vault-0-{i:03d}", t) for i in range(tasks) for t in trials}
    return {
        "expected_pairs": len(expected),
        "pairs_recorded_successfully_once": sum(1 for k in expected if valid[k] == 1),
        "duplicates": sum(n - 1 for n in valid.values() if n > 1),
        "lost": sum(1 for k in expected if valid[k] == 0),
        "unexpected_pairs": len({(r.task_id, r.trial) for r in current} - expected),
        "errored_lines_kept_as_history": sum(1 for r in records if r.errored),
    }


def outage(tasks: int, outage_s: float, latency_s: float, runs_dir: str) -> dict:
    server = FakeOpenAIServer(reply=vault_reply, latency_s=latency_s)
    with server as url:
        # outage_wait_s 0: the breaker stops the run at once and a rerun completes it (what this figure measures)
        cfg = config(url, runs_dir, "outage", tasks, outage_wait_s=0)
        started: dict[str, float] = {}

        def trigger() -> None:
            # Start the outage once half of the tasks have their successful trial recorded.
            path = records_path(Path(runs_dir) / "outage")
            while True:
                time.sleep(0.05)
                if path.exists() and path.read_bytes().count(b'"success": true') >= tasks // 2:
                    server.outage(outage_s)
                    started["t"] = time.monotonic()
                    return

        threading.Thread(target=trigger, daemon=True).start()
        t0 = time.monotonic()
        first = asyncio.run(run_trials_async(cfg, progress=False))
        stopped = time.monotonic()
        remaining = started["t"] + outage_s - time.monotonic()
        time.sleep(max(remaining, 0.0) + 0.1)  # the user reruns once the API is back
        second = run_trials(cfg, progress=False)
    return {
        "tasks": tasks,
        "outage_s": outage_s,
        "first_run_s": round(stopped - t0, 2),
        "outage_started_after_s": round(started["t"] - t0, 2),
        "stopped_after_outage_start_s": round(stopped - started["t"], 2),
        "first_run_stopped_by_errors": first.stopped_by_errors is not None,
        "first_run_episodes": first.new_episodes,
        "rerun_episodes": second.new_episodes,
        "rerun_stopped_by_errors": second.stopped_by_errors is not None,
        **check(read_records(records_path(second.run_dir)), tasks, (0, 1)),
        "cumulative_success": second.summary["cumulative_success"],
    }


def concurrent_starts(tasks: int, latency_s: float, runs_dir: str) -> dict:
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    server = FakeOpenAIServer(reply=vault_reply, latency_s=latency_s)
    with server as url:
        recipe = Path(runs_dir) / "concurrent.yaml"
        recipe.write_text(yaml.safe_dump(to_dict(config(url, runs_dir, "concurrent", tasks))))
        cmd = [sys.executable, "-m", "retroformer.cli", "trials", "--config", str(recipe)]
        env = dict(os.environ, RETROFORMER_LOG_LEVEL="WARNING")
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lock = lock_path(Path(runs_dir) / "concurrent")
        while not (lock.exists() and lock.read_text().strip()):
            time.sleep(0.05)
        time.sleep(0.5)
        t0 = time.monotonic()
        second = subprocess.run(cmd, env=env, capture_output=True, text=True)
        second_s = time.monotonic() - t0
        first_was_running = first.poll() is None
        # The same refusal in process (the lock attempt alone), and what a bare start of the command costs here.
        t1 = time.perf_counter()
        try:
            RunLock(Path(runs_dir) / "concurrent").acquire()
        except RunInUse:
            in_process_s = time.perf_counter() - t1
        t2 = time.monotonic()
        subprocess.run([sys.executable, "-c", "import retroformer.cli, retroformer.trials"], env=env, check=True)
        startup_s = time.monotonic() - t2
        first_rc = first.wait()
        records = read_records(records_path(Path(runs_dir) / "concurrent"))
    return {
        "second_exit_code": second.returncode,
        "second_wall_s": round(second_s, 3),
        "refusal_in_process_s": round(in_process_s, 5),
        "python_start_and_import_s": round(startup_s, 3),
        "second_message": second.stderr.strip().splitlines()[-1] if second.stderr.strip() else "",
        "first_was_running": first_was_running,
        "first_exit_code": first_rc,
        **check(records, tasks, (0, 1)),
    }


def damaged_records(tasks: int, gaps: int, latency_s: float, runs_dir: str) -> dict:
    server = FakeOpenAIServer(reply=vault_reply, latency_s=latency_s)
    with server as url:
        cfg = config(url, runs_dir, "damaged", tasks, stop_on_success=False)
        run_trials(cfg, progress=False)
        path = records_path(Path(runs_dir) / "damaged")
        lines = path.read_bytes().splitlines(keepends=True)
        removed = 0
        for i in reversed(range(len(lines) - 1)):
            if removed < gaps and json.loads(lines[i])["trial"] == 1:
                del lines[i]
                removed += 1
        last = lines.pop()
        marked = last.replace(b'"created_at": "', '"created_at": "é✓'.encode())
        path.write_bytes(b"".join(lines) + marked[: marked.index("✓".encode()) + 1])
        resumed = run_trials(cfg, progress=False)
        again = run_trials(cfg, progress=False)
    return {
        "tasks": tasks,
        "middle_trials_removed": removed,
        "cut_multibyte_last_line": 1,
        "resumed_episodes": resumed.new_episodes,
        "second_resume_episodes": again.new_episodes,
        **check(read_records(path), tasks, (0, 1, 2)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--outage_s", type=float, default=30.0)
    parser.add_argument("--latency", type=float, default=0.05, help="the fake server's answer delay in seconds")
    parser.add_argument("--gaps", type=int, default=10, help="middle trials removed in scenario 3")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=["outage", "concurrent", "damaged"],
        choices=["outage", "concurrent", "damaged"],
    )
    parser.add_argument("--repeats", type=int, default=1, help="repeats of the concurrent-start scenario")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    figures: dict = {"load_average_1min_before": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="faults-") as runs_dir:
        if "outage" in args.scenarios:
            figures["outage"] = outage(args.tasks, args.outage_s, args.latency, runs_dir)
        if "concurrent" in args.scenarios:
            figures["concurrent_starts"] = [
                concurrent_starts(args.tasks, 4 * args.latency, str(Path(runs_dir) / f"c{i}"))
                for i in range(args.repeats)
            ]
        if "damaged" in args.scenarios:
            figures["damaged_records"] = damaged_records(args.tasks, args.gaps, args.latency, runs_dir)
    figures["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    text = json.dumps(figures, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return figures


if __name__ == "__main__":
    main()
