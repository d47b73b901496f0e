"""Build tiny models offline and deterministically: a tokenizer trained with ``tokenizers``, a causal LM and a
sequence-classification (reward) model with random weights, all saved with ``save_pretrained``.

    retroformer tiny-models --out runs/tiny

writes ``runs/tiny/lm`` (tokenizer + ``LlamaForCausalLM``) and ``runs/tiny/rm`` (tokenizer +
``LlamaForSequenceClassification`` with one output). A Llama config is used because transformers keeps a locally
trained tokenizer with it (a Qwen2 config was seen to swap in Qwen2's own). Nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from retroformer.config import doc
from retroformer.errors import ConfigError

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


@dataclass
class TinyModelConfig:
    """Shape of the tiny models (defaults: about 0.4M parameters, builds in seconds on a CPU)."""

    out: str = doc("output directory; lm/ and rm/ are written under it", "runs/tiny")
    vocab_size: int = doc("tokenizer vocabulary size (byte-level BPE)", 1024)
    hidden_size: int = doc("model width", 64)
    num_layers: int = doc("transformer layers", 2)
    num_heads: int = doc("attention heads", 4)
    num_kv_heads: int = doc("key/value heads (grouped-query attention)", 2)
    intermediate_size: int = doc("MLP width", 128)
    max_position_embeddings: int = doc("longest sequence in tokens", 2048)
    initializer_range: float = doc(
        "std of the random weights. Larger than the usual 0.02 so that a LoRA adapter can make the tiny model "
        "confident (tied embeddings behind a final RMSNorm bound the logits), but not so large that the random "
        "attention is saturated (at 0.3 LoRA cannot learn to attend to a token in the prompt)",
        0.2,
    )
    seed: int = doc("seed for the random weights", 0)
    force: bool = doc("rebuild even if the output already exists", False)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"tiny.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"tiny.num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}")
        if self.vocab_size < 300:
            raise ConfigError(f"tiny.vocab_size={self.vocab_size} must be >= 300 (256 bytes + merges + specials)")


def default_corpus() -> list[str]:
    """Environment text the tokenizer is trained on: the built-in environments' prompts and task text."""
    from retroformer.envs.synthetic import corpus as synthetic_corpus

    texts = list(synthetic_corpus())
    # Other environments contribute their prompts when their modules import (they only hold text).
    for module in (
        "retroformer.envs.hotpotqa",
        "retroformer.envs.webshop",
        "retroformer.envs.alfworld",
        "retroformer.envs.textworld_env",
    ):
        try:
            mod = __import__(module, fromlist=["corpus"])
        except ImportError:
            continue
        if hasattr(mod, "corpus"):
            texts.extend(mod.corpus())
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer wrapped as ``PreTrainedTokenizerFast`` (deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def build_tiny_models(cfg: TinyModelConfig, texts: list[str] | None = None) -> dict[str, Path]:
    """Write ``<out>/lm`` and ``<out>/rm``; skip if they exist and ``force`` is off. Returns the two paths."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    out = Path(cfg.out)
    paths = {"lm": out / "lm", "rm": out / "rm"}
    if not cfg.force and all((p / "config.json").is_file() for p in paths.values()):
        logger.info("tiny models already in %s (use --force to rebuild)", out)
        return paths
    tokenizer = train_tokenizer(texts if texts is not None else default_corpus(), cfg.vocab_size)
    model_cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=cfg.initializer_range,
    )
    torch.manual_seed(cfg.seed)
    lm = LlamaForCausalLM(model_cfg)
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(cfg.seed + 1)
    rm_cfg = copy.deepcopy(model_cfg)  # the LM's config must not claim one label
    rm_cfg.num_labels = 1
    rm = LlamaForSequenceClassification(rm_cfg)
    for key, model in (("lm", lm), ("rm", rm)):
        paths[key].mkdir(parents=True, exist_ok=True)
        model.save_pretrained(paths[key])
        tokenizer.save_pretrained(paths[key])
    (out / "tiny_config.json").write_text(json.dumps(cfg.__dict__, indent=2))
    n = sum(p.numel() for p in lm.parameters())
    logger.info("built tiny models in %s (%d parameters, vocab %d)", out, n, len(tokenizer))
    return paths
