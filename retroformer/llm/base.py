"""One small LLM interface shared by the actor and the retrospective model.

A backend turns a :class:`GenerationRequest` into a :class:`Completion`. Backends are async so that episodes of
different tasks can run concurrently against a server; in-process backends batch concurrent requests.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from urllib.parse import urlparse

from retroformer.types import Usage


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. ``temperature == 0`` means greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def deterministic(self) -> bool:
        return self.temperature == 0.0 or self.seed is not None


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt. ``system`` is used by chat-style backends; completion-style backends prepend it to ``prompt``."""

    prompt: str
    params: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None


@dataclass
class Completion:
    text: str
    usage: Usage
    model_id: str
    finish_reason: str = "stop"
    cached: bool = False


def is_openai_url(base_url: str | None) -> bool:
    """Whether ``base_url`` is OpenAI's own API (None: the SDK default, which is)."""
    if base_url is None:
        return True
    host = urlparse(base_url).hostname or ""
    return host == "openai.com" or host.endswith(".openai.com")


def apply_stop(text: str, stop: tuple[str, ...]) -> str:
    """Cut ``text`` at the first stop sequence (backends that cannot stop server-side use this)."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


class LLM(abc.ABC):
    """A text generator. ``model_id`` goes into every record's provenance."""

    model_id: str = "unknown"

    @property
    def cache_identity(self) -> str:
        """What the response cache keys on besides the request: everything that makes this model answer as it does.
        Defaults to ``model_id``; backends add what ``model_id`` leaves out (server URL, weights, prompt limits)."""
        return self.model_id

    @abc.abstractmethod
    async def generate(self, request: GenerationRequest) -> Completion:
        """Generate one completion; raise :class:`retroformer.errors.LLMError` after retries fail."""

    def wind_down(self) -> None:  # noqa: B027 - optional hook
        """The run is stopping (a signal): finish the calls in flight within one timeout, start no retries, and
        refuse calls that could not finish by then. A backend without timeouts or retries ignores it."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections or models."""
