"""LLM: the offline batch API, shaped like vLLM's so existing scripts port by import."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence

from tqdm.auto import tqdm

from strata.checkpoint import resolve_model_path
from strata.config import DEFAULT_MODEL, EngineConfig
from strata.engine.core import EngineCore
from strata.inputs import TokenizedPrompt
from strata.output_processor import OutputProcessor
from strata.outputs import RequestOutput
from strata.sampling_params import SamplingParams
from strata.tokenizer import Tokenizer

PromptType = str | dict  # "text" or {"prompt_token_ids": [...]} (or {"prompt": "text"})


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, **engine_args) -> None:
        self.config = EngineConfig.create(model, **engine_args)
        self.engine = EngineCore(self.config)
        # Its tensor-parallel ranks (processes) go with it, at the latest when Python exits.
        self._finalizer = weakref.finalize(self, self.engine.shutdown)
        self.tokenizer = None
        if not self.config.skip_tokenizer_init:
            self.tokenizer = Tokenizer(resolve_model_path(self.config.tokenizer or model))
        self._request_ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the engine's tensor-parallel ranks and KV connector now (else: when this LLM
        is collected, or Python exits)."""
        self._finalizer()

    def get_tokenizer(self) -> Tokenizer | None:
        return self.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the prompts' order."""
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} sampling params")
        # Tokenize and validate everything before the first request is queued.
        encoded = [self._encode(p) for p in prompts]
        for prompt, params in zip(encoded, sampling_params, strict=True):
            self.engine.validate(prompt.token_ids, params)

        outputs = OutputProcessor(self.tokenizer)
        for prompt, params in zip(encoded, sampling_params, strict=True):
            for sample in outputs.add_prompt(str(next(self._request_ids)), prompt, params):
                self.engine.add_request(sample.engine_id, prompt.token_ids, sample.params)

        progress = tqdm(total=len(outputs.samples), desc="Generating", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests:
                stopped = []
                for delta in filter(None, map(outputs.process, self.engine.step())):
                    if delta.finish_reason is not None:
                        progress.update(1)
                    if delta.abort:
                        stopped.append(delta.sample.engine_id)
                self.engine.abort_requests(stopped)
        except BaseException:  # no blocks outlive an interrupt
            self.engine.abort_requests([s.engine_id for s in outputs.abort_unfinished()])
            raise
        finally:
            progress.close()
        return outputs.request_outputs()

    def _encode(self, prompt: PromptType) -> TokenizedPrompt:
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return TokenizedPrompt(list(prompt["prompt_token_ids"]), prompt.get("prompt"))
        text = prompt["prompt"] if isinstance(prompt, dict) else prompt
        if not isinstance(text, str):
            raise ValueError(f"a prompt must be a string or {{'prompt_token_ids': [...]}}, "
                             f"got {type(prompt).__name__}")
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer (skip_tokenizer_init is set)")
        return TokenizedPrompt(self.tokenizer.encode(text) if text else [], text)
