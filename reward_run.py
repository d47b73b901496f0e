"""Stage 2 of Retroformer: a scalar reward model of reflections, trained on their ratings.

    python reward_run.py --config experiments/recipes/reward.yaml

Any field can be overridden on the command line (``--mode regression --use_lora false``); ``--help`` lists them all.
Under accelerate::

    accelerate launch --num_processes 2 reward_run.py --config experiments/recipes/reward.yaml

A rerun with the same ``output_dir`` resumes from its last checkpoint. Load the result with
``retroformer.training.reward.load_reward_model(output_dir)``.
"""

from __future__ import annotations


def make_parser():
    from retroformer.config import make_parser as build
    from retroformer.training.reward import RewardStageConfig

    return build(RewardStageConfig, prog="reward_run.py", description=RewardStageConfig.__doc__)


def main(argv: list[str] | None = None) -> dict:
    from retroformer.cli import load_env_file, load_stage_config
    from retroformer.training.common import setup_logging
    from retroformer.training.reward import RewardStageConfig, run_reward

    load_env_file()  # CKPT_DIR, DATA_DIR, HF_TOKEN, tracker keys, ...: from .env, never from the library
    setup_logging()
    cfg, sources = load_stage_config(RewardStageConfig, argv, prog="reward_run.py", stage="reward")
    return run_reward(cfg, sources=sources)


if __name__ == "__main__":
    from retroformer.cli import run_stage_script

    raise SystemExit(run_stage_script(main))
