"""Where the client's CPU per LLM call goes, layer by layer, interleaved in the same minutes.

    .venv/bin/python bench/client_layers.py --rounds 3 --calls 1536 --out bench/client_layers.json

Arms, each ``--calls`` chat completions at concurrency ``--concurrency`` (every arm but ``sdk``) against
:class:`retroformer.testing.FakeOpenAIServer` in a separate process (fixed ``--latency``):

- ``aiohttp``: aiohttp alone, sending the bytes and headers the SDK sends and parsing the reply with ``json.loads``:
  the floor for any client that speaks HTTP from Python with aiohttp;
- ``sdk``: ``OpenAIBackend.generate`` (the official SDK and its HTTP client, the retry loop) with a transport that
  answers at once, one call after another: the SDK's own request and response handling, without a network;
- ``backend``: ``OpenAIBackend.generate`` over HTTP (aiohttp), as the trial loop calls it;
- ``trials``: the whole trial loop (``run_trials_async``, the vault tasks of ``rollout_throughput.py``: three calls
  per task, records saved), ``--calls / 3`` tasks.

The server plays the vault policy (:mod:`retroformer.testing.vault_policy`) for every arm. Printed: per arm the range
and median over rounds of CPU per call, in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import httpx2

PROMPT = "Task: you are in a vault with 4 doors: amber, cobalt, jade, scarlet. Find the way out.\n" * 8
REPLY = {
    "id": "x",
    "object": "chat.completion",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Action: open[amber]"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 120, "completion_tokens": 6, "total_tokens": 126},
}


def _serve(latency_s: float, conn) -> None:
    from retroformer.testing import FakeOpenAIServer
    from retroformer.testing.vault_policy import vault_reply

    with FakeOpenAIServer(reply=vault_reply, latency_s=latency_s) as url:
        conn.send(url)
        conn.recv()


def _backend(url: str, concurrency: int, transport: httpx2.AsyncBaseTransport | None = None):
    from retroformer.llm import LLMConfig
    from retroformer.llm.openai_backend import OpenAIBackend

    cfg = LLMConfig(backend="openai", model="fake-model", base_url=url, concurrency=concurrency, max_tokens=64)
    return OpenAIBackend(cfg, api_key="sk-bench", transport=transport)


async def _aiohttp(url: str, calls: int, concurrency: int) -> None:
    import aiohttp

    body = json.dumps(
        {"model": "fake-model", "max_tokens": 64, "temperature": 0.0, "top_p": 1.0,
         "messages": [{"role": "user", "content": PROMPT}]}
    ).encode()  # fmt: skip
    headers = {
        "Authorization": "Bearer sk-bench", "Accept": "application/json", "Content-Type": "application/json",
        "User-Agent": f"AsyncOpenAI/Python {__import__('openai').__version__}", "Accept-Encoding": "gzip, deflate",
    }  # fmt: skip
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=5.0)
    semaphore = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

        async def one() -> None:
            async with semaphore, session.post(f"{url}/chat/completions", data=body, headers=headers) as reply:
                data = json.loads(await reply.read())
                assert data["choices"][0]["message"]["content"]

        await asyncio.gather(*(one() for _ in range(calls)))


async def _sdk(url: str, calls: int, concurrency: int) -> None:
    from retroformer.llm.base import GenerationRequest

    body = json.dumps(REPLY).encode()

    class Instant(httpx2.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            return httpx2.Response(200, headers=[(b"content-type", b"application/json")], content=body, request=request)

    llm = _backend(url, concurrency, transport=Instant())
    try:
        for _ in range(calls):
            await llm.generate(GenerationRequest(prompt=PROMPT))
    finally:
        await llm.aclose()


async def _over_http(url: str, calls: int, concurrency: int) -> None:
    from retroformer.llm.base import GenerationRequest

    llm = _backend(url, concurrency)
    try:
        await asyncio.gather(*(llm.generate(GenerationRequest(prompt=PROMPT)) for _ in range(calls)))
    finally:
        await llm.aclose()


async def _trials(url: str, calls: int, concurrency: int) -> None:
    import tempfile

    from rollout_throughput import trials_config

    from retroformer.trials import run_trials_async

    with tempfile.TemporaryDirectory(prefix="bench-layers-") as runs_dir:
        cfg = trials_config(url, runs_dir, concurrency, max(1, calls // 3))  # three calls per task
        result = await run_trials_async(cfg, progress=False)
        if result.summary["errored_episodes"] or result.summary["cumulative_success"][-1] != 1.0:
            raise RuntimeError(f"benchmark run was not clean: {result.summary}")


ARMS = {"aiohttp": _aiohttp, "sdk": _sdk, "backend": _over_http, "trials": _trials}


def _cpu_ms_per_call(arm: str, url: str, calls: int, concurrency: int) -> float:
    asyncio.run(ARMS[arm](url, concurrency, concurrency))  # warm-up: connections, first-call set-up
    start = time.process_time()
    asyncio.run(ARMS[arm](url, calls, concurrency))
    return 1000 * (time.process_time() - start) / calls


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=1536)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--out", default=None, help="write every measurement as JSON here")
    args = parser.parse_args(argv)

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(args.latency, child), daemon=True)
    server.start()
    started = dt.datetime.now(dt.timezone.utc)
    rows: list[dict] = []
    try:
        url = parent.recv()
        for r in range(args.rounds):
            for arm in ARMS:
                ms = _cpu_ms_per_call(arm, url, args.calls, args.concurrency)
                rows.append({"round": r, "arm": arm, "ms_per_call": ms})
                print(f"round {r + 1}/{args.rounds} {arm}: {ms:.3f} ms/call", flush=True)
    finally:
        parent.send("stop")
        server.join(timeout=10)
    print(
        f"\nc = {args.concurrency}, latency {args.latency * 1000:.0f} ms, {args.calls} calls per arm; "
        f"{started:%Y-%m-%d %H:%M} UTC; load {os.getloadavg()[0]:.2f} at the end\n"
    )
    print("| arm | CPU ms per call, range (median) |\n|---|---|")
    for arm in ARMS:
        values = [row["ms_per_call"] for row in rows if row["arm"] == arm]
        print(f"| {arm} | {min(values):.2f}-{max(values):.2f} ({statistics.median(values):.2f}) |")
    result = {"what": vars(args), "started_utc": started.isoformat(timespec="minutes"), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
