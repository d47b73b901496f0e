"""The text-environment interface, task suites, and the registry of environments by name.

An *environment suite* (:class:`EnvSuite`) knows a task list, the prompts for its actor and reflector, and makes one
:class:`TextEnv` per concurrent episode. A ``TextEnv`` is the classic loop::

    obs = env.reset(task)                    # the task description the actor sees first
    result = env.step("search[red mug]")     # -> StepResult(observation, reward, done, info)
    outcome = env.outcome()                  # -> Outcome(return_, success, metrics) at episode end

To add an environment, subclass both, give the suite a ``Config`` dataclass (its fields are the ``env.options`` of a
recipe; unknown keys are rejected) and decorate it with ``@register_env("name")``. Heavy dependencies are imported
inside the methods, never at module import, so the registry stays cheap.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from retroformer.errors import ConfigError, EnvError
from retroformer.types import text_hash


@dataclass(frozen=True)
class Task:
    """One task: a stable id and the environment-specific data needed to reset to it."""

    task_id: str
    payload: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class StepResult:
    observation: str
    reward: float = 0.0
    done: bool = False
    #: ``info["invalid"] = True`` marks an action the environment did not accept (it is counted in the record).
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """An episode's return ``G`` (paper section 3), its success flag, and any extra metrics (e.g. EM and F1)."""

    return_: float
    success: bool
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EnvPrompts:
    """The text an environment contributes to the actor's and the reflector's prompts.

    ``examples`` are few-shot trajectories in the actor's format (``Thought:`` / ``Action:`` / ``Observation:`` lines);
    ``reflection_examples`` show a failed trajectory and a good reflection on it.
    """

    instructions: str
    examples: str
    reflection_instructions: str
    reflection_examples: str = ""


@dataclass(frozen=True)
class ShortPrompts:
    """A short few-shot *completion* prompt for small actors (``actor.kind: short``), beside the ReAct prompt.

    A model of ~100M parameters does not keep to the Thought/Action format, but it continues a pattern: ``examples``
    are blocks of ``Task: ...`` / ``Notes: ...`` / ``Action: <prefix><argument><suffix>``, and the prompt ends with
    ``Action: <action_prefix>`` so that the model only writes the argument (a door name, a search query, ...).
    """

    examples: str
    action_prefix: str
    action_suffix: str
    no_notes: str = "none"


class TextEnv(abc.ABC):
    """One episode at a time. Not thread-safe; the trial loop makes one per concurrent episode."""

    @abc.abstractmethod
    def reset(self, task: Task) -> str:
        """Start ``task`` and return the first observation (the task description)."""

    @abc.abstractmethod
    def step(self, action: str) -> StepResult:
        """Apply one action (the text after ``Action:``)."""

    @abc.abstractmethod
    def outcome(self) -> Outcome:
        """The episode's return and success so far (called when it ends)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release processes, sockets or files."""


class EnvSuite(abc.ABC):
    """A named environment with its task list and prompts. Subclasses define ``Config`` and ``name``."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"

    @dataclass
    class Config:
        max_steps: int = 10

    prompts: EnvPrompts
    #: The short completion prompt for small actors, where the environment has one (``actor.kind: short``).
    short_prompts: ClassVar[ShortPrompts | None] = None
    #: Whether ``make`` and the environments' calls may block (a server, a planner, a subprocess, disk): the episode
    #: loop then runs each in a worker thread, so that other episodes go on meanwhile. A suite whose environments live
    #: in memory and answer in microseconds sets False: its calls run on the event loop, where they cost less than the
    #: two thread switches a worker thread takes (``bench/RESULTS.md``, section 7).
    blocking: ClassVar[bool] = True

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def max_steps(self) -> int:
        return int(self.config.max_steps)

    @abc.abstractmethod
    def tasks(self) -> list[Task]:
        """The task list, in a stable order."""

    @abc.abstractmethod
    def make(self) -> TextEnv:
        """A fresh environment instance for one concurrent episode."""

    def fingerprint(self, tasks: list[Task]) -> str:
        """Identifies the task list so that runs on different tasks are never compared side by side."""
        return text_hash("\n".join([self.name, self.version, *[t.task_id for t in tasks]]))

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop servers or processes started by the suite."""


_REGISTRY: dict[str, type[EnvSuite]] = {}
#: Built-in environments, imported lazily on first use so that optional dependencies are only needed when used.
_BUILTIN_MODULES = {
    "synthetic": "retroformer.envs.synthetic",
    "textworld": "retroformer.envs.textworld_env",
    "hotpotqa": "retroformer.envs.hotpotqa",
    "alfworld": "retroformer.envs.alfworld",
    "webshop": "retroformer.envs.webshop",
}


def register_env(name: str) -> Callable[[type[EnvSuite]], type[EnvSuite]]:
    """Class decorator: make an :class:`EnvSuite` available by ``name`` in recipes."""

    def wrap(cls: type[EnvSuite]) -> type[EnvSuite]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_envs() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def get_env_class(name: str) -> type[EnvSuite]:
    """The suite class registered as ``name``; a typo gets the closest valid name suggested."""
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, available_envs(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown environment {name!r}.{hint} Available: {', '.join(available_envs())}")
    return _REGISTRY[name]


def make_suite(name: str, options: dict[str, Any] | None = None) -> EnvSuite:
    """Build a registered suite from its options (validated against its ``Config``; unknown keys rejected)."""
    from retroformer.config import from_dict

    cls = get_env_class(name)
    cfg = from_dict(cls.Config, options or {}, where="env.options")
    if not dataclasses.is_dataclass(cfg):  # pragma: no cover - programming error in a suite
        raise EnvError(f"environment {name!r} has a Config that is not a dataclass")
    return cls(cfg)
