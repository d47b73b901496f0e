"""HFBackend on the tiny offline model: greedy determinism, batching equals single generation, micro-batching of
concurrent calls, LoRA adapters, stop sequences, truncation, seeded sampling."""

from __future__ import annotations

import asyncio
import time

import pytest

torch = pytest.importorskip("torch")

from retroformer.errors import ConfigError  # noqa: E402
from retroformer.llm import LLMConfig, build_llm  # noqa: E402
from retroformer.llm.base import Completion, GenerationRequest, SamplingParams  # noqa: E402
from retroformer.llm.hf_backend import HFBackend  # noqa: E402
from retroformer.tiny import TinyModelConfig, build_tiny_models  # noqa: E402
from retroformer.types import Usage  # noqa: E402

PROMPTS = [
    "Task: open the vault. Thought:",
    "hi",
    "The reflection says that the clue was wrong and the plan is to",
    "a b c",
]
GREEDY = SamplingParams(max_tokens=12)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> str:
    """The tiny LM with weights redrawn at a larger scale: its greedy output then depends on every prompt token
    (the stock random init repeats one token), so batch-vs-single comparisons can actually fail."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    paths = build_tiny_models(TinyModelConfig(out=str(root)))
    model = AutoModelForCausalLM.from_pretrained(paths["lm"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    out = root / "lm-sharp"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(paths["lm"]).save_pretrained(out)
    return str(out)


def backend(model: str, **overrides) -> HFBackend:
    fields = {"backend": "hf", "model": model, "device": "cpu", "style": "completion"}
    fields.update(overrides)
    return HFBackend(LLMConfig(**fields))


def texts(completions) -> list[str]:
    return [c.text for c in completions]


def test_greedy_is_deterministic_and_counts_usage(lm_dir):
    llm = backend(lm_dir)
    a = llm.generate_batch(PROMPTS[:1], GREEDY)[0]
    b = backend(lm_dir).generate_batch(PROMPTS[:1], GREEDY)[0]
    assert a.text == b.text and a.text.strip()
    assert a.model_id == lm_dir
    n_prompt = len(llm._tokenizer(PROMPTS[0])["input_ids"])
    assert (a.usage.prompt_tokens, a.usage.completion_tokens, a.usage.calls) == (n_prompt, 12, 1)
    assert a.finish_reason == "length"


def test_batch_with_left_padding_equals_each_prompt_alone(lm_dir):
    llm = backend(lm_dir, batch_size=8)
    batched = llm.generate_batch(PROMPTS, GREEDY)
    alone = [llm.generate_batch([p], GREEDY)[0] for p in PROMPTS]
    lengths = {len(llm._tokenizer(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS), "prompts must differ in length so that the batch is padded"
    assert len(set(texts(alone))) == len(PROMPTS), "outputs must depend on the prompt for the check to mean anything"
    assert texts(batched) == texts(alone)
    assert [c.usage for c in batched] == [c.usage for c in alone]
    assert llm.batch_sizes == [4, 1, 1, 1, 1]


def test_generate_batch_chunks_by_batch_size(lm_dir):
    llm = backend(lm_dir, batch_size=2)
    out = llm.generate_batch(PROMPTS + ["one more"], SamplingParams(max_tokens=3))
    assert len(out) == 5 and llm.batch_sizes == [2, 2, 1]
    assert llm.generate_batch([], GREEDY) == []


def count_forward_calls(llm: HFBackend) -> list[int]:
    llm.load()
    calls: list[int] = []
    llm._model.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls


def test_concurrent_calls_share_forward_passes(lm_dir):
    prompts = PROMPTS + ["five", "six six"]
    llm = backend(lm_dir, batch_size=8)
    forwards = count_forward_calls(llm)

    async def concurrent():
        return await asyncio.gather(*(llm.generate(GenerationRequest(p, GREEDY)) for p in prompts))

    async def sequential():
        return [await llm.generate(GenerationRequest(p, GREEDY)) for p in prompts]

    together = asyncio.run(concurrent())
    assert llm.batch_sizes == [6]
    batched_forwards = len(forwards)
    one_by_one = asyncio.run(sequential())
    assert llm.batch_sizes == [6] + [1] * 6
    assert texts(together) == texts(one_by_one)
    # One batch takes about as many forward passes as one prompt alone (one per generated token).
    assert batched_forwards <= GREEDY.max_tokens
    assert len(forwards) - batched_forwards >= 5 * batched_forwards


def test_micro_batcher_groups_by_sampling_params(lm_dir):
    llm = backend(lm_dir, batch_size=8)
    other = SamplingParams(max_tokens=5)

    async def mixed():
        requests = [GenerationRequest(p, GREEDY if i % 2 else other) for i, p in enumerate(PROMPTS + ["x", "y"])]
        return await asyncio.gather(*(llm.generate(r) for r in requests))

    out = asyncio.run(mixed())
    assert sorted(llm.batch_sizes) == [3, 3]
    assert [c.usage.completion_tokens for c in out] == [5, 12] * 3


def stub_backend(monkeypatch, generate_s: float, **kw) -> HFBackend:
    """An HFBackend whose ``model.generate`` is a stub taking ``generate_s`` seconds: the batcher's timing alone."""
    llm = HFBackend(LLMConfig(backend="hf", model="stub", device="cpu", batch_size=8), **kw)
    llm._model = object()  # counts as loaded

    def fake_generate(texts, params):
        time.sleep(generate_s)
        llm.batch_sizes.append(len(texts))
        return [Completion(text, Usage(calls=1), "stub") for text, _ in texts]

    monkeypatch.setattr(llm, "format_prompt", lambda prompt, system=None: (prompt, True))
    monkeypatch.setattr(llm, "_generate_formatted", fake_generate)
    return llm


async def episodes(llm: HFBackend, rounds: int, spread_s: float, n: int = 8) -> None:
    """``n`` episodes calling the backend ``rounds`` times; after each answer, episode i takes ``i * spread_s / (n-1)``
    seconds (its environment step) before its next call, so the callers of one batch come back apart."""

    async def episode(i: int) -> None:
        for r in range(rounds):
            await llm.generate(GenerationRequest(f"episode {i} step {r}", GREEDY))
            await asyncio.sleep(i * spread_s / (n - 1))

    await asyncio.gather(*(episode(i) for i in range(n)))


def test_eight_episodes_returning_milliseconds_apart_share_one_generate_call(monkeypatch):
    # Episodes come back over 20 ms, 4x the 5 ms window; the last generate took 0.4 s, so the batcher waits up to 40 ms.
    llm = stub_backend(monkeypatch, generate_s=0.4)
    asyncio.run(episodes(llm, rounds=3, spread_s=0.02))
    assert llm.batch_sizes == [8, 8, 8]
    # With the fixed window alone, the same episodes split into smaller batches that keep alternating.
    fixed = stub_backend(monkeypatch, generate_s=0.4, straggler_wait=0.0)
    asyncio.run(episodes(fixed, rounds=3, spread_s=0.02))
    assert len(fixed.batch_sizes) > 3 and sum(fixed.batch_sizes) == 24


def test_a_lone_caller_after_a_burst_waits_a_tenth_of_a_generate_at_most(monkeypatch):
    llm = stub_backend(monkeypatch, generate_s=0.3)

    async def burst_then_alone() -> list[float]:
        await asyncio.gather(*(llm.generate(GenerationRequest(f"p{i}", GREEDY)) for i in range(8)))
        windows = []
        for i in range(HFBackend.RECENT_BATCHES + 1):
            await llm.generate(GenerationRequest(f"alone {i}", GREEDY))
            windows.append(llm.last_window_s)
        return windows

    windows = asyncio.run(burst_then_alone())
    assert llm.batch_sizes == [8] + [1] * (HFBackend.RECENT_BATCHES + 1)
    # The first lone caller is held open for the seven others: a tenth of the last generate (at least 0.3 s; a slow
    # machine measures more), then goes alone. Four lone batches later the batcher no longer expects company.
    assert 0.3 * llm.straggler_wait <= windows[0] <= 0.3
    assert windows[-1] == llm.batch_wait_s


def test_stop_sequences_cut_the_text(lm_dir):
    llm = backend(lm_dir)
    full = llm.generate_batch(PROMPTS[2:3], GREEDY)[0].text
    stop = full[4:7]
    assert stop and full.index(stop) > 0
    out = llm.generate_batch(PROMPTS[2:3], SamplingParams(max_tokens=12, stop=("NEVER", stop)))[0]
    assert out.text == full[: full.index(stop)]
    assert out.finish_reason == "stop"
    assert out.usage.completion_tokens < 12  # generation itself stopped early (stop_strings)


def test_long_prompts_keep_their_last_tokens(lm_dir):
    llm = backend(lm_dir, max_prompt_tokens=8)
    tail = " and then the vault door opened slowly"
    a, b = llm.generate_batch(["first story" * 20 + tail, "another start entirely" * 20 + tail], GREEDY)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens == 8
    assert a.text == b.text


def test_seeded_sampling_is_reproducible(lm_dir):
    llm = backend(lm_dir)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=5)
    a = llm.generate_batch(PROMPTS[:1], seeded)[0].text
    b = llm.generate_batch(PROMPTS[:1], seeded)[0].text
    c = llm.generate_batch(PROMPTS[:1], SamplingParams(max_tokens=12, temperature=1.0, seed=6))[0].text
    assert a == b and a != c


def make_adapter(lm_dir: str, out, perturb: bool) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lm_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    if perturb:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator))
    peft_model.save_pretrained(out)
    return str(out)


def test_lora_adapter_changes_output_and_model_id(lm_dir, tmp_path):
    base = texts(backend(lm_dir).generate_batch(PROMPTS, GREEDY))
    zero = make_adapter(lm_dir, tmp_path / "zero", perturb=False)
    tuned = make_adapter(lm_dir, tmp_path / "tuned", perturb=True)
    # A fresh LoRA (B = 0) is the identity: same output, so a difference below comes from the adapter's weights.
    assert texts(backend(lm_dir, adapter=zero).generate_batch(PROMPTS, GREEDY)) == base
    llm = backend(lm_dir, adapter=tuned)
    assert texts(llm.generate_batch(PROMPTS, GREEDY)) != base
    assert llm.model_id.startswith(f"{lm_dir}+adapter:tuned@")
    # The hash part tells adapters apart by their weights, not their directory names.
    assert llm.model_id.rsplit("@", 1)[1] != backend(lm_dir, adapter=zero).model_id.rsplit("@", 1)[1]


def test_bad_paths_fail_with_config_errors(lm_dir, tmp_path):
    with pytest.raises(ConfigError, match="could not load llm.model"):
        backend(str(tmp_path / "missing")).load()
    with pytest.raises(ConfigError, match="has no adapter_model.safetensors"):
        backend(lm_dir, adapter=str(tmp_path)).load()
    with pytest.raises(ConfigError, match="no CUDA device"):
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
        backend(lm_dir, device="cuda").load()


def test_build_llm_and_async_errors_reach_callers(tmp_path):
    llm = build_llm(LLMConfig(backend="hf", model=str(tmp_path / "missing"), device="cpu"))
    assert isinstance(llm, HFBackend)
    with pytest.raises(ConfigError, match="could not load"):
        asyncio.run(llm.generate(GenerationRequest("hi")))


def test_chat_style_uses_the_tokenizer_chat_template(lm_dir):
    llm = backend(lm_dir, style="chat")
    llm.load()
    assert llm.format_prompt("hi", "sys") == ("sys\n\nhi", True)  # no template: plain text
    llm._tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    assert llm.format_prompt("hi", "sys") == ("<system>sys\n<user>hi\n<assistant>", False)
    out = asyncio.run(llm.generate(GenerationRequest("hi", GREEDY, system="sys")))
    assert out.usage.prompt_tokens == len(llm._tokenizer("<system>sys\n<user>hi\n<assistant>")["input_ids"])
