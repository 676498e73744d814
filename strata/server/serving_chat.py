"""/v1/chat/completions: messages through the chat template, then generation as usual."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from strata.openai_errors import APIError
from strata.outputs import Logprob
from strata.server.generation import Generation
from strata.server.protocol import ChatCompletionRequest
from strata.server.serving import OpenAIServing
from strata.server.sse import cancel_on_disconnect, event_stream, json_response


async def create_chat_completion(serving: OpenAIServing, body: ChatCompletionRequest,
                                 request: Request) -> Response:
    model = serving.check_model(body.model)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    try:
        params = body.sampling_params(body.max_completion_tokens or body.max_tokens, logprobs)
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc
    serving.check_samples(params.n, "n")
    pd = serving.remote_prefill.check(request, body.kv_transfer_params)
    prompt = await serving.chat_prompt(body.messages, body.add_generation_prompt,
                                       body.chat_template_kwargs)
    generation = serving.new_generation(
        "chatcmpl", [prompt], params, body.cache_salt,
        await serving.remote_prefill.kv_transfer_params(pd, model, [prompt], params.n,
                                                        body.cache_salt))
    header = {"id": generation.request_id, "object": "chat.completion",
              "created": int(time.time()), "model": model}
    if body.stream:
        return event_stream(_stream(generation, body, prompt.token_ids, header | {
            "object": "chat.completion.chunk"}))
    return await cancel_on_disconnect(request, _complete(generation, body, prompt.token_ids,
                                                         header))


async def _complete(generation: Generation, body: ChatCompletionRequest, prompt_ids: list[int],
                    header: dict) -> Response:
    choices = []
    for sample in await generation.run_to_end():
        choices.append({
            "index": sample.choice_index,
            "message": {"role": "assistant", "content": sample.text},
            "logprobs": _logprobs(sample.logprobs, sample.token_ids, sample.params.logprobs)
            if sample.logprobs is not None else None,
            "finish_reason": sample.finish_reason, "stop_reason": sample.stop_reason}
            | ({"token_ids": sample.token_ids} if body.return_token_ids else {}))
    # vLLM's return_token_ids in chat: the prompt's ids beside the choices, each choice's own
    prompt = {"prompt_token_ids": prompt_ids} if body.return_token_ids else {}
    return json_response(header | {"choices": choices, "usage": generation.usage()} | prompt
                         | generation.handoff)


async def _stream(generation: Generation, body: ChatCompletionRequest, prompt_ids: list[int],
                  header: dict) -> AsyncIterator[dict]:
    # The first chunk of each choice names the role, as OpenAI's stream does; with
    # return_token_ids the first of all carries the prompt's ids, as vLLM's does.
    for index in range(len(generation.outputs.samples)):
        yield header | {"choices": [{"index": index, "delta": {"role": "assistant",
                                                               "content": ""},
                                     "logprobs": None, "finish_reason": None}]} | (
            {"prompt_token_ids": prompt_ids} if body.return_token_ids and index == 0 else {})
    unsent_ids: dict[int, list[int]] = {}  # token ids of deltas whose text was held back
    async for delta in generation.deltas():
        sample = delta.sample
        token_ids = unsent_ids.setdefault(sample.choice_index, [])
        token_ids.extend(delta.token_ids)
        if not delta.text and delta.finish_reason is None and delta.logprobs is None:
            continue
        unsent_ids[sample.choice_index] = []
        choice = {
            "index": sample.choice_index,
            "delta": {"content": delta.text} if delta.text else {},
            "logprobs": _logprobs(delta.logprobs, delta.token_ids, sample.params.logprobs)
            if delta.logprobs is not None else None,
            "finish_reason": delta.finish_reason,
            "stop_reason": sample.stop_reason if delta.finish_reason else None}
        if body.return_token_ids:
            choice["token_ids"] = token_ids
        yield header | {"choices": [choice]}
    if body.include_usage:
        yield header | {"choices": [], "usage": generation.usage()}


def _logprobs(entries: list[dict[int, Logprob]], token_ids: list[int], top_n: int) -> dict:
    """Chat's logprobs object: per token, the sampled one and the top-N (ranks 1..N)."""
    def item(lp: Logprob) -> dict:
        token = lp.decoded_token or ""
        return {"token": token, "logprob": lp.logprob, "bytes": list(token.encode())}

    content = []
    for entry, token_id in zip(entries, token_ids, strict=True):
        # The entry holds the top-N plus the sampled token, which may rank below them.
        top = sorted((lp for lp in entry.values() if lp.rank <= top_n), key=lambda lp: lp.rank)
        content.append(item(entry[token_id]) | {"top_logprobs": [item(lp) for lp in top]})
    return {"content": content}
