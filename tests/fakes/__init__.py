"""Test doubles shared by the test suite.

Names are imported lazily so that `python -m tests.fakes.fake_vllm` does not import the module twice.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ALL_KINDS",
    "CHAT",
    "COMPLETIONS",
    "DETOKENIZE",
    "EMBEDDINGS",
    "LLM_KINDS",
    "MODELS",
    "TOKENIZE",
    "FakeVLLM",
    "FakeVLLMServer",
    "LoggedRequest",
    "ToyModel",
    "free_port",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tests.fakes import fake_vllm

        return getattr(fake_vllm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
