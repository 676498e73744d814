"""The model's tokenizer, its chat template, and incremental detokenization with stop strings."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerFast

from strata.checkpoint import load_json


class Tokenizer:
    """tokenizer.json through PreTrainedTokenizerFast, whatever class tokenizer_config names.

    (TinyStories-656K names LlamaTokenizer, which would re-process leading spaces.)
    """

    def __init__(self, path: Path) -> None:
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"missing tokenizer.json in {path}")
        config = load_json(path / "tokenizer_config.json", required=False)
        special = {k: _token_text(config[k]) for k in
                   ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(k)}
        self.hf = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **special)
        self.hf.chat_template = config.get("chat_template")
        self.backend = self.hf.backend_tokenizer

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """How one token reads after other text (for logprobs): decoded alone, SentencePiece
        would drop the leading space of "▁upon", so it is decoded after an anchor token."""
        anchor, anchor_text = self._anchor
        text = self.backend.decode([anchor, token_id], skip_special_tokens=False)
        if text.startswith(anchor_text):
            return text[len(anchor_text):]
        return self.backend.decode([token_id], skip_special_tokens=False)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters of text one token stands for (its longest vocabulary entry;
        byte-level entries spell each byte, so never fewer): a longer text than max_model_len
        times this cannot fit, and need not be tokenized to know it."""
        return max(map(len, self.backend.get_vocab(with_added_tokens=True)))

    @functools.cached_property
    def _anchor(self) -> tuple[int, str]:
        token = self.encode("a", add_special_tokens=False)[-1]
        return token, self.backend.decode([token], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        if not self.hf.chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        return self.hf.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt, **kwargs)

    def chat_needs_bos(self, text: str) -> bool:
        """Whether encoding a rendered chat adds special tokens: a template that writes the
        BOS token itself must not get a second one."""
        bos = self.hf.bos_token
        return not (bos and text.startswith(bos))


def _token_text(value: str | dict) -> str:
    return value["content"] if isinstance(value, dict) else value


@dataclass
class IncrementalDetokenizer:
    """Text of one output, token by token.

    Never emits half a UTF-8 character (DecodeStream waits for the rest of a
    byte-fallback sequence), finds stop strings that span tokens, and holds back
    as much text as could still turn out to begin a stop string.
    """

    tokenizer: Tokenizer
    prompt_token_ids: list[int]
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    text: str = ""
    stop_string: str | None = None  # set once a stop string has matched
    _emitted: int = 0
    _decoded: int = 0  # characters the stream has produced, before any stop-string cut

    def __post_init__(self) -> None:
        # The prompt is context: a first output token "▁Once" decodes to " Once".
        self._ids = list(self.prompt_token_ids)
        self._stream = DecodeStream(ids=self._ids, skip_special_tokens=self.skip_special_tokens)
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def add_token(self, token_id: int) -> None:
        self._ids.append(token_id)
        try:
            piece = self._stream.step(self.tokenizer.backend, token_id)
        except Exception:  # tokenizers raises a bare Exception ("Invalid prefix ...")
            piece = self._resync()
        self._decoded += len(piece or "")
        if not piece or self.stop_string is not None:
            return
        search_from = max(0, len(self.text) - self._hold)
        self.text += piece
        found = [(at, stop) for stop in self.stop if (at := self.text.find(stop, search_from)) >= 0]
        if found:
            at, self.stop_string = min(found)
            end = at + len(self.stop_string) if self.include_stop_str_in_output else at
            self.text = self.text[:end]

    def _resync(self) -> str:
        """The stream refuses a token that changes how the text before it decodes (byte tokens
        left dangling, then a token that makes them replacement characters). Take the new text
        from a decode of the whole sequence instead, and start a fresh stream after it."""
        decode = self.tokenizer.backend.decode
        skip = self.skip_special_tokens
        full, prompt = decode(self._ids, skip_special_tokens=skip), decode(
            self._ids[:len(self.prompt_token_ids)], skip_special_tokens=skip)
        self._stream = DecodeStream(ids=self._ids, skip_special_tokens=skip)
        return full[len(prompt) + self._decoded:] if full.startswith(prompt) else ""

    def delta(self, final: bool) -> str:
        """Text not yet emitted that can no longer be cut by a stop string."""
        end = len(self.text) if final or self.stop_string else len(self.text) - self._hold
        if end <= self._emitted:
            return ""
        piece, self._emitted = self.text[self._emitted:end], end
        return piece
