"""Where prompt tokens come from: a real tokenizer (exact lengths) or a word list (approximate)."""

from __future__ import annotations

import random
import re
from pathlib import Path

from tokenizers import Tokenizer

# Short common words: most tokenizers give each one token (with its leading space).
WORDS = ("the", "a", "and", "to", "of", "in", "is", "it", "was", "he", "she", "they", "we", "you",
         "that", "on", "for", "with", "as", "at", "by", "this", "from", "but", "not", "or", "have",
         "had", "one", "all", "when", "there", "so", "up", "out", "if", "about", "who", "get",
         "which", "go", "me", "make", "can", "like", "time", "no", "just", "him", "know", "take",
         "people", "into", "year", "your", "good", "some", "could", "them", "see", "other", "than",
         "then", "now", "look", "only", "come", "its", "over", "think", "also", "back", "after",
         "use", "two", "how", "our", "work", "first", "well", "way", "even", "new", "want",
         "because", "any", "these", "give", "day", "most", "us")

_ANCHOR = "\n"  # merges with what follows in hardly any tokenizer
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class WordTokens:
    """No tokenizer: prompts of random words, one word counted as one token."""

    def text(self, rng: random.Random, n: int) -> str:
        return " ".join(rng.choices(WORDS, k=n))

    def count(self, text: str) -> int:
        return len(text.split())


class HFTokens:
    """A tokenizer.json (Hugging Face `tokenizers`, no transformers): exact prompt lengths."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        self.tokenizer = Tokenizer.from_file(str(file))
        special = set(self.tokenizer.get_added_tokens_decoder())
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        # Byte-fallback pieces (<0x41>) decode to stray bytes and invalid UTF-8: leave them out.
        self.candidates = sorted(i for piece, i in vocab.items()
                                 if i not in special and not _BYTE_TOKEN.fullmatch(piece))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of text that continues a sequence: encoded after an anchor, which keeps
        tokenizers that prepend a space marker (sentencepiece's "▁") from adding one here."""
        anchor = self.encode(_ANCHOR)
        ids = self.encode(_ANCHOR + text)
        return ids[len(anchor):] if ids[:len(anchor)] == anchor else self.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def ids(self, rng: random.Random, n: int) -> list[int]:
        return rng.choices(self.candidates, k=n)

    def text(self, rng: random.Random, n: int) -> str:
        """Random ids decoded to text, re-encoded and trimmed or topped up until the text is
        n tokens (as vLLM does): merges across piece boundaries change the count."""
        ids = self.ids(rng, n)
        for _ in range(10):
            text = self.decode(ids)
            ids = self.encode(text)
            if len(ids) == n:
                return text
            ids = ids[:n] if len(ids) > n else ids + self.ids(rng, n - len(ids))
        return self.decode(ids)  # rarely reached; then within a token or two of n


def load_tokens(tokenizer: str | None) -> WordTokens | HFTokens:
    return HFTokens(tokenizer) if tokenizer else WordTokens()
