"""Strata: an LLM inference stack. The offline API: `LLM(model).generate(prompts, params)`."""

from strata.llm import LLM
from strata.outputs import CompletionOutput, RequestOutput
from strata.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
