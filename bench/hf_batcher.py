"""New tokens/s of the ``hf`` backend's micro-batcher against one bare batched ``model.generate``.

    OMP_NUM_THREADS=2 .venv/bin/python bench/hf_batcher.py

SmolLM2-135M-Instruct (the folder ``retroformer models`` writes; float32, CPU), 8 chat prompts of a vault task
(system text + a task with its trajectory so far, about 180 tokens each), greedy, ``--max_new_tokens`` each, with the
actor's stop sequence ``--stop`` (the ReAct actor stops before the environment's next observation).
Three arms, interleaved in every repetition (their order rotates), all on the same loaded model:

- ``bare``: the 8 prompts rendered with the chat template, tokenized together (left padding), and one
  ``model.generate`` under ``torch.inference_mode`` with a ``StopStringCriteria`` built beforehand; only the
  ``generate`` call is timed;
- ``backend``: 8 asyncio tasks call :meth:`HFBackend.generate` at once, as 8 episodes of the trial loop do; timed
  from the first call to the last answer (prompt formatting, tokenization, the batcher's wait, decoding included);
- ``staggered``: the same, but the 8 calls arrive spread over ``--stagger_ms`` (episodes come back from their
  environment steps at different moments).

New tokens are counted the same way in every arm: per prompt, the generated tokens up to and including the first EOS
(the backend's ``completion_tokens``). Reported: tokens/s per arm, the ratio of each backend arm to ``bare`` in the
same repetition, the sizes of the ``generate`` calls the batcher made, and process CPU seconds per arm (on a machine
shared with other work the wall times scatter; tokens per CPU second scatter less).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from retroformer.llm import LLMConfig
from retroformer.llm.base import GenerationRequest, SamplingParams
from retroformer.llm.hf_backend import HFBackend

SYSTEM = "You are an agent in a text world. Answer with one Thought line and one Action line."
ROOMS = ["red", "green", "blue", "amber", "white", "black", "silver", "golden"]


def vault_prompts(n: int) -> list[str]:
    """``n`` distinct task prompts of similar length, each with a short trajectory, like an actor's mid-episode."""
    prompts = []
    for i in range(n):
        room = ROOMS[i % len(ROOMS)]
        prompts.append(
            f"Task {i}: you stand in the {room} hall of a vault with four doors, numbered 1 to 4. One door leads to "
            "the treasure; the others lead back to this hall. A note on the wall reads: 'the door you want is "
            f"neither the first nor the one beside the {room} lamp'. Earlier attempts taught you: the lamp stands "
            f"beside door {1 + i % 4}; door 1 was wrong in the last attempt.\n"
            "Thought: I should read the note again.\nAction: look note\n"
            f"Observation: The note says the door you want is neither the first nor the one beside the {room} lamp.\n"
            "Explain step by step which doors remain, why, and which one you open now."
        )
    return prompts


def count_new_tokens(rows: list[list[int]], eos_ids: set[int], pad_id: int | None) -> int:
    """Generated tokens per row up to and including the first EOS (as the backend counts ``completion_tokens``)."""
    total = 0
    for row in rows:
        count = len(row)
        for i, tok in enumerate(row):
            if tok in eos_ids:
                count = i + 1
                break
            if tok == pad_id:
                count = i
                break
        total += count
    return total


def bare_generate(backend: HFBackend, prompts: list[str], max_new_tokens: int, stop: Any) -> tuple[int, float, float]:
    """(new tokens, seconds, CPU seconds) of one batched ``model.generate`` of ``prompts`` on the backend's model;
    ``stop`` is a prebuilt ``StoppingCriteriaList`` or None."""
    import torch

    tok, model = backend._tokenizer, backend._model
    texts = [
        tok.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for p in prompts
    ]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            top_p=None,
            top_k=None,
            stopping_criteria=stop,
        )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = out[:, enc["input_ids"].shape[1] :].tolist()
    return count_new_tokens(rows, eos_ids, tok.pad_token_id), wall, cpu


async def through_backend(
    backend: HFBackend, prompts: list[str], params: SamplingParams, stagger_s: float, rng: random.Random
) -> tuple[int, float, float]:
    """(new tokens, seconds, CPU seconds) of ``len(prompts)`` concurrent ``generate`` calls."""
    delays = sorted(rng.uniform(0, stagger_s) for _ in prompts) if stagger_s > 0 else [0.0] * len(prompts)
    delays = [d - delays[0] for d in delays]  # the first call arrives at once

    async def one(prompt: str, delay: float) -> int:
        if delay:
            await asyncio.sleep(delay)
        completion = await backend.generate(GenerationRequest(prompt, params, system=SYSTEM))
        return completion.usage.completion_tokens

    t0, c0 = time.perf_counter(), time.process_time()
    counts = await asyncio.gather(*(one(p, d) for p, d in zip(prompts, delays, strict=True)))
    return sum(counts), time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/models/smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stagger_ms", type=float, default=30.0, help="spread of arrival times in the staggered arm")
    parser.add_argument("--stop", default="\nObservation", help="stop sequence of every arm ('' for none)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)

    import torch
    from transformers import StoppingCriteriaList
    from transformers.generation.stopping_criteria import StopStringCriteria

    cfg = LLMConfig(
        backend="hf",
        model=args.model,
        style="chat",
        device="cpu",
        dtype="float32",
        batch_size=args.prompts,
        max_tokens=args.max_new_tokens,
    )
    backend = HFBackend(cfg)
    backend.load()
    prompts = vault_prompts(args.prompts)
    lens = [len(backend._tokenizer(backend.format_prompt(p, SYSTEM)[0])["input_ids"]) for p in prompts]
    print(
        f"model {args.model}, {args.prompts} prompts of {min(lens)}-{max(lens)} tokens, max_new_tokens "
        f"{args.max_new_tokens}, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f} at the start"
    )
    rng = random.Random(0)
    arms = ["bare", "backend", "staggered"]
    stops = (args.stop,) if args.stop else ()
    bare_stop = StoppingCriteriaList([StopStringCriteria(backend._tokenizer, list(stops))]) if stops else None
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0, stop=stops)

    async def run_all() -> list[dict]:
        rows: list[dict] = []
        # Warm-up (not measured): the first forward passes allocate and pick kernels.
        bare_generate(backend, prompts, 4, bare_stop)
        await through_backend(backend, prompts, SamplingParams(max_tokens=4, stop=stops), 0.0, rng)
        for rep in range(args.repeats):
            order = arms[rep % 3 :] + arms[: rep % 3]
            for arm in order:
                before = len(backend.batch_sizes)
                if arm == "bare":
                    tokens, wall, cpu = bare_generate(backend, prompts, args.max_new_tokens, bare_stop)
                else:
                    stagger = args.stagger_ms / 1000 if arm == "staggered" else 0.0
                    tokens, wall, cpu = await through_backend(backend, prompts, params, stagger, rng)
                rows.append(
                    {
                        "repeat": rep,
                        "arm": arm,
                        "new_tokens": tokens,
                        "wall_s": wall,
                        "tokens_per_s": tokens / wall,
                        "cpu_s": cpu,
                        "batches": backend.batch_sizes[before:] if arm != "bare" else [len(prompts)],
                    }
                )
        await backend.aclose()
        return rows

    rows = asyncio.run(run_all())
    bare = {r["repeat"]: r["tokens_per_s"] for r in rows if r["arm"] == "bare"}
    print(f"load {os.getloadavg()[0]:.2f} (1-min average at the end)")
    print("| rep | arm | new tokens | wall s | tokens/s | ratio to bare | generate calls (sizes) | CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["ratio"] = r["tokens_per_s"] / bare[r["repeat"]]
        print(
            f"| {r['repeat']} | {r['arm']} | {r['new_tokens']} | {r['wall_s']:.2f} | {r['tokens_per_s']:.1f} "
            f"| {r['ratio']:.2f} | {r['batches']} | {r['cpu_s']:.2f} |"
        )

    def total(arm: str, key: str) -> float:
        return sum(r[key] for r in rows if r["arm"] == arm)

    base = total("bare", "new_tokens") / total("bare", "wall_s")
    base_cpu = total("bare", "new_tokens") / total("bare", "cpu_s")
    for arm in arms[1:]:
        ours = total(arm, "new_tokens") / total(arm, "wall_s")
        ours_cpu = total(arm, "new_tokens") / total(arm, "cpu_s")
        print(
            f"{arm}: {ours:.1f} tokens/s over all repetitions, {ours / base:.2f} x bare ({base:.1f} tokens/s); "
            f"per CPU second {ours_cpu / base_cpu:.2f} x bare"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
