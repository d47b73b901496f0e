"""Text environments and their registry. Import a suite with :func:`make_suite`; heavy modules load lazily."""

from retroformer.envs.base import (
    EnvPrompts,
    EnvSuite,
    Outcome,
    StepResult,
    Task,
    TextEnv,
    available_envs,
    get_env_class,
    make_suite,
    register_env,
)

__all__ = [
    "EnvPrompts",
    "EnvSuite",
    "Outcome",
    "StepResult",
    "Task",
    "TextEnv",
    "available_envs",
    "get_env_class",
    "make_suite",
    "register_env",
]
