"""What every endpoint shares: the engine client, the tokenizer, the served names, and the
checks a request passes before it reaches the engine (model, prompt length, capacity)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import httpx
import jinja2

from strata.engine.client import AsyncEngineClient, EngineInfo
from strata.engine.request import validate_request
from strata.sampling_params import SamplingParams
from strata.server.disagg import remote_prefill
from strata.server.errors import APIError
from strata.server.generation import Generation, Prompt
from strata.server.metrics import ServerMetrics
from strata.server.protocol import ChatMessage
from strata.tokenizer import Tokenizer

# For base models whose tokenizer has none (like stories260K): the messages' contents,
# one per line, so a chat request continues the same text a completion would.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}\n{% endif %}"
    "{{ message['content'] }}{% endfor %}")


@dataclass
class ServerLimits:
    max_waiting_requests: int = 1024
    retry_after_seconds: int = 1
    remote_prefill_timeout: float = 60.0  # seconds a prefiller may take before a fallback


class OpenAIServing:
    def __init__(self, client: AsyncEngineClient, tokenizer: Tokenizer, served_names: list[str],
                 model_path: str, metrics: ServerMetrics, limits: ServerLimits) -> None:
        self.client, self.tokenizer, self.metrics, self.limits = client, tokenizer, metrics, limits
        self.served_names = served_names
        self.model_path = model_path
        self.info: EngineInfo = client.info
        # Prefill calls to other instances (disaggregation); connections are kept alive.
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(limits.remote_prefill_timeout))

    async def kv_transfer_params(self, body, request, model: str, prompts: list[Prompt],
                                 n: int) -> dict | None:
        """The client's own kv_transfer_params, or a remote prefill's when the request names
        a prefiller (x-prefiller-host-port), or None."""
        if body.kv_transfer_params:
            return body.kv_transfer_params
        return await remote_prefill(self.http, request, model, prompts, n, body.cache_salt,
                                    self.metrics.kv_transfer_fallbacks.inc)

    def check_model(self, name: str | None) -> str:
        """The served name a request addresses; 404 for one this server does not serve."""
        if name is None:
            return self.served_names[0]
        if name not in self.served_names:
            raise APIError(404, f"The model `{name}` does not exist.", "model")
        return name

    def check_engine(self) -> None:
        if self.client.dead:
            raise APIError(503, "the engine process is not running")

    def text_prompt(self, text: str, add_special_tokens: bool = True) -> Prompt:
        try:
            text.encode()
        except UnicodeEncodeError as exc:  # JSON can carry lone surrogates; tokenizers cannot
            raise APIError(400, f"the prompt is not valid Unicode: {exc.reason}", "prompt") from exc
        return Prompt(self.tokenizer.encode(text, add_special_tokens) if text else [], text)

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool,
                    template_kwargs: dict | None = None) -> Prompt:
        try:
            text = self.tokenizer.apply_chat_template(
                [m.template_dict() for m in messages], add_generation_prompt,
                **(template_kwargs or {}))
        except (jinja2.TemplateError, TypeError, ValueError) as exc:
            raise APIError(400, f"cannot apply the chat template: {exc}", "messages") from exc
        return self.text_prompt(text, add_special_tokens=self.tokenizer.chat_needs_bos(text))

    def new_generation(self, prefix: str, prompts: list[Prompt], params: SamplingParams,
                       cache_salt: str | None = None,
                       kv_transfer_params: dict | None = None) -> Generation:
        """Check every prompt and the server's capacity, then queue the samples."""
        self.check_engine()
        info = self.info
        for index, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{index}]"
            if params.max_tokens is not None and \
                    len(prompt.token_ids) + params.max_tokens > info.max_model_len:
                raise APIError(
                    400, f"This model's maximum context length is {info.max_model_len} tokens. "
                    f"However, you requested {len(prompt.token_ids) + params.max_tokens} tokens "
                    f"({len(prompt.token_ids)} in the prompt, {params.max_tokens} in the "
                    "completion). Please reduce the length of the prompt or completion.", param)
            try:
                validate_request(prompt.token_ids, params, info.max_model_len, info.vocab_size)
            except ValueError as exc:
                raise APIError(400, str(exc), param) from exc
        if kv_transfer_params and (len(prompts) != 1 or params.n != 1):
            raise APIError(400, "kv_transfer_params need one prompt and n = 1",
                           "kv_transfer_params")
        self.check_capacity(len(prompts) * params.n)
        generation = Generation(f"{prefix}-{uuid.uuid4().hex}", prompts, params, self.client,
                                self.tokenizer, self.metrics, cache_salt, kv_transfer_params)
        generation.start()
        return generation

    def check_capacity(self, num_new: int) -> None:
        """429 when the requests not yet running would pass --max-waiting-requests."""
        waiting = self.client.num_waiting
        if waiting > 0 and waiting + num_new > self.limits.max_waiting_requests:
            raise APIError(429, f"the server is at capacity ({waiting} requests waiting); "
                           "retry later", headers={"Retry-After":
                                                   str(self.limits.retry_after_seconds)})
