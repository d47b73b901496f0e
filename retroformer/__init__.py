"""Retroformer: a frozen actor LLM improved across trials by a trained retrospective model (arXiv 2308.02151)."""

__version__ = "0.1.0"
