"""A prompt as the engine takes it: token ids, and the text they came from when there was one.

The one prompt type of the offline LLM and the HTTP server (the router's own, for picking
an endpoint, is `strata.router.prompt.Prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenizedPrompt:
    token_ids: list[int]
    text: str | None = None  # None when given as token ids (decoded only if echoed)
