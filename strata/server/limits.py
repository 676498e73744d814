"""What one server takes on: its waiting queue, samples per request and body size. Apart
from the serving code so that `strata serve` reads its flags without importing the
tokenizer's libraries (seconds, which the engine's start need not wait for)."""

from __future__ import annotations

from dataclasses import dataclass

BYTES_PER_TOKEN_ID = 8  # a token id in JSON: up to 6 digits, a comma and a space
MIN_BODY_BYTES, MAX_BODY_BYTES = 1 << 20, 32 << 20


@dataclass
class ServerLimits:
    max_waiting_requests: int = 1024  # samples waiting to be scheduled
    max_samples_per_request: int = 256  # prompts x n
    max_request_body_bytes: int | None = None  # None: as much as the largest request needs
    retry_after_seconds: int = 1

    def body_bytes(self, max_model_len: int) -> int:
        """The body limit: by default, room for a list of --max-samples-per-request prompts
        of max_model_len token ids (1-32 MiB). A larger body cannot be a request this server
        would take, and refusing it by its Content-Length spares the event loop buffering and
        parsing it, which no thread can take off it (JSON parsers hold the GIL)."""
        if self.max_request_body_bytes is not None:
            return self.max_request_body_bytes
        need = self.max_samples_per_request * max_model_len * BYTES_PER_TOKEN_ID
        return min(MAX_BODY_BYTES, max(MIN_BODY_BYTES, need))
