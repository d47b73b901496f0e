"""Prompt text of the HotPotQA environment: ReAct instructions, few-shot trajectories and the reflection prompt.

All entities below are fictional and written for this project; they do not overlap the fixture questions, so the
few-shot examples never give away a fixture answer.
"""

from __future__ import annotations

INSTRUCTIONS = """\
Answer a question by alternating Thought, Action and Observation steps. A Thought reasons about what is known and \
what to do next. An Action is exactly one of:
(1) Search[entity]: opens the page titled entity and shows its first sentences. If no page has that title, it lists \
similar titles that you can search instead.
(2) Lookup[keyword]: shows the next sentence containing keyword on the page opened by the last successful Search.
(3) Finish[answer]: submits the answer and ends the task. Give a short answer (a name, a place, a number, yes or \
no), not a sentence.
You have only a few actions, so search for the entities named in the question first and finish as soon as you know \
the answer."""

EXAMPLES = """\
Task: In what year was the architect of the Ostrel Observatory born?
Thought: I need to find who designed the Ostrel Observatory, then that person's year of birth.
Action: Search[Ostrel Observatory]
Observation: The Ostrel Observatory is an astronomical observatory on Mount Ostrel. It was designed by the architect \
Jana Wickmore and opened in 1931.
Thought: The architect is Jana Wickmore. Now I need her year of birth.
Action: Search[Wickmore]
Observation: Could not find [Wickmore]. Similar: ['Jana Wickmore', 'Wickmore Hall', 'Wick Moor']
Thought: There is no page titled Wickmore, but Jana Wickmore is listed. I search her full name.
Action: Search[Jana Wickmore]
Observation: Jana Wickmore (1889-1960) was an architect known for observatories and libraries. She designed the \
Ostrel Observatory.
Thought: Jana Wickmore was born in 1889.
Action: Finish[1889]

Task: Were the Halden Canal and the Murrow Canal opened in the same decade?
Thought: I need the opening years of both canals and then compare their decades.
Action: Search[Halden Canal]
Observation: The Halden Canal links the towns of Halden and Brisk. It is 42 kilometres long and has nine locks.
Thought: The first sentences do not give the opening year. I look up the word opened on this page.
Action: Lookup[opened]
Observation: (Result 1 / 1) The canal was opened in 1794 after six years of work.
Thought: The Halden Canal opened in 1794. Now the Murrow Canal.
Action: Search[Murrow Canal]
Observation: The Murrow Canal is a short canal opened in 1821 to carry slate from the Murrow quarries.
Thought: 1794 is in the 1790s and 1821 is in the 1820s, so they were not opened in the same decade.
Action: Finish[no]"""

REFLECTION_INSTRUCTIONS = """\
You are reviewing an attempt to answer a question with the actions Search[entity], Lookup[keyword] and \
Finish[answer]. The attempt failed: the answer was wrong, or the actions ran out before an answer was given. In two \
or three sentences, name the specific mistake that caused the failure and give a concrete plan for the next attempt: \
which titles to search, which keywords to look up, and when to finish. Do not retell the whole attempt."""

REFLECTION_EXAMPLES = """\
Task: Which company built the locomotive that pulled the first train to Fennick Cross?
Trajectory:
Thought: I need the first train to Fennick Cross and its locomotive.
Action: Search[Fennick Cross]
Observation: Fennick Cross is a railway junction opened in 1868. The first train to arrive was pulled by the \
locomotive Brisk Hart.
Thought: The locomotive was Brisk Hart. The question asks who built it, and Fennick Cross is a railway junction, so \
the answer is the railway.
Action: Finish[Fennick Cross railway]
Observation: Answer [Fennick Cross railway] is INCORRECT.
Result: return 0, failed
Reflection: I found the locomotive, Brisk Hart, but guessed its builder instead of searching for it. Next time I \
will Search[Brisk Hart], Lookup[built] if the first sentences do not name the builder, and Finish with the company \
name only."""
