"""One sample's output as it grows token by token: ids, text, logprobs, why it ended.

Shared by the offline LLM and the HTTP server, which both turn the engine's
per-step outputs into text (the server streams the deltas as they come).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.engine.messages import EngineCoreOutput
from strata.outputs import Logprob
from strata.sampling_params import SamplingParams
from strata.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class SampleState:
    index: int
    params: SamplingParams
    tokenizer: Tokenizer | None
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0  # prompt tokens the engine found in its prefix cache
    kv_transfer_params: dict | None = None  # a prefill handed to a decode instance: where

    @classmethod
    def create(cls, index: int, params: SamplingParams, tokenizer: Tokenizer | None,
               prompt_token_ids: list[int]) -> SampleState:
        detokenizer = None
        if tokenizer is not None:
            detokenizer = IncrementalDetokenizer(
                tokenizer, prompt_token_ids, params.stop, params.include_stop_str_in_output,
                params.skip_special_tokens)
        return cls(index, params, tokenizer, detokenizer,
                   logprobs=[] if params.logprobs is not None else None)

    @property
    def text(self) -> str:
        return self.detokenizer.text if self.detokenizer else ""

    @property
    def stopped_by_string(self) -> bool:
        """Finished on a stop string, which the engine cannot see: it must be aborted."""
        return self.detokenizer is not None and self.detokenizer.stop_string is not None

    def absorb(self, out: EngineCoreOutput) -> None:
        self.token_ids.append(out.new_token_id)
        if out.num_cached_tokens is not None:
            self.num_cached_tokens = out.num_cached_tokens
        if out.kv_transfer_params is not None:
            self.kv_transfer_params = out.kv_transfer_params
        if out.logprobs is not None and self.logprobs is not None:
            self.logprobs.append(self._logprob_dict(out))
        self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
        if self.detokenizer is None:
            return
        self.detokenizer.add_token(out.new_token_id)
        if self.detokenizer.stop_string is not None:
            self.finish_reason, self.stop_reason = "stop", self.detokenizer.stop_string

    def _logprob_dict(self, out: EngineCoreOutput) -> dict[int, Logprob]:
        lp = out.logprobs
        text = self.tokenizer.token_text if self.tokenizer else (lambda _: None)
        entries = {token: Logprob(value, rank + 1, text(token))
                   for rank, (token, value) in enumerate(zip(lp.top_ids, lp.top_logprobs))}
        entries[out.new_token_id] = Logprob(lp.logprob, lp.rank, text(out.new_token_id))
        return entries
