"""Data shipped with the HotPotQA environment: the fictional fixture (fixture.json) and the prompt text."""
