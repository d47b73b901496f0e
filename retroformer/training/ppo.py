"""PPO for the retrospective model: one reflection per prompt, one reward at the end (paper, section 4.2).

The episode of the retrospective model is a single action: it reads a failed trajectory ``x`` and writes a whole
reflection ``y``; its reward ``r(x, y)`` (a reward model's score, or the next attempt's return difference) arrives
once, at the end. The loop below is PPO (Schulman et al., 2017) specialised to that one-step episode, in the shape of
cleanrl's ``ppo.py``: rollout, advantages, ``ppo_epochs`` epochs of clipped updates on minibatches.

Choices, and why:

* **Policy and reference in one model.** The policy is the base model plus a trainable LoRA adapter (initialised from
  the SFT adapter when one is given). The reference shares the base weights: for a fresh adapter it is the model with
  the adapter disabled (``with model.disable_adapter():``); when training starts from an SFT adapter, it is a frozen
  second copy of that adapter (a few MB, as TRL does), so that the KL anchors the policy to the SFT model and not to
  the base model, from which the SFT adapter is already far (about 20 nats per reflection in the toy demo).
* **Baseline: the group mean, not a value head.** With one action and one terminal reward, a value head would have to
  predict ``E[r | x]`` from the prompt alone, and a fresh head is wrong for many updates. Sampling
  ``num_samples_per_prompt`` reflections per prompt and using their mean reward as the baseline estimates the same
  quantity without extra parameters, as in RLOO (Ahmadian et al., 2024, "Back to Basics") and GRPO (Shao et al.,
  2024, DeepSeekMath). The leave-one-out baseline of RLOO equals this one up to the factor ``G / (G - 1)``, which
  batch normalisation of the advantages (``normalize_advantages``) removes anyway. A prompt whose samples all get the
  same reward still has advantages when ``kl_coef > 0``: its returns differ by their KL penalties, so its gradient
  pulls towards the reference; with ``kl_coef = 0`` it contributes no gradient.
* **KL as a per-sequence penalty on the reward** (Ziegler et al., 2019; Ouyang et al., 2022; RLOO):
  ``returns = reward - kl_coef * sum_t (logp_old - ref_logp)``. With a single terminal reward there is no credit to
  assign across tokens, so shaping every token (as the old TRL PPOTrainer did) buys nothing here; the sequence KL
  enters the advantage through the group baseline like the reward does.
* **Loss**: the clipped surrogate, per token, ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)`` with
  ``ratio = exp(logp_new - logp_old)`` and the sequence's advantage ``A`` on each of its tokens, averaged over the
  response tokens of the minibatch; minus ``entropy_coef`` times the mean token entropy.
* **Log-probabilities** are taken from ``logits / temperature``, the distribution the reflections were sampled from.
* **No dropout** in the policy during training (LoRA dropout included), as TRL's ``disable_dropout`` does: the old
  log-probabilities are computed without it, so the ratio of the first update must be exactly 1.

Device placement, DDP and gradient accumulation are accelerate's (:class:`accelerate.Accelerator`). Each process
samples its own ``batch_size`` prompts per iteration. Checkpoints (``checkpoint-N``: adapter, optimizer, step, RNG
states) are written every ``save_steps`` iterations and the run resumes from the last one automatically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from retroformer.config import doc, from_dict, to_dict
from retroformer.errors import ConfigError, DataError, Interrupted
from retroformer.tracking import TENSORBOARD_DIR, check_report_to, flat_config, parse_report_to
from retroformer.training.common import (
    LoraSettings,
    StopOnSigterm,
    any_process,
    build_lora_config,
    resume_checkpoint,
)
from retroformer.training.mixing import BALANCE_ENVS_HELP, ENV_WEIGHTS_HELP, check_env_mixing, ppo_env_metrics

logger = logging.getLogger(__name__)

#: A reward function over sampled reflections: (prompts, reflections, dataset rows) -> one float per reflection.
RewardFn = Callable[[list[str], list[str], list[dict[str, Any]]], list[float]]

TRAINING_STATE = "training_state.pt"
#: Name of the frozen copy of the SFT adapter that serves as the reference; the trained adapter is PEFT's "default".
REFERENCE_ADAPTER = "reference"
#: A generated reflection ends at its first blank line.
STOP_STRING = "\n\n"


@dataclass
class PPORunConfig:
    """Policy-gradient training of the retrospective model with LoRA (``ppo_run.py``)."""

    # --- model and data
    model: str = doc("base causal LM of the retrospective model (local directory or Hub id)", "")
    sft_adapter: str | None = doc("LoRA adapter from sft_run.py to start from (trainable); null: a fresh adapter", None)
    dataset: list[str] = doc("rated-reflection dataset directories (Dataset.save_to_disk); their unique prompts are "
                             "the training prompts", default_factory=list)  # fmt: skip
    only_failed: bool = doc(
        "keep only prompts whose logged reflection did not lead to success in the next trial (success_after false): "
        "the prompts the reflector has still to learn",
        False,
    )
    output_dir: str = doc("where the adapter, tokenizer, config.yaml, metrics.json and checkpoints go", "runs/ppo")
    # --- algorithm and reward
    algorithm: Literal["ppo", "grpo", "rloo"] = doc(
        "ppo: this package's PPO loop; grpo / rloo: TRL's GRPOTrainer / RLOOTrainer with the same reward", "ppo"
    )
    reward_source: Literal["rm", "env"] = doc(
        "rm: score with the reward model from reward_run.py (offline, as in the paper); env: re-run the next trial "
        "with the reflection and use the return difference (online)",
        "rm",
    )
    reward_model: str | None = doc("reward model directory (reward_run.py output); needed by reward_source=rm", None)
    env_run_dir: str | None = doc("trials run directory (runs/<run>); needed by reward_source=env", None)
    env_run_dirs: list[str] = doc("several trials runs for reward_source=env (instead of env_run_dir): each row is "
                                  "scored by the run that wrote it (run_name), with its environment, actor and key",
                                  default_factory=list)  # fmt: skip
    env_weights: dict[str, float] = doc(ENV_WEIGHTS_HELP + " (training prompts)", default_factory=dict)
    balance_envs: bool = doc(BALANCE_ENVS_HELP + " (training prompts)", False)
    # --- policy-gradient hyperparameters
    kl_coef: float = doc("weight of the KL penalty to the reference (adapter disabled); grpo/rloo: beta", 0.05)
    clip_range: float = doc("PPO clip range epsilon for the probability ratio (Schulman et al., 2017)", 0.2)
    learning_rate: float = doc("AdamW learning rate of the LoRA parameters (constant)", 1e-4)
    num_iterations: int = doc("rollout + update iterations; grpo/rloo: the trainer's max_steps", 100)
    batch_size: int = doc("prompts per iteration (per process)", 8)
    num_samples_per_prompt: int = doc("reflections sampled per prompt; their mean reward is the baseline (>= 2)", 4)
    ppo_epochs: int = doc("passes over each rollout batch; grpo/rloo: the trainer's num_iterations", 2)
    minibatch_size: int = doc("reflections per gradient step; must divide batch_size * num_samples_per_prompt", 8)
    gradient_accumulation_steps: int = doc("minibatches accumulated per optimizer step", 1)
    normalize_advantages: bool = doc("divide advantages by their batch standard deviation after the group baseline",
                                     True)  # fmt: skip
    entropy_coef: float = doc("weight of the token-entropy bonus (0: none)", 0.0)
    max_grad_norm: float = doc("gradient-norm clip", 1.0)
    # --- generation
    max_new_tokens: int = doc("longest reflection in tokens; generation also stops at eos or a stop string", 64)
    stop: list[str] = doc(
        "a sampled reflection ends at the first of these strings; use what the trial loop's reflector stops at "
        "(it always stops at a blank line), so that PPO trains on the reflections rollouts write",
        default_factory=lambda: [STOP_STRING],
    )
    temperature: float = doc("sampling temperature of the reflections (and of their log-probabilities)", 1.0)
    max_prompt_length: int = doc("prompts longer than this many tokens are cut on the left (the clue is at the end)",
                                 1024)  # fmt: skip
    # --- adapter
    lora: LoraSettings = doc("LoRA shape of a fresh adapter (ignored when sft_adapter is given)",
                             default_factory=LoraSettings)  # fmt: skip
    # --- run
    seed: int = doc("seed of LoRA init, prompt order and sampling", 0)
    save_steps: int = doc("write checkpoint-N every N iterations; a rerun resumes from the last one", 50)
    logging_steps: int = doc("log metrics every N iterations", 1)
    # --- held-out evaluation (logged beside the training curves)
    eval_dataset: list[str] = doc(
        "held-out rated reflections (tasks not in `dataset`): every eval_steps iterations one reflection per unique "
        "prompt is sampled and scored by the reward source; logged as eval/reward_mean and, for reward_source=env, "
        "eval/success (the next attempt's return reaches 1.0)",
        default_factory=list,
    )
    eval_steps: int = doc("evaluate on eval_dataset every N iterations and at the last one (0: never)", 0)
    report_to: str = doc("experiment tracker(s), comma-separated: none, tensorboard, wandb, trackio, ... (accelerate's "
                         "names; TensorBoard: <output_dir>/tensorboard/ppo)", "none")  # fmt: skip

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = from_dict(LoraSettings, self.lora, "lora")
        check_report_to(self.report_to)  # a tracker that is not installed fails here, before any model loads
        if not self.model:
            raise ConfigError("model is empty; pass the base model directory, e.g. --model runs/tiny/lm")
        if not self.dataset:
            raise ConfigError("dataset is empty; pass rated-reflection dataset directories, e.g. --dataset runs/x/data")
        if self.reward_source == "rm" and not self.reward_model:
            raise ConfigError(
                "reward_source=rm needs reward_model; pass --reward_model <dir from reward_run.py>, "
                "or use --reward_source env with --env_run_dir"
            )
        if self.reward_source == "env" and not (self.env_run_dir or self.env_run_dirs):
            raise ConfigError(
                "reward_source=env needs env_run_dir; pass --env_run_dir runs/<run> (the trials run), or "
                "--env_run_dirs [runs/a, runs/b] for the runs of several environments"
            )
        if self.env_run_dir and self.env_run_dirs:
            raise ConfigError("set env_run_dir (one run) or env_run_dirs (several), not both; list every run there")
        check_env_mixing(self.env_weights, self.balance_envs)
        for name in ("num_iterations", "batch_size", "ppo_epochs", "minibatch_size", "gradient_accumulation_steps",
                     "max_new_tokens", "max_prompt_length", "save_steps", "logging_steps"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.stop or not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop={self.stop!r} must be a list of non-empty strings, e.g. ['\\n\\n']")
        if self.num_samples_per_prompt < 2:
            raise ConfigError(
                f"num_samples_per_prompt={self.num_samples_per_prompt} must be >= 2: the baseline is the mean reward "
                "of the samples of a prompt, so one sample always has advantage 0"
            )
        rollout = self.batch_size * self.num_samples_per_prompt
        if rollout % self.minibatch_size:
            raise ConfigError(
                f"minibatch_size={self.minibatch_size} must divide batch_size * num_samples_per_prompt = {rollout}"
            )
        if self.eval_steps < 0 or (self.eval_steps > 0) != bool(self.eval_dataset):
            raise ConfigError(
                f"eval_steps={self.eval_steps} with eval_dataset={self.eval_dataset}: set both (eval_steps >= 1 and "
                "held-out rated reflections) for a held-out evaluation, or neither"
            )
        if self.eval_steps and self.algorithm != "ppo":
            raise ConfigError(f"eval_steps works with algorithm=ppo only (got {self.algorithm!r}); set eval_steps 0")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef={self.kl_coef} must be >= 0")
        if not 0 < self.clip_range < 1:
            raise ConfigError(f"clip_range={self.clip_range} must be in (0, 1); 0.2 is the usual value")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be > 0")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0 (sampling is needed for exploration)")
        if self.max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm={self.max_grad_norm} must be > 0")
        if self.entropy_coef < 0:
            raise ConfigError(f"entropy_coef={self.entropy_coef} must be >= 0")
        if self.algorithm == "rloo" and self.entropy_coef:
            raise ConfigError(f"entropy_coef={self.entropy_coef} is not supported by algorithm=rloo; set it to 0")


# ----------------------------------------------------------------------------------------------------------------------
# The math: small pure functions on tensors, unit-tested one by one.


def masked_mean(values, mask, dim=None):
    """Mean of ``values`` where ``mask`` is 1 (over all elements, or along ``dim``); 0 where the mask is empty."""
    mask = mask.to(values.dtype)
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1.0)


def group_advantages(returns, group_size: int, normalize: bool, eps: float = 1e-8):
    """Advantages with the group-mean baseline: ``A = R - mean(R of the same prompt)``.

    ``returns`` holds ``group_size`` consecutive samples per prompt. With ``normalize`` the advantages are then divided
    by their standard deviation over the whole batch (a batch of all-zero advantages stays zero).
    """
    grouped = returns.view(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if normalize and advantages.numel() > 1:
        advantages = advantages / (advantages.std() + eps)
    return advantages


def sequence_kl(logprobs, ref_logprobs, mask):
    """``sum_t (logp - ref_logp)`` over each response's tokens: a sample of KL(policy || reference) per sequence."""
    return ((logprobs - ref_logprobs) * mask).sum(dim=1)


def minibatch_order(rollout_size: int, group_size: int, device=None):
    """A random order of the rollout's rows in which each group of ``group_size`` consecutive rows stays together
    (``group_size`` 1: any order)."""
    import torch

    groups = torch.randperm(rollout_size // group_size, device=device)
    return (groups.unsqueeze(1) * group_size + torch.arange(group_size, device=device)).reshape(-1)


def clipped_surrogate_loss(logprobs, old_logprobs, advantages, mask, clip_range: float):
    """PPO's clipped objective as a loss, averaged over response tokens; also returns clip fraction and approx KL.

    ``advantages`` has one value per sequence and is applied to each of its tokens.
    """
    import torch

    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    adv = advantages.unsqueeze(1)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - logratio, mask)  # Schulman's low-variance k3 estimator
    return loss, clipfrac, approx_kl


def disable_dropout(model) -> None:
    """Set every dropout probability in ``model`` to 0 (LoRA dropout included), as TRL's ``disable_dropout`` does."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def stop_string_ends(tokenizer, responses, stop: str | Sequence[str]) -> list[int]:
    """Per response, the number of tokens up to and including the one that completes a stop string (its length if
    none); ``stop`` is one string or several.

    Generation stopped by a stop string pads the rest of the sequence, and when the pad token is the eos token that
    padding cannot be told from a sampled eos by the tokens alone: this end can.
    """
    stops = [stop] if isinstance(stop, str) else list(stop)
    ends = []
    for row in responses.tolist():
        end = len(row)
        if any(s in tokenizer.decode(row, skip_special_tokens=False) for s in stops):
            for k in range(1, len(row) + 1):
                if any(s in tokenizer.decode(row[:k], skip_special_tokens=False) for s in stops):
                    end = k
                    break
        ends.append(end)
    return ends


def response_mask(responses, eos_token_id: int | None, pad_token_id: int | None, ends: list[int] | None = None):
    """1 on the tokens a reflection consists of: up to and including its first eos, before the trailing padding.

    Generation pads finished sequences with ``pad_token_id``; :func:`sample_reflections` forbids sampling the pad token
    (when it differs from eos), so trailing pads are always padding. ``ends`` (from :func:`stop_string_ends`) cuts
    each response after its stop string: when pad and eos are the same token, the padding after a stop string
    would otherwise count as a sampled eos.
    """
    import torch

    batch, length = responses.shape
    positions = torch.arange(length, device=responses.device).expand(batch, length)
    end = torch.full((batch,), length, device=responses.device)
    if eos_token_id is not None:
        is_eos = responses == eos_token_id
        end = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, end)
    if pad_token_id is not None and pad_token_id != eos_token_id:
        not_pad = (responses != pad_token_id).flip(1)
        last = torch.where(not_pad.any(1), length - not_pad.int().argmax(1), torch.zeros_like(end))
        end = torch.minimum(end, last)
    if ends is not None:
        end = torch.minimum(end, torch.tensor(ends, device=responses.device, dtype=end.dtype))
    return (positions < end.unsqueeze(1)).long()


def token_logprobs(
    model, input_ids, attention_mask, response_length: int, temperature: float, with_entropy=False, group_size: int = 1
):
    """Log-probabilities (and optionally entropies) of the last ``response_length`` tokens of ``input_ids``.

    Position ids follow the attention mask, as in generation, so that left-padded prompts see the same positions.
    With ``group_size`` G > 1 the rows come in groups of G that share one prompt (the samples of a prompt, left-padded
    alike): each prompt is run once and its keys and values are repeated for its G responses, which gives the same
    log-probabilities and gradients as running every row whole, at a fraction of the cost when prompts are much
    longer than reflections.
    """
    import torch

    logits = _response_logits(model, input_ids, attention_mask, response_length, group_size).float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, input_ids[:, -response_length:].unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logprobs, None
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy


def _response_logits(model, input_ids, attention_mask, response_length: int, group_size: int):
    """The logits that predict the last ``response_length`` tokens (see :func:`token_logprobs`)."""
    import torch

    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    if group_size == 1:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        return logits[:, -response_length - 1 : -1]
    prompt_length = input_ids.shape[1] - response_length
    prompt = _grouped_prompt_pass(model, input_ids[:, :prompt_length], attention_mask[:, :prompt_length], group_size)
    responses = model(
        input_ids=input_ids[:, prompt_length:],
        attention_mask=attention_mask,
        position_ids=position_ids[:, prompt_length:],
        cache=prompt.cache,
    )
    first = prompt.logits[:, -1:].repeat_interleave(group_size, dim=0)  # predicts each response's first token
    return torch.cat([first, responses.logits[:, :-1]], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Rollout: sample reflections, score them, compute what the update needs.


@dataclass
class Rollout:
    """One iteration's samples: ``B * G`` sequences, ``G`` consecutive ones per prompt."""

    input_ids: Any  # [N, P + T] prompt (left-padded) + response
    attention_mask: Any  # [N, P + T]
    mask: Any  # [N, T] 1 on response tokens
    logprobs: Any  # [N, T] under the policy that sampled them (old)
    ref_logprobs: Any  # [N, T] under the reference (adapter disabled)
    rewards: Any  # [N]
    kl: Any  # [N] sum_t (logprobs - ref_logprobs)
    returns: Any  # [N] rewards - kl_coef * kl
    advantages: Any  # [N]
    reflections: list[str]

    @property
    def response_length(self) -> int:
        return self.mask.shape[1]


@contextlib.contextmanager
def reference_model(model):
    """Inside this block ``model`` is the reference: the frozen SFT adapter if loaded, else the adapter disabled."""
    if REFERENCE_ADAPTER in model.peft_config:
        model.set_adapter(REFERENCE_ADAPTER)  # also freezes "default" and ...
        try:
            yield
        finally:
            model.set_adapter("default")  # ... makes it trainable again (and the reference frozen)
    else:
        with model.disable_adapter():
            yield


def cut_reflection(text: str, stop: Sequence[str] = (STOP_STRING,)) -> str:
    """A generated reflection ends at its first stop string (a blank line by default)."""
    for s in stop:
        text = text.split(s, 1)[0]
    return text.strip()


def sample_reflections(
    model, tokenizer, prompts: list[str], cfg: PPORunConfig, logits_processor=None, group_size: int = 1
):
    """Sample one reflection per prompt; returns (input_ids, attention_mask, response mask, texts).

    With ``group_size`` G > 1 the prompts come in runs of G equal ones (the samples of a prompt): each is read once
    and its keys and values repeated for its G samples, instead of reading it G times.
    """
    import torch
    from transformers import LogitsProcessorList

    enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=cfg.max_prompt_length)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    suppress = None
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        suppress = [tokenizer.pad_token_id]  # trailing pads must mean "finished" (see response_mask)
    with torch.no_grad():
        prefix = {}
        if group_size > 1 and enc["input_ids"].shape[1] > 1:
            prefix["cache"] = prompt_cache(model, enc["input_ids"], enc["attention_mask"], group_size)
        out = model.generate(
            **enc,
            **prefix,
            do_sample=True,
            temperature=cfg.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=cfg.max_new_tokens,
            stop_strings=list(cfg.stop),
            tokenizer=tokenizer,
            suppress_tokens=suppress,
            logits_processor=LogitsProcessorList(logits_processor or []),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    prompt_len = enc["input_ids"].shape[1]
    responses = out[:, prompt_len:]
    if responses.shape[1] == 0:  # nothing generated at all: keep one padded position so shapes stay valid
        responses = torch.full((out.shape[0], 1), tokenizer.pad_token_id, device=device, dtype=out.dtype)
        out = torch.cat([out, responses], dim=1)
    ends = stop_string_ends(tokenizer, responses, cfg.stop)
    mask = response_mask(responses, tokenizer.eos_token_id, tokenizer.pad_token_id, ends)
    attention_mask = torch.cat([enc["attention_mask"], torch.ones_like(responses)], dim=1)
    texts = [
        cut_reflection(tokenizer.decode(r[: int(m.sum())], skip_special_tokens=True), cfg.stop)
        for r, m in zip(responses, mask, strict=True)
    ]
    return out, attention_mask, mask, texts


def prompt_cache(model, input_ids, attention_mask, group_size: int):
    """Keys and values of every prompt but its last token, computed once per group of ``group_size`` equal prompts
    and repeated for each of them: ``generate`` then reads only the last token of each prompt itself."""
    return _grouped_prompt_pass(model, input_ids[:, :-1], attention_mask[:, :-1], group_size).cache


def _grouped_prompt_pass(model, input_ids, attention_mask, group_size: int):
    """The model's output on the first row of each group of ``group_size`` equal (left-padded) prompt rows, with its
    cache of keys and values repeated once per row of the group."""
    if input_ids.shape[0] % group_size:
        raise ValueError(f"{input_ids.shape[0]} rows do not split into groups of {group_size}")
    ids, mask = input_ids[::group_size], attention_mask[::group_size]
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True)
    out.cache.batch_repeat_interleave(group_size)
    return out


def collect_rollout(
    model,
    tokenizer,
    prompts: list[str],
    rows: list[dict],
    reward_fn: RewardFn,
    cfg: PPORunConfig,
    logits_processor=None,
) -> Rollout:
    """Sample ``num_samples_per_prompt`` reflections for each prompt, score them and compute advantages."""
    import torch

    group = cfg.num_samples_per_prompt
    prompts_rep = [p for p in prompts for _ in range(group)]
    rows_rep = [r for r in rows for _ in range(group)]
    model.eval()  # no LoRA dropout while sampling and scoring the old policy
    input_ids, attention_mask, mask, texts = sample_reflections(
        model, tokenizer, prompts_rep, cfg, logits_processor, group_size=group
    )
    length = mask.shape[1]
    with torch.no_grad():
        logprobs, _ = token_logprobs(model, input_ids, attention_mask, length, cfg.temperature, group_size=group)
        with reference_model(model):
            ref_logprobs, _ = token_logprobs(
                model, input_ids, attention_mask, length, cfg.temperature, group_size=group
            )
    rewards = torch.tensor(reward_fn(prompts_rep, texts, rows_rep), dtype=torch.float32, device=logprobs.device)
    if rewards.shape != (len(texts),):
        raise DataError(f"the reward source returned {tuple(rewards.shape)} rewards for {len(texts)} reflections")
    kl = sequence_kl(logprobs, ref_logprobs, mask)
    returns = rewards - cfg.kl_coef * kl
    advantages = group_advantages(returns, group, cfg.normalize_advantages)
    return Rollout(input_ids, attention_mask, mask, logprobs, ref_logprobs, rewards, kl, returns, advantages, texts)


# ----------------------------------------------------------------------------------------------------------------------
# Model, checkpoints.


def build_policy(cfg: PPORunConfig):
    """Base model + trainable LoRA adapter (from ``sft_adapter`` or fresh), and its tokenizer (left padding).

    With ``sft_adapter`` the model also holds a frozen copy of it, the reference (see :func:`reference_model`).
    """
    import torch
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.sft_adapter or cfg.model)
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # the clue is at the end of the prompt
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    if cfg.sft_adapter:
        model = PeftModel.from_pretrained(base, cfg.sft_adapter, is_trainable=True)
        model.load_adapter(cfg.sft_adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    else:
        model = get_peft_model(base, build_lora_config(cfg.lora, "CAUSAL_LM"))
    return model, tokenizer


def _rng_state() -> dict[str, Any]:
    import torch

    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def save_checkpoint(model, optimizer, step: int, prompt_rng: random.Random, history: list[dict], output_dir: Path):
    """Write ``checkpoint-<step>`` atomically (a crash mid-write leaves no half checkpoint to resume from)."""
    import torch

    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, selected_adapters=["default"])
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": _rng_state(),
             "prompt_rng": prompt_rng.getstate(), "history": history}  # fmt: skip
    torch.save(state, tmp / TRAINING_STATE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    logger.info("saved %s", final)


def load_checkpoint(model, optimizer, checkpoint: str | Path, prompt_rng: random.Random) -> tuple[int, list[dict]]:
    """Restore adapter weights, optimizer, RNG states; returns (step, metrics history)."""
    import torch
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    checkpoint = Path(checkpoint)
    set_peft_model_state_dict(model, load_peft_weights(str(checkpoint)), adapter_name="default")
    state = torch.load(checkpoint / TRAINING_STATE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    prompt_rng.setstate(state["prompt_rng"])
    logger.info("resumed from %s at iteration %d", checkpoint, state["step"])
    return int(state["step"]), list(state["history"])


def _last_checkpoint(output_dir: Path) -> Path | None:
    last = resume_checkpoint(output_dir)
    return Path(last) if last and (Path(last) / TRAINING_STATE).is_file() else None


# ----------------------------------------------------------------------------------------------------------------------
# The loop.


def train_ppo(
    model,
    tokenizer,
    prompts: Sequence[str],
    rows: Sequence[dict[str, Any]],
    reward_fn: RewardFn,
    cfg: PPORunConfig,
    logits_processor: list | None = None,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Run ``cfg.num_iterations`` PPO iterations on ``model`` (a PEFT model); returns the final metrics.

    ``rows[i]`` is the dataset row of ``prompts[i]`` (passed to the reward function). ``logits_processor`` (a list of
    transformers logits processors) constrains sampling; tests use it to keep a bandit small. ``evaluate(policy)``
    (see :func:`held_out_evaluator`) runs every ``cfg.eval_steps`` iterations; its ``eval/...`` metrics join the log.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    if len(prompts) != len(rows) or not prompts:
        raise DataError(f"train_ppo needs one row per prompt and at least one prompt; got {len(prompts)}/{len(rows)}")
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=parse_report_to(cfg.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / TENSORBOARD_DIR)),
    )
    set_seed(cfg.seed, device_specific=True)  # seeding in one place: sampling differs across processes
    prompt_rng = random.Random(cfg.seed + accelerator.process_index)
    disable_dropout(model)  # model.train() below must not make the new log-probabilities differ from the old ones
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)
    policy = accelerator.unwrap_model(model)

    start, history = 0, []
    last = _last_checkpoint(output_dir)
    if last is not None:
        start, history = load_checkpoint(policy, optimizer, last, prompt_rng)
    if cfg.report_to != "none":
        accelerator.init_trackers("ppo", config=flat_config(to_dict(cfg)))  # TensorBoard: <output_dir>/tensorboard/ppo

    order: list[int] = []
    rollout_size = cfg.batch_size * cfg.num_samples_per_prompt
    # minibatches of whole groups share each prompt's forward pass (see token_logprobs)
    group = cfg.num_samples_per_prompt if cfg.minibatch_size % cfg.num_samples_per_prompt == 0 else 1
    started = time.perf_counter()
    with StopOnSigterm() as sigterm:
        for iteration in range(start + 1, cfg.num_iterations + 1):
            t0 = time.perf_counter()
            batch_idx = []
            while len(batch_idx) < cfg.batch_size:  # epochs over the prompts, reshuffled each time
                if not order:
                    order = list(range(len(prompts)))
                    prompt_rng.shuffle(order)
                batch_idx.append(order.pop())
            batch = collect_rollout(
                policy, tokenizer, [prompts[i] for i in batch_idx], [rows[i] for i in batch_idx], reward_fn, cfg,
                logits_processor,
            )  # fmt: skip
            t1 = time.perf_counter()

            model.train()
            stats: dict[str, list[float]] = {"loss": [], "pg_loss": [], "entropy": [], "clipfrac": [], "approx_kl": []}
            grad_norms: list[float] = []
            for _epoch in range(cfg.ppo_epochs):
                perm = minibatch_order(rollout_size, group, batch.input_ids.device)
                for mb_start in range(0, rollout_size, cfg.minibatch_size):
                    mb = perm[mb_start : mb_start + cfg.minibatch_size]
                    with accelerator.accumulate(model):
                        new_logprobs, entropy = token_logprobs(
                            model, batch.input_ids[mb], batch.attention_mask[mb], batch.response_length, cfg.temperature,
                            with_entropy=cfg.entropy_coef > 0, group_size=group,
                        )  # fmt: skip
                        pg_loss, clipfrac, approx_kl = clipped_surrogate_loss(
                            new_logprobs, batch.logprobs[mb], batch.advantages[mb], batch.mask[mb], cfg.clip_range
                        )
                        loss = pg_loss
                        if entropy is not None:
                            mean_entropy = masked_mean(entropy, batch.mask[mb])
                            loss = pg_loss - cfg.entropy_coef * mean_entropy
                            stats["entropy"].append(mean_entropy.item())
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            grad_norms.append(float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm)))
                        optimizer.step()
                        optimizer.zero_grad()
                    stats["loss"].append(loss.item())
                    stats["pg_loss"].append(pg_loss.item())
                    stats["clipfrac"].append(clipfrac.item())
                    stats["approx_kl"].append(approx_kl.item())
            t2 = time.perf_counter()

            rewards = accelerator.gather(batch.rewards)
            lengths = accelerator.gather(batch.mask.sum(1).float())
            metrics = {
                "iteration": iteration,
                "rollout/reward_mean": rewards.mean().item(),
                "rollout/reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
                "rollout/return_mean": batch.returns.mean().item(),
                "rollout/response_length": lengths.mean().item(),
                "rollout/time_s": t1 - t0,
                "ppo/kl": batch.kl.mean().item(),
                "ppo/advantage_std": batch.advantages.std().item(),
                "ppo/time_s": t2 - t1,
                "ppo/learning_rate": cfg.learning_rate,
                "ppo/grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
            }
            metrics.update({f"ppo/{k}": sum(v) / len(v) for k, v in stats.items() if v})
            metrics.update(ppo_env_metrics(batch.rewards, [rows[i] for i in batch_idx], cfg.num_samples_per_prompt))
            if evaluate is not None and (iteration % cfg.eval_steps == 0 or iteration == cfg.num_iterations):
                metrics.update(evaluate(policy))
            history.append(metrics)
            if iteration % cfg.logging_steps == 0 or iteration == cfg.num_iterations:
                logger.info("iteration %d/%d %s", iteration, cfg.num_iterations,
                            json.dumps({k: round(v, 4) for k, v in metrics.items() if k != "iteration"}))  # fmt: skip
                if cfg.report_to != "none":
                    accelerator.log(metrics, step=iteration)
            stopping = any_process(accelerator, sigterm.received)
            if iteration % cfg.save_steps == 0 or iteration == cfg.num_iterations or stopping:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save_checkpoint(policy, optimizer, iteration, prompt_rng, history, output_dir)
            if stopping and iteration < cfg.num_iterations:
                raise Interrupted(
                    f"stopped by SIGTERM after iteration {iteration}/{cfg.num_iterations}; "
                    f"{output_dir / f'checkpoint-{iteration}'} is saved: run the same command again to resume"
                )

    done = [m for m in history if m["iteration"] > start]
    elapsed = time.perf_counter() - started
    summary = {
        "ppo/iterations": cfg.num_iterations,
        "ppo/resumed_from": start,
        "ppo/iterations_per_second": len(done) / elapsed if done and elapsed > 0 else 0.0,
        "ppo/train_loss": sum(m["ppo/loss"] for m in done) / len(done) if done else float("nan"),
        "rollout/reward_mean_first": history[0]["rollout/reward_mean"] if history else float("nan"),
        "rollout/reward_mean_last": history[-1]["rollout/reward_mean"] if history else float("nan"),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        policy.save_pretrained(output_dir, selected_adapters=["default"])
        tokenizer.save_pretrained(output_dir)
        (output_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    if cfg.report_to != "none":
        accelerator.end_training()
    return summary
