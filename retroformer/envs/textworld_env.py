"""TextWorld games, generated offline and played through the ``textworld`` package.

Task ``i`` is the game that ``textworld`` generates from seed ``seed + i`` with the configured world size, number of
objects and quest length. Generation is deterministic for a seed (the same options give byte-identical games) and
takes seconds per game, so each game is written once under ``cache_dir`` in a file named after a hash of its
generation options and seed, and later runs load it from there::

    env:
      name: textworld
      options: {num_tasks: 8, world_size: 3, num_objects: 6, quest_length: 3, cache_dir: runs/textworld_games}

The first observation is the game's objective followed by the starting room (the ASCII-art banner is stripped).
Return = score / max_score in [0, 1]; success = the game's ``won`` flag. Admissible commands, score and won are in
each step's ``info``; the outcome's metrics hold ``score`` and ``max_score``.

An action that is not one of the game's admissible commands is **rejected without stepping the game**: the actor gets
an observation saying so (with the admissible commands listed) and ``info["invalid"] = True``. Rejecting, rather than
letting the game's parser answer, keeps the game state and the move count out of the actor's typos, and tells an LLM
actor what it can do instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retroformer.config import doc
from retroformer.envs.base import EnvPrompts, EnvSuite, Outcome, StepResult, Task, TextEnv, register_env
from retroformer.errors import ConfigError, EnvError
from retroformer.types import text_hash

logger = logging.getLogger(__name__)

#: textworld's generator keeps module-level random state; generate one game at a time per process.
_GENERATION_LOCK = threading.Lock()

PROMPTS = EnvPrompts(
    instructions=(
        "You are playing a text adventure game. The task description states the goal. Each turn, reply with one "
        "thought and then one action. Use plain game commands such as: look, inventory, go <direction>, "
        "examine <thing>, take <thing>, take <thing> from <container>, put <thing> on <supporter>, "
        "insert <thing> into <container>, open <thing>, close <thing>, unlock <thing> with <key>, eat <thing>. "
        "Only commands the game accepts in the current situation count; others are rejected and the admissible "
        "commands are listed."
    ),
    examples=(
        "Task: Your goal is to find the brass key in the pantry and put it on the shelf in the hallway.\n"
        "-= Pantry =-\nYou are in a pantry. There is a closed crate here. An exit leads north.\n"
        "Thought: The key is probably inside the crate, so I open it first.\n"
        "Action: open crate\n"
        "Observation: You open the crate, revealing a brass key.\n"
        "Thought: Now I take the key out of the crate.\n"
        "Action: take brass key from crate\n"
        "Observation: You take the brass key from the crate.\n"
        "Thought: The hallway must be through the north exit.\n"
        "Action: go north\n"
        "Observation: -= Hallway =-\nYou are in a hallway. You see a shelf. Exits lead south and east.\n"
        "Thought: I am in the hallway with the key, so I put it on the shelf.\n"
        "Action: put brass key on shelf\n"
        "Observation: You put the brass key on the shelf. Your score has just gone up by one point. "
        "*** The End ***\n"
    ),
    reflection_instructions=(
        "You did not complete the game. Read your trajectory and the objective again. In two or three sentences, "
        "say which step went wrong (a wrong room, an object you did not take, a container you did not open, an "
        "action in the wrong order) and give the exact sequence of commands to try next time."
    ),
    reflection_examples=(
        "Trajectory: Objective: put the apple on the table in the kitchen. I went east into the bedroom, examined "
        "the bed, went west, looked around and ran out of steps without finding the apple.\n"
        "Reflection: I wasted steps in the bedroom and never opened the fridge in the kitchen, where the apple "
        "was. Next time: open fridge, take apple from fridge, put apple on table.\n"
    ),
)


def corpus() -> list[str]:
    """Prompt text for training the tiny tokenizer (no game is generated)."""
    return [
        PROMPTS.instructions,
        PROMPTS.examples,
        PROMPTS.reflection_instructions,
        PROMPTS.reflection_examples,
        "Welcome to TextWorld! Your score has just gone up by one point. You scored 1 out of a possible 1.",
    ]


# Lines of the title banner are drawn with these characters only.
_BANNER_CHARS = set(" _|\\/$<>-")
_END_PROMPT_RE = re.compile(r"Would you like to RESTART.*", re.DOTALL)


def clean_feedback(text: str) -> str:
    """The game's text without the ASCII-art banner, the ``>`` prompt and the status line after it."""
    text = _END_PROMPT_RE.sub("", text)
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(">"):
            # The command prompt; the interpreter's status line (room name, score/moves) is glued after it.
            continue
        if stripped and set(stripped) <= _BANNER_CHARS:
            continue
        lines.append(stripped)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def normalise_command(action: str) -> str:
    return " ".join(action.strip().lower().split())


@register_env("textworld")
class TextWorldSuite(EnvSuite):
    """Generated TextWorld quests; see the module docstring."""

    version = "1"
    prompts = PROMPTS

    @dataclass
    class Config:
        # --- tasks ---
        num_tasks: int = doc("number of games; game i is generated from seed + i", 8)
        seed: int = doc("seed of the first game", 0)
        # --- game generation (textworld's `tw-make custom` options) ---
        world_size: int = doc("rooms per game (tw-make --world-size)", 3)
        num_objects: int = doc("minimum objects per game (tw-make --nb-objects)", 6)
        quest_length: int = doc("commands the quest needs (tw-make --quest-length)", 3)
        theme: str = doc("text grammar theme (tw-make --theme)", "house")
        cache_dir: str | None = doc(
            "directory of generated games, reused across runs; None uses a 'textworld_games' folder in the "
            "system temporary directory",
            None,
        )
        # --- episodes ---
        max_steps: int = doc("actor steps per episode", 30)
        list_commands: bool = doc("append the admissible commands to every observation", False)

        def __post_init__(self) -> None:
            for name, low in (("num_tasks", 1), ("world_size", 1), ("num_objects", 0), ("quest_length", 1),
                              ("max_steps", 1)):  # fmt: skip
                if getattr(self, name) < low:
                    raise ConfigError(f"env.options.{name} must be >= {low}, got {getattr(self, name)}")
            if self.seed < 0:
                raise ConfigError(f"env.options.seed must be >= 0 (textworld seeds are non-negative), got {self.seed}")

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.cache_dir = Path(config.cache_dir or Path(tempfile.gettempdir()) / "textworld_games")
        #: Games this suite generated (the rest were loaded from the cache).
        self.generated = 0
        self._tasks: list[Task] | None = None

    def _generation_options(self) -> dict[str, Any]:
        import textworld

        c = self.config
        return {
            "world_size": c.world_size,
            "num_objects": c.num_objects,
            "quest_length": c.quest_length,
            "theme": c.theme,
            "textworld": textworld.__version__,
        }

    def game_path(self, seed: int) -> Path:
        """Where the game of ``seed`` is cached (``.z8`` story file; its ``.json`` sits beside it)."""
        key = text_hash(json.dumps(self._generation_options(), sort_keys=True), length=10)
        return self.cache_dir / f"tw-{key}-s{seed}.z8"

    def _generate(self, seed: int, path: Path) -> None:
        import textworld
        from textworld.generator import QuestGenerationError

        c = self.config
        options = textworld.GameOptions()
        options.seeds = seed
        options.nb_rooms = c.world_size
        options.nb_objects = c.num_objects
        options.chaining.min_length = options.chaining.max_length = c.quest_length
        options.chaining.max_depth = c.quest_length
        options.grammar.theme = c.theme
        options.file_ext = ".z8"
        options.force_recompile = True
        path.parent.mkdir(parents=True, exist_ok=True)
        # Build in a private folder, then move into place: a concurrent run never sees a half-written game.
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-") as tmp:
            options.path = str(Path(tmp) / path.name)
            try:
                with _GENERATION_LOCK:
                    game_file, _ = textworld.make(options)
            except QuestGenerationError as exc:
                raise EnvError(
                    f"textworld could not generate a quest of length {c.quest_length} with world_size="
                    f"{c.world_size}, num_objects={c.num_objects} (seed {seed}): {exc}; increase world_size or "
                    "num_objects, or shorten quest_length"
                ) from None
            built = Path(game_file)
            os.replace(built.with_suffix(".json"), path.with_suffix(".json"))
            os.replace(built, path)
        self.generated += 1

    def load_game(self, seed: int) -> dict[str, Any]:
        """The payload of the game of ``seed``: generated on the first call, then read from the cache."""
        import textworld

        path = self.game_path(seed)
        if not (path.is_file() and path.with_suffix(".json").is_file()):
            logger.info("generating TextWorld game (seed %d) into %s", seed, path)
            self._generate(seed, path)
        game = textworld.Game.load(str(path.with_suffix(".json")))
        return {
            "game_file": str(path),
            "seed": seed,
            "objective": game.objective,
            "walkthrough": list(game.metadata.get("walkthrough") or []),
        }

    def tasks(self) -> list[Task]:
        if self._tasks is None:
            c = self.config
            out = []
            for i in range(c.num_tasks):
                seed = c.seed + i
                task_id = f"tw-r{c.world_size}-o{c.num_objects}-q{c.quest_length}-{c.theme}-s{seed}"
                out.append(Task(task_id=task_id, payload=self.load_game(seed)))
            self._tasks = out
        return list(self._tasks)

    def make(self) -> TextEnv:
        return TextWorldEnv(list_commands=self.config.list_commands)


class TextWorldEnv(TextEnv):
    """One TextWorld game at a time, through ``textworld.start``."""

    def __init__(self, list_commands: bool = False) -> None:
        self.list_commands = list_commands
        self._env: Any = None
        self._game_file: str | None = None
        self._state: Any = None

    def _info(self) -> dict[str, Any]:
        s = self._state
        return {
            "admissible_commands": list(s["admissible_commands"] or []),
            "score": s["score"],
            "max_score": s["max_score"],
            "won": bool(s["won"]),
            "lost": bool(s["lost"]),
        }

    def _with_commands(self, text: str) -> str:
        if not self.list_commands:
            return text
        return f"{text}\nAdmissible commands: {', '.join(self._state['admissible_commands'] or [])}."

    def reset(self, task: Task) -> str:
        import textworld

        game_file = task.payload.get("game_file")
        if not game_file or not Path(game_file).is_file():
            raise EnvError(
                f"task {task.task_id!r} names game file {game_file!r}, which does not exist; build tasks with "
                "TextWorldSuite.tasks() (it regenerates games missing from the cache)"
            )
        if self._env is None or self._game_file != game_file:
            self.close()
            infos = textworld.EnvInfos(
                admissible_commands=True, won=True, lost=True, score=True, max_score=True, objective=True
            )
            self._env = textworld.start(game_file, request_infos=infos)
            self._game_file = game_file
        self._state = self._env.reset()
        room = clean_feedback(self._state.feedback)
        objective = self._state["objective"] or task.payload.get("objective", "")
        # The welcome text already states the objective; keep it once, first.
        if objective and objective in room:
            room = room.replace(objective, "").strip()
        return self._with_commands(f"{objective}\n\n{room}".strip())

    def step(self, action: str) -> StepResult:
        if self._state is None:
            raise RuntimeError("TextWorldEnv.step() called before reset()")
        command = normalise_command(action)
        admissible = [normalise_command(c) for c in self._state["admissible_commands"] or []]
        if command not in admissible:
            text = (
                f"The game does not accept {action.strip()!r} here. "
                f"Admissible commands: {', '.join(self._state['admissible_commands'] or [])}."
            )
            return StepResult(text, info={**self._info(), "invalid": True})
        before = self._state["score"]
        self._state, _, done = self._env.step(command)
        max_score = self._state["max_score"] or 1
        reward = (self._state["score"] - before) / max_score
        done = bool(done or self._state["won"] or self._state["lost"])
        return StepResult(self._with_commands(clean_feedback(self._state.feedback)), reward, done, self._info())

    def outcome(self) -> Outcome:
        if self._state is None:
            raise RuntimeError("TextWorldEnv.outcome() called before reset()")
        score, max_score = float(self._state["score"]), float(self._state["max_score"] or 0)
        return_ = score / max_score if max_score > 0 else 0.0
        won = bool(self._state["won"])
        return Outcome(return_=return_, success=won, metrics={"score": score, "max_score": max_score})

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
            self._game_file = None


__all__ = ["TextWorldEnv", "TextWorldSuite", "clean_feedback", "corpus"]
