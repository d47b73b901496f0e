"""Throughput of the trial loop against an OpenAI-compatible server with a fixed latency.

    .venv/bin/python bench/rollout_throughput.py --concurrency 1 4 16 64 --latency 0.2 --repeats 2

The actor is ``actor.kind: react`` over the OpenAI backend (chat style) and the reflector is an OpenAI-backend
``M_r``; both talk to :class:`retroformer.testing.FakeOpenAIServer`, which runs in a **separate process** (so that its
threads do not compete with the client for the GIL) and answers every request after ``--latency`` seconds. Its
reply function plays a fixed vault policy: the actor opens the door its newest reflection names, else the first
door; the reflector carries the clue forward. Each task is therefore exactly three sequential calls (failed attempt,
reflection, successful attempt) and every run of ``tasks_per_slot x c`` tasks has the same ideal wall time
``tasks_per_slot x 3 x latency``.

Reported per concurrency ``c`` (trials ``concurrency`` = actor and reflector ``llm.concurrency`` = c):
episodes/s, LLM calls/s (requests the server received / wall time of ``run_trials_async``), speedup over c=1 (the
sequential shape of the reference code), and efficiency against the latency bound ``c / latency`` calls/s.
``--profile C`` writes a cProfile of the run at concurrency C to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

from retroformer.testing.vault_policy import vault_reply


def _serve(latency_s: float, conn) -> None:
    """Child process: run the fake server until the parent sends anything; report request counts on request."""
    from retroformer.testing import FakeOpenAIServer

    server = FakeOpenAIServer(reply=vault_reply, latency_s=latency_s)
    with server as url:
        conn.send(url)
        while True:
            msg = conn.recv()
            if msg == "count":
                cpu = sum(os.times()[:2])
                conn.send((len(server.requests), server.max_in_flight, cpu))
            else:
                break


def trials_config(url: str, runs_dir: str, concurrency: int, num_tasks: int, http_client: str | None = None):
    from retroformer.config import from_dict
    from retroformer.trials import TrialsConfig

    llm = {"backend": "openai", "base_url": url, "model": "fake-model", "style": "chat", "concurrency": concurrency}
    if http_client is not None:
        llm["http_client"] = http_client
    return from_dict(
        TrialsConfig,
        {
            "run_name": f"c{concurrency}",
            "runs_dir": runs_dir,
            "trials": 3,
            "concurrency": concurrency,
            "export_dataset": False,
            "env": {"name": "synthetic", "options": {"num_tasks": num_tasks, "num_doors": 4}},
            "actor": {"kind": "react", "llm": llm},
            "reflector": {"llm": dict(llm, max_tokens=64)},
        },
    )


def run_once(
    conn, url: str, concurrency: int, tasks_per_slot: int, latency: float, profile: str | None, http_client=None
) -> dict:
    from retroformer.trials import run_trials_async

    num_tasks = tasks_per_slot * concurrency
    runs_dir = tempfile.mkdtemp(prefix="bench-rollout-")
    try:
        cfg = trials_config(url, runs_dir, concurrency, num_tasks, http_client)
        conn.send("count")
        before, _, server_cpu0 = conn.recv()
        prof = None
        if profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        res = asyncio.run(run_trials_async(cfg, progress=False))
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        if prof is not None:
            prof.disable()
            prof.dump_stats(profile)
        conn.send("count")
        after, max_in_flight, server_cpu1 = conn.recv()
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)
    calls = after - before
    if res.summary["errored_episodes"] or res.summary["cumulative_success"][-1] != 1.0:
        raise RuntimeError(f"benchmark run was not clean: {res.summary}")
    return {
        "concurrency": concurrency,
        "tasks": num_tasks,
        "episodes": res.new_episodes,
        "calls": calls,
        "wall_s": wall,
        "episodes_per_s": res.new_episodes / wall,
        "calls_per_s": calls / wall,
        "ideal_calls_per_s": concurrency / latency,
        "efficiency": (calls / wall) / (concurrency / latency),
        "server_max_in_flight": max_in_flight,
        "client_cpu_s": cpu,
        "client_cpu_ms_per_call": 1000 * cpu / calls,
        "server_cpu_s": server_cpu1 - server_cpu0,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--latency", type=float, default=0.2, help="fixed server latency per request, seconds")
    parser.add_argument("--tasks_per_slot", type=int, default=4, help="tasks per concurrency slot (tasks = this x c)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", type=int, default=None, help="cProfile the run at this concurrency")
    parser.add_argument("--out", default=None, help="write the rows as JSON here (and the profile beside it)")
    parser.add_argument("--http-client", default=None, help="llm.http_client (aiohttp or httpx); default: the config's")
    args = parser.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(args.latency, child), daemon=True)
    proc.start()
    rows: list[dict] = []
    try:
        url = parent.recv()
        # Warm-up: imports, the HTTP client, the first connections; not measured.
        run_once(parent, url, 1, 1, args.latency, None, args.http_client)
        for rep in range(args.repeats):
            for c in args.concurrency:
                prof = None
                if args.profile == c and rep == 0:
                    prof = str(Path(args.out or "rollout").with_suffix("")) + f".c{c}.prof"
                row = run_once(parent, url, c, args.tasks_per_slot, args.latency, prof, args.http_client)
                row["repeat"] = rep
                rows.append(row)
    finally:
        parent.send("stop")
        proc.join(timeout=10)
        if proc.is_alive():
            proc.terminate()
    base = {r["repeat"]: r["calls_per_s"] for r in rows if r["concurrency"] == 1}
    print(
        f"latency {args.latency * 1000:.0f} ms, http client {args.http_client or 'default'}, load "
        f"{os.getloadavg()[0]:.2f} (1-min avg at the end)"
    )
    print(
        "| rep | c | tasks | episodes | calls | wall s | episodes/s | calls/s | speedup vs c=1 | x c | efficiency "
        "| client CPU s | client CPU ms/call | server CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = r["calls_per_s"] / base[r["repeat"]] if r["repeat"] in base else float("nan")
        r["speedup"] = speed
        print(
            f"| {r['repeat']} | {r['concurrency']} | {r['tasks']} | {r['episodes']} | {r['calls']} | {r['wall_s']:.2f} "
            f"| {r['episodes_per_s']:.1f} | {r['calls_per_s']:.1f} | {speed:.2f} | {speed / r['concurrency']:.2f} "
            f"| {r['efficiency']:.2f} | {r['client_cpu_s']:.2f} | {r['client_cpu_ms_per_call']:.2f} "
            f"| {r['server_cpu_s']:.2f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
