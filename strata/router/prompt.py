"""What the router reads from a request body: the model (body-based routing) and the
prompt's blocks, for the prefix scorers and the P/D threshold.

With the model's tokenizer (`strata route --tokenizer`), a prompt becomes the token ids
the engine will see, chat template included, and its blocks get the engine's own chained
ids: they equal the ids in the endpoints' KV events (precise mode). Without one, text is cut
into blocks of characters (approximate mode only), and its token count is estimated."""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
import orjson

from strata.block_hash import prompt_block_ids
from strata.openai_errors import error_body
from strata.tokenizer import Tokenizer

CHARS_PER_BLOCK = 64  # about one 16-token KV block of English text
CHARS_PER_TOKEN = 4


class RouteError(Exception):
    """A request the router answers itself, in the OpenAI error shape."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param)


@dataclass
class PromptBlocks:
    """What routing needs of a request: its model, and its prompt as KV block ids."""

    model: str
    block_ids: list[int]
    num_tokens: int  # exact from token ids, estimated from characters without a tokenizer
    exact: bool  # block ids are the engine's (token ids), not blocks of characters


def parse_body(body: bytes) -> dict:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RouteError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RouteError(400, "the body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise RouteError(400, "the body names no model: `model` is required", "model")
    return data


def read_prompt(data: dict, tokenizer: Tokenizer | None, block_size: int, seed: int = 0
                ) -> PromptBlocks:
    """The first prompt of a completion, or a chat's messages, as blocks."""
    salt = data.get("cache_salt") if isinstance(data.get("cache_salt"), str) else None
    tokens = _token_ids(data, tokenizer)
    if tokens is not None:
        return PromptBlocks(data["model"], prompt_block_ids(tokens, block_size, seed, salt),
                      len(tokens), exact=True)
    text = _text(data)
    chars = [ord(c) for c in text]
    return PromptBlocks(data["model"], prompt_block_ids(chars, CHARS_PER_BLOCK, seed, salt),
                  len(text) // CHARS_PER_TOKEN, exact=False)


def _first_prompt(data: dict) -> str | list[int] | None:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch: the first prompt stands for it
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return prompt
    return None


def _messages(data: dict) -> list[dict]:
    messages = data.get("messages")
    if not isinstance(messages, list):
        return []
    rendered = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):  # parts: their texts, as the server joins them
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        rendered.append({"role": str(message.get("role", "")),
                         "content": content if isinstance(content, str) else ""})
    return rendered


def _token_ids(data: dict, tokenizer: Tokenizer | None) -> list[int] | None:
    prompt = _first_prompt(data)
    if isinstance(prompt, list):
        return prompt
    if tokenizer is None:
        return None
    try:
        if isinstance(prompt, str):
            return tokenizer.encode(prompt) if prompt else []
        messages = _messages(data)
        if not messages:
            return None
        kwargs = data.get("chat_template_kwargs")
        text = tokenizer.apply_chat_template(
            messages, data.get("add_generation_prompt", True) is not False,
            **(kwargs if isinstance(kwargs, dict) else {}))
        return tokenizer.encode(text, tokenizer.chat_needs_bos(text))
    except (jinja2.TemplateError, TypeError, ValueError, UnicodeEncodeError):
        return None  # the endpoint will answer the error; the router just routes it


def _text(data: dict) -> str:
    prompt = _first_prompt(data)
    if isinstance(prompt, str):
        return prompt
    return "".join(f"<|{m['role']}|>{m['content']}" for m in _messages(data))
