"""llm/serve.sh's vLLM branch on the CPU: the project's tiny model and two trained LoRA adapters behind vLLM.

vLLM runs from the serving environment ``.venv-serve`` (``make serve-venv``: vLLM's CPU build, whose pins clash with
the training stack's); the tests skip, saying so, when it is absent. The server starts once for the module (one to
two minutes on two cores) and the tests check that

- ``/v1/models`` lists the base and both adapters, served by vLLM (chosen by ``SERVE_BACKEND=auto``);
- a LoRA adapter trained by the project's SFT stage gives, through vLLM, the token log-probabilities that PEFT gives
  in process, within ``LOGPROB_ATOL`` (measured: under 1e-5 in float32), while it moves them by far more than that;
- the trial loop runs with the actor and the reflector both served by vLLM;
- SIGTERM stops llm/serve.sh, every process of the server, and frees the port.

The tiny model is built with ``hidden_size=128`` (head size 32): vLLM's CPU attention supports head sizes from 32
up, and the default tiny shape (head size 16) fails on the first request.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_training import vault_prompt, write_rated_dataset

from retroformer.testing.serve_script import start_serve_script

ROOT = Path(__file__).resolve().parents[1]
SERVE_PYTHON = ROOT / ".venv-serve" / "bin" / "python"
READY_TIMEOUT_S = 420
# float32 on both sides; differences come from the order of floating-point sums (vLLM's CPU kernels vs PyTorch's).
LOGPROB_ATOL = 1e-3
SFT_STEPS = 40


def _serving_env_missing() -> str | None:
    if not SERVE_PYTHON.exists():
        return f"the serving environment {SERVE_PYTHON.parent.parent} is absent; create it with `make serve-venv`"
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    if subprocess.run([str(SERVE_PYTHON), "-c", probe], capture_output=True, timeout=60).returncode != 0:
        return f"{SERVE_PYTHON} cannot import vllm; recreate the serving environment with `make serve-venv`"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        path = Path(f"/proc/{p}/task/{p}/children")
        kids = [int(x) for x in path.read_text().split()] if path.exists() else []
        out.extend(kids)
        todo.extend(kids)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")  # a zombie has exited; only its parent has not collected it yet
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny model (head size 32) and an SFT adapter trained on vault reflections, plus its step-20 checkpoint."""
    reason = _serving_env_missing()
    if reason:
        pytest.skip(reason)
    from retroformer.tiny import TinyModelConfig, build_tiny_models
    from retroformer.training.sft import SFTStageConfig, run_sft

    out = tmp_path_factory.mktemp("vllm_models")
    lm = build_tiny_models(TinyModelConfig(out=str(out / "tiny"), hidden_size=128, intermediate_size=256))["lm"]
    data = write_rated_dataset(out / "rated", num_prompts=8, reflections_per_prompt=4)
    sft_dir = out / "sft"
    cfg = SFTStageConfig(
        model=str(lm),
        dataset=[data],
        output_dir=str(sft_dir),
        max_steps=SFT_STEPS,
        learning_rate=1e-3,
        per_device_train_batch_size=4,
        logging_steps=10,
        save_steps=SFT_STEPS // 2,
        save_total_limit=None,
    )
    metrics = run_sft(cfg)
    assert metrics["sft/last_logged_loss"] < metrics["sft/first_logged_loss"], metrics
    early = sft_dir / f"checkpoint-{SFT_STEPS // 2}"
    assert (early / "adapter_config.json").is_file(), sorted(p.name for p in early.iterdir())
    return {"lm": lm, "sft": sft_dir, "early": early, "dir": out}


@pytest.fixture(scope="module")
def server(models):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVE_")}
    env.update(
        {
            "SERVE_ENV_FILE": str(models["dir"] / "no.env"),  # keep a developer's .env out of the test
            "SERVE_MODEL": str(models["lm"]),
            "SERVE_ADAPTERS": f"sft={models['sft']},early={models['early']}",
            "SERVE_PORT": str(port),
            "SERVE_HOST": "127.0.0.1",
            "SERVE_DTYPE": "float32",  # vLLM's auto picks bfloat16 on a CPU; the parity test compares float32
            # Eager mode: the torch.compile warm-up costs over a minute on two cores and changes nothing tested here.
            "SERVE_EXTRA_ARGS": "--enforce-eager --max-model-len 2048",
            "SERVE_READY_TIMEOUT": str(READY_TIMEOUT_S - 20),
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "PYTHON": sys.executable,
            "HF_HUB_OFFLINE": "1",
        }
    )
    try:
        served = start_serve_script(ROOT / "llm" / "serve.sh", env, timeout_s=READY_TIMEOUT_S)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    proc, url, lines = served.proc, served.url, served.lines
    yield {"proc": proc, "url": url, "port": port, "lines": lines, "server_pids": _descendants(proc.pid)}
    served.kill()  # when a failed test left it running


def test_models_lists_base_and_adapters_served_by_vllm(server, models):
    import httpx

    data = httpx.get(f"{server['url']}/models", timeout=10).json()["data"]
    by_id = {m["id"]: m for m in data}
    assert set(by_id) == {"base", "sft", "early"}
    assert {m["owned_by"] for m in data} == {"vllm"}, "SERVE_BACKEND=auto did not choose vLLM from .venv-serve"
    assert by_id["sft"]["parent"] == by_id["early"]["parent"] == "base"
    assert "ready: " + server["url"] + " models: base sft early\n" in server["lines"]


def _served_logprobs(url: str, model: str, ids: list[int]) -> list[float]:
    import httpx

    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
    reply = httpx.post(f"{url}/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    rows = reply.json()["choices"][0]["prompt_logprobs"]
    assert rows[0] is None and len(rows) == len(ids)  # the first token has no context
    return [rows[i][str(ids[i])]["logprob"] for i in range(1, len(ids))]


def _peft_logprobs(model_dir: Path, adapter: Path | None, ids: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)  # not merged: PEFT's own LoRA forward
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_trained_adapter_logprobs_match_peft(server, models):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["lm"])
    texts = [
        vault_prompt(["red", "blue", "green", "amber"], "green")
        + " I opened the wrong door. The scratch said the way out is the green door. Next time open[green].",
        "Task: You are in a vault with 3 doors. Reflection: I was unlucky.",
    ]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        local = {name: _peft_logprobs(models["lm"], models.get(name), ids) for name in ("base", "sft", "early")}
        for name in ("base", "sft", "early"):
            served = torch.tensor(_served_logprobs(server["url"], name, ids))
            diff = (served - local[name]).abs().max().item()
            print(f"{name}: {len(ids)} tokens, max |vLLM - PEFT| log-prob {diff:.2e}")  # shown with pytest -s
            assert diff < LOGPROB_ATOL, f"model {name!r}: max |vLLM - PEFT| log-prob {diff:.2e} >= {LOGPROB_ATOL}"
        # The parity would prove nothing if the adapters hardly changed the model.
        for name in ("sft", "early"):
            moved = (local[name] - local["base"]).abs().max().item()
            assert moved > 100 * LOGPROB_ATOL, f"adapter {name!r} moves log-probs by only {moved:.2e}"
        assert (local["sft"] - local["early"]).abs().max().item() > 10 * LOGPROB_ATOL


def test_trials_with_actor_and_reflector_served_by_vllm(server, tmp_path):
    from retroformer.config import from_dict
    from retroformer.trials import TrialsConfig, run_trials

    served = {"backend": "openai", "base_url": server["url"], "style": "completion", "max_retries": 1, "timeout_s": 60}
    cfg = from_dict(
        TrialsConfig,
        {
            "run_name": "vllm-served",
            "runs_dir": str(tmp_path),
            "trials": 2,
            "concurrency": 2,
            "env": {"name": "synthetic", "options": {"num_tasks": 2, "num_doors": 3, "max_steps": 2}},
            "actor": {"kind": "react", "llm": {**served, "model": "base", "max_tokens": 16}},
            "reflector": {"llm": {**served, "model": "sft", "max_tokens": 16}},
        },
    )
    res = run_trials(cfg, progress=False)
    assert len(res.records) >= 2
    for record in res.records:
        assert record.end_reason != "llm_error", record.error
        assert record.actor_id.startswith("base@"), record.actor_id
        assert record.steps, "the served actor took no step"
        assert record.actor_usage.prompt_tokens > 0 and record.actor_usage.completion_tokens > 0
    failed_first = [r for r in res.records if r.trial == 0 and not r.success]
    for record in failed_first:
        assert record.reflection is not None, record.error
        assert record.reflection.reflector_id.startswith("sft@")
        assert record.reflection.text.strip() and record.reflection.usage.completion_tokens > 0
    assert len([r for r in res.records if r.trial == 1]) == len(failed_first)


def test_sigterm_stops_the_script_and_the_server_and_frees_the_port(server):
    proc = server["proc"]
    pids = server["server_pids"]
    assert len(pids) >= 2, f"expected vLLM's API server and engine processes under serve.sh, found {pids}"
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=90) == 143  # 128 + SIGTERM: the script's own trap ran
    deadline = time.monotonic() + 60  # vLLM's engine processes take a while to go on a loaded machine
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "a vLLM process outlived llm/serve.sh"
    with socket.socket() as s:  # the port is free again: another server (which sets SO_REUSEADDR) can listen on it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server["port"]))
        s.listen()


def test_vllm_backend_without_vllm_fails_before_starting(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVE_")}
    env.update({"SERVE_ENV_FILE": str(tmp_path / "no.env"), "SERVE_BACKEND": "vllm", "SERVE_MODEL": str(tmp_path),
                "SERVE_VLLM_PYTHON": sys.executable, "SERVE_PORT": str(_free_port()), "PYTHON": sys.executable})  # fmt: skip
    proc = subprocess.run(["bash", str(ROOT / "llm" / "serve.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "cannot import vllm" in proc.stderr and "make serve-venv" in proc.stderr
    assert "ready:" not in proc.stdout


def test_bad_adapter_spec_fails_before_starting_vllm(tmp_path):
    reason = _serving_env_missing()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVE_")}
    env.update({"SERVE_ENV_FILE": str(tmp_path / "no.env"), "SERVE_BACKEND": "vllm", "SERVE_MODEL": str(tmp_path),
                "SERVE_ADAPTERS": "ppo=runs/b, sft", "SERVE_PORT": str(_free_port()), "PYTHON": sys.executable})  # fmt: skip
    proc = subprocess.run(["bash", str(ROOT / "llm" / "serve.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "entry 'sft' is not name=path" in proc.stderr and "ready:" not in proc.stdout
