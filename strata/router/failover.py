"""Which streamed requests the proxy can resume on another endpoint when theirs dies
mid-answer, and what it sends to resume one: a /v1/completions request whose prompt is the
original prompt's token ids plus the output's ids up to a resume point (see
stream_ledger.py), with the tokens left to generate and the client's sampling fields."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from strata.router.stream_ledger import ResumePoint

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the server's when a completion names none
# The client's fields a continuation keeps: those that shape sampling from here on
# (Strata's SamplingFields). The prompt's own fields (messages, echo, chat template) are
# spent: the prompt travels as ids.
SAMPLING_FIELDS = ("model", "temperature", "top_p", "top_k", "min_p", "seed",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "stop",
                   "stop_token_ids", "ignore_eos", "include_stop_str_in_output",
                   "skip_special_tokens", "user", "cache_salt")


class NotResumable(Exception):
    """A streamed request that a dead endpoint's failure ends, as before failover."""


@dataclass
class ResumableRequest:
    """A streamed request with one choice and no logprobs: its text can be continued."""

    data: dict  # the client's body
    chat: bool
    wants_ids: bool  # the client asked for the token ids itself: they are not stripped
    include_usage: bool
    max_tokens: int | None  # None: up to the model's context
    min_tokens: int
    hold: int  # characters the server holds back while a stop string could still match

    @classmethod
    def of(cls, path: str, data: dict) -> ResumableRequest:
        """Raises NotResumable, saying why, for a request failover cannot continue."""
        if path not in (COMPLETIONS, CHAT):
            raise NotResumable(f"{path} is not a completion")
        chat = path == CHAT
        if data.get("n") not in (None, 1):
            raise NotResumable("n > 1: several choices")
        if chat and data.get("logprobs"):
            raise NotResumable("logprobs: a continuation's would not join the stream's")
        if not chat:
            if _num_prompts(data.get("prompt")) != 1:
                raise NotResumable("a batch of prompts: several choices")
            if data.get("echo"):
                raise NotResumable("echo: the stream's text starts with the prompt's")
            if data.get("logprobs") is not None:
                raise NotResumable("logprobs: a continuation's would not join the stream's")
        stop = data.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
        options = data.get("stream_options")
        if chat:
            max_tokens = data.get("max_completion_tokens") or data.get("max_tokens")
        else:
            max_tokens = data.get("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
        min_tokens = data.get("min_tokens") or 0
        if not isinstance(max_tokens, int | None) or not isinstance(min_tokens, int):
            raise NotResumable("max_tokens or min_tokens is not an integer")
        return cls(data, chat, data.get("return_token_ids") is True,
                   isinstance(options, dict) and options.get("include_usage") is True,
                   max_tokens, min_tokens,
                   # the server's hold: the longest stop string but one character
                   max((len(s) for s in stops if isinstance(s, str) and s), default=1) - 1)

    def upstream_body(self) -> bytes:
        """The client's body, asking for the token ids a continuation is built from."""
        return orjson.dumps(self.data | {"return_token_ids": True})

    def continuation_body(self, prompt_ids: list[int], output_ids: list[int],
                          start: ResumePoint) -> bytes:
        """A /v1/completions request that goes on from start: the prompt's ids and the
        output's first start.num_ids ids as its prompt, what is left of max_tokens and
        min_tokens, the same sampling; it streams ids (for a second failover) and usage
        when the client wants it."""
        done = start.num_ids
        body = {name: self.data[name] for name in SAMPLING_FIELDS if name in self.data}
        return orjson.dumps(body | {
            "prompt": prompt_ids + output_ids[:done],
            "max_tokens": None if self.max_tokens is None else self.max_tokens - done,
            "min_tokens": max(0, self.min_tokens - done),
            "stream": True, "stream_options": {"include_usage": self.include_usage},
            "return_token_ids": True})


def _num_prompts(prompt: object) -> int:
    """As the server counts them: a string or a list of ids is one prompt."""
    if isinstance(prompt, str) or not isinstance(prompt, list) or not prompt:
        return 1
    return 1 if isinstance(prompt[0], int) else len(prompt)
