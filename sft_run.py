"""Stage 1 of Retroformer: supervised fine-tuning (LoRA) of the retrospective model on well-rated reflections.

    python sft_run.py --config experiments/recipes/sft.yaml

Any field can be overridden on the command line (``--min_rating 0.5 --lora.r 2``); ``--help`` lists them all. Under
accelerate::

    accelerate launch --num_processes 2 sft_run.py --config experiments/recipes/sft.yaml

A rerun with the same ``output_dir`` resumes from its last checkpoint.
"""

from __future__ import annotations


def make_parser():
    from retroformer.config import make_parser as build
    from retroformer.training.sft import SFTStageConfig

    return build(SFTStageConfig, prog="sft_run.py", description=SFTStageConfig.__doc__)


def main(argv: list[str] | None = None) -> dict:
    from retroformer.cli import load_env_file, load_stage_config
    from retroformer.training.common import setup_logging
    from retroformer.training.sft import SFTStageConfig, run_sft

    load_env_file()  # CKPT_DIR, DATA_DIR, HF_TOKEN, tracker keys, ...: from .env, never from the library
    setup_logging()
    cfg, sources = load_stage_config(SFTStageConfig, argv, prog="sft_run.py", stage="sft")
    return run_sft(cfg, sources=sources)


if __name__ == "__main__":
    from retroformer.cli import run_stage_script

    raise SystemExit(run_stage_script(main))
