"""Agents: the ReAct actor, the retrospective model (reflector) and the reflection memory."""

from retroformer.agents.actor import ActContext, Actor, ReActActor, ShortPromptActor, parse_action
from retroformer.agents.memory import memory_window
from retroformer.agents.reflector import Reflector, build_reflection_prompt, clean_reflection

__all__ = [
    "ActContext",
    "Actor",
    "ReActActor",
    "ShortPromptActor",
    "Reflector",
    "build_reflection_prompt",
    "clean_reflection",
    "memory_window",
    "parse_action",
]
