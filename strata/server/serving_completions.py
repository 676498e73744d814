"""/v1/completions: prompts as text or token ids, n samples each, streamed or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from strata.inputs import TokenizedPrompt
from strata.openai_errors import APIError
from strata.output_processor import Sample
from strata.outputs import Logprob
from strata.server.generation import Generation
from strata.server.protocol import CompletionRequest
from strata.server.serving import OpenAIServing
from strata.server.sse import cancel_on_disconnect, event_stream, json_response


async def create_completion(serving: OpenAIServing, body: CompletionRequest,
                            request: Request) -> Response:
    model = serving.check_model(body.model)
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs (prompt logprobs) is not supported", "echo")
    try:
        params = body.sampling_params(body.max_tokens, body.logprobs)
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc
    serving.check_samples(_num_prompts(body.prompt) * params.n, "prompt")
    pd = serving.remote_prefill.check(request, body.kv_transfer_params)
    prompts = await _prompts(serving, body.prompt)
    generation = serving.new_generation(
        "cmpl", prompts, params, body.cache_salt,
        await serving.remote_prefill.kv_transfer_params(pd, model, prompts, params.n,
                                                        body.cache_salt))
    created = int(time.time())
    header = {"id": generation.request_id, "object": "text_completion", "created": created,
              "model": model}
    if body.stream:
        return event_stream(_stream(serving, generation, body, header))
    return await cancel_on_disconnect(request, _complete(serving, generation, body, header))


def _num_prompts(prompt) -> int:
    return 1 if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) \
        else len(prompt)


async def _prompts(serving: OpenAIServing, prompt) -> list[TokenizedPrompt]:
    if isinstance(prompt, str):
        return await serving.text_prompts([prompt])
    if not prompt:
        raise APIError(400, "the prompt is empty", "prompt")
    if isinstance(prompt[0], int):
        return [TokenizedPrompt(list(prompt))]
    if isinstance(prompt[0], str):
        return await serving.text_prompts(prompt)
    return [TokenizedPrompt(list(ids)) for ids in prompt]


async def _echo(serving: OpenAIServing, sample: Sample, body: CompletionRequest) -> str:
    """The prompt's text, if echoed (prompts given as ids are decoded off the event loop)."""
    if not body.echo:
        return ""
    prompt = sample.prompt
    return prompt.text if prompt.text is not None else await serving.decode(prompt.token_ids)


async def _complete(serving: OpenAIServing, generation: Generation, body: CompletionRequest,
                    header: dict) -> Response:
    choices = []
    for sample in await generation.run_to_end():
        choices.append({
            "index": sample.choice_index, "text": await _echo(serving, sample, body) + sample.text,
            "logprobs": _logprobs(sample.logprobs, sample.token_ids, 0)
            if sample.logprobs is not None else None,
            "finish_reason": sample.finish_reason, "stop_reason": sample.stop_reason}
            | ({"prompt_token_ids": sample.prompt.token_ids, "token_ids": sample.token_ids}
               if body.return_token_ids else {}))
    return json_response(header | {"choices": choices, "usage": generation.usage()}
                         | generation.handoff)


async def _stream(serving: OpenAIServing, generation: Generation, body: CompletionRequest,
                  header: dict) -> AsyncIterator[dict]:
    echoed: set[int] = set()
    offsets: dict[int, int] = {}
    unsent_ids: dict[int, list[int]] = {}  # token ids of deltas whose text was held back
    started: set[int] = set()  # choices that have sent a chunk
    async for delta in generation.deltas():
        sample = delta.sample
        text = delta.text
        if sample.choice_index not in echoed:
            echoed.add(sample.choice_index)
            text = await _echo(serving, sample, body) + text
        token_ids = unsent_ids.setdefault(sample.choice_index, [])
        token_ids.extend(delta.token_ids)
        if not text and delta.finish_reason is None and delta.logprobs is None:
            continue  # held back (a possible stop string) or half a character
        unsent_ids[sample.choice_index] = []
        logprobs = None
        if delta.logprobs is not None:
            start = offsets.get(sample.choice_index, 0)
            logprobs = _logprobs(delta.logprobs, delta.token_ids, start)
            offsets[sample.choice_index] = start + sum(
                len(t) for t in logprobs["tokens"])
        choice = {"index": sample.choice_index, "text": text, "logprobs": logprobs,
                  "finish_reason": delta.finish_reason,
                  "stop_reason": sample.stop_reason if delta.finish_reason else None}
        if body.return_token_ids:  # vLLM's: the prompt's ids once, then each chunk's new ids
            if sample.choice_index not in started:
                choice["prompt_token_ids"] = sample.prompt.token_ids
            choice["token_ids"] = token_ids
        started.add(sample.choice_index)
        yield header | {"choices": [choice]}
    if body.include_usage:
        yield header | {"choices": [], "usage": generation.usage()}


def _logprobs(entries: list[dict[int, Logprob]], token_ids: list[int], text_offset: int) -> dict:
    """The legacy completions logprobs object."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for entry, token_id in zip(entries, token_ids, strict=True):
        sampled = entry[token_id]
        tokens.append(sampled.decoded_token or "")
        token_logprobs.append(sampled.logprob)
        top.append({lp.decoded_token or "": lp.logprob for lp in entry.values()})
        offsets.append(text_offset)
        text_offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}
