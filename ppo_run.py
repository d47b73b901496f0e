"""Stage 3 of Retroformer: policy-gradient training (LoRA) of the retrospective model on reflection prompts.

    python ppo_run.py --config experiments/recipes/ppo.yaml

Any field can be overridden on the command line (``--kl_coef 0.1 --reward_source env --env_run_dir runs/demo``);
``--help`` lists them all. Under accelerate::

    accelerate launch --num_processes 2 ppo_run.py --config experiments/recipes/ppo.yaml

A rerun with the same ``output_dir`` resumes from its last ``checkpoint-N``. Outputs: the LoRA adapter and tokenizer,
``config.yaml`` (the resolved config), ``metrics.json`` (``ppo/...``, ``rollout/...``) and, for ``algorithm: ppo``,
``history.json`` (one metrics row per iteration).

Where this departs from the paper (section 4.2; its code used TRL's old ``PPOTrainer``, which no longer exists):

* **No value head.** The paper's PPO had a value head. A reflection is one action with one terminal reward, so we use
  the mean reward of ``num_samples_per_prompt`` samples of the same prompt as the baseline (as RLOO and GRPO do),
  plus batch normalisation of the advantages (``normalize_advantages``); see ``retroformer/training/ppo.py``.
* **KL as a per-sequence penalty on the reward**, against a reference that shares the policy's base weights: a
  frozen copy of the SFT adapter when training starts from one, else the model with its fresh adapter disabled.
* **Online rewards as an option.** The paper scored reflections offline with a reward model (``reward_source: rm``,
  the default). ``reward_source: env`` re-runs the actor's next attempt with the sampled reflection and uses the
  return difference itself, the quantity the reward model was trained to predict.
* **TRL's GRPO and RLOO** are available as alternatives to our PPO loop (``algorithm: grpo`` / ``rloo``), with the
  same reward sources.
* **Several environments, one reflector.** ``env_run_dirs`` lists the trials runs of several environments; each
  prompt's reflections are scored by the run that wrote its row. ``env_weights`` / ``balance_envs`` set each
  environment's share of the prompts; ``ppo/<env>/reward_mean`` and ``eval/<env>/success`` are logged per environment.
* Prompts come from the rated-reflection dataset (unique ``prompt`` values, optionally only those whose logged
  reflection did not lead to success), cut on the left to ``max_prompt_length`` tokens.
"""

from __future__ import annotations


def make_parser():
    from retroformer.config import make_parser as build
    from retroformer.training.ppo import PPORunConfig

    return build(PPORunConfig, prog="ppo_run.py", description=PPORunConfig.__doc__)


def main(argv: list[str] | None = None) -> dict:
    from retroformer.cli import actor_api_key, load_env_file, load_stage_config
    from retroformer.training.common import setup_logging
    from retroformer.training.ppo_stage import PPORunConfig, run

    load_env_file()
    setup_logging()
    cfg, sources = load_stage_config(PPORunConfig, argv, prog="ppo_run.py", stage="ppo")
    api_key = actor_api_key(cfg.env_run_dir) if cfg.reward_source == "env" else None
    # Several runs (one reflector, several environments): each run's actor gets the key its own config names.
    api_keys = {d: actor_api_key(d) for d in cfg.env_run_dirs} if cfg.reward_source == "env" else None
    return run(cfg, api_key=api_key, sources=sources, api_keys=api_keys)


if __name__ == "__main__":
    from retroformer.cli import run_stage_script

    raise SystemExit(run_stage_script(main))
