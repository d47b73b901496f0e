"""Shared record types: what one step, one episode and one rated reflection look like on disk.

Episode records are the hand-off between rollouts and training (DESIGN.md section 2). They are written one JSON object
per line, append-only, and carry a schema version so that older files can be read or rejected clearly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from retroformer.errors import DataError

SCHEMA_VERSION = 1

#: How an episode can end. ``success``: the environment reported success. ``done``: the environment ended the
#: episode without success (e.g. a wrong final answer). ``step_limit``: the step budget ran out. ``repeat``: the actor
#: repeated the same action too often (ALFWorld protocol). ``llm_error``: an LLM call failed after its retries; such an
#: episode is *errored*, neither success nor failure, and produces no rating. ``env_error``: the environment failed
#: (e.g. a server that stayed down after retries); also errored. ``budget``: the run's token or cost budget ran out
#: during the episode; errored. A resumed run re-attempts errored episodes (the errored record stays as history).
END_REASONS = ("success", "done", "step_limit", "repeat", "llm_error", "env_error", "budget")
ERRORED_END_REASONS = ("llm_error", "env_error", "budget")


@dataclass
class Usage:
    """Token accounting for one or more LLM calls."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    cached_calls: int = 0

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.calls += other.calls
        self.cached_calls += other.cached_calls

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Step:
    """One actor step: what it thought, what it did, what it saw."""

    thought: str
    action: str
    observation: str
    reward: float = 0.0
    valid: bool = True


@dataclass
class Reflection:
    """A reflection written by the retrospective model after a failed episode: ``y[k,i]`` from prompt ``x[k,i]``."""

    prompt: str
    text: str
    reflector_id: str
    prompt_hash: str
    usage: Usage = field(default_factory=Usage)


@dataclass
class EpisodeRecord:
    """One episode of one task at one trial, with the reflection written after it (if any)."""

    run_name: str
    task_id: str
    trial: int
    env_name: str
    env_version: str
    seed: int
    actor_id: str
    reflector_id: str
    actor_prompt_hash: str
    memory: list[str]
    steps: list[Step]
    return_: float
    success: bool
    end_reason: str
    metrics: dict[str, float] = field(default_factory=dict)
    num_invalid_actions: int = 0
    reflection: Reflection | None = None
    actor_usage: Usage = field(default_factory=Usage)
    error: str | None = None
    task_fingerprint: str = ""
    wall_time_s: float = 0.0
    created_at: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def errored(self) -> bool:
        """An LLM or environment call failed (the episode is neither success nor failure), or the reflector's did."""
        return self.end_reason in ERRORED_END_REASONS or self.error is not None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpisodeRecord:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DataError(
                f"episode record has schema_version={version!r}, this version of retroformer reads "
                f"{SCHEMA_VERSION}; re-run the trials with this version or convert the file"
            )
        data = dict(data)
        data["steps"] = [Step(**s) for s in data["steps"]]
        data["actor_usage"] = Usage(**data.get("actor_usage") or {})
        if data.get("reflection") is not None:
            refl = dict(data["reflection"])
            refl["usage"] = Usage(**refl.get("usage") or {})
            data["reflection"] = Reflection(**refl)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise DataError(f"episode record has unknown fields {sorted(unknown)}; expected only {sorted(known)}")
        return cls(**data)


#: Columns of the rated-reflection dataset exported by the trial loop and read by the three training stages.
RATED_REFLECTION_COLUMNS = (
    "prompt",  # x[k,i]: the reflection prompt
    "reflection",  # y[k,i]: the reflection text
    "rating",  # r = G[k,i+1] - G[k,i]
    "return_before",  # G[k,i]
    "return_after",  # G[k,i+1]
    "success_after",  # whether trial i+1 succeeded
    "task_id",
    "trial",  # i
    "run_name",
    "env_name",
    "env_version",
    "actor_id",
    "reflector_id",
    "actor_prompt_hash",
    "reflector_prompt_hash",
    "task_fingerprint",
    "seed",
)


def text_hash(text: str, length: int = 16) -> str:
    """A short, stable hash of a prompt template or any text (sha256, hex)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]
