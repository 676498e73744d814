"""One HTTP request's generation: its prompts x n samples as engine requests, merged into
one stream of per-sample deltas, with the latency metrics measured as the client sees them.

All samples share one queue, fed by the engine client; closing the stream (the
client went away, or the handler was cancelled) aborts every sample still running,
so its KV blocks go back to the pool in the engine's next step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from strata.engine.client import AsyncEngineClient, EngineDeadError, EngineRejectedError
from strata.engine.messages import EngineCoreOutput
from strata.outputs import Logprob
from strata.sample_state import SampleState
from strata.sampling_params import SamplingParams
from strata.server.errors import APIError
from strata.server.metrics import ServerMetrics
from strata.tokenizer import Tokenizer


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None = None  # None when given as token ids (decoded only if echoed)


@dataclass
class Sample:
    choice_index: int  # prompt_index * n + sample index, as OpenAI numbers choices
    prompt: Prompt
    engine_id: str
    state: SampleState
    last_token_time: float | None = None
    done: bool = False


@dataclass
class SampleDelta:
    sample: Sample
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None


class Generation:
    def __init__(self, request_id: str, prompts: list[Prompt], params: SamplingParams,
                 client: AsyncEngineClient, tokenizer: Tokenizer,
                 metrics: ServerMetrics, cache_salt: str | None = None,
                 kv_transfer_params: dict | None = None) -> None:
        self.request_id = request_id
        self.prompts = prompts
        self.cache_salt = cache_salt
        self.kv_transfer_params = kv_transfer_params
        self.client, self.metrics = client, metrics
        self.arrival = time.monotonic()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.samples: dict[str, Sample] = {}
        self.params_n = params.n
        for p_index, prompt in enumerate(prompts):
            for s_index in range(params.n):
                sample_params = params.for_sample(s_index)
                engine_id = f"{request_id}-{p_index}-{s_index}"
                state = SampleState.create(s_index, sample_params, tokenizer, prompt.token_ids)
                self.samples[engine_id] = Sample(p_index * params.n + s_index, prompt,
                                                 engine_id, state)

    def start(self) -> None:
        for sample in self.samples.values():
            self.client.add_request(sample.engine_id, sample.prompt.token_ids,
                                    sample.state.params, self.queue, self.cache_salt,
                                    self.kv_transfer_params)
        self.metrics.prompt_tokens.inc(self.num_prompt_tokens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prompts)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(s.state.token_ids) for s in self.samples.values())

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache: per prompt, the fewest any of its
        samples found (the samples of one prompt share it, and one of them computed it)."""
        cached: dict[int, int] = {}
        for sample in self.samples.values():
            index, tokens = sample.choice_index // self.params_n, sample.state.num_cached_tokens
            cached[index] = min(cached.get(index, tokens), tokens)
        return sum(cached.values())

    @property
    def handoff(self) -> dict:
        """A prefill for a decode instance: where its blocks can be read (vLLM's field)."""
        for sample in self.samples.values():
            if sample.state.kv_transfer_params is not None:
                return {"kv_transfer_params": sample.state.kv_transfer_params}
        return {}

    def usage(self) -> dict:
        prompt, completion = self.num_prompt_tokens, self.num_completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": self.num_cached_tokens}}

    async def deltas(self) -> AsyncIterator[SampleDelta]:
        """Each sample's new tokens and text as the engine produces them, until all finish."""
        remaining = len(self.samples)
        try:
            while remaining:
                item = await self.queue.get()
                if isinstance(item, EngineDeadError):
                    raise APIError(503, str(item))
                if isinstance(item, EngineRejectedError):
                    raise APIError(400, str(item))
                sample = self.samples[item.request_id]
                if sample.done:
                    continue  # a token that came after its stop string: already aborted
                delta = self._absorb(sample, item)
                if delta.finish_reason is not None:
                    remaining -= 1
                yield delta
        finally:
            self.abort_unfinished()

    def _absorb(self, sample: Sample, out: EngineCoreOutput) -> SampleDelta:
        state, metrics, now = sample.state, self.metrics, time.monotonic()
        if sample.last_token_time is None:
            metrics.ttft.observe(now - self.arrival)
        else:
            metrics.itl.observe(now - sample.last_token_time)
        if out.queue_time is not None:
            metrics.queue_time.observe(out.queue_time)
        metrics.generation_tokens.inc()
        sample.last_token_time = now
        num_logprobs = len(state.logprobs) if state.logprobs is not None else 0
        state.absorb(out)
        if state.stopped_by_string and out.finish_reason is None:
            self.client.abort([sample.engine_id])  # the engine cannot see stop strings
        finished = state.finish_reason is not None
        if finished:
            sample.done = True
            metrics.finished(state.finish_reason, now - self.arrival)
        text = state.detokenizer.delta(final=finished) if state.detokenizer else ""
        logprobs = state.logprobs[num_logprobs:] if state.logprobs is not None else None
        return SampleDelta(sample, text, [out.new_token_id], logprobs,
                           state.finish_reason if finished else None)

    def abort_unfinished(self) -> None:
        unfinished = [s for s in self.samples.values() if not s.done]
        for sample in unfinished:
            sample.done = True
            self.metrics.success["abort"].inc()
        self.client.abort([s.engine_id for s in unfinished])

    async def run_to_end(self) -> list[Sample]:
        """Consume every delta; the samples in choice order."""
        async for _ in self.deltas():
            pass
        return sorted(self.samples.values(), key=lambda s: s.choice_index)
