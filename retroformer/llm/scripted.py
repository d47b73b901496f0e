"""Scripted LLM doubles for tests and offline runs: deterministic, no model, no network."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from retroformer.errors import LLMError
from retroformer.llm.base import LLM, Completion, GenerationRequest, apply_stop
from retroformer.types import Usage


def _usage(prompt: str, text: str) -> Usage:
    return Usage(prompt_tokens=len(prompt.split()), completion_tokens=len(text.split()), calls=1)


class ScriptedLLM(LLM):
    """Answers from a list of replies in order (cycling if ``cycle``), or from a function of the prompt.

    A reply that is an exception instance is raised, which lets tests simulate an LLM failing after retries.
    """

    def __init__(
        self,
        replies: Sequence[str | Exception] | Callable[[str], str] = (),
        model_id: str = "scripted",
        cycle: bool = False,
    ) -> None:
        self.replies = replies
        self.model_id = model_id
        self.cycle = cycle
        self.prompts: list[str] = []

    async def generate(self, request: GenerationRequest) -> Completion:
        self.prompts.append(request.prompt)
        if callable(self.replies):
            reply: str | Exception = self.replies(request.prompt)
        else:
            i = len(self.prompts) - 1
            if i >= len(self.replies) and not self.cycle:
                raise LLMError(f"scripted LLM {self.model_id!r} ran out of replies after {len(self.replies)}")
            reply = self.replies[i % len(self.replies)]
        if isinstance(reply, Exception):
            raise reply
        text = apply_stop(reply, request.params.stop)
        return Completion(text=text, usage=_usage(request.prompt, text), model_id=self.model_id)
