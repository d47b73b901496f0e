"""Helpers for ``llm/serve.sh``: merge LoRA adapters into local copies of the base, and wait for a server.

``transformers serve`` (the CPU fallback of ``llm/serve.sh``) loads no LoRA adapters, and it loads a model by the
name a request gives: a local path relative to its working directory, else a Hub id. So the script merges each
adapter into a full copy of the base (``peft``'s ``merge_and_unload``), cached under a key of the base and adapter
files, and starts the server in a *names folder* holding one link per served name (``base``, ``sft``, ``ppo``, ...).
A request for ``model="sft"`` then loads the merged SFT model, as vLLM's ``--lora-modules sft=...`` would answer it.

    python -m retroformer.serving prepare --model runs/tiny/lm --adapters sft=runs/demo/sft \\
        --cache-dir runs/serve_cache --names-dir runs/serve_cache/names-8000
    python -m retroformer.serving wait --url http://127.0.0.1:8000/v1 --timeout 300 --load base --load sft
    python -m retroformer.serving serve --names base sft -- --host 127.0.0.1 --port 8000 --device cpu

``serve`` runs ``transformers serve`` behind :class:`ServedModelsGuard`: a request for a model name that is not
served answers 404 (``transformers serve`` would try to load it as a path or Hub id and answer 500), and with
``SERVE_API_KEY`` in the environment every request must carry it (``Authorization: Bearer <key>``), as vLLM's
``--api-key`` does.

Nothing here runs at import.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

from retroformer.errors import ConfigError, LLMError

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_adapters(spec: str) -> dict[str, str]:
    """``"sft=runs/demo/sft,ppo=runs/demo/ppo"`` -> ``{"sft": "runs/demo/sft", "ppo": "runs/demo/ppo"}``."""
    out: dict[str, str] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ConfigError(f"SERVE_ADAPTERS entry {item!r} is not name=path; write e.g. sft=runs/demo/sft")
        if not NAME_RE.match(name):
            raise ConfigError(
                f"SERVE_ADAPTERS name {name!r} must be letters, digits, '.', '_' or '-' (it becomes the model name)"
            )
        if name in out:
            raise ConfigError(f"SERVE_ADAPTERS names {name!r} twice; give each adapter its own name")
        out[name] = path
    return out


def _fingerprint(base: Path, adapter: Path) -> str:
    """Key of a merged copy: the adapter's files and the base's config and weight files (name, size, mtime)."""
    h = hashlib.sha256(str(base.resolve()).encode())
    for p in sorted(base.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for p in sorted(adapter.iterdir()):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def merge_adapter(base: str | Path, adapter: str | Path, cache_dir: str | Path, dtype: str = "auto") -> Path:
    """A full copy of ``base`` with the LoRA ``adapter`` merged in, saved under ``cache_dir`` (reused if present)."""
    base, adapter = Path(base), Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(
            f"adapter folder {str(adapter)!r} has no adapter_config.json; point SERVE_ADAPTERS at a folder written by "
            "PeftModel.save_pretrained (e.g. the output of sft_run.py)"
        )
    if not (base / "config.json").is_file():
        raise ConfigError(
            f"base model {str(base)!r} is not a local model folder (no config.json); CPU serving merges adapters "
            "into a local copy, so set SERVE_MODEL to a local path"
        )
    out = Path(cache_dir) / f"merged-{_fingerprint(base, adapter)}"
    if (out / "config.json").is_file():
        logger.info("reusing merged model %s", out)
        return out
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tokenizer_src = adapter if (adapter / "tokenizer_config.json").is_file() else base
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(tmp)
    os.replace(tmp, out)
    logger.info("merged %s into %s -> %s", adapter, base, out)
    return out


def prepare_names_dir(
    model: str, adapters: dict[str, str], cache_dir: str | Path, names_dir: str | Path, base_name: str, dtype: str
) -> list[str]:
    """Fill ``names_dir`` with one link per served name; returns the names (base first)."""
    names_dir = Path(names_dir)
    if names_dir.exists():
        shutil.rmtree(names_dir)
    names_dir.mkdir(parents=True)
    if not NAME_RE.match(base_name):
        raise ConfigError(f"SERVE_BASE_NAME {base_name!r} must be letters, digits, '.', '_' or '-'")
    if base_name in adapters:
        raise ConfigError(f"adapter name {base_name!r} is also SERVE_BASE_NAME; rename one of them")
    names = []
    if Path(model).is_dir():
        (names_dir / base_name).symlink_to(Path(model).resolve(), target_is_directory=True)
        names.append(base_name)
    else:
        logger.warning("SERVE_MODEL %r is not a local folder: the base is served under that name", model)
    for name, path in adapters.items():
        merged = merge_adapter(model, path, cache_dir, dtype=dtype)
        (names_dir / name).symlink_to(merged.resolve(), target_is_directory=True)
        names.append(name)
    return names


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_ready(
    base_url: str, timeout_s: float, load: list[str] = (), pid: int | None = None, api_key: str | None = None
) -> None:
    """Poll ``GET {base_url}/models`` until it answers, then ask the server to load each of ``load``.

    Fails with :class:`LLMError` after ``timeout_s`` seconds in all, or as soon as process ``pid`` has exited.
    """
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    root = base_url.rstrip("/").removesuffix("/v1")
    last = "no answer yet"
    while True:
        if pid is not None and not _pid_alive(pid):
            raise LLMError(f"the server process {pid} exited before answering {base_url}/models; see its log above")
        try:
            r = httpx.get(f"{base_url.rstrip('/')}/models", timeout=5.0, headers=headers)
            if r.status_code == 200:
                break
            last = f"HTTP {r.status_code}"
        except httpx.TransportError as exc:
            last = type(exc).__name__
        if time.monotonic() > deadline:
            raise LLMError(
                f"{base_url}/models did not answer within {timeout_s:.0f} s (last: {last}); raise "
                "SERVE_READY_TIMEOUT or check the server log"
            )
        time.sleep(0.5)
    for name in load:
        # transformers serve loads on first use; ask now so the first real request is not the slow one.
        remaining = max(1.0, deadline - time.monotonic())
        with httpx.stream("POST", f"{root}/load_model", json={"model": name}, timeout=remaining, headers=headers) as r:
            if r.status_code != 200:
                raise LLMError(f"loading model {name!r} answered HTTP {r.status_code}; expected 200")
            status = None
            for line in r.iter_lines():
                if line.startswith("data:"):
                    event = json.loads(line[5:])
                    status = event.get("status")
                    if status == "error":
                        raise LLMError(f"the server could not load model {name!r}: {event}")
            if status != "ready":
                raise LLMError(f"loading model {name!r} ended with status {status!r}; expected 'ready'")
        logger.info("model %s loaded", name)


#: The endpoints whose requests must name a model (OpenAI answers 400 without one).
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


class ServedModelsGuard:
    """ASGI middleware in front of ``transformers serve``, answering in OpenAI's error format: 401 without the API key
    (if one is set), 400 for a completion request without a ``model``, 404 for a model that is not served; and
    ``GET /v1/models/{id}`` (the SDK's ``models.retrieve``), which ``transformers serve`` lacks.

    Requests are checked before the wrapped app sees them; a checked body is handed on unchanged.
    """

    def __init__(self, app, names: list[str], api_key: str | None = None) -> None:
        self.app = app
        self.names = list(names)
        self._key = api_key or None

    async def _reply(self, send, status: int, message: str, etype: str, param: str | None = None) -> None:
        await self._json(send, status, {"error": {"message": message, "type": etype, "param": param, "code": status}})

    async def _json(self, send, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._key is not None and scope.get("path") != "/health":
            sent = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(sent.encode(), f"Bearer {self._key}".encode()):
                await self._reply(send, 401, "missing or wrong API key (Authorization: Bearer ...)", "auth_error")
                return
        path = (scope.get("path") or "").rstrip("/")
        if scope.get("method") == "GET" and path.startswith("/v1/models/"):
            await self._retrieve(send, path[len("/v1/models/") :])
            return
        if scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            request = None  # not JSON: the app answers it
        model = request.get("model") if isinstance(request, dict) else None
        if isinstance(request, dict) and path in GENERATION_PATHS and not (isinstance(model, str) and model):
            await self._reply(
                send,
                400,
                f"you must provide a model parameter (a string), one of: {', '.join(self.names)}",
                "invalid_request_error",
                "model",
            )
            return
        if isinstance(model, str) and model not in self.names:
            await self._reply(
                send, 404, f"model {model!r} is not served here; served: {', '.join(self.names)}", "not_found_error"
            )
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _retrieve(self, send, model: str) -> None:
        """``GET /v1/models/{model}`` as OpenAI answers it."""
        if model not in self.names:
            await self._reply(
                send,
                404,
                f"The model {model!r} does not exist; served: {', '.join(self.names)}",
                "invalid_request_error",
                "model",
            )
            return
        await self._json(send, 200, {"id": model, "object": "model", "created": 0, "owned_by": "retroformer"})


def serve_transformers(names: list[str], api_key: str | None, server_argv: list[str]) -> None:
    """Run ``transformers serve <server_argv>`` with its app wrapped in :class:`ServedModelsGuard`."""
    from transformers.cli import transformers as transformers_cli
    from transformers.cli.serving import server as transformers_server

    build = transformers_server.build_server

    def guarded(*args, **kwargs):
        return ServedModelsGuard(build(*args, **kwargs), names, api_key)

    transformers_server.build_server = guarded  # Serve() imports build_server from this module when it starts
    sys.argv = ["transformers", "serve", *server_argv]
    transformers_cli.main()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retroformer.serving", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="merge adapters and write the names folder; prints the served names")
    p.add_argument("--model", required=True)
    p.add_argument("--adapters", default="")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--names-dir", required=True)
    p.add_argument("--base-name", default="base")
    p.add_argument("--dtype", default="auto")
    w = sub.add_parser("wait", help="wait until the server answers and has loaded the named models")
    w.add_argument("--url", required=True)
    w.add_argument("--timeout", type=float, default=300.0)
    w.add_argument("--load", action="append", default=[])
    w.add_argument("--pid", type=int, default=None)
    g = sub.add_parser("serve", help="run `transformers serve ARGS` answering only for --names (see the docstring)")
    g.add_argument("--names", nargs="+", required=True)
    g.add_argument("server_args", nargs=argparse.REMAINDER, help="arguments of `transformers serve`, after --")
    args = parser.parse_args(argv)
    # A script: the key comes from the environment (serve.sh reads it from .env), never from the command line.
    api_key = os.environ.get("SERVE_API_KEY") or None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "prepare":
            names = prepare_names_dir(
                args.model, parse_adapters(args.adapters), args.cache_dir, args.names_dir, args.base_name, args.dtype
            )
            print(" ".join(names))
        elif args.command == "serve":
            serve_transformers(args.names, api_key, [a for a in args.server_args if a != "--"])
        else:
            wait_ready(args.url, args.timeout, args.load, args.pid, api_key=api_key)
    except (ConfigError, LLMError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
