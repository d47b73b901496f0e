"""Every call ends in bounded time: a total deadline per attempt (not a per-read timeout), and after a signal no retry
and no call that could not end within one timeout. Against the fake OpenAI-compatible server, offline."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest

from retroformer.config import from_dict
from retroformer.errors import LLMError
from retroformer.llm import LLMConfig
from retroformer.llm.base import GenerationRequest, SamplingParams
from retroformer.llm.openai_backend import OpenAIBackend
from retroformer.testing import FakeOpenAIServer, Fault
from retroformer.trials import TrialsConfig, run_trials

#: Far above every deadline under test: reached only by a call that would hang for ever.
HANG_GUARD_S = 60


def generate(llm: OpenAIBackend) -> str:
    async def go():
        try:
            request = GenerationRequest("hello", SamplingParams(max_tokens=8))
            return (await asyncio.wait_for(llm.generate(request), HANG_GUARD_S)).text
        finally:
            await llm.aclose()

    return asyncio.run(go())


def test_a_server_that_sends_headers_then_a_byte_at_a_time_is_cut_off_by_the_deadline():
    with FakeOpenAIServer(faults=[Fault("drip")]) as url:
        cfg = LLMConfig(backend="openai", base_url=url, model="m", timeout_s=1, max_retries=0)
        with pytest.raises(LLMError, match=r"timed out after 1 s without a complete reply"):
            generate(OpenAIBackend(cfg))


def test_a_drip_then_a_good_reply_is_retried_and_answered():
    with FakeOpenAIServer(reply=lambda p: "fine", faults=[Fault("drip")]) as url:
        cfg = LLMConfig(backend="openai", base_url=url, model="m", timeout_s=1, max_retries=1)
        assert generate(OpenAIBackend(cfg, backoff_s=0.01)) == "fine"


def test_after_sigterm_no_retry_starts_and_the_call_in_flight_ends_within_its_timeout(tmp_path):
    server = FakeOpenAIServer(faults=[Fault("timeout")] * 50, timeout_hold_s=HANG_GUARD_S)
    llm = {"backend": "openai", "model": "m", "timeout_s": 1, "max_retries": 30, "retry_backoff_s": 0.01}
    with server as url:
        llm["base_url"] = url
        cfg = from_dict(
            TrialsConfig,
            {
                "runs_dir": str(tmp_path / "runs"),
                "trials": 2,
                "concurrency": 1,
                "export_dataset": False,
                "env": {"name": "synthetic", "options": {"num_tasks": 3}},
                "actor": {"kind": "react", "llm": llm},
                "reflector": {"llm": llm},
            },
        )
        at_signal: list[int] = []

        def send_sigterm():
            while not server.requests:
                threading.Event().wait(0.01)
            at_signal.append(len(server.requests))
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=send_sigterm, daemon=True).start()
        result = run_trials(cfg, progress=False)
    assert result.stopped_by_signal == "SIGTERM"
    assert result.stopped_by_errors is None  # calls cut short by the stop are not an outage
    assert len(server.requests) == at_signal[0] == 1  # the attempt in flight was not retried
    (rec,) = result.records
    assert rec.errored and "the run is stopping" in rec.error
