"""One HTTP request's generation: its prompts x n samples as engine requests, merged into
one stream of per-sample deltas, with the latency metrics measured as the client sees them.
Text, stop strings and usage are the OutputProcessor's, as offline; what is here is HTTP's.

All samples share one queue, fed by the engine client; closing the stream (the
client went away, or the handler was cancelled) aborts every sample still running,
so its KV blocks go back to the pool in the engine's next step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from strata.engine.client import AsyncEngineClient, EngineDeadError, EngineRejectedError
from strata.engine.messages import NewRequest
from strata.inputs import TokenizedPrompt
from strata.openai_errors import APIError
from strata.output_processor import OutputProcessor, Sample, SampleDelta
from strata.sampling_params import SamplingParams
from strata.server.metrics import ServerMetrics
from strata.tokenizer import Tokenizer


class Generation:
    def __init__(self, request_id: str, prompts: list[TokenizedPrompt], params: SamplingParams,
                 client: AsyncEngineClient, tokenizer: Tokenizer,
                 metrics: ServerMetrics, cache_salt: str | None = None,
                 kv_transfer_params: dict | None = None) -> None:
        self.request_id = request_id
        self.cache_salt = cache_salt
        self.kv_transfer_params = kv_transfer_params
        self.client, self.metrics = client, metrics
        self.arrival = time.monotonic()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.outputs = OutputProcessor(tokenizer)
        for index, prompt in enumerate(prompts):
            self.outputs.add_prompt(f"{request_id}-{index}", prompt, params)
        self.last_token_time: dict[str, float] = {}  # by engine id, for the ITL

    def start(self) -> None:
        self.client.add_requests(
            [NewRequest(sample.engine_id, sample.prompt.token_ids, sample.params)
             for sample in self.outputs.samples.values()],
            self.queue, self.cache_salt, self.kv_transfer_params)
        self.metrics.prompt_tokens.inc(self.outputs.num_prompt_tokens)

    @property
    def handoff(self) -> dict:
        """A prefill for a decode instance: where its blocks can be read (vLLM's field)."""
        params = self.outputs.kv_transfer_params
        return {} if params is None else {"kv_transfer_params": params}

    def usage(self) -> dict:
        outputs = self.outputs
        prompt, completion = outputs.num_prompt_tokens, outputs.num_completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": outputs.num_cached_tokens}}

    async def deltas(self) -> AsyncIterator[SampleDelta]:
        """Each sample's new tokens and text as the engine produces them, until all finish."""
        remaining = len(self.outputs.samples)
        try:
            while remaining:
                item = await self.queue.get()
                if isinstance(item, EngineDeadError):
                    raise APIError(503, str(item))
                if isinstance(item, EngineRejectedError):
                    raise APIError(400, str(item))
                delta = self.outputs.process(item)
                if delta is None:
                    continue  # a token that came after its stop string: already aborted
                self._observe(delta, item.queue_time)
                if delta.abort:
                    self.client.abort([delta.sample.engine_id])
                if delta.finish_reason is not None:
                    remaining -= 1
                yield delta
        finally:
            self.abort_unfinished()

    def _observe(self, delta: SampleDelta, queue_time: float | None) -> None:
        """The latencies as the client sees them, and the finish counters."""
        metrics, now, engine_id = self.metrics, time.monotonic(), delta.sample.engine_id
        last = self.last_token_time.get(engine_id)
        if last is None:
            metrics.ttft.observe(now - self.arrival)
        else:
            metrics.itl.observe(now - last)
        if queue_time is not None:
            metrics.queue_time.observe(queue_time)
        metrics.generation_tokens.inc()
        self.last_token_time[engine_id] = now
        if delta.finish_reason is not None:
            metrics.finished(delta.finish_reason, now - self.arrival)

    def abort_unfinished(self) -> None:
        unfinished = self.outputs.abort_unfinished()
        self.metrics.success["abort"].inc(len(unfinished))
        self.client.abort([s.engine_id for s in unfinished])

    async def run_to_end(self) -> list[Sample]:
        """Consume every delta; the samples in choice order."""
        async for _ in self.deltas():
            pass
        return list(self.outputs.samples.values())
