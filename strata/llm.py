"""LLM: the offline batch API, shaped like vLLM's so existing scripts port by import."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from tqdm.auto import tqdm

from strata.config import DEFAULT_MODEL, EngineConfig
from strata.engine.core import EngineCore, EngineCoreOutput
from strata.model.loader import resolve_model_path
from strata.outputs import CompletionOutput, Logprob, RequestOutput
from strata.sampling_params import SamplingParams
from strata.tokenizer import IncrementalDetokenizer, Tokenizer

PromptType = str | dict  # "text" or {"prompt_token_ids": [...]} (or {"prompt": "text"})


@dataclass
class _Sample:
    """Frontend state of one of a prompt's n samples."""

    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


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
        samples: dict[str, _Sample] = {}
        for (text, token_ids), params in zip(encoded, sampling_params, strict=True):
            request_id = str(next(self._request_ids))
            outputs[request_id] = RequestOutput(request_id, text, token_ids)
            for index in range(params.n):
                # Each sample is its own engine request; seeded samples get distinct seeds.
                child = replace(params, n=1,
                                seed=None if params.seed is None else params.seed + index)
                samples[f"{request_id}-{index}"] = self._new_sample(index, child, token_ids)
                self.engine.add_request(f"{request_id}-{index}", token_ids, child)

        progress = tqdm(total=len(samples), desc="Generating", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests:
                stopped = []
                for out in self.engine.step():
                    sample = samples[out.request_id]
                    self._absorb(sample, out)
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
            request_id = sample_id.rsplit("-", 1)[0]
            text = sample.detokenizer.text if sample.detokenizer else ""
            outputs[request_id].outputs.append(CompletionOutput(
                sample.index, text, sample.token_ids, sample.logprobs,
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

    def _new_sample(self, index: int, params: SamplingParams, prompt_ids: list[int]) -> _Sample:
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(
                self.tokenizer, prompt_ids, params.stop, params.include_stop_str_in_output,
                params.skip_special_tokens)
        return _Sample(index, params, detokenizer,
                       logprobs=[] if params.logprobs is not None else None)

    def _absorb(self, sample: _Sample, out: EngineCoreOutput) -> None:
        sample.token_ids.append(out.new_token_id)
        if out.logprobs is not None:
            sample.logprobs.append(self._logprob_dict(out))
        sample.finish_reason, sample.stop_reason = out.finish_reason, out.stop_reason
        if sample.detokenizer is None:
            return
        sample.detokenizer.add_token(out.new_token_id)
        if sample.detokenizer.stop_string is not None:
            sample.finish_reason, sample.stop_reason = "stop", sample.detokenizer.stop_string

    def _logprob_dict(self, out: EngineCoreOutput) -> dict[int, Logprob]:
        lp = out.logprobs
        text = self.tokenizer.token_text if self.tokenizer else (lambda _: None)
        entries = {token: Logprob(value, rank + 1, text(token))
                   for rank, (token, value) in enumerate(zip(lp.top_ids, lp.top_logprobs,
                                                            strict=True))}
        entries[out.new_token_id] = Logprob(lp.logprob, lp.rank, text(out.new_token_id))
        return entries
