"""The FastAPI app: OpenAI's endpoints, plus health, metrics, tokenize and version."""

from __future__ import annotations

import time

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

import strata
from strata.dashboard.hub import DashboardHub
from strata.dashboard.routes import dashboard_routes
from strata.openai_errors import APIError
from strata.server.errors import install_error_handlers
from strata.server.middleware import APIKeyCheck, BodySizeLimit
from strata.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from strata.server.serving import OpenAIServing
from strata.server.serving_chat import create_chat_completion
from strata.server.serving_completions import create_completion
from strata.server.sse import json_response

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def build_app(serving: OpenAIServing, api_key: str | None = None,
              max_body_bytes: int = 32 * 2**20, dashboard: DashboardHub | None = None
              ) -> FastAPI:
    app = FastAPI(title="Strata", version=strata.__version__,
                  description="OpenAI-compatible LLM serving")
    app.state.serving = serving
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(APIKeyCheck, api_key=api_key)
    started = int(time.time())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(serving, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(serving, body, request)

    @app.get("/v1/models")
    async def models() -> Response:
        return json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": started, "owned_by": "strata",
             "root": serving.model_path, "max_model_len": serving.info.max_model_len}
            for name in serving.served_names]})

    @app.get("/health")
    async def health() -> Response:
        serving.check_engine()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        names = request.query_params.getlist("name[]")
        return Response(serving.metrics.exposition(names), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/version")
    async def version() -> Response:
        return json_response({"version": strata.__version__})

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Response:
        serving.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages")
        if body.messages is not None:
            if not body.messages:
                raise APIError(400, "messages is empty", "messages")
            prompt = await serving.chat_prompt(body.messages, body.add_generation_prompt)
        else:
            [prompt] = await serving.text_prompts([body.prompt], body.add_special_tokens)
        return json_response({"count": len(prompt.token_ids), "tokens": prompt.token_ids,
                              "max_model_len": serving.info.max_model_len})

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Response:
        serving.check_model(body.model)
        info = serving.info
        if len(body.tokens) > info.max_model_len:
            raise APIError(400, f"at most max_model_len ({info.max_model_len}) tokens at once",
                           "tokens")
        if any(t >= info.vocab_size for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {info.vocab_size})", "tokens")
        return json_response({"prompt": await serving.decode(body.tokens)})

    if dashboard is not None:
        app.router.routes.extend(dashboard_routes(dashboard))
    return app
