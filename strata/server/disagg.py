"""The decode side of disaggregation in the frontend: a request with the header
`x-prefiller-host-port` has its prompt computed by that prefiller, as llm-d's and vLLM's
P/D proxies do it. The prefiller answers a one-token completion with the
`kv_transfer_params` naming its blocks; the engine here reads them and decodes. Any
failure on the way (refused, timed out, not a Strata with a connector) is counted and the
prompt is computed here instead: slower, never lost."""

from __future__ import annotations

import logging

import httpx
from starlette.requests import Request

from strata.http_headers import PREFILLER_HEADER
from strata.server.generation import Prompt

logger = logging.getLogger("strata.server")


async def remote_prefill(http: httpx.AsyncClient, request: Request, model: str,
                         prompts: list[Prompt], n: int, cache_salt: str | None,
                         on_fallback) -> dict | None:
    """kv_transfer_params from the prefiller the header names, or None to prefill here."""
    prefiller = request.headers.get(PREFILLER_HEADER)
    if not prefiller:
        return None
    if len(prompts) != 1 or n != 1:
        logger.info("one prompt and n = 1 only are prefilled remotely: prefilling here")
        return None
    body = {"model": model, "prompt": prompts[0].token_ids, "max_tokens": 1,
            "temperature": 0, "kv_transfer_params": {"do_remote_decode": True}}
    if cache_salt is not None:
        body["cache_salt"] = cache_salt
    try:
        response = await http.post(f"http://{prefiller}/v1/completions", json=body)
        response.raise_for_status()
        params = response.json()["kv_transfer_params"]
        if not isinstance(params, dict) or not params.get("do_remote_prefill"):
            raise ValueError(f"no remote prefill in its answer: {params!r}")
        return params
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        logger.warning("prefiller %s failed (%s: %s): prefilling here", prefiller,
                       type(exc).__name__, exc)
        on_fallback()
        return None
