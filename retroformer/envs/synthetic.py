"""A synthetic environment in which the *content of a reflection* decides the next attempt.

Each task is a vault with a few doors; exactly one leads out, and the actor may open only one door per attempt. A
failed attempt reveals a clue (``the way out is the <name> door``). A reflection that carries the clue forward makes
the next attempt succeed; one that does not, does not. The door that is right is never the first one listed, so an
actor without reflections (ReAct) never succeeds: every success is owed to a reflection.

It is paired with :class:`PlanFollowingActor`, a deterministic actor that is **not an LLM**: it opens the door that
its newest reflection names (``open[<name>]`` or ``<name> door``), and otherwise the first door. It exists so that the
retrospective model's learning can be shown on a CPU in minutes: with this actor, a reflection's rating is exactly
whether it carried the clue forward. Real experiments use an LLM actor on HotPotQA, ALFWorld or WebShop.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from retroformer.config import doc
from retroformer.envs.base import EnvPrompts, EnvSuite, Outcome, StepResult, Task, TextEnv, register_env
from retroformer.errors import ConfigError
from retroformer.llm import register_scripted_policy
from retroformer.llm.base import LLM, Completion, GenerationRequest
from retroformer.types import Usage

DOOR_NAMES = (
    "amber", "azure", "bronze", "cedar", "coral", "crimson", "ebony", "golden",
    "indigo", "ivory", "jade", "lilac", "maple", "ochre", "pearl", "silver",
)  # fmt: skip

ACTION_RE = re.compile(r"^\s*open\s*\[\s*([a-z]+)\s*\]\s*$", re.IGNORECASE)

PROMPTS = EnvPrompts(
    instructions=(
        "You are escaping a vault. Exactly one door leads out and you may open only one door per attempt. "
        "Reply with a thought and then one action. Actions: look (describe the vault again) and open[<door>]."
    ),
    examples=(
        "Task: You are in a vault with four doors: pearl, jade, ochre, maple. Exactly one leads out.\n"
        "Thought: I have no plan yet, so I try the first door.\n"
        "Action: open[pearl]\n"
        "Observation: The pearl door is locked. Scratched into it: the way out is the ochre door.\n"
    ),
    reflection_instructions=(
        "You failed to escape the vault. Write one or two sentences: why the attempt failed and exactly which door "
        "to open next time."
    ),
    reflection_examples=(
        "Trajectory: I opened the pearl door. Observation: The pearl door is locked. Scratched into it: the way out "
        "is the ochre door.\n"
        "Reflection: I opened the wrong door. The scratch said the way out is the ochre door, so I will open it next.\n"
    ),
)


def corpus() -> list[str]:
    """Text for training the tiny tokenizer."""
    suite = SyntheticSuite(SyntheticSuite.Config(num_tasks=32))
    texts = [PROMPTS.instructions, PROMPTS.examples, PROMPTS.reflection_instructions, PROMPTS.reflection_examples]
    for task in suite.tasks():
        env = suite.make()
        texts.append(env.reset(task))
        texts.append(env.step(f"open[{task.payload['doors'][0]}]").observation)
        texts.append(f"Reflection: The way out is the {task.payload['answer']} door, so I will open it next.")
    return texts


@register_env("synthetic")
class SyntheticSuite(EnvSuite):
    """Vault tasks; see the module docstring."""

    version = "1"
    prompts = PROMPTS

    @dataclass
    class Config:
        num_tasks: int = doc("number of vault tasks", 16)
        num_doors: int = doc("doors per vault (2-8)", 4)
        seed: int = doc("seed of the task generator", 0)
        max_steps: int = doc("steps per episode (look does not end the episode)", 3)

        def __post_init__(self) -> None:
            if not 2 <= self.num_doors <= 8:
                raise ConfigError(f"env.options.num_doors must be in 2..8, got {self.num_doors}")
            if self.num_tasks < 1:
                raise ConfigError(f"env.options.num_tasks must be >= 1, got {self.num_tasks}")

    def tasks(self) -> list[Task]:
        rng = random.Random(self.config.seed)
        out = []
        for i in range(self.config.num_tasks):
            doors = rng.sample(DOOR_NAMES, self.config.num_doors)
            answer = doors[rng.randrange(1, len(doors))]  # never the first: no success without a reflection
            out.append(Task(task_id=f"vault-{self.config.seed}-{i:03d}", payload={"doors": doors, "answer": answer}))
        return out

    def make(self) -> TextEnv:
        return VaultEnv()


class VaultEnv(TextEnv):
    def __init__(self) -> None:
        self.task: Task | None = None
        self.won = False

    def _describe(self) -> str:
        assert self.task is not None
        doors = self.task.payload["doors"]
        return f"You are in a vault with {len(doors)} doors: {', '.join(doors)}. Exactly one leads out."

    def reset(self, task: Task) -> str:
        self.task = task
        self.won = False
        return self._describe()

    def step(self, action: str) -> StepResult:
        if self.task is None:
            raise RuntimeError("VaultEnv.step() called before reset()")
        if action.strip().lower() == "look":
            return StepResult(self._describe())
        match = ACTION_RE.match(action)
        doors, answer = self.task.payload["doors"], self.task.payload["answer"]
        if not match or match.group(1).lower() not in doors:
            return StepResult(
                f"Invalid action. Valid actions: look, open[<door>] with <door> one of {', '.join(doors)}.",
                info={"invalid": True},
            )
        door = match.group(1).lower()
        if door == answer:
            self.won = True
            return StepResult(f"The {door} door swings open. You are out.", reward=1.0, done=True)
        return StepResult(f"The {door} door is locked. Scratched into it: the way out is the {answer} door.", done=True)

    def outcome(self) -> Outcome:
        return Outcome(return_=1.0 if self.won else 0.0, success=self.won)


_PLAN_RE = re.compile(r"open\s*\[\s*([a-z]+)\s*\]|\b([a-z]+)\s+door\b", re.IGNORECASE)


def planned_door(memory: list[str], doors: list[str]) -> str | None:
    """The door the newest reflection names (its last mention of one of ``doors``), if any."""
    for reflection in reversed(memory):
        names = [(m.group(1) or m.group(2)).lower() for m in _PLAN_RE.finditer(reflection)]
        names = [n for n in names if n in doors]
        if names:
            return names[-1]
    return None


class PlanFollowingActor:
    """Deterministic, LLM-free actor for the vault: opens the door its memory names, else the first door.

    Not an LLM. It makes the effect of a reflection on the next attempt exact, so that reflector training can be
    shown on a CPU. It implements the same ``act`` interface as :class:`retroformer.agents.actor.ReActActor`.
    """

    actor_id = "plan-following-actor"
    prompt_hash = "plan-following-v1"

    async def act(self, ctx) -> tuple[str, str, Usage]:  # ctx: retroformer.agents.actor.ActContext
        doors = ctx.task.payload["doors"]
        door = planned_door(ctx.memory, doors)
        if door is None:
            return "No plan in memory; I try the first door.", f"open[{doors[0]}]", Usage()
        return f"My reflection says to open the {door} door.", f"open[{door}]", Usage()


_CLUE_RE = re.compile(r"the way out is the ([a-z]+) door")


@register_scripted_policy("synthetic-clue")
class ClueReflector(LLM):
    """Scripted reflector for the vault: carries the last clue forward with probability ``carry_prob``.

    When it does not, it writes a plausible but useless reflection. Seeded by the prompt text, so a rerun writes the
    same reflections.
    """

    def __init__(self, carry_prob: float = 0.5, seed: int = 0) -> None:
        if not 0.0 <= carry_prob <= 1.0:
            raise ConfigError(f"llm.scripted_options.carry_prob must be in [0, 1], got {carry_prob}")
        self.carry_prob = carry_prob
        self.seed = seed
        self.model_id = f"scripted-clue-p{carry_prob:g}"

    async def generate(self, request: GenerationRequest) -> Completion:
        rng = random.Random(f"{self.seed}:{request.prompt}")
        # The prompt ends with the failed trajectory, so its last clue is this attempt's.
        clues = _CLUE_RE.findall(request.prompt)
        if clues and rng.random() < self.carry_prob:
            door = clues[-1]
            text = f"I opened the wrong door. The scratch said the way out is the {door} door, so I will open it next."
        else:
            text = "I was unlucky with my choice. Next time I should think more carefully before acting."
        usage = Usage(prompt_tokens=len(request.prompt.split()), completion_tokens=len(text.split()), calls=1)
        return Completion(text=text, usage=usage, model_id=self.model_id)
