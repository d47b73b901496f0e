"""Fixtures for the training-stage tests: tiny models built once per session, small rated datasets in the vault style.

Import the fixture into a test module with ``from helpers_training import tiny_models  # noqa: F401``.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from retroformer.envs.synthetic import DOOR_NAMES, PROMPTS
from retroformer.types import RATED_REFLECTION_COLUMNS

GOOD = "I opened the wrong door. The scratch said the way out is the {answer} door. Next time open[{answer}]."
GENERIC = "I was unlucky with my choice. Next time I should think more carefully before acting."
WRONG = "I opened the wrong door. Next time open[{other}]."


def vault_prompt(doors: list[str], answer: str) -> str:
    """A reflection prompt after a failed vault attempt; it ends with the clue, then ``Reflection:``."""
    return (
        f"{PROMPTS.reflection_instructions}\n"
        f"Task: You are in a vault with {len(doors)} doors: {', '.join(doors)}. Exactly one leads out.\n"
        f"Thought: I have no plan yet, so I try the first door.\n"
        f"Action: open[{doors[0]}]\n"
        f"Observation: The {doors[0]} door is locked. Scratched into it: the way out is the {answer} door.\n"
        f"Result: failed\n"
        f"Reflection:"
    )


def rated_rows(
    num_prompts: int = 8,
    reflections_per_prompt: int = 4,
    seed: int = 0,
    wrong_door: bool = False,
    run_name: str = "test-run",
) -> dict[str, list]:
    """Columns of a rated-reflection dataset: per prompt, reflections that carry the clue (rating 1.0) or not (0.0).

    Each prompt gets at least one good and one bad reflection, so every prompt yields pairs. ``wrong_door`` makes some
    bad reflections name a wrong door (harder: the reward model must read the clue, not just spot ``open[``).
    """
    rng = random.Random(seed)
    rows: dict[str, list] = {c: [] for c in RATED_REFLECTION_COLUMNS}
    for k in range(num_prompts):
        doors = rng.sample(DOOR_NAMES, 4)
        answer = doors[rng.randrange(1, 4)]
        prompt = vault_prompt(doors, answer)
        for j in range(reflections_per_prompt):
            good = j == 0 or (j > 1 and rng.random() < 0.5)
            if good:
                text = GOOD.format(answer=answer)
            elif wrong_door and rng.random() < 0.5:
                text = WRONG.format(other=rng.choice([d for d in doors if d != answer]))
            else:
                text = GENERIC
            rating = 1.0 if good else 0.0
            row = {
                "prompt": prompt,
                "reflection": text,
                "rating": rating,
                "return_before": 0.0,
                "return_after": rating,
                "success_after": good,
                "task_id": f"vault-{seed}-{k:03d}",
                "trial": 0,
                "run_name": run_name,
                "env_name": "synthetic",
                "env_version": "1",
                "actor_id": "plan-following-actor",
                "reflector_id": "scripted-clue-p0.5",
                "actor_prompt_hash": "plan-following-v1",
                "reflector_prompt_hash": "test",
                "task_fingerprint": f"fp-{k}",
                "seed": seed,
            }
            for c in RATED_REFLECTION_COLUMNS:
                rows[c].append(row[c])
    return rows


def write_rated_dataset(path: Path, **kwargs) -> str:
    """Save :func:`rated_rows` with ``Dataset.save_to_disk`` (as the trial loop does); returns the path."""
    from datasets import Dataset

    Dataset.from_dict(rated_rows(**kwargs)).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """``{"lm": ..., "rm": ...}``: tiny Llama causal LM and reward model with a locally trained tokenizer."""
    from retroformer.tiny import TinyModelConfig, build_tiny_models

    out = tmp_path_factory.mktemp("tiny")
    paths = build_tiny_models(TinyModelConfig(out=str(out)))
    return {k: str(v) for k, v in paths.items()}


REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """Import a top-level stage script (``sft_run``, ``reward_run``) as a module, whatever the working directory."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
