"""From the engine's tokens to outputs: one request's prompts x n samples turned into text,
logprobs and the reason each ended, for the offline LLM and the HTTP server alike (vLLM's
OutputProcessor).

The engine sees token ids only, so stop strings are found here while it goes on generating:
a delta says when its sample must be aborted there. Nothing here imports torch: the HTTP
frontend, which runs without it, runs this too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.engine.messages import EngineCoreOutput
from strata.inputs import TokenizedPrompt
from strata.outputs import CompletionOutput, Logprob, RequestOutput, SampleLogprobs
from strata.sampling_params import SamplingParams
from strata.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class Sample:
    """One sample's output as it grows token by token."""

    engine_id: str  # its engine request: "{prompt's request id}-{index}"
    index: int  # among its prompt's n
    choice_index: int  # among all the request's samples, as OpenAI numbers choices
    prompt: TokenizedPrompt
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None  # None without a tokenizer: token ids only
    token_ids: list[int] = field(default_factory=list)
    logprobs: SampleLogprobs | None = None  # a list when logprobs were asked for
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0  # prompt tokens the engine found in its prefix cache
    kv_transfer_params: dict | None = None  # a prefill handed to a decode instance: where

    @property
    def text(self) -> str:
        return self.detokenizer.text if self.detokenizer else ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SampleDelta:
    """What one engine output added to its sample."""

    sample: Sample
    text: str  # new text that no stop string can cut any more
    token_ids: list[int]
    logprobs: SampleLogprobs | None
    finish_reason: str | None  # set on the sample's last delta only
    abort: bool = False  # ended by a stop string while the engine goes on: abort it there


@dataclass
class PromptSamples:
    """One prompt's n samples: one RequestOutput offline."""

    request_id: str
    prompt: TokenizedPrompt
    samples: list[Sample]

    @property
    def num_cached_tokens(self) -> int:
        """The fewest any sample found: they share the prompt, and one of them computed it."""
        return min(s.num_cached_tokens for s in self.samples)

    def request_output(self) -> RequestOutput:
        outputs = [CompletionOutput(s.index, s.text, s.token_ids, s.logprobs, s.finish_reason,
                                    s.stop_reason) for s in self.samples]
        return RequestOutput(self.request_id, self.prompt.text, self.prompt.token_ids, outputs,
                             self.num_cached_tokens)


class OutputProcessor:
    """The samples of one request (offline: of one generate call), by engine request id."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.prompts: list[PromptSamples] = []
        self.samples: dict[str, Sample] = {}  # in choice order

    def add_prompt(self, request_id: str, prompt: TokenizedPrompt,
                   params: SamplingParams) -> list[Sample]:
        """The prompt's n samples, each an engine request of its own for the caller to add."""
        samples = []
        for index in range(params.n):
            sample_params = params.for_sample(index)
            detokenizer = None if self.tokenizer is None else IncrementalDetokenizer(
                self.tokenizer, prompt.token_ids, sample_params.stop,
                sample_params.include_stop_str_in_output, sample_params.skip_special_tokens)
            sample = Sample(f"{request_id}-{index}", index, len(self.samples), prompt,
                            sample_params, detokenizer,
                            logprobs=[] if sample_params.logprobs is not None else None)
            self.samples[sample.engine_id] = sample
            samples.append(sample)
        self.prompts.append(PromptSamples(request_id, prompt, samples))
        return samples

    def process(self, out: EngineCoreOutput) -> SampleDelta | None:
        """Add one engine output to its sample. None for a token that came after the sample
        ended: its stop string was found before the abort reached the engine."""
        sample = self.samples[out.request_id]
        if sample.finished:
            return None
        sample.token_ids.append(out.new_token_id)
        if out.num_cached_tokens is not None:
            sample.num_cached_tokens = out.num_cached_tokens
        if out.kv_transfer_params is not None:
            sample.kv_transfer_params = out.kv_transfer_params
        logprobs = None
        if sample.logprobs is not None:
            logprobs = [self._logprobs(out)] if out.logprobs is not None else []
            sample.logprobs.extend(logprobs)
        sample.finish_reason, sample.stop_reason = out.finish_reason, out.stop_reason
        text, abort = "", False
        if (detokenizer := sample.detokenizer) is not None:
            detokenizer.add_token(out.new_token_id)
            if detokenizer.stop_string is not None:
                abort = out.finish_reason is None
                sample.finish_reason, sample.stop_reason = "stop", detokenizer.stop_string
            text = detokenizer.delta(final=sample.finished)
        return SampleDelta(sample, text, [out.new_token_id], logprobs, sample.finish_reason,
                           abort)

    def abort_unfinished(self) -> list[Sample]:
        """End every sample still running (its reader is gone); the caller aborts them in
        the engine."""
        unfinished = [s for s in self.samples.values() if not s.finished]
        for sample in unfinished:
            sample.finish_reason = "abort"
        return unfinished

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p.prompt.token_ids) for p in self.prompts)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples.values())

    @property
    def num_cached_tokens(self) -> int:
        return sum(p.num_cached_tokens for p in self.prompts)

    @property
    def kv_transfer_params(self) -> dict | None:
        """A prefill's handoff to a decode instance: where its blocks can be read."""
        return next((s.kv_transfer_params for s in self.samples.values()
                     if s.kv_transfer_params is not None), None)

    def request_outputs(self) -> list[RequestOutput]:
        return [p.request_output() for p in self.prompts]

    def _logprobs(self, out: EngineCoreOutput) -> dict[int, Logprob]:
        """The step's top-N (ranks 1..N) and the sampled token, which may rank below them."""
        lp = out.logprobs
        text = self.tokenizer.token_text if self.tokenizer else (lambda _: None)
        entries = {token: Logprob(value, rank + 1, text(token))
                   for rank, (token, value) in enumerate(zip(lp.top_ids, lp.top_logprobs))}
        entries[out.new_token_id] = Logprob(lp.logprob, lp.rank, text(out.new_token_id))
        return entries
