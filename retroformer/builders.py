"""Builders: from a trial config to the environment suite, its tasks, the actor, the reflector and their LLMs.

Below both the episode runner (:mod:`retroformer.rollout`, whose online scorer rebuilds a run's actor) and the trial
loop (:mod:`retroformer.trials`), so that each imports it from above. The builders take any config with the
``env``, ``actor``, ``reflector`` and ``cache_dir`` fields of :class:`retroformer.trials.TrialsConfig`, e.g. the
:class:`RunSpec` that :func:`load_run_spec` reads back from a run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from retroformer.agents.actor import Actor, MemoryBlindActor, ReActActor, ShortPromptActor
from retroformer.agents.reflector import Reflector
from retroformer.config import check_model_path, doc, from_dict, read_yaml
from retroformer.envs.base import EnvSuite, Task, make_suite
from retroformer.envs.synthetic import PlanFollowingActor
from retroformer.errors import ConfigError, DataError
from retroformer.llm import LLMConfig, build_llm
from retroformer.llm.cache import CachedLLM
from retroformer.llm.cost import MeteredLLM
from retroformer.records import config_path


@dataclass
class EnvSection:
    name: str = doc("registered environment: synthetic, textworld, hotpotqa, alfworld, webshop", "synthetic")
    options: dict = doc(
        "the environment's own options (its Config fields; unknown keys are rejected)", default_factory=dict
    )
    max_tasks: int | None = doc("use only the first N tasks of the environment's list", None)

    def __post_init__(self) -> None:
        if self.max_tasks is not None and self.max_tasks < 1:
            raise ConfigError(f"env.max_tasks must be >= 1 or null (all tasks), got {self.max_tasks}")


@dataclass
class ActorSection:
    kind: Literal["react", "short", "plan"] = doc(
        "react: an LLM with a ReAct prompt; short: an LLM with the environment's short few-shot completion prompt "
        "(small models, e.g. SmolLM2-135M; use llm.style completion); plan: the synthetic env's plan-following actor "
        "(no LLM)",
        "react",
    )
    llm: LLMConfig = doc("the actor's LLM (ignored for kind=plan)", default_factory=LLMConfig)
    retry: Literal["first", "random"] = doc(
        "kind=plan: the door it opens on a retry whose memory names none. first: its first guess again "
        "(deterministic); random: a fresh uniform draw among the other doors, like a sampling LLM actor that a "
        "useless reflection sometimes leaves lucky",
        "first",
    )
    read_memory: bool = doc(
        "false: the actor never sees its reflections (they are still written and recorded); a negative control: "
        "with it every reflector must tie, which shows that a gain goes through the reflection",
        True,
    )
    max_observation_chars: int = doc("observations longer than this are truncated in the actor's prompt", 1500)
    max_prompt_chars: int = doc("oldest scratchpad steps are dropped beyond this prompt length", 24000)


@dataclass
class ReflectorSection:
    kind: Literal["llm", "none"] = doc(
        "llm: write reflections with `llm`; none: no reflections (ReAct baseline)", "llm"
    )
    llm: LLMConfig = doc(
        "the retrospective model (base + optional LoRA adapter, or a server); completion style by default, the "
        "format sft_run.py trains on",
        default_factory=lambda: LLMConfig(max_tokens=64, style="completion"),
    )
    max_chars: int = doc("reflections are cut to this many characters (at a sentence end where possible)", 600)
    stop: list[str] = doc(
        "strings at which a reflection ends, besides a blank line and a new 'Task:' or 'Trajectory:' (e.g. ['\\n'] "
        "for one-line reflections); ppo_run.py's `stop` should match",
        default_factory=list,
    )
    examples: bool = doc(
        "put the environment's example reflection in the reflection prompt (few-shot); false: zero-shot, the "
        "instructions, the task and the failed attempt only",
        True,
    )

    def __post_init__(self) -> None:
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"reflector.stop must be a list of non-empty strings, got {self.stop!r}; e.g. ['\\n']")


class RunSpec(Protocol):
    """What the builders read from a trial config."""

    env: EnvSection
    actor: ActorSection
    reflector: ReflectorSection
    cache_dir: str | None
    seed: int


@dataclass
class RunAgents:
    """The parts of a finished run's config that rebuild its environment and agents (see :func:`load_run_spec`)."""

    env: EnvSection = field(default_factory=EnvSection)
    actor: ActorSection = field(default_factory=ActorSection)
    reflector: ReflectorSection = field(default_factory=ReflectorSection)
    cache_dir: str | None = None
    memory_size: int = 3
    concurrency: int = 8
    seed: int = 0


def load_run_spec(run_dir: str | Path) -> RunAgents:
    """The environment and agent sections of the config a trials run wrote to ``run_dir``."""
    run_dir = Path(run_dir)
    path = config_path(run_dir)
    if not path.is_file():
        raise DataError(
            f"{run_dir} is not a trials run directory (no {path.relative_to(run_dir)}); "
            "pass the directory that `retroformer trials` wrote (runs/<run_name>)"
        )
    data = read_yaml(path)
    return RunAgents(
        env=from_dict(EnvSection, data.get("env") or {}, where="env"),
        actor=from_dict(ActorSection, data.get("actor") or {}, where="actor"),
        reflector=from_dict(ReflectorSection, data.get("reflector") or {}, where="reflector"),
        cache_dir=data.get("cache_dir"),
        memory_size=int(data.get("memory_size", 3)),
        concurrency=int(data.get("concurrency", 8)),
        seed=int(data.get("seed", 0)),
    )


def check_model_paths(cfg: RunSpec, roles: tuple[str, ...] = ("actor", "reflector")) -> None:
    """Fail before any episode on an in-process model or adapter path that does not exist (hub ids pass)."""
    sections = {
        "actor": (cfg.actor, cfg.actor.kind != "plan"),
        "reflector": (cfg.reflector, cfg.reflector.kind != "none"),
    }
    for role in roles:
        section, used = sections[role]
        if used and section.llm.backend == "hf":
            check_model_path(section.llm.model, f"{role}.llm.model")
            if section.llm.adapter:
                check_model_path(section.llm.adapter, f"{role}.llm.adapter")


def build_suite(cfg: RunSpec) -> EnvSuite:
    return make_suite(cfg.env.name, cfg.env.options)


def select_tasks(cfg: RunSpec, suite: EnvSuite) -> list[Task]:
    tasks = suite.tasks()
    if cfg.env.max_tasks is not None:
        tasks = tasks[: cfg.env.max_tasks]
    ids = [t.task_id for t in tasks]
    if len(set(ids)) != len(ids):
        raise DataError(f"environment {cfg.env.name!r} returned duplicate task ids; task ids must be unique")
    return tasks


def _wrap_cache(llm, cfg: RunSpec):
    if cfg.cache_dir is None:
        return llm
    return CachedLLM(llm, cfg.cache_dir)


def _meter(llm, role: str, ledger):
    """Count each call's usage in ``ledger.budget`` (a :class:`~retroformer.llm.cost.Budget`), reserving its worst
    case before it is sent (None: no metering)."""
    return llm if ledger is None else MeteredLLM(llm, role, ledger.budget)


def build_actor(cfg: RunSpec, suite: EnvSuite, api_key: str | None = None, meter=None) -> Actor:
    """The configured actor; with ``meter`` (a ledger with a ``budget``) its calls are counted and budgeted."""
    actor = _build_actor(cfg, suite, api_key, meter)
    return actor if cfg.actor.read_memory else MemoryBlindActor(actor)


def _build_actor(cfg: RunSpec, suite: EnvSuite, api_key: str | None, meter) -> Actor:
    if cfg.actor.kind == "plan":
        return PlanFollowingActor(retry=cfg.actor.retry, seed=cfg.seed)
    if cfg.actor.kind == "short" and suite.short_prompts is None:
        raise ConfigError(
            f"actor.kind=short needs an environment with a short prompt; {cfg.env.name!r} has none (the synthetic "
            "vault has one); use actor.kind=react"
        )
    llm = _meter(_wrap_cache(build_llm(cfg.actor.llm, api_key=api_key), cfg), "actor", meter)
    if cfg.actor.kind == "short":
        return ShortPromptActor(
            llm, suite.short_prompts, cfg.actor.llm.sampling(), max_observation_chars=cfg.actor.max_observation_chars
        )
    return ReActActor(
        llm,
        suite.prompts,
        cfg.actor.llm.sampling(),
        max_observation_chars=cfg.actor.max_observation_chars,
        max_prompt_chars=cfg.actor.max_prompt_chars,
    )


def build_reflector(cfg: RunSpec, api_key: str | None = None, meter=None) -> Reflector | None:
    if cfg.reflector.kind == "none":
        return None
    llm = _meter(_wrap_cache(build_llm(cfg.reflector.llm, api_key=api_key), cfg), "reflector", meter)
    return Reflector(
        llm,
        cfg.reflector.llm.sampling(stop=tuple(cfg.reflector.stop)),
        max_chars=cfg.reflector.max_chars,
        examples=cfg.reflector.examples,
    )
