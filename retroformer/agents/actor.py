"""The actor: a frozen LLM acting in an environment with a ReAct prompt (Thought / Action / Observation).

The prompt is ``instructions + few-shot examples + reflection memory + task + scratchpad`` (paper section 4: the
reflections of earlier attempts go into the actor's prompt, nothing else about the actor changes).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Protocol

from retroformer.envs.base import EnvPrompts, ShortPrompts, Task
from retroformer.llm.base import LLM, GenerationRequest, SamplingParams
from retroformer.types import Step, Usage, text_hash

ACTION_LINE = re.compile(r"^\s*Action\s*(?:\d+\s*)?:\s*(.*)$", re.IGNORECASE | re.MULTILINE)
THOUGHT_PREFIX = re.compile(r"^\s*Thought\s*(?:\d+\s*)?:\s*", re.IGNORECASE)

#: Observation given back when the actor's output has no ``Action:`` line (it is counted as an invalid action).
FORMAT_ERROR = "Invalid format. Write one line 'Thought: <reasoning>' and then one line 'Action: <action>'."


@dataclass
class ActContext:
    """What an actor sees at one step."""

    task: Task
    description: str  # the environment's first observation
    memory: list[str]  # reflections, oldest first (already cut to the last m)
    steps: list[Step] = field(default_factory=list)
    prompts: EnvPrompts | None = None
    trial: int = 0  # which attempt at the task this is (0 = the first)


class Actor(Protocol):
    actor_id: str
    prompt_hash: str

    async def act(self, ctx: ActContext) -> tuple[str, str | None, Usage]:
        """Return ``(thought, action, usage)``; ``action`` is None when the output could not be parsed."""


class MemoryBlindActor:
    """An actor that never sees its memory: ``inner`` acts on every step with no reflections.

    The negative control of a reflector comparison: the reflections are still written and recorded, but they cannot
    change what the actor does, so every reflector must then score the same.
    """

    def __init__(self, inner: Actor) -> None:
        self.inner = inner
        self.actor_id = f"{inner.actor_id}+memory-blind"
        self.prompt_hash = f"{inner.prompt_hash}+memory-blind"

    async def act(self, ctx: ActContext) -> tuple[str, str | None, Usage]:
        # the same steps list: the episode appends to it, and the inner actor reads it
        return await self.inner.act(dataclasses.replace(ctx, memory=[]))


def format_memory(memory: list[str]) -> str:
    if not memory:
        return ""
    lines = "\n".join(f"- {m}" for m in memory)
    return f"Reflections on your earlier attempts at this task (use them to plan):\n{lines}\n"


def format_steps(steps: list[Step]) -> str:
    return "".join(f"Thought: {s.thought}\nAction: {s.action}\nObservation: {s.observation}\n" for s in steps)


def parse_action(text: str) -> tuple[str, str | None]:
    """Split an actor completion into ``(thought, action)``; ``action`` is None if there is no ``Action:`` line."""
    match = ACTION_LINE.search(text)
    if not match:
        return THOUGHT_PREFIX.sub("", text.strip()).strip(), None
    thought = THOUGHT_PREFIX.sub("", text[: match.start()].strip()).strip()
    action = match.group(1).strip()
    return thought, action or None


class ReActActor:
    """LLM actor. ``max_observation_chars`` and ``max_prompt_chars`` keep long episodes inside the context."""

    TEMPLATE = "{instructions}\n\nHere are examples:\n{examples}\n\n{memory}Task: {description}\n{scratchpad}Thought:"

    def __init__(
        self,
        llm: LLM,
        prompts: EnvPrompts,
        params: SamplingParams,
        max_observation_chars: int = 1500,
        max_prompt_chars: int = 24000,
    ) -> None:
        self.llm = llm
        self.prompts = prompts
        self.params = SamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=tuple(dict.fromkeys((*params.stop, "\nObservation"))),
            seed=params.seed,
        )
        self.max_observation_chars = max_observation_chars
        self.max_prompt_chars = max_prompt_chars
        self.actor_id = llm.model_id
        self.prompt_hash = text_hash(self.TEMPLATE + prompts.instructions + prompts.examples)

    def build_prompt(self, ctx: ActContext) -> str:
        prompts = ctx.prompts or self.prompts
        steps = [
            Step(s.thought, s.action, _truncate(s.observation, self.max_observation_chars), s.reward, s.valid)
            for s in ctx.steps
        ]
        head = self.TEMPLATE.split("{scratchpad}")[0].format(
            instructions=prompts.instructions,
            examples=prompts.examples.strip(),
            memory=format_memory(ctx.memory),
            description=ctx.description,
        )
        scratch = format_steps(steps)
        # Keep the newest steps when the scratchpad would overflow the prompt budget.
        while steps and len(head) + len(scratch) > self.max_prompt_chars:
            steps = steps[1:]
            scratch = "[earlier steps omitted]\n" + format_steps(steps)
        return f"{head}{scratch}Thought:"

    async def act(self, ctx: ActContext) -> tuple[str, str | None, Usage]:
        completion = await self.llm.generate(GenerationRequest(self.build_prompt(ctx), self.params))
        thought, action = parse_action(completion.text)
        if action is not None:
            action = action.splitlines()[0].strip()
        return thought, action, completion.usage


class ShortPromptActor:
    """LLM actor for small models: a few-shot completion prompt that ends in the action's prefix.

    The prompt is ``examples``, a blank line, ``Task:``, ``Notes:`` (the reflection memory, or ``none``) and the steps
    so far as ``Action:`` / ``Observation:`` lines, then ``Action: <action_prefix>``; the model writes the argument
    and the action is ``prefix + argument + suffix``. There is no thought (the episode record keeps an empty one).
    Use it with ``llm.style: completion`` and a small ``llm.max_tokens``.
    """

    # Notes right before the action: SmolLM2-135M followed a note naming the door 15/24 times placed here, and about
    # as rarely as without a note when the notes came before the task.
    TEMPLATE = "{examples}\nTask: {description}\nNotes: {notes}\n{scratchpad}Action: {prefix}"

    def __init__(self, llm: LLM, prompts: ShortPrompts, params: SamplingParams, max_observation_chars: int = 300):
        self.llm = llm
        self.prompts = prompts
        self.params = SamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=tuple(dict.fromkeys((*params.stop, prompts.action_suffix, "\n"))),
            seed=params.seed,
        )
        self.max_observation_chars = max_observation_chars
        self.actor_id = llm.model_id
        self.prompt_hash = text_hash(self.TEMPLATE + prompts.examples + prompts.action_prefix + prompts.action_suffix)

    def build_prompt(self, ctx: ActContext) -> str:
        notes = " ".join(m.strip() for m in ctx.memory) if ctx.memory else self.prompts.no_notes
        scratch = "".join(
            f"Action: {s.action}\nObservation: {_truncate(s.observation, self.max_observation_chars)}\n"
            for s in ctx.steps
        )
        return self.TEMPLATE.format(
            examples=self.prompts.examples.strip() + "\n",
            notes=notes,
            description=ctx.description,
            scratchpad=scratch,
            prefix=self.prompts.action_prefix,
        )

    async def act(self, ctx: ActContext) -> tuple[str, str | None, Usage]:
        completion = await self.llm.generate(GenerationRequest(self.build_prompt(ctx), self.params))
        argument = completion.text.split(self.prompts.action_suffix, 1)[0].strip().splitlines()
        if not argument or not argument[0].strip():
            return "", None, completion.usage
        return "", f"{self.prompts.action_prefix}{argument[0].strip()}{self.prompts.action_suffix}", completion.usage


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " [truncated]"
