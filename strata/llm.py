"""LLM: the offline batch API, shaped like vLLM's so existing scripts port by import."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from strata.checkpoint import resolve_model_path
from strata.config import DEFAULT_MODEL, EngineConfig
from strata.engine.core import EngineCore
from strata.outputs import CompletionOutput, RequestOutput
from strata.sample_state import SampleState
from strata.sampling_params import SamplingParams
from strata.tokenizer import Tokenizer

PromptType = str | dict  # "text" or {"prompt_token_ids": [...]} (or {"prompt": "text"})


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, **engine_args) -> None:
        self.config = EngineConfig.create(model, **engine_args)
        self.engine = EngineCore(self.config)
        self.tokenizer = None
        if not self.config.skip_tokenizer_init:
            self.tokenizer = Tokenizer(resolve_model_path(self.config.tokenizer or model))
        self._request_ids = itertools.count()

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
        for (_, token_ids), params in zip(encoded, sampling_params, strict=True):
            self.engine.validate(token_ids, params)

        outputs: dict[str, RequestOutput] = {}
        samples: dict[str, SampleState] = {}
        for (text, token_ids), params in zip(encoded, sampling_params, strict=True):
            request_id = str(next(self._request_ids))
            outputs[request_id] = RequestOutput(request_id, text, token_ids)
            for index in range(params.n):
                child = params.for_sample(index)
                samples[f"{request_id}-{index}"] = SampleState.create(
                    index, child, self.tokenizer, token_ids)
                self.engine.add_request(f"{request_id}-{index}", token_ids, child)

        progress = tqdm(total=len(samples), desc="Generating", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests:
                stopped = []
                for out in self.engine.step():
                    sample = samples[out.request_id]
                    sample.absorb(out)
                    if sample.finish_reason is not None:
                        progress.update(1)
                        if out.finish_reason is None:  # a stop string: the engine goes on
                            stopped.append(out.request_id)
                self.engine.abort_requests(stopped)
        except BaseException:
            self.engine.abort_requests(list(samples))  # no blocks outlive an interrupt
            raise
        finally:
            progress.close()

        for sample_id, sample in samples.items():
            output = outputs[sample_id.rsplit("-", 1)[0]]
            output.num_cached_tokens = sample.num_cached_tokens if not output.outputs else min(
                output.num_cached_tokens, sample.num_cached_tokens)
            output.outputs.append(CompletionOutput(
                sample.index, sample.text, sample.token_ids, sample.logprobs,
                sample.finish_reason, sample.stop_reason))
        return list(outputs.values())

    def _encode(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        text = prompt["prompt"] if isinstance(prompt, dict) else prompt
        if not isinstance(text, str):
            raise ValueError(f"a prompt must be a string or {{'prompt_token_ids': [...]}}, "
                             f"got {type(prompt).__name__}")
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer (skip_tokenizer_init is set)")
        return text, self.tokenizer.encode(text) if text else []
