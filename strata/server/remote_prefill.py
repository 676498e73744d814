"""The frontend's side of disaggregation: which P/D fields a request may carry, and the
decode side's call to a prefiller.

A request with the header `x-prefiller-host-port` has its prompt computed by that
prefiller, as llm-d's and vLLM's P/D proxies do it: the prefiller answers a one-token
completion with the `kv_transfer_params` naming its blocks, and the engine here reads them
and decodes. Any failure on the way (refused, timed out, not a Strata with a connector, an
answer naming a host that is not a peer) is counted and the prompt is computed here
instead: slower, never lost. Who may send P/D fields, and which hosts they may name, is
`KVPeers`' to say; this module asks it before anything leaves the server.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx
from starlette.requests import Request

from strata.http_headers import KV_PEER_TOKEN_HEADER, PREFILLER_HEADER
from strata.inputs import TokenizedPrompt
from strata.openai_errors import APIError
from strata.server.kv_peers import KVPeers

logger = logging.getLogger("strata.server")


@dataclass
class PDRequest:
    """A request's P/D fields once checked: the client's own kv_transfer_params, or a
    prefiller to ask for them."""

    kv_transfer_params: dict | None = None
    prefiller: str | None = None


class RemotePrefill:
    def __init__(self, peers: KVPeers, has_connector: bool, transfer_timeout: float,
                 api_key: str | None, on_fallback) -> None:
        self.peers, self.has_connector = peers, has_connector
        self.transfer_timeout = transfer_timeout
        self.on_fallback = on_fallback
        # What a prefiller of the same deployment asks of its callers.
        self.headers = {KV_PEER_TOKEN_HEADER: peers.token} if peers.token else {}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self.http = httpx.AsyncClient(timeout=transfer_timeout, follow_redirects=False)

    def check(self, request: Request, kv_transfer_params: dict | None) -> PDRequest:
        """The request's P/D fields, refused (400/403) unless it may send them. Runs before
        any work on the request, so a refused one costs nothing."""
        prefiller = request.headers.get(PREFILLER_HEADER)
        if prefiller is None and not kv_transfer_params:
            return PDRequest()
        if not self.has_connector:
            raise APIError(400, "P/D fields (x-prefiller-host-port, kv_transfer_params) need "
                                "a server started with --kv-connector", "kv_transfer_params")
        self.peers.check_configured()
        self.peers.check_caller(request.headers.get(KV_PEER_TOKEN_HEADER))
        if kv_transfer_params:  # the caller's own (it wins over a prefiller header)
            try:
                self.peers.check_remote(kv_transfer_params)
            except ValueError as exc:
                raise APIError(400, f"kv_transfer_params: {exc}", "kv_transfer_params") from None
            return PDRequest(kv_transfer_params=kv_transfer_params)
        return PDRequest(prefiller=self.peers.prefiller(prefiller))

    async def kv_transfer_params(self, pd: PDRequest, model: str, prompts: list[TokenizedPrompt],
                                 n: int, cache_salt: str | None) -> dict | None:
        """What the engine gets: the caller's params, a prefiller's answer, or None."""
        if pd.prefiller is None:
            return pd.kv_transfer_params
        if len(prompts) != 1 or n != 1:
            logger.info("one prompt and n = 1 only are prefilled remotely: prefilling here")
            return None
        body = {"model": model, "prompt": prompts[0].token_ids, "max_tokens": 1,
                "temperature": 0, "kv_transfer_params": {"do_remote_decode": True}}
        if cache_salt is not None:
            body["cache_salt"] = cache_salt
        try:
            # One deadline for the whole exchange: a prefiller that accepts the connection and
            # then stops costs --kv-transfer-timeout, not more.
            async with asyncio.timeout(self.transfer_timeout):
                response = await self.http.post(f"http://{pd.prefiller}/v1/completions",
                                                json=body, headers=self.headers)
            response.raise_for_status()
            params = response.json()["kv_transfer_params"]
            if not isinstance(params, dict) or not params.get("do_remote_prefill"):
                raise ValueError(f"no remote prefill in its answer: {params!r}")
            self.peers.check_remote(params)
            return params
        # Any failure falls back, the transport's own bugs too: httpcore was seen raising
        # AttributeError (a socket gone mid-connect) when a prefiller was killed.
        except Exception as exc:
            logger.warning("prefiller %s failed (%s: %s): prefilling here", pd.prefiller,
                           type(exc).__name__, exc)
            self.on_fallback()
            return None
