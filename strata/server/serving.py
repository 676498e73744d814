"""What every endpoint shares: the engine client, the tokenizer, the served names, and the
checks a request passes before it reaches the engine (model, samples, prompt length,
capacity). Every check whose cost does not grow with the request runs before any work that
does; tokenizing and templating run off the event loop."""

from __future__ import annotations

import asyncio
import uuid

import jinja2

from strata.engine.client import AsyncEngineClient, EngineInfo
from strata.engine.validation import validate_request
from strata.inputs import TokenizedPrompt
from strata.openai_errors import APIError
from strata.sampling_params import SamplingParams
from strata.server.generation import Generation
from strata.server.limits import ServerLimits
from strata.server.metrics import ServerMetrics
from strata.server.protocol import ChatMessage
from strata.server.remote_prefill import RemotePrefill
from strata.tokenizer import Tokenizer

# For base models whose tokenizer has none (like stories260K): the messages' contents,
# one per line, so a chat request continues the same text a completion would.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}\n{% endif %}"
    "{{ message['content'] }}{% endfor %}")


class OpenAIServing:
    def __init__(self, client: AsyncEngineClient, tokenizer: Tokenizer, served_names: list[str],
                 model_path: str, metrics: ServerMetrics, limits: ServerLimits,
                 remote_prefill: RemotePrefill) -> None:
        self.client, self.tokenizer, self.metrics, self.limits = client, tokenizer, metrics, limits
        self.served_names = served_names
        self.model_path = model_path
        self.info: EngineInfo = client.info
        self.remote_prefill = remote_prefill
        self.max_prompt_chars = self.info.max_model_len * tokenizer.max_token_chars

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

    def check_samples(self, num_samples: int, param: str) -> None:
        """400 for more samples (prompts x n) than one request may ask for, or than could ever
        be queued; 429 while the samples waiting to be scheduled would pass
        --max-waiting-requests. Cheap: run before any work on the request, and again as it
        is queued."""
        limits = self.limits
        if num_samples > limits.max_samples_per_request:
            raise APIError(400, f"the request asks for {num_samples} samples (prompts x n); "
                           f"the limit is {limits.max_samples_per_request}", param)
        if num_samples - self.info.max_num_seqs > limits.max_waiting_requests:
            raise APIError(400, f"the request asks for {num_samples} samples, more than this "
                           "server can run and queue at once", param)
        if self.client.num_queued(num_samples) > limits.max_waiting_requests:
            raise APIError(429, f"the server is at capacity ({self.client.num_queued()} "
                           "samples waiting); retry later",
                           headers={"Retry-After": str(limits.retry_after_seconds)})

    def check_text(self, text: str, param: str) -> None:
        """Bound a text before any work grows with it: longer than max_model_len tokens of the
        longest the vocabulary has, it cannot fit, whatever it tokenizes to."""
        if len(text) > self.max_prompt_chars:
            raise APIError(400, f"the prompt is {len(text)} characters long: it cannot fit this "
                           f"model's maximum context length of {self.info.max_model_len} "
                           f"tokens (at most {self.max_prompt_chars} characters)", param)
        try:
            text.encode()
        except UnicodeEncodeError as exc:  # JSON can carry lone surrogates; tokenizers cannot
            raise APIError(400, f"the prompt is not valid Unicode: {exc.reason}", param) from exc

    async def text_prompts(self, texts: list[str],
                           add_special_tokens: bool = True) -> list[TokenizedPrompt]:
        """Tokenized off the event loop (the tokenizer lets go of the GIL), after the bound."""
        params = ["prompt"] if len(texts) == 1 else [f"prompt[{i}]" for i in range(len(texts))]
        for text, param in zip(texts, params):
            self.check_text(text, param)

        def encode() -> list[TokenizedPrompt]:
            return [TokenizedPrompt(self.tokenizer.encode(text, add_special_tokens)
                                    if text else [], text) for text in texts]

        return await asyncio.to_thread(encode)

    async def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool,
                          template_kwargs: dict | None = None) -> TokenizedPrompt:
        """The chat template and the tokenizer, off the event loop."""
        dicts = [m.template_dict() for m in messages]
        self.check_text("".join(m["content"] for m in dicts), "messages")

        def render() -> str:
            try:
                return self.tokenizer.apply_chat_template(dicts, add_generation_prompt,
                                                          **(template_kwargs or {}))
            except (jinja2.TemplateError, TypeError, ValueError) as exc:
                raise APIError(400, f"cannot apply the chat template: {exc}",
                               "messages") from exc

        text = await asyncio.to_thread(render)
        return (await self.text_prompts(
            [text], add_special_tokens=self.tokenizer.chat_needs_bos(text)))[0]

    async def decode(self, token_ids: list[int]) -> str:
        return await asyncio.to_thread(self.tokenizer.decode, token_ids)

    def new_generation(self, prefix: str, prompts: list[TokenizedPrompt], params: SamplingParams,
                       cache_salt: str | None = None,
                       kv_transfer_params: dict | None = None) -> Generation:
        """Check every prompt and the server's capacity, then queue the samples."""
        self.check_engine()
        info = self.info
        for index, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{index}]"
            try:
                validate_request(prompt.token_ids, params, info.max_model_len, info.vocab_size)
            except ValueError as exc:
                raise APIError(400, str(exc), param) from exc
        if kv_transfer_params and (len(prompts) != 1 or params.n != 1):
            raise APIError(400, "kv_transfer_params need one prompt and n = 1",
                           "kv_transfer_params")
        self.check_samples(len(prompts) * params.n, "prompt")
        generation = Generation(f"{prefix}-{uuid.uuid4().hex}", prompts, params, self.client,
                                self.tokenizer, self.metrics, cache_salt, kv_transfer_params)
        generation.start()
        return generation
