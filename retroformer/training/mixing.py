"""One retrospective model for several environments: the mixture of its training data, and metrics per environment.

Retroformer's reflector "learns from rewards across multiple environments and tasks" (paper, section 4). The rated
reflections of several trials runs (HotPotQA, ALFWorld, WebShop, ...) are concatenated by every stage; left as they
are, the environment with the most rows dominates. Two ways to set the mixture, the same in SFT, the reward model and
PPO's prompts (the config fields ``env_weights`` and ``balance_envs``):

* ``env_weights: {hotpotqa: 2, alfworld: 1, webshop: 1}``: each environment's share of the examples, relative to the
  others (an environment the weights do not name gets 1; weight 0 leaves it out);
* ``balance_envs: true``: equal shares.

The examples are resampled, seeded, to those shares, keeping their total number: an environment with fewer rows
than its share has its rows repeated, one with more has a sample of them. Rows are told apart by their ``env_name``
column (written by ``retroformer trials`` and ``retroformer import-ratings``).

Metrics per environment carry the environment's name in the middle: ``ppo/<env>/reward_mean``, ``eval/<env>/success``,
``sft/<env>/num_examples``, ``reward/<env>/eval_spearman``.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retroformer.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

#: The dataset column that names a row's environment.
ENV_COLUMN = "env_name"
ENV_WEIGHTS_HELP = (
    "share of the training examples per environment (env_name), relative to the others, e.g. {hotpotqa: 2, "
    "alfworld: 1}; unnamed environments get 1, 0 leaves one out; {}: the rows as they come"
)
BALANCE_ENVS_HELP = "resample the training examples so that every environment (env_name) has the same share"


def check_env_mixing(weights: dict[str, float], balance: bool) -> None:
    """ConfigError for a negative or non-numeric weight, all weights 0, or both ways of mixing at once."""
    if balance and weights:
        raise ConfigError(f"balance_envs=true and env_weights={weights}: set one of them (balance = equal weights)")
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(
                f"env_weights[{name!r}]={weight!r} must be a number >= 0 (a share relative to the others)"
            )
    if weights and not any(weights.values()):
        raise ConfigError(f"env_weights={weights} leaves every environment out; give at least one a weight > 0")


def mixing_enabled(weights: dict[str, float], balance: bool) -> bool:
    return bool(weights) or balance


def env_shares(env_names: Sequence[str], weights: dict[str, float], balance: bool) -> dict[str, float]:
    """Each present environment's target share (summing to 1); a ConfigError for a weight of an absent environment."""
    present = sorted(set(env_names))
    unknown = sorted(set(weights) - set(present))
    if unknown:
        raise ConfigError(
            f"env_weights names {unknown}, which no row has; the datasets hold environments {present} (env_name)"
        )
    raw = {env: 1.0 if balance else float(weights.get(env, 1.0)) for env in present}
    total = sum(raw.values())
    if total <= 0:
        raise ConfigError(f"env_weights={weights} gives every environment present ({present}) weight 0")
    return {env: w / total for env, w in raw.items()}


def mix_indices(env_names: Sequence[str], weights: dict[str, float], balance: bool, seed: int) -> list[int]:
    """Indices into ``env_names`` (one per example) resampled to the shares of :func:`env_shares`, seeded, keeping
    the total; the identity when no mixing is asked for."""
    if not mixing_enabled(weights, balance):
        return list(range(len(env_names)))
    shares = env_shares(env_names, weights, balance)
    by_env: dict[str, list[int]] = defaultdict(list)
    for i, env in enumerate(env_names):
        by_env[env].append(i)
    rng = random.Random(seed)
    out: list[int] = []
    for env, share in shares.items():
        pool = by_env[env]
        wanted = round(share * len(env_names))
        full, rest = divmod(wanted, len(pool))
        out += pool * full + rng.sample(pool, rest)  # whole passes over the env's rows, then a sample
    rng.shuffle(out)
    if not out:
        raise DataError(f"no examples left after mixing with shares {shares}; raise the weights or add rows")
    return out


def env_counts(env_names: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for env in env_names:
        counts[env] += 1
    return dict(sorted(counts.items()))


def count_metrics(prefix: str, name: str, env_names: Sequence[str]) -> dict[str, int]:
    """``{"<prefix>/<env>/<name>": count}`` for each named environment among ``env_names`` (empty names: none)."""
    return {f"{prefix}/{env}/{name}": n for env, n in env_counts(env_names).items() if env}


def env_mean_metrics(
    prefix: str, name: str, values: Sequence[float], rows: Sequence[dict[str, Any]]
) -> dict[str, float]:
    """``{"<prefix>/<env>/<name>": mean of values}`` over the rows of each environment (rows without an ``env_name``:
    nothing)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for value, row in zip(values, rows, strict=True):
        env = row.get(ENV_COLUMN)
        if env:
            groups[env].append(float(value))
    return {f"{prefix}/{env}/{name}": sum(v) / len(v) for env, v in sorted(groups.items())}


def ppo_env_metrics(rewards, rows: Sequence[dict[str, Any]], group: int) -> dict[str, float]:
    """``ppo/<env>/reward_mean`` of one rollout: ``rewards`` (a tensor or list) holds ``group`` consecutive samples
    of each prompt of ``rows``."""
    values = rewards.tolist() if hasattr(rewards, "tolist") else list(rewards)
    return env_mean_metrics("ppo", "reward_mean", values, [row for row in rows for _ in range(group)])


def saved_columns(path: str | Path) -> set[str] | None:
    """The columns of a dataset written by ``Dataset.save_to_disk`` (its ``dataset_info.json``), without loading it;
    None when the file does not say (the loader then reports what is wrong)."""
    info = Path(path) / "dataset_info.json"
    if not info.is_file():
        return None
    features = json.loads(info.read_text(encoding="utf-8")).get("features")
    return set(features) if isinstance(features, dict) else None


def has_env_column(paths: Sequence[str]) -> bool:
    """Whether every dataset of ``paths`` has the ``env_name`` column."""
    return all(ENV_COLUMN in (saved_columns(p) or set()) for p in paths)


class EnvRewardRecorder:
    """Wraps a reward source's ``score``: rewards are passed through and also gathered per environment, for the
    ``ppo/<env>/reward_mean`` of a whole run (:meth:`totals`) and of the calls since the last :meth:`drain`."""

    def __init__(self, score) -> None:
        self._score = score
        self._total: dict[str, list[float]] = defaultdict(list)
        self._recent: dict[str, list[float]] = defaultdict(list)

    def score(self, prompts: list[str], reflections: list[str], rows: list[dict[str, Any]]) -> list[float]:
        rewards = self._score(prompts, reflections, rows)
        for reward, row in zip(rewards, rows, strict=True):
            env = row.get(ENV_COLUMN)
            if env:
                self._total[env].append(float(reward))
                self._recent[env].append(float(reward))
        return rewards

    @staticmethod
    def _means(groups: dict[str, list[float]]) -> dict[str, float]:
        return {f"ppo/{env}/reward_mean": sum(v) / len(v) for env, v in sorted(groups.items()) if v}

    def drain(self) -> dict[str, float]:
        out = self._means(self._recent)
        self._recent = defaultdict(list)
        return out

    def totals(self) -> dict[str, float]:
        return self._means(self._total)
