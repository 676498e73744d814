"""Strata: an LLM inference stack. The offline API: `LLM(model).generate(prompts, params)`.

The names below load on first use, so that `strata.bench` and `strata.router` (clients
that run without torch) can import their package without pulling in the engine.
"""

import importlib

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"

_HOMES = {"LLM": "strata.llm", "SamplingParams": "strata.sampling_params",
          "RequestOutput": "strata.outputs", "CompletionOutput": "strata.outputs"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'strata' has no attribute {name!r}")
