"""llm/serve.sh on the CPU: a tiny base model plus a LoRA adapter behind ``transformers serve``.

The server is started once for the module (about 15 s on two cores), answers OpenAI completion requests for the base
and for the adapter by name, and must give the same greedy text as in-process generation of the same (merged) model.
The tiny tokenizer has no chat template, so requests use the completion endpoint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retroformer.testing.serve_script import start_serve_script

pytest.importorskip("fastapi", reason="transformers serve needs fastapi: pip install 'transformers[serving]'")
pytest.importorskip("uvicorn", reason="transformers serve needs uvicorn: pip install 'transformers[serving]'")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Reflection: I opened the wrong door.", "Task: escape"]
MAX_TOKENS = 12
READY_TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not collected it yet.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from retroformer.tiny import TinyModelConfig, build_tiny_models

    out = tmp_path_factory.mktemp("serve_models")
    lm = build_tiny_models(TinyModelConfig(out=str(out / "tiny")))["lm"]
    model = AutoModelForCausalLM.from_pretrained(lm)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at zero: perturb it so the adapter changes the model
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    adapter = out / "adapter"
    peft_model.save_pretrained(adapter)
    return {"lm": lm, "adapter": adapter, "cache": out / "serve_cache"}


DOTENV_SECRET = "sk-dotenv-secret-for-another-service"


@pytest.fixture(scope="module")
def server(models):
    port = _free_port()
    # An .env of the test's own (a developer's stays out): a secret of another service must not reach the server.
    env_file = models["cache"].parent / "serve.env"
    env_file.write_text(f"OPENAI_API_KEY={DOTENV_SECRET}\nexport SERVE_BASE_NAME='base'\n")
    env = {
        **os.environ,
        "SERVE_ENV_FILE": str(env_file),
        "SERVE_MODEL": str(models["lm"]),
        "SERVE_ADAPTERS": f"sft={models['adapter']}",
        "SERVE_PORT": str(port),
        "SERVE_HOST": "127.0.0.1",
        "SERVE_BACKEND": "transformers",
        "SERVE_CACHE_DIR": str(models["cache"]),
        "SERVE_READY_TIMEOUT": str(READY_TIMEOUT_S - 10),
        "PYTHON": sys.executable,
        "HF_HUB_OFFLINE": "1",
    }
    try:
        served = start_serve_script(ROOT / "llm" / "serve.sh", env, timeout_s=READY_TIMEOUT_S, tail=40)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    proc = served.proc
    info = {"proc": proc, "url": served.url, "lines": served.lines, "server_pids": _children(proc.pid)}
    yield info
    served.kill()  # when a failed test left it running


def _local_greedy(model_dir: Path, adapter: Path | None, prompt: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_help_documents_every_variable():
    out = subprocess.run(["bash", str(ROOT / "llm" / "serve.sh"), "--help"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0
    for var in ("SERVE_MODEL", "SERVE_ADAPTERS", "SERVE_HOST", "SERVE_PORT", "SERVE_DTYPE", "SERVE_BACKEND",
                "SERVE_CACHE_DIR", "SERVE_READY_TIMEOUT", "SERVE_ENV_FILE", "PYTHON"):  # fmt: skip
        assert var in out.stdout, f"--help does not document {var}"
    assert subprocess.run(["bash", "-n", str(ROOT / "llm" / "serve.sh")], timeout=10).returncode == 0


def test_models_are_listed_by_name(server):
    import httpx

    ids = {m["id"] for m in httpx.get(f"{server['url']}/models", timeout=10).json()["data"]}
    assert {"base", "sft"} <= ids


def test_an_unknown_model_name_answers_404_and_other_secrets_of_env_stay_out(server):
    import httpx

    r = httpx.post(f"{server['url']}/completions", json={"model": "nope", "prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 404 and "'nope' is not served here" in r.json()["error"]["message"]
    for pid in server["server_pids"]:
        environ = Path(f"/proc/{pid}/environ")
        if environ.exists():
            assert DOTENV_SECRET.encode() not in environ.read_bytes()


def test_http_greedy_text_matches_in_process_generation(server, models):
    from openai import OpenAI

    client = OpenAI(base_url=server["url"], api_key="EMPTY", max_retries=0, timeout=60)
    texts = {}
    for name, adapter in (("base", None), ("sft", models["adapter"])):
        for prompt in PROMPTS:
            reply = client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
            expected = _local_greedy(models["lm"], adapter, prompt)
            assert reply.choices[0].text == expected, f"model {name!r}, prompt {prompt!r}"
            texts[name, prompt] = expected
    assert any(texts["base", p] != texts["sft", p] for p in PROMPTS), "the adapter did not change the served model"


def test_trials_with_the_served_reflector(server, tmp_path):
    pytest.importorskip("retroformer.llm.openai_backend", reason="the OpenAI-compatible backend is not available")
    from retroformer.config import from_dict
    from retroformer.trials import TrialsConfig, run_trials

    cfg = from_dict(
        TrialsConfig,
        {
            "run_name": "served",
            "runs_dir": str(tmp_path),
            "trials": 2,
            "env": {"name": "synthetic", "options": {"num_tasks": 2, "num_doors": 3}},
            "actor": {"kind": "plan"},
            "reflector": {
                "llm": {
                    "backend": "openai",
                    "base_url": server["url"],
                    "style": "completion",
                    "model": "sft",
                    "max_tokens": 16,
                    "max_retries": 1,
                    "timeout_s": 60,
                },  # fmt: skip
            },
        },
    )
    res = run_trials(cfg, progress=False)
    first = [r for r in res.records if r.trial == 0]
    assert len(first) == 2 and not any(r.success for r in first)  # the plan actor needs a reflection to win
    for record in first:
        assert record.reflection is not None, record.error
        assert "sft" in record.reflection.reflector_id
    assert len([r for r in res.records if r.trial == 1]) == 2


def test_sigint_stops_the_script_and_the_server(server):
    proc = server["proc"]
    assert server["server_pids"], "serve.sh started no server process"
    os.kill(proc.pid, signal.SIGINT)
    proc.wait(timeout=90)  # generous: on a loaded machine the server's shutdown alone can take tens of seconds
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in server["server_pids"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in server["server_pids"]), "the server outlived llm/serve.sh"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(server["url"].split(":")[2].split("/")[0])), timeout=2)


def test_bad_adapter_spec_fails_before_starting_a_server(tmp_path):
    from retroformer.errors import ConfigError
    from retroformer.serving import parse_adapters

    assert parse_adapters("sft=runs/a, ppo=runs/b,") == {"sft": "runs/a", "ppo": "runs/b"}
    with pytest.raises(ConfigError, match="twice"):
        parse_adapters("sft=a,sft=b")
    env = {**os.environ, "SERVE_ENV_FILE": str(tmp_path / "no.env"), "SERVE_BACKEND": "transformers",
           "SERVE_MODEL": str(tmp_path), "SERVE_ADAPTERS": "sft", "SERVE_CACHE_DIR": str(tmp_path / "c"),
           "SERVE_PORT": str(_free_port()), "PYTHON": sys.executable}  # fmt: skip
    proc = subprocess.run(["bash", str(ROOT / "llm" / "serve.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "not name=path" in proc.stderr and "ready:" not in proc.stdout


def test_the_guard_checks_the_api_key_and_the_model_name_before_the_server_sees_a_request():
    import asyncio

    import httpx

    from retroformer.serving import ServedModelsGuard

    seen = []

    async def app(scope, receive, send):
        body = (await receive())["body"]
        seen.append(json.loads(body))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    async def go():
        guard = ServedModelsGuard(app, ["base", "sft"], api_key="k3y")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://s") as client:
            no_key = await client.post("/v1/completions", json={"model": "sft"})
            wrong = await client.post("/v1/completions", json={"model": "sft"}, headers={"Authorization": "Bearer x"})
            key = {"Authorization": "Bearer k3y"}
            unknown = await client.post("/v1/completions", json={"model": "ppo"}, headers=key)
            ok = await client.post("/v1/completions", json={"model": "sft", "prompt": "p"}, headers=key)
        return no_key.status_code, wrong.status_code, unknown.status_code, ok.status_code

    assert asyncio.run(go()) == (401, 401, 404, 200)
    assert seen == [{"model": "sft", "prompt": "p"}]  # only the accepted request, its body intact


def test_a_non_loopback_host_without_an_api_key_is_warned_about(tmp_path):
    env = {**os.environ, "SERVE_ENV_FILE": str(tmp_path / "none.env"), "SERVE_HOST": "0.0.0.0", "SERVE_BACKEND": "x"}
    out = subprocess.run(["bash", str(ROOT / "llm" / "serve.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "SERVE_API_KEY is not set" in out.stderr
    env["SERVE_API_KEY"] = "k"
    out = subprocess.run(["bash", str(ROOT / "llm" / "serve.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "SERVE_API_KEY is not set" not in out.stderr


def test_the_guard_answers_a_request_without_a_model_and_models_retrieve_in_openais_format():
    import asyncio

    import httpx
    import httpx2
    import openai

    from retroformer.serving import ServedModelsGuard

    seen = []

    async def app(scope, receive, send):
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"the wrapped server"})

    guard = ServedModelsGuard(app, ["base", "sft"])

    async def raw():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://s") as client:
            chat = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            completion = await client.post("/v1/completions", json={"model": None, "prompt": "p"})
            return chat, completion

    async def sdk():
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=guard))
        client = openai.AsyncOpenAI(base_url="http://s/v1", api_key="k", max_retries=0, http_client=http)
        try:
            found = await client.models.retrieve("sft")
            with pytest.raises(openai.NotFoundError) as missing:
                await client.models.retrieve("ppo")
            return found, missing.value
        finally:
            await client.close()

    chat, completion = asyncio.run(raw())
    for reply in (chat, completion):
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "model"
        assert "you must provide a model parameter" in error["message"] and "base, sft" in error["message"]
    found, missing = asyncio.run(sdk())
    assert (found.id, found.object) == ("sft", "model")
    assert missing.status_code == 404 and "'ppo' does not exist" in str(missing)
    assert seen == []  # none of these reached the wrapped server
