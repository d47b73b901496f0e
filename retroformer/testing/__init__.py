"""Test and benchmark helpers that ship with the package: local servers that stand in for remote services."""

from retroformer.testing.fake_openai import FakeOpenAIServer, Fault, RecordedRequest

__all__ = ["FakeOpenAIServer", "Fault", "RecordedRequest"]
