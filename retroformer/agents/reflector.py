"""The retrospective model M_r: reads a failed trajectory and its return, writes a reflection (paper section 4.1).

The reflection prompt ``x[k,i]`` holds the task, the trajectory, its return and earlier reflections; the reflection
``y[k,i]`` names the root cause and a plan. The same prompt builder is used at rollout and at training time (the
prompts are stored in the records and the dataset), so SFT/PPO train on exactly what the loop asks.
"""

from __future__ import annotations

import re

from retroformer.agents.actor import format_steps
from retroformer.envs.base import EnvPrompts, Outcome
from retroformer.llm.base import LLM, GenerationRequest, SamplingParams
from retroformer.types import Reflection, Step, text_hash

TEMPLATE = (
    "{instructions}\n\n{examples}\n\n{earlier}Task: {description}\nTrajectory:\n{trajectory}"
    "Result: {result}\nReflection:"
)
#: The same prompt without the environment's example reflection (zero-shot).
ZERO_SHOT_TEMPLATE = (
    "{instructions}\n\n{earlier}Task: {description}\nTrajectory:\n{trajectory}Result: {result}\nReflection:"
)


def build_reflection_prompt(
    prompts: EnvPrompts,
    description: str,
    steps: list[Step],
    outcome: Outcome,
    earlier: list[str],
    max_observation_chars: int = 600,
    max_prompt_chars: int = 12000,
    examples: bool = True,
) -> str:
    """``x[k,i]``: the reflection prompt for one failed episode; ``examples=False`` leaves out the environment's
    example reflection (a zero-shot prompt)."""
    earlier_block = ""
    if earlier:
        earlier_block = "Earlier reflections:\n" + "\n".join(f"- {r}" for r in earlier) + "\n"
    short = [Step(s.thought, s.action, s.observation[:max_observation_chars], s.reward, s.valid) for s in steps]
    result = f"return {outcome.return_:g}, {'succeeded' if outcome.success else 'failed'}"

    def render(trajectory_steps: list[Step], omitted: bool) -> str:
        trajectory = ("[earlier steps omitted]\n" if omitted else "") + format_steps(trajectory_steps)
        return (TEMPLATE if examples else ZERO_SHOT_TEMPLATE).format(
            instructions=prompts.reflection_instructions,
            examples=prompts.reflection_examples.strip(),
            earlier=earlier_block,
            description=description,
            trajectory=trajectory,
            result=result,
        )

    prompt = render(short, False)
    # The end of a trajectory usually holds the failure; drop the oldest steps first when it is too long.
    while len(short) > 1 and len(prompt) > max_prompt_chars:
        short = short[1:]
        prompt = render(short, True)
    return prompt


_WS = re.compile(r"[ \t]+")


def clean_reflection(text: str, max_chars: int) -> str:
    """Keep the first paragraph, squash whitespace, cut at a role marker, cap the length at a sentence end."""
    text = text.strip()
    for marker in ("\n\n", "\nTask:", "\nTrajectory:", "\nReflection:", "\nThought:", "\nAction:"):
        i = text.find(marker)
        if i != -1:
            text = text[:i]
    text = _WS.sub(" ", text.replace("\n", " ")).strip()
    if len(text) > max_chars:
        cut = text[:max_chars]
        end = max(cut.rfind(". "), cut.rfind("! "), cut.rfind("? "))
        text = cut[: end + 1] if end > max_chars // 2 else cut.rstrip()
    return text


class Reflector:
    """Writes reflections with any :class:`LLM` (in-process HF + LoRA, or over HTTP)."""

    def __init__(self, llm: LLM, params: SamplingParams, max_chars: int = 600, examples: bool = True) -> None:
        self.llm = llm
        self.examples = examples
        self.params = SamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=tuple(dict.fromkeys((*params.stop, "\n\n", "\nTask:", "\nTrajectory:"))),
            seed=params.seed,
        )
        self.max_chars = max_chars
        self.reflector_id = llm.model_id

    def prompt_hash(self, prompts: EnvPrompts) -> str:
        if not self.examples:
            return text_hash(ZERO_SHOT_TEMPLATE + prompts.reflection_instructions)
        return text_hash(TEMPLATE + prompts.reflection_instructions + prompts.reflection_examples)

    async def reflect(
        self, prompts: EnvPrompts, description: str, steps: list[Step], outcome: Outcome, earlier: list[str]
    ) -> Reflection:
        prompt = build_reflection_prompt(prompts, description, steps, outcome, earlier, examples=self.examples)
        completion = await self.llm.generate(GenerationRequest(prompt, self.params))
        return Reflection(
            prompt=prompt,
            text=clean_reflection(completion.text, self.max_chars),
            reflector_id=self.llm.model_id,
            prompt_hash=self.prompt_hash(prompts),
            usage=completion.usage,
        )
