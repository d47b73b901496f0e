"""In-process Hugging Face generation, batched across concurrent callers.

Episodes of different tasks call :meth:`HFBackend.generate` concurrently; a small async micro-batcher collects the
requests that arrive within a few milliseconds, groups those that share sampling parameters, and runs each group as
one left-padded ``model.generate`` call in a worker thread, so that they share forward passes. Training code can call
the synchronous :meth:`HFBackend.generate_batch` directly.

Episodes do not come back at the same moment: between two calls each one steps its environment, so the callers of one
batch return milliseconds apart. A fixed window of a few milliseconds then splits them into two smaller batches that
keep alternating, each costing nearly the time of a full one. The batcher therefore expects as many requests as the
largest of its last few batches, and while fewer have arrived it waits for the rest for up to ``straggler_wait`` times
the duration of the last ``model.generate`` (10 %: at worst a tenth of the model's time idles; in exchange a batch is
not split). ``bench/RESULTS.md`` (section 8) has the measurement.

Decoding follows the OpenAI API's meaning of the parameters: greedy when ``temperature == 0``; otherwise temperature
and top-p sampling (no top-k), seeded with ``torch.manual_seed(seed)`` when a seed is given (a seeded batch is
reproducible for the same batch composition). The model's own ``generation_config`` contributes only its special
token ids, not its sampling defaults (e.g. a repetition penalty), so results do not depend on what a checkpoint ships.

Prompts: in chat style, when the tokenizer has a chat template, system + user messages are rendered with it (as an
OpenAI-compatible server hosting the same model would); otherwise the system text, a blank line and the prompt.
Prompts longer than ``cfg.max_prompt_tokens`` keep their last tokens (and a leading BOS token, if the tokenizer adds
one). Stop sequences stop generation early (transformers' ``StopStringCriteria``, built once per set of stop sequences:
building it reads and sorts the whole vocabulary, about 0.1 s on a CPU, which ``generate(stop_strings=...)`` would
spend on every call) and are always cut client-side.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retroformer.errors import ConfigError, LLMError
from retroformer.llm.base import LLM, Completion, GenerationRequest, SamplingParams, apply_stop
from retroformer.types import Usage

if TYPE_CHECKING:
    from retroformer.llm import LLMConfig

logger = logging.getLogger(__name__)

_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_DTYPES = ("auto", "float32", "bfloat16", "float16")


def adapter_fingerprint(adapter_dir: str | Path) -> str:
    """``<dir name>@<first 10 hex of sha256(weights file)>``: which adapter produced an output, for provenance."""
    path = Path(adapter_dir)
    for name in _ADAPTER_WEIGHTS:
        weights = path / name
        if weights.is_file():
            digest = hashlib.sha256()
            with weights.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            return f"{path.name}@{digest.hexdigest()[:10]}"
    raise ConfigError(
        f"llm.adapter={str(adapter_dir)!r} has no {' or '.join(_ADAPTER_WEIGHTS)}; expected a directory written by "
        "peft's save_pretrained (e.g. the output of sft_run.py or ppo_run.py)"
    )


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def weights_fingerprint(model: str) -> str:
    """A cheap fingerprint of a local model directory's weights (names, sizes, modification times), so that weights
    retrained in place are told apart; a hub id stands for itself."""
    path = Path(model)
    if not path.is_dir():
        return f"id:{model}"
    digest = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json"):
        st = f.stat()
        digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return f"files:{digest.hexdigest()[:16]}"


class HFBackend(LLM):
    """A local causal LM (plus an optional LoRA adapter), loaded on first use or by :meth:`load`.

    ``batch_wait_s`` is how long the micro-batcher waits after the first request of a batch for others to join;
    ``straggler_wait`` (a fraction of the last ``model.generate``'s duration) how much longer it waits while fewer
    requests have arrived than its recent batches held (see the module docstring).
    ``batch_sizes`` lists the size of every ``model.generate`` call run so far.
    """

    #: How many recent batches set the number of requests the micro-batcher expects.
    RECENT_BATCHES = 4

    def __init__(self, cfg: LLMConfig, *, batch_wait_s: float = 0.005, straggler_wait: float = 0.1) -> None:
        if cfg.dtype not in _DTYPES:
            raise ConfigError(f"llm.dtype={cfg.dtype!r} is not one of {_DTYPES}")
        self.cfg = cfg
        self.style = cfg.style
        self.batch_wait_s = batch_wait_s
        self.straggler_wait = straggler_wait
        self.batch_sizes: list[int] = []
        self._recent: deque[int] = deque(maxlen=self.RECENT_BATCHES)
        self.last_window_s = 0.0  # how long the last batch was held open for more requests (batch_wait_s or patience)
        self._last_generate_s = 0.0
        self._stop_criteria: dict[tuple[str, ...], Any] = {}
        self.usage = Usage()
        self._model: Any = None
        self._tokenizer: Any = None
        self._device: str | None = None
        self._model_id: str | None = None
        self._lock = threading.Lock()  # one generate (or load) at a time on the model
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"HFBackend(model={self.cfg.model!r}, adapter={self.cfg.adapter!r}, loaded={self._model is not None})"

    @property
    def cache_identity(self) -> str:
        """The model id (with the adapter's hash), the base weights' fingerprint and the prompt-token limit."""
        return (
            f"{self.model_id}|weights={weights_fingerprint(self.cfg.model)}"
            f"|max_prompt_tokens={self.cfg.max_prompt_tokens}"
        )

    @property
    def model_id(self) -> str:  # type: ignore[override]
        if self._model_id is None:
            self._model_id = self.cfg.model
            if self.cfg.adapter:
                self._model_id += f"+adapter:{adapter_fingerprint(self.cfg.adapter)}"
        return self._model_id

    # --- loading ---

    def _resolve_device_dtype(self) -> tuple[str, Any]:
        import torch

        device = self.cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"llm.device={self.cfg.device!r} but no CUDA device is available; use 'cpu' or 'auto'")
        if self.cfg.dtype == "auto":
            if device == "cpu":
                dtype = torch.float32
            else:
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = getattr(torch, self.cfg.dtype)
        return device, dtype

    def load(self) -> None:
        """Load tokenizer, model and adapter now (otherwise the first generation does it)."""
        with self._lock:
            self._load_locked()

    def _load_locked(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device, dtype = self._resolve_device_dtype()
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.cfg.model)
            model = AutoModelForCausalLM.from_pretrained(self.cfg.model, dtype=dtype)
        except OSError as exc:
            raise ConfigError(
                f"could not load llm.model={self.cfg.model!r} ({exc}); expected a local directory with config.json "
                "and tokenizer files, or a hub id that is cached or reachable (`retroformer tiny-models` builds a "
                "tiny offline one)"
            ) from exc
        if tokenizer.pad_token_id is None:
            # Left padding needs a pad id; padded positions are masked, so the EOS token is a safe stand-in.
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        if self.cfg.adapter:
            from peft import PeftModel

            fingerprint = adapter_fingerprint(self.cfg.adapter)  # also checks the directory
            # Merged weights generate as fast as the base model; the adapter itself stays untouched on disk.
            model = PeftModel.from_pretrained(model, self.cfg.adapter).merge_and_unload()
            logger.info("loaded adapter %s on %s", fingerprint, self.cfg.model)
        model.to(device)
        model.eval()
        self._tokenizer, self._model, self._device = tokenizer, model, device
        logger.info("loaded %s on %s (%s)", self.model_id, device, dtype)

    # --- prompts ---

    def format_prompt(self, prompt: str, system: str | None = None) -> tuple[str, bool]:
        """The text fed to the model and whether the tokenizer should add its special tokens (after :meth:`load`)."""
        tokenizer = self._tokenizer
        if tokenizer is None:
            raise RuntimeError("HFBackend.format_prompt needs the tokenizer: call load() first")
        if self.style == "chat" and getattr(tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": prompt})
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return text, False  # the template writes its own BOS
        return (f"{system}\n\n{prompt}" if system else prompt), True

    def _encode(self, texts: Sequence[tuple[str, bool]]) -> tuple[Any, Any, list[int]]:
        """Left-padded input ids and attention mask, and each prompt's token count after truncation."""
        import torch

        tokenizer = self._tokenizer
        limit = self.cfg.max_prompt_tokens
        flags = {special for _, special in texts}
        if len(flags) == 1:  # the usual case: one call for the whole batch (a fast tokenizer encodes it in parallel)
            encoded = tokenizer([text for text, _ in texts], add_special_tokens=flags.pop())["input_ids"]
        else:
            encoded = [tokenizer(text, add_special_tokens=special)["input_ids"] for text, special in texts]
        rows: list[list[int]] = []
        for ids, (_, special) in zip(encoded, texts, strict=True):
            if len(ids) > limit:
                keep_bos = special and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
                ids = [ids[0], *ids[-(limit - 1) :]] if keep_bos and limit > 1 else ids[-limit:]
            rows.append(ids)
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return input_ids.to(self._device), mask.to(self._device), [len(r) for r in rows]

    # --- generation ---

    def _generation_config(self, params: SamplingParams) -> Any:
        from transformers import GenerationConfig

        base = self._model.generation_config
        fields: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "pad_token_id": self._tokenizer.pad_token_id,
            "eos_token_id": base.eos_token_id if base.eos_token_id is not None else self._tokenizer.eos_token_id,
            "bos_token_id": base.bos_token_id,
        }
        if params.temperature > 0:
            fields.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            fields.update(do_sample=False)
        return GenerationConfig(**fields)

    def _stopping_criteria(self, params: SamplingParams) -> Any:
        """A ``StoppingCriteriaList`` for the stop sequences of ``params`` (None without any), built once per set."""
        from transformers import StoppingCriteriaList
        from transformers.generation.stopping_criteria import StopStringCriteria

        stops = tuple(s for s in params.stop if s)
        if not stops:
            return None
        criterion = self._stop_criteria.get(stops)
        if criterion is None:
            if len(self._stop_criteria) >= 16:  # a run uses a handful of stop sets; bound the memory anyway
                self._stop_criteria.clear()
            criterion = self._stop_criteria[stops] = StopStringCriteria(self._tokenizer, list(stops))
        return StoppingCriteriaList([criterion])

    def _eos_ids(self, gen_config: Any) -> set[int]:
        eos = gen_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return ids

    def generate_batch(
        self, prompts: Sequence[str], params: SamplingParams, system: str | None = None
    ) -> list[Completion]:
        """Generate for every prompt (same params and system text), in chunks of ``cfg.batch_size``. Blocking."""
        with self._lock:
            self._load_locked()
            texts = [self.format_prompt(p, system) for p in prompts]
            return self._generate_locked(texts, params)

    def _generate_formatted(self, texts: Sequence[tuple[str, bool]], params: SamplingParams) -> list[Completion]:
        with self._lock:
            self._load_locked()
            return self._generate_locked(texts, params)

    def _generate_locked(self, texts: Sequence[tuple[str, bool]], params: SamplingParams) -> list[Completion]:
        out: list[Completion] = []
        if not texts:
            return out
        size = self.cfg.batch_size
        for start in range(0, len(texts), size):
            out.extend(self._generate_chunk(texts[start : start + size], params))
        return out

    def _generate_chunk(self, texts: Sequence[tuple[str, bool]], params: SamplingParams) -> list[Completion]:
        import torch

        input_ids, mask, prompt_lens = self._encode(texts)
        gen_config = self._generation_config(params)
        stopping = self._stopping_criteria(params)
        if gen_config.do_sample and params.seed is not None:
            torch.manual_seed(params.seed)
        with torch.inference_mode():
            output = self._model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                generation_config=gen_config,
                stopping_criteria=stopping,
            )
        self.batch_sizes.append(len(texts))
        new_tokens = output[:, input_ids.shape[1] :].tolist()
        eos_ids = self._eos_ids(gen_config)
        pad = self._tokenizer.pad_token_id
        completions = []
        for row, prompt_len in zip(new_tokens, prompt_lens, strict=True):
            count, hit_eos = len(row), False
            for i, tok in enumerate(row):
                if tok in eos_ids:
                    count, hit_eos = i + 1, True
                    break
                if tok == pad:  # rows that finished early (stop string) are padded after their end
                    count = i
                    break
            raw = self._tokenizer.decode(row[:count], skip_special_tokens=True)
            text = apply_stop(raw, params.stop)
            stopped = hit_eos or len(text) < len(raw) or count < params.max_tokens
            usage = Usage(prompt_tokens=prompt_len, completion_tokens=count, calls=1)
            self.usage.add(usage)
            completions.append(
                Completion(
                    text=text, usage=usage, model_id=self.model_id, finish_reason="stop" if stopped else "length"
                )
            )
        return completions

    # --- async micro-batching ---

    def _ensure_worker(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._loop = loop
            self._worker = loop.create_task(self._batch_worker(self._queue), name="hf-microbatcher")
        return self._queue

    async def generate(self, request: GenerationRequest) -> Completion:
        queue = self._ensure_worker()
        future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        queue.put_nowait((request, future))
        return await future

    async def _collect(self, queue: asyncio.Queue) -> list[tuple[GenerationRequest, asyncio.Future]]:
        """The first waiting request plus those arriving within ``batch_wait_s``, or, while fewer have come than the
        largest of the recent batches, within ``straggler_wait`` x the last generate's duration (at most 4 batches'
        worth)."""
        loop = asyncio.get_running_loop()
        items = [await queue.get()]
        cap = 4 * self.cfg.batch_size
        expected = min(max(self._recent, default=1), cap)
        start = loop.time()
        patience = max(self.batch_wait_s, self.straggler_wait * self._last_generate_s)
        window = self.batch_wait_s
        while len(items) < cap:
            if not queue.empty():
                items.append(queue.get_nowait())
                continue
            window = self.batch_wait_s if len(items) >= expected else patience
            remaining = start + window - loop.time()
            if remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        self.last_window_s = window  # how long this batch was held open for more requests
        self._recent.append(len(items))
        return items

    async def _batch_worker(self, queue: asyncio.Queue) -> None:
        while True:
            items = [(r, f) for r, f in await self._collect(queue) if not f.done()]
            groups: dict[SamplingParams, list[tuple[GenerationRequest, asyncio.Future]]] = {}
            for request, future in items:
                groups.setdefault(request.params, []).append((request, future))
            for params, group in groups.items():
                for start in range(0, len(group), self.cfg.batch_size):
                    await self._run_group(params, group[start : start + self.cfg.batch_size])

    async def _run_group(self, params: SamplingParams, group: list[tuple[GenerationRequest, asyncio.Future]]) -> None:
        try:
            if self._model is None:
                await asyncio.to_thread(self.load)
            texts = [self.format_prompt(r.prompt, r.system) for r, _ in group]
            t0 = time.perf_counter()
            results = await asyncio.to_thread(self._generate_formatted, texts, params)
            self._last_generate_s = time.perf_counter() - t0
        except ConfigError as exc:
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        except Exception as exc:  # noqa: BLE001 - any model failure is handed to every caller of this batch
            error = LLMError(
                f"in-process generation with {self.cfg.model!r} failed for a batch of {len(group)} prompt(s): "
                f"{type(exc).__name__}: {exc}; if memory ran out, lower llm.batch_size, llm.max_tokens or "
                "llm.max_prompt_tokens"
            )
            error.__cause__ = exc
            for _, future in group:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), completion in zip(group, results, strict=True):
            if not future.done():
                future.set_result(completion)

    async def aclose(self) -> None:
        """Stop the micro-batcher and drop the model (frees its memory once no other reference holds it)."""
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                logger.debug("micro-batcher stopped")
        self._worker = self._queue = self._loop = None
        with self._lock:
            self._model = self._tokenizer = None
            self._stop_criteria.clear()
