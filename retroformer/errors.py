"""The project's exception hierarchy.

Every error a user can cause says what was observed, what was expected and how to fix it.
"""

from __future__ import annotations


class RetroformerError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(RetroformerError, ValueError):
    """A configuration file, field or value is invalid."""


class DataError(RetroformerError):
    """A records file or dataset is missing, corrupt or has the wrong shape."""


class StorageError(RetroformerError):
    """Records could not be written (a full disk, a lost mount, permissions); those already written are kept."""


class EnvError(RetroformerError):
    """An environment could not be created or driven."""


class LLMError(RetroformerError):
    """An LLM call failed after its retries."""


class BudgetExceeded(RetroformerError):
    """A run reached its token or cost budget; finished episodes are kept."""


class RunInUse(RetroformerError):
    """Another process is running in the same run directory."""


class Interrupted(RetroformerError):
    """A stage stopped at a signal (SIGTERM) after saving a checkpoint to resume from; the process exits 143."""

    exit_code = 143
