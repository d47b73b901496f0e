"""Our own calls into transformers / TRL raise no deprecation warnings."""

from __future__ import annotations

import warnings

import pytest

from retroformer.training.common import TrainerSettings, trainer_kwargs


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_kwargs_build_configs_without_deprecation_warnings(tmp_path, checkpointing):
    from transformers import TrainingArguments
    from trl import RewardConfig, SFTConfig

    cfg = TrainerSettings(gradient_checkpointing=checkpointing)
    for cls in (TrainingArguments, SFTConfig, RewardConfig):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            args = cls(**trainer_kwargs(cfg, str(tmp_path / cls.__name__)), use_cpu=True)
        assert args.activation_checkpointing is checkpointing
        assert args.gradient_checkpointing is checkpointing  # the old name mirrors the new one


def test_stage_logging_silences_peft_reading_the_deprecated_checkpointing_property(tiny_models):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from retroformer.training.common import setup_logging

    model = AutoModelForCausalLM.from_pretrained(tiny_models["lm"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        setup_logging()
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
