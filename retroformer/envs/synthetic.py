"""A synthetic environment in which the *content of a reflection* decides the next attempt.

Each task is a vault with a few doors; exactly one leads out, and the actor may open only one door per attempt. A
failed attempt reveals a clue (``the way out is the <name> door``). The right door is never the first one listed,
and an actor's first guess is the first door, so every task needs at least one retry. With ``wall_clue`` the same
clue is also scratched on the wall, where ``look`` shows it: an actor that looks before it opens a door succeeds.

It is paired with :class:`PlanFollowingActor`, an actor that is **not an LLM**. It follows its newest reflection
that holds a plan: a door it names (``open[<name>]`` or ``<name> door``), or the advice to look around first (it then
looks, reads the clue and opens that door). On a retry without a plan it either repeats its first guess (``retry:
first``, deterministic: a reflection's rating is then exactly whether it carried the clue) or opens a uniformly
random door among the others (``retry: random``). The second is the shape of a real task: an LLM actor sampling at a
temperature sometimes succeeds after a useless reflection (a lucky retry), while the right reflection makes success
certain.

Why ``retry: random`` separates imitation from policy gradient. With ``n`` doors, a reflection after the first
failure leads to success at the next attempt with probability 1 if it gives a plan that works (the clue's door, or
"look around first" when the wall shows the clue), ``1 / (n - 1)`` if it gives none (the actor draws among the other
doors), and 0 if it names a wrong door. Let the behaviour reflector (:class:`ClueReflector`) write a working plan
with probability ``h``, a wrong door with ``w`` and a generic sentence otherwise (``g = 1 - h - w``). Reward-filtered
imitation (SFT on reflections rated > 0) fits the distribution of the *rewarded* reflections, whose fixed point is
``p(working plan) = h / (h + g / (n - 1))``: with ``n = 4, h = 0.1, w = 0.15`` that is 0.29, and the most likely
(greedy) reflection is the generic one, worth ``1 / 3``. Policy gradient maximises the expected return
``p(working plan) + p(generic) / (n - 1)``, whose maximum is at ``p(working plan) = 1``, worth 1. More SFT steps on the
same data move towards the first fixed point, not the second; only the effect of the reflection (its reward) tells
them apart. Every number here is a property of the task (how often a blind retry is lucky) and of the behaviour
data; none is chosen for a learner.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from retroformer.config import doc
from retroformer.envs.base import (
    EnvPrompts,
    EnvSuite,
    Outcome,
    ShortPrompts,
    StepResult,
    Task,
    TextEnv,
    register_env,
)
from retroformer.errors import ConfigError
from retroformer.llm import register_scripted_policy
from retroformer.llm.base import LLM, Completion, GenerationRequest
from retroformer.types import Usage, text_hash

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

#: The short completion prompt for small LLM actors (``actor.kind: short``). With it, SmolLM2-135M-Instruct opens the
#: right door about half the time when its notes name that door, and rarely otherwise (it opens the first door).
SHORT_PROMPTS = ShortPrompts(
    examples=(
        "Task: You are in a vault with 4 doors: pearl, jade, ochre, maple. Exactly one leads out.\n"
        "Notes: none\n"
        "Action: open[pearl]\n\n"
        "Task: You are in a vault with 4 doors: amber, coral, maple, silver. Exactly one leads out.\n"
        "Notes: The way out is the maple door.\n"
        "Action: open[maple]\n"
    ),
    action_prefix="open[",
    action_suffix="]",
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
        texts.append(f"Reflection: {CLUE_TEMPLATE.format(door=task.payload['answer'])}")
    texts.append(f"Reflection: {GENERIC_REFLECTION}")
    texts.append(f"Reflection: {LOOK_REFLECTION}")
    return texts


@register_env("synthetic")
class SyntheticSuite(EnvSuite):
    """Vault tasks; see the module docstring."""

    version = "1"
    prompts = PROMPTS
    short_prompts = SHORT_PROMPTS
    blocking = False  # vaults are a few Python objects: every call returns in microseconds

    @dataclass
    class Config:
        num_tasks: int = doc("number of vault tasks", 16)
        num_doors: int = doc("doors per vault (2-8)", 4)
        seed: int = doc("seed of the task generator", 0)
        max_steps: int = doc("steps per episode (look does not end the episode)", 3)
        wall_clue: bool = doc("the clue is also scratched on the wall, where `look` shows it", False)

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
        return VaultEnv(wall_clue=self.config.wall_clue)


class VaultEnv(TextEnv):
    def __init__(self, wall_clue: bool = False) -> None:
        self.task: Task | None = None
        self.won = False
        self.wall_clue = wall_clue

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
            wall = f" Scratched on the wall: the way out is the {self.task.payload['answer']} door."
            return StepResult(self._describe() + (wall if self.wall_clue else ""))
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
_LOOK_RE = re.compile(r"\blook around\b", re.IGNORECASE)
_CLUE_RE = re.compile(r"the way out is the ([a-z]+) door")


def planned_door(memory: list[str], doors: list[str]) -> str | None:
    """The door the newest reflection names (its last mention of one of ``doors``), if any."""
    for reflection in reversed(memory):
        names = [(m.group(1) or m.group(2)).lower() for m in _PLAN_RE.finditer(reflection)]
        names = [n for n in names if n in doors]
        if names:
            return names[-1]
    return None


def plan_of(memory: list[str], doors: list[str]) -> tuple[str, str | None] | None:
    """The newest reflection's plan: ``("open", door)``, ``("look", None)`` (look around first), or None."""
    for reflection in reversed(memory):
        door = planned_door([reflection], doors)
        if door is not None:
            return "open", door
        if _LOOK_RE.search(reflection):
            return "look", None
    return None


class PlanFollowingActor:
    """LLM-free actor for the vault: follows the newest plan in its memory; without one, see ``retry``.

    A plan is a door to open, or the advice to look around first (it looks, then opens the door a clue in what it
    saw names, if any). ``retry="first"``: the first door on every attempt without a plan (deterministic).
    ``retry="random"``: the first door on the first attempt, then a fresh uniform draw among the other doors on each
    retry without a plan (a new draw every call, so the online scorer of ``ppo_run.py`` draws again; the n-th draw for
    a (task, trial) depends only on the seed, the task, the trial and n, not on how concurrent episodes interleave,
    so a run is reproducible at any ``concurrency``). Not an LLM: it
    makes the effect of a reflection on the next attempt known exactly, so that reflector training can be shown on a
    CPU. It implements the ``act`` interface of :class:`retroformer.agents.actor.ReActActor`.
    """

    def __init__(self, retry: str = "first", seed: int = 0) -> None:
        if retry not in ("first", "random"):
            raise ConfigError(f"actor.retry must be 'first' or 'random', got {retry!r}")
        self.retry = retry
        self.seed = seed
        self._draws: dict[tuple[str, int], int] = {}  # (task id, trial) -> draws made so far
        self.actor_id = "plan-following-actor" if retry == "first" else "plan-following-actor-random-retry"
        self.prompt_hash = f"plan-following-v2-{retry}"

    async def act(self, ctx) -> tuple[str, str, Usage]:  # ctx: retroformer.agents.actor.ActContext
        doors = ctx.task.payload["doors"]
        plan = plan_of(ctx.memory, doors)
        if plan is not None and plan[0] == "open":
            return f"My reflection says to open the {plan[1]} door.", f"open[{plan[1]}]", Usage()
        if plan is not None:
            seen = [c for step in ctx.steps for c in _CLUE_RE.findall(step.observation) if c in doors]
            if not ctx.steps:
                return "My reflection says to look around first.", "look", Usage()
            if seen:
                return f"What I saw says the way out is the {seen[-1]} door.", f"open[{seen[-1]}]", Usage()
        if self.retry == "random" and ctx.trial > 0:
            key = (ctx.task.task_id, ctx.trial)
            n = self._draws[key] = self._draws.get(key, -1) + 1
            door = random.Random(f"{self.seed}:{key[0]}:{key[1]}:{n}").choice(doors[1:])
            return "No plan that works; my first guess failed, so I try another door.", f"open[{door}]", Usage()
        return "No plan in memory; I try the first door.", f"open[{doors[0]}]", Usage()


_DOORS_RE = re.compile(r"vault with \d+ doors: ([a-z, ]+)\.")

CLUE_TEMPLATE = "I opened the wrong door. The scratch said the way out is the {door} door, so I will open it next."
LOOK_REFLECTION = "I opened a door without looking around. Next time I will look around first and read the scratches."
GENERIC_REFLECTION = "I was unlucky with my choice. Next time I should think more carefully before acting."


@register_scripted_policy("synthetic-clue")
class ClueReflector(LLM):
    """Scripted behaviour reflector for the vault.

    With probability ``carry_prob`` it carries the last clue forward; with ``look_prob`` it advises looking around
    first (a plan that works where the wall shows the clue); with ``wrong_prob`` it writes the clue's sentence with
    a wrong door of the vault (a confident, mistaken reflection); otherwise a plausible but generic one. Seeded by
    ``seed`` and the prompt text: a rerun writes the same reflections, and runs with different seeds write different
    reflections for the same prompt (the within-prompt pairs a reward model learns from).

    ``template`` is the wording of a door's sentence (``{door}`` stands for the door). With ``carry_prob: 1`` the
    reflector is an oracle of that wording: it measures how often an actor follows a correct note worded so, the
    ceiling of any reflector that writes it. Only the failed attempt's own clue counts (what the prompt holds after
    its last ``Task:``); the examples' clue does not, so an attempt that revealed nothing gets no door.
    """

    def __init__(
        self,
        carry_prob: float = 0.5,
        wrong_prob: float = 0.0,
        look_prob: float = 0.0,
        seed: int = 0,
        template: str = CLUE_TEMPLATE,
    ) -> None:
        probs = (carry_prob, wrong_prob, look_prob)
        if not (all(0.0 <= p <= 1.0 for p in probs) and sum(probs) <= 1.0):
            raise ConfigError(
                "llm.scripted_options.carry_prob, wrong_prob and look_prob must be in [0, 1] and sum to at most 1, "
                f"got {carry_prob}, {wrong_prob} and {look_prob}"
            )
        if not isinstance(template, str) or "{door}" not in template:
            raise ConfigError(
                f"llm.scripted_options.template must be a sentence holding {{door}} where the door goes, got "
                f"{template!r}; e.g. 'The way out is the {{door}} door.'"
            )
        self.carry_prob, self.wrong_prob, self.look_prob = probs
        self.seed = seed
        self.template = template
        self.model_id = f"scripted-clue-p{carry_prob:g}" + "".join(
            f"-{k}{p:g}" for k, p in (("w", wrong_prob), ("l", look_prob)) if p
        )
        if template != CLUE_TEMPLATE:
            self.model_id += f"-t{text_hash(template)[:8]}"

    async def generate(self, request: GenerationRequest) -> Completion:
        rng = random.Random(f"{self.seed}:{request.prompt}")
        # The prompt ends with this task and its failed trajectory; the examples and earlier reflections come before.
        current = request.prompt.rsplit("Task: ", 1)[-1]
        clues = _CLUE_RE.findall(current)
        draw = rng.random()
        doors = _DOORS_RE.findall(current)
        wrong = [d for d in doors[-1].split(", ") if d != clues[-1]] if clues and doors else []
        if clues and draw < self.carry_prob:
            text = self.template.format(door=clues[-1])
        elif wrong and draw < self.carry_prob + self.wrong_prob:
            text = self.template.format(door=rng.choice(wrong))
        elif draw < self.carry_prob + self.wrong_prob + self.look_prob:
            text = LOOK_REFLECTION
        else:
            text = GENERIC_REFLECTION
        usage = Usage(prompt_tokens=len(request.prompt.split()), completion_tokens=len(text.split()), calls=1)
        return Completion(text=text, usage=usage, model_id=self.model_id)
