"""ALFWorld (Shridhar et al., 2021) on the real ``alfworld`` package: household tasks as text games.

Each game is a folder ``json_2.1.1/<split>/<task-type>-<Obj>-<MRecep>-<Recep>-<scene>/<trial>/`` holding
``traj_data.json`` and ``initial_state.pddl`` and, in the downloaded data, ``game.tw-pddl`` (domain + grammar +
problem + ``solvable`` + walkthrough). One :class:`AlfWorldEnv` plays one game at a time through the same engine that
``alfworld``'s own ``AlfredTWEnv`` and ``alfworld-generate`` use: TextWorld's ``PddlEnv`` with ALFWorld's
``AlfredDemangler`` and ``AlfredInfos`` wrappers. No YAML file is needed: the only settings that route needs (the
information requested from the game, the wrappers) are set here in code.

    suite = make_suite("alfworld", {"data_path": "/data/alfworld", "split": "valid_unseen"})

Data: ``alfworld-download`` fetches the games into ``$ALFWORLD_DATA``; scripts pass that folder as ``data_path``.
With ``data_path: null`` the suite plays the small set of games shipped in ``retroformer/envs/alfworld_data`` (written
for this project in ALFWorld's file format), so ``env: {name: alfworld}`` runs offline once the extra is installed.
A game without ``game.tw-pddl`` (the shipped ones) is built in memory from ``initial_state.pddl``, the package's own
``alfred.pddl`` domain and ``alfred.twl2`` grammar, exactly as ``alfworld-generate`` builds it, except that the goal
template is chosen by a stable hash of the task id instead of the global ``random`` (so reruns see the same text).

Protocol (Reflexion / Retroformer, paper section 4): success = the game's ``won`` flag, return = 1.0 if won else 0.0;
at most 50 steps; the episode stops when the same action is issued twice in a row.

Where this adapter departs from the bare package, and why:

- ``alfworld`` 0.4.x names the put action ``move O to R``; older prompts and models say ``put O in/on R``. A ``put``
  command that the game does not accept is translated to ``move`` (``accept_put_grammar``), so both grammars work.
- ``think: ...`` actions answer ``OK.`` and do not touch the game (the ReAct protocol for ALFWorld).
- The welcome banner (``-= Welcome to TextWorld, ALFRED! =-``) is removed from the first observation.
- The planner's PDDL translator overwrites ``sys.argv`` and swaps ``sys.stdout`` while it loads a game, and TextWorld
  shares one grammar parser between all games: every call into the engine holds a process-wide lock, and the
  caller's ``sys.argv`` is restored after each load.
- Importing ``alfworld`` creates ``~/.cache/alfworld`` and sets ``os.environ["ALFWORLD_DATA"]`` if unset (the
  package's own import-time behaviour); it is imported only when a game is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from retroformer.config import doc
from retroformer.envs.base import EnvPrompts, EnvSuite, Outcome, StepResult, Task, TextEnv, register_env
from retroformer.errors import ConfigError, EnvError

logger = logging.getLogger(__name__)

#: The folder shipped with the package: fixture games and prompt text.
DATA_DIR = Path(__file__).resolve().parent / "alfworld_data"
FIXTURE_ROOT = DATA_DIR / "json_2.1.1"
PROMPT_DIR = DATA_DIR / "prompts"

SPLITS = ("train", "valid_seen", "valid_unseen")
#: ALFWorld's six task types (the ``task_type`` field of ``traj_data.json``).
TASK_TYPES = (
    "pick_and_place_simple",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "look_at_obj_in_light",
    "pick_two_obj_and_place",
)
#: Task types with their own few-shot file ``examples_<type>.txt``; the others use ``examples_generic.txt``.
PROMPTED_TASK_TYPES = ("pick_and_place_simple", "pick_heat_then_place_in_recep", "look_at_obj_in_light")

INVALID_FEEDBACK = "Nothing happens."
THINK_FEEDBACK = "OK."
_BANNER_RE = re.compile(r"^\s*-=.*?=-\s*", re.DOTALL)
_THINK_RE = re.compile(r"^\s*think\s*:", re.IGNORECASE)
# ``put mug 1 in/on desk 1``, ``put mug 1 in desk 1``, ``put mug 1 on desk 1`` (pre-0.4 grammar and ReAct prompts).
_PUT_RE = re.compile(r"^\s*put\s+(?P<obj>.+?)\s+(?:in/on|in|on|into|onto)\s+(?P<recep>.+?)\s*$", re.IGNORECASE)

# The engine is not thread-safe: loading a game runs fast-downward's PDDL translator, which sets ``sys.argv``, swaps
# ``sys.stdout`` and keeps its options in module globals, and every step derives its text with TextWorld's grammar
# parser, one module-level instance shared by all games (concurrent steps were seen to crash it). All calls into the
# engine hold this lock; a step takes milliseconds, so episodes still overlap on what is slow (the LLM calls).
_ENGINE_LOCK = threading.Lock()

# Each TextWorld PddlEnv loads its own copy of fast-downward's shared library. The copies share C++ registries (unique
# symbols are bound process-wide), so unloading one (``fast_downward.close_lib``) leaves function pointers into
# unmapped code that crash the interpreter at exit. Copies are therefore never unloaded: idle engines wait here and are
# reused, so a run holds at most as many copies as it has concurrent episodes.
_IDLE_ENGINES: list[Any] = []
_POOL_LOCK = threading.Lock()


def _acquire_engine() -> Any:
    with _POOL_LOCK:
        if _IDLE_ENGINES:
            return _IDLE_ENGINES.pop()
    return make_textworld_env()


def _release_engine(engine: Any) -> None:
    with _POOL_LOCK:
        _IDLE_ENGINES.append(engine)


def translate_put(action: str) -> str:
    """``put O in/on R`` (pre-0.4 grammar) -> ``move O to R`` (alfworld 0.4.x); other actions are returned as is."""
    match = _PUT_RE.match(action)
    if not match:
        return action
    return f"move {match.group('obj')} to {match.group('recep')}"


def strip_banner(text: str) -> str:
    """The first observation without the ``-= Welcome to TextWorld, ALFRED! =-`` line."""
    return _BANNER_RE.sub("", text, count=1).strip()


def _normalize(action: str) -> str:
    return " ".join(action.lower().split())


def _read_prompt(name: str) -> str:
    return (PROMPT_DIR / name).read_text(encoding="utf-8").strip("\n")


def prompts_for_type(task_type: str | None) -> EnvPrompts:
    """Actor and reflector prompts for one task type (a generic few-shot for types without their own)."""
    examples = f"examples_{task_type}.txt" if task_type in PROMPTED_TASK_TYPES else "examples_generic.txt"
    return EnvPrompts(
        instructions=_read_prompt("instructions.txt"),
        examples=_read_prompt(examples),
        reflection_instructions=_read_prompt("reflection_instructions.txt"),
        reflection_examples=_read_prompt("reflection_examples.txt"),
    )


def corpus() -> list[str]:
    """The prompt texts (for the tiny tokenizer); reads only the shipped text files, never imports ``alfworld``."""
    return [p.read_text(encoding="utf-8") for p in sorted(PROMPT_DIR.glob("*.txt"))]


# --------------------------------------------------------------------------------------------------------------------
# Game files


def _alfworld_logic() -> tuple[str, str]:
    """The installed package's PDDL domain and TextWorld grammar (``alfworld/data/alfred.{pddl,twl2}``)."""
    from importlib import resources

    # Not ``alfworld.info.ALFRED_PDDL_PATH``: the same files, without depending on that module's layout.
    data = resources.files("alfworld") / "data"
    return (data / "alfred.pddl").read_text(), (data / "alfred.twl2").read_text()


def task_description(traj_data: dict[str, Any], key: str) -> str:
    """The templated goal text ALFWorld writes into a game (``put a mug in desk.``), chosen by a hash of ``key``.

    ``alfworld.agents.utils.misc.get_templated_task_desc`` picks a template with the global ``random``; a stable
    choice keeps the task text (and so the actor's prompt) the same across runs and processes.
    """
    import alfworld.gen.goal_library as glib

    params = traj_data["pddl_params"]
    goal = traj_data["task_type"] + ("_slice" if params.get("object_sliced") else "")
    templates = glib.gdict[goal]["templates"]
    index = int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % len(templates)
    return templates[index].format(
        obj=params["object_target"].lower(),
        recep=params["parent_target"].lower(),
        toggle=params["toggle_target"].lower(),
        mrecep=params["mrecep_target"].lower(),
    )


def build_game_data(game_dir: str | Path, key: str | None = None) -> dict[str, Any]:
    """The content of ``game.tw-pddl`` for a game folder, built from its ``initial_state.pddl`` and ``traj_data.json``.

    Same fields as ``alfworld-generate`` writes (``solvable`` and ``walkthrough`` left unknown).
    """
    game_dir = Path(game_dir)
    problem_path, traj_path = game_dir / "initial_state.pddl", game_dir / "traj_data.json"
    for path in (problem_path, traj_path):
        if not path.is_file():
            raise EnvError(
                f"ALFWorld game folder {str(game_dir)!r} has no {path.name}; expected traj_data.json and "
                "initial_state.pddl (or a ready game.tw-pddl) as written by alfworld-download"
            )
    traj_data = json.loads(traj_path.read_text())
    domain, grammar = _alfworld_logic()
    desc = task_description(traj_data, key or game_dir.name)
    return {
        "pddl_domain": domain,
        "grammar": grammar.replace("UNKNOWN GOAL", desc),
        "pddl_problem": problem_path.read_text(),
        "solvable": None,
        "walkthrough": None,
    }


def write_game_file(game_dir: str | Path, out_dir: str | Path | None = None, key: str | None = None) -> Path:
    """Write ``game.tw-pddl`` for ``game_dir`` into ``out_dir`` (default: the game folder); returns its path."""
    path = Path(out_dir or game_dir) / "game.tw-pddl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(build_game_data(game_dir, key)))
    return path


def make_textworld_env(*, facts: bool = False, expert: str | None = None):
    """A TextWorld ``PddlEnv`` wrapped as ALFWorld wraps it (names demangled, gamefile recorded).

    ``expert``: ``"handcoded"`` or ``"planner"`` adds ALFWorld's ``AlfredExpert`` (its next action appears in
    ``state["extra.expert_plan"]``); used to check that games are solvable.
    """
    try:
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos
        from textworld.envs import PddlEnv
    except ImportError as exc:
        raise EnvError(
            f"the alfworld environment needs the optional extra (import failed: {exc}); install it with "
            "`pip install 'retroformer[alfworld]'` (alfworld==0.4.2, with the virtual environment's bin/ on PATH so "
            "that its planner builds)"
        ) from None
    infos = textworld.EnvInfos(won=True, admissible_commands=True, facts=facts, extras=["gamefile"])
    env = AlfredInfos(AlfredDemangler(PddlEnv(infos), shuffle=False))
    if expert is not None:
        env = AlfredExpert(env, expert_type=expert)
    return env


def load_game(env: Any, game: str | dict[str, Any]) -> Any:
    """``env.load(game)`` + ``env.reset()`` under the engine lock, with the caller's ``sys.argv`` restored."""
    with _ENGINE_LOCK:
        argv, saved_argv = sys.argv, list(sys.argv)
        try:
            env.load(game)
            return env.reset()
        finally:
            # The translator rebinds sys.argv; put back the caller's list object and its content (others may hold it).
            argv[:] = saved_argv
            sys.argv = argv


# --------------------------------------------------------------------------------------------------------------------
# Suite and environment


def _split_dir(data_path: str | None, split: str) -> Path:
    """``<data_path>/json_2.1.1/<split>`` (``data_path`` may also point at ``json_2.1.1`` itself)."""
    if data_path is None:
        root = FIXTURE_ROOT
    else:
        base = Path(os.path.expanduser(data_path))
        if not base.is_dir():
            raise EnvError(
                f"env.options.data_path={data_path!r} is not a folder; expected the ALFWorld data folder "
                "($ALFWORLD_DATA, holding json_2.1.1/). Run `alfworld-download` to fetch the games and point "
                "data_path at that folder, or set data_path: null to play the shipped fixture games"
            )
        root = base / "json_2.1.1" if (base / "json_2.1.1").is_dir() else base
    split_dir = root / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise EnvError(
            f"no ALFWorld split folder {str(split_dir)!r} (found: {found or 'nothing'}); expected "
            f"json_2.1.1/{split}/ as written by `alfworld-download`. Run it, point env.options.data_path at the "
            f"folder it filled ($ALFWORLD_DATA), or pick a split that exists"
        )
    return split_dir


@register_env("alfworld")
class AlfWorldSuite(EnvSuite):
    """ALFWorld games of one split; see the module docstring."""

    version = "alfworld-0.4.2-1"

    @dataclass
    class Config:
        # Data
        data_path: str | None = doc(
            "ALFWorld data folder (holds json_2.1.1/; `alfworld-download` fills $ALFWORLD_DATA); null: the shipped "
            "fixture games",
            None,
        )
        split: Literal["train", "valid_seen", "valid_unseen"] = doc(
            "which games: the paper evaluates the 134 out-of-distribution valid_unseen games", "valid_unseen"
        )
        task_types: list[str] = doc(
            "task types to keep (traj_data.json task_type)", default_factory=lambda: list(TASK_TYPES)
        )
        num_games: int = doc("play only the first N games in sorted order (0: all)", 0)
        # Episode protocol (Reflexion)
        max_steps: int = doc("steps per episode (Reflexion protocol: 50)", 50)
        repeat_limit: int = doc(
            "end the episode when the same action is issued this many times in a row (Reflexion: 2; 0: never)", 2
        )
        accept_put_grammar: bool = doc("translate the pre-0.4 `put O in/on R` into alfworld 0.4's `move O to R`", True)

        def __post_init__(self) -> None:
            unknown = [t for t in self.task_types if t not in TASK_TYPES]
            if unknown or not self.task_types:
                raise ConfigError(
                    f"env.options.task_types={self.task_types!r} has unknown or no task types {unknown}; "
                    f"use a non-empty subset of {list(TASK_TYPES)}"
                )
            if self.num_games < 0:
                raise ConfigError(f"env.options.num_games must be >= 0 (0: all games), got {self.num_games}")
            if self.max_steps < 1:
                raise ConfigError(f"env.options.max_steps must be >= 1, got {self.max_steps}")
            if self.repeat_limit < 0 or self.repeat_limit == 1:
                raise ConfigError(
                    f"env.options.repeat_limit must be 0 (off) or >= 2, got {self.repeat_limit}; "
                    "the Reflexion protocol uses 2 (stop when an action repeats right away)"
                )

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.prompts = prompts_for_type(None)
        self._prompts_by_type: dict[str, EnvPrompts] = {}

    def prompts_for(self, task: Task) -> EnvPrompts:
        """Prompts for ``task``: few-shot examples of its own task type where we have them."""
        task_type = task.payload.get("task_type")
        if task_type not in self._prompts_by_type:
            self._prompts_by_type[task_type] = prompts_for_type(task_type)
        return self._prompts_by_type[task_type]

    def tasks(self) -> list[Task]:
        split_dir = _split_dir(self.config.data_path, self.config.split)
        root = split_dir.parent
        out: list[Task] = []
        skipped: dict[str, int] = {}
        for traj_path in sorted(split_dir.rglob("traj_data.json")):
            game_dir = traj_path.parent
            rel = game_dir.relative_to(root).as_posix()
            if "movable" in rel or "Sliced" in rel:  # not supported by ALFWorld's text engine either
                skipped["movable/sliced"] = skipped.get("movable/sliced", 0) + 1
                continue
            traj_data = json.loads(traj_path.read_text())
            task_type = traj_data.get("task_type")
            if task_type not in self.config.task_types:
                skipped["task type"] = skipped.get("task type", 0) + 1
                continue
            game_file = game_dir / "game.tw-pddl"
            if game_file.is_file():
                if json.loads(game_file.read_text()).get("solvable") is False:
                    skipped["unsolvable"] = skipped.get("unsolvable", 0) + 1
                    continue
            elif not (game_dir / "initial_state.pddl").is_file():
                skipped["no game file"] = skipped.get("no game file", 0) + 1
                continue
            payload = {
                "game_dir": str(game_dir),
                "game_file": str(game_file) if game_file.is_file() else None,
                "task_type": task_type,
            }
            out.append(Task(task_id=rel, payload=payload))
        if skipped:
            logger.info("alfworld %s: skipped %s", self.config.split, skipped)
        if not out:
            raise EnvError(
                f"no playable ALFWorld games under {str(split_dir)!r} for task types {self.config.task_types} "
                f"(skipped: {skipped or 'none found'}); expected game folders with traj_data.json and game.tw-pddl "
                "or initial_state.pddl. Run `alfworld-download` and point env.options.data_path at its folder"
            )
        if self.config.num_games:
            out = out[: self.config.num_games]
        logger.info("alfworld %s: %d games", self.config.split, len(out))
        return out

    def make(self) -> AlfWorldEnv:
        return AlfWorldEnv(
            max_steps=self.config.max_steps,
            repeat_limit=self.config.repeat_limit,
            accept_put_grammar=self.config.accept_put_grammar,
        )


@dataclass
class _Episode:
    task: Task
    state: Any
    steps: int = 0
    won: bool = False
    done: bool = False
    actions: list[str] = field(default_factory=list)


class AlfWorldEnv(TextEnv):
    """One ALFWorld game at a time. Not thread-safe; make one per concurrent episode."""

    def __init__(self, max_steps: int = 50, repeat_limit: int = 2, accept_put_grammar: bool = True) -> None:
        self.max_steps = max_steps
        self.repeat_limit = repeat_limit
        self.accept_put_grammar = accept_put_grammar
        self._env: Any = None
        self._episode: _Episode | None = None

    def reset(self, task: Task) -> str:
        if self._env is None:
            self._env = _acquire_engine()
        game_file = task.payload.get("game_file")
        game = game_file if game_file else build_game_data(task.payload["game_dir"], key=task.task_id)
        state = load_game(self._env, game)
        self._episode = _Episode(task=task, state=state)
        return strip_banner(state.feedback)

    def _command(self, action: str) -> str:
        """The command to send to the game: as written if admissible, else the 0.4 form of a ``put``."""
        assert self._episode is not None
        action = " ".join(action.strip().split())
        admissible = self._episode.state.get("admissible_commands") or []
        if self.accept_put_grammar and action not in admissible:
            return translate_put(action)
        return action

    def step(self, action: str) -> StepResult:
        episode = self._episode
        if episode is None:
            raise EnvError("AlfWorldEnv.step() called before reset(); call reset(task) first")
        if episode.done:
            raise EnvError(f"AlfWorldEnv.step({action!r}) called after the episode ended; call reset(task) first")
        episode.steps += 1
        info: dict[str, Any] = {}
        if _THINK_RE.match(action):
            observation = THINK_FEEDBACK
            command = action.strip()
        else:
            command = self._command(action)
            if command != " ".join(action.split()):
                info["translated_to"] = command
            with _ENGINE_LOCK:
                state, _, _ = self._env.step(command)
            episode.state = state
            observation = state.feedback.strip()
            episode.won = bool(state["won"])
            if observation == INVALID_FEEDBACK:
                info["invalid"] = True
        episode.actions.append(_normalize(command))
        done = episode.won
        if not done and self.repeat_limit and len(episode.actions) >= self.repeat_limit:
            if len(set(episode.actions[-self.repeat_limit :])) == 1:
                done, info["end_reason"] = True, "repeat"
        if not done and episode.steps >= self.max_steps:
            done, info["end_reason"] = True, "step_limit"
        episode.done = done
        return StepResult(observation, reward=1.0 if episode.won else 0.0, done=done, info=info)

    def outcome(self) -> Outcome:
        if self._episode is None:
            raise EnvError("AlfWorldEnv.outcome() called before reset(); call reset(task) first")
        won = self._episode.won
        return Outcome(return_=1.0 if won else 0.0, success=won, metrics={"steps": float(self._episode.steps)})

    def close(self) -> None:
        if self._env is not None:
            _release_engine(self._env)  # reused by the next episode; see _IDLE_ENGINES
            self._env = None
