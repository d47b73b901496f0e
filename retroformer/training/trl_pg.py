"""GRPO and RLOO for the retrospective model through TRL 1.16 (``algorithm: grpo`` / ``rloo`` in ``ppo_run.py``).

Every call into TRL's RL API lives in this module. TRL 1.16 has no PPO (it was removed in 1.13 and only ever took
reward *models*); its ``GRPOTrainer`` and ``RLOOTrainer`` take Python reward functions, so the same
:class:`retroformer.training.rewards.RewardSource` that scores our PPO loop's samples scores theirs. Dataset columns
other than ``prompt`` (``task_id``, ``trial``, ``return_before`` for the ``env`` source) reach the reward function
as keyword arguments, one list entry per completion.

How :class:`retroformer.training.ppo.PPORunConfig` maps onto TRL's configs:

==========================  =========================================================================
ours                        TRL
==========================  =========================================================================
num_iterations              ``max_steps`` (optimizer steps, not rollouts)
batch_size * num_samples    ``generation_batch_size`` (completions per rollout)
num_samples_per_prompt      ``num_generations``
minibatch_size              ``per_device_train_batch_size``
ppo_epochs                  ``num_iterations`` (updates per rollout)
clip_range, kl_coef         ``epsilon``, ``beta``
normalize_advantages        GRPO ``scale_rewards="batch"`` (else ``"none"``); RLOO ``normalize_advantages``
max_new_tokens              ``max_completion_length``
==========================  =========================================================================

Differences from our loop: prompts are cut to ``max_prompt_length`` tokens (on the left) before TRL sees them;
completions are not stopped at a blank line, only scored up to it; the learning rate follows TRL's default linear
decay. As in our loop, the reference is a frozen copy of the SFT adapter when training starts from one (TRL adds it
when ``kl_coef > 0``), else the model with the fresh adapter disabled. Training runs in float32 without gradient
checkpointing (both hurt on CPU). A group whose completions all get the same reward has zero advantage, hence zero loss and gradient: that is a
degenerate batch, not a bug.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from retroformer.config import to_dict
from retroformer.tracking import trainer_callback
from retroformer.training.mixing import EnvRewardRecorder
from retroformer.training.ppo import PPORunConfig, cut_reflection
from retroformer.training.rewards import RewardSource

logger = logging.getLogger(__name__)


def truncate_prompts(tokenizer, prompts: list[str], max_length: int) -> list[str]:
    """Keep the last ``max_length`` tokens of each prompt (the clue and ``Reflection:`` are at the end)."""
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out.append(prompt if len(ids) <= max_length else tokenizer.decode(ids[-max_length:]))
    return out


def make_reward_func(score, columns: tuple[str, ...]):
    """A TRL reward function over (prompts, completions, **dataset columns) backed by ``score`` (a reward source's
    ``score``, or an :class:`~retroformer.training.mixing.EnvRewardRecorder`'s)."""

    def reflection_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        rows = [{"prompt": p, **{c: kwargs[c][i] for c in columns}} for i, p in enumerate(prompts)]
        return score(list(prompts), [cut_reflection(c) for c in completions], rows)

    return reflection_reward


def env_metrics_callback(recorder: EnvRewardRecorder, tracker):
    """A ``transformers.TrainerCallback`` that reports the rewards per environment gathered since the last log
    (``ppo/<env>/reward_mean``) to ``tracker`` (the callback of :func:`retroformer.tracking.trainer_callback`) at the
    trainer's step."""
    from transformers import TrainerCallback

    class EnvRewardCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            values = recorder.drain()
            if values:
                tracker.report(values, state.global_step)

    return EnvRewardCallback()


def _trainer_args(cfg: PPORunConfig):
    from trl import GRPOConfig, RLOOConfig

    common = dict(
        output_dir=cfg.output_dir,
        max_steps=cfg.num_iterations,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.minibatch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        generation_batch_size=cfg.batch_size * cfg.num_samples_per_prompt,
        num_generations=cfg.num_samples_per_prompt,
        num_iterations=cfg.ppo_epochs,
        epsilon=cfg.clip_range,
        beta=cfg.kl_coef,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=0,
        top_p=1.0,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        save_steps=cfg.save_steps,
        logging_steps=cfg.logging_steps,
        report_to="none",  # trackers are fed by retroformer.tracking.trainer_callback (ppo/... names)
        bf16=False,
        # transformers 5 renamed it: `gradient_checkpointing` (TRL's configs default it to True) is a deprecated alias
        # that warns whenever the new name is unset.
        activation_checkpointing=False,
    )
    if cfg.algorithm == "grpo":
        return GRPOConfig(
            **common,
            scale_rewards="batch" if cfg.normalize_advantages else "none",
            entropy_coef=cfg.entropy_coef,
        )
    return RLOOConfig(**common, normalize_advantages=cfg.normalize_advantages)


def train_trl(
    cfg: PPORunConfig,
    prompts: list[str],
    rows: list[dict[str, Any]],
    reward: RewardSource,
    recorder: EnvRewardRecorder | None = None,
):
    """Train with TRL's ``GRPOTrainer`` or ``RLOOTrainer``; saves the adapter + tokenizer; returns ``ppo/...`` metrics.

    Every column of ``rows`` besides ``prompt`` (what the reward source and the metrics per environment read) reaches
    the reward function. With ``recorder`` the rewards pass through it, and the trackers of ``cfg.report_to`` get
    ``ppo/<env>/reward_mean`` at each log."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer, RLOOTrainer

    from retroformer.training.common import build_lora_config, namespaced, resume_checkpoint, train_until_sigterm

    tokenizer = AutoTokenizer.from_pretrained(cfg.sft_adapter or cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    columns = tuple(c for c in rows[0] if c != "prompt")
    prompts = truncate_prompts(tokenizer, prompts, cfg.max_prompt_length)
    dataset = Dataset.from_list(
        [{"prompt": p, **{c: r[c] for c in columns}} for p, r in zip(prompts, rows, strict=True)]
    )

    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    peft_config = None
    if cfg.sft_adapter:
        model = PeftModel.from_pretrained(model, cfg.sft_adapter, is_trainable=True)
    else:
        peft_config = build_lora_config(cfg.lora, "CAUSAL_LM")
    trainer_cls = GRPOTrainer if cfg.algorithm == "grpo" else RLOOTrainer
    trainer = trainer_cls(
        model=model,
        reward_funcs=make_reward_func(recorder.score if recorder is not None else reward.score, columns),
        args=_trainer_args(cfg),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    callback = trainer_callback(cfg.report_to, "ppo", cfg.output_dir, to_dict(cfg))
    if callback is not None:
        if recorder is not None:
            trainer.add_callback(env_metrics_callback(recorder, callback))
        trainer.add_callback(callback)
    result = train_until_sigterm(trainer, resume_checkpoint(cfg.output_dir))
    trainer.save_model(cfg.output_dir)
    tokenizer.save_pretrained(cfg.output_dir)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    metrics = namespaced("ppo", dict(result.metrics))
    if logged:
        metrics.update({f"ppo/last/{k}": v for k, v in logged[-1].items() if isinstance(v, (int, float))})
    metrics["ppo/algorithm_steps"] = trainer.state.global_step
    logger.info(
        "%s finished after %d steps; adapter in %s", cfg.algorithm, trainer.state.global_step, Path(cfg.output_dir)
    )
    return metrics
