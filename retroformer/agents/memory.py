"""Reflection memory: the last ``m`` reflections of a task go into the actor's next prompt (paper section 4; m=3)."""

from __future__ import annotations


def memory_window(reflections: list[str], size: int) -> list[str]:
    """The newest ``size`` non-empty reflections, oldest first. ``size == 0`` disables memory."""
    kept = [r for r in reflections if r.strip()]
    return kept[-size:] if size > 0 else []
