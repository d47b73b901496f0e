"""A scripted policy for the synthetic vault environment, answered by a fake OpenAI-compatible server.

It plays both roles from the prompt alone: as the reflector (a prompt ending in ``Reflection:``) it carries the last
clue forward; as the ReAct actor it opens the door its newest reflection names, else the first door. Tests and the
throughput benchmark use it to drive the real trial loop over HTTP without a model.
"""

from __future__ import annotations

import re

CLUE = re.compile(r"the way out is the ([a-z]+) door")
PLAN = re.compile(r"open the ([a-z]+) door")
DOORS = re.compile(r"with \d+ doors: ([a-z, ]+)\.")
MEMORY_HEADER = "Reflections on your earlier attempts"


def vault_reply(prompt: str) -> str:
    """Reflect by carrying the clue; act by following the newest reflection, else the first door."""
    if prompt.rstrip().endswith("Reflection:"):
        clues = CLUE.findall(prompt.split("Trajectory:")[-1])
        door = clues[-1] if clues else "unknown"
        return f"I opened the wrong door. Next time I will open the {door} door."
    doors = DOORS.search(prompt.split("Task: ")[-1]).group(1).split(", ")
    memory = prompt.split(MEMORY_HEADER)[-1].split("Task: ")[0] if MEMORY_HEADER in prompt else ""
    plan = PLAN.findall(memory)
    return f"Thought: I follow my plan.\nAction: open[{plan[-1] if plan else doors[0]}]"
