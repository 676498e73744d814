"""The checks every request passes before it is queued, torch-free so the HTTP frontend
runs them too."""

from __future__ import annotations

from strata.sampling_params import SamplingParams


def validate_request(prompt_token_ids: list[int], params: SamplingParams, max_model_len: int,
                     vocab_size: int) -> None:
    """Raise ValueError, with the reason, for a request the engine cannot serve.

    The engine checks every request it is given; the HTTP frontend runs the same
    checks first, so that a bad request gets a 400 before it crosses the socket.
    """
    params.validate()  # again: the params may have been changed since they were made
    if not prompt_token_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_token_ids) >= max_model_len:
        raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens, which leaves no "
                         f"room to generate within max_model_len {max_model_len}")
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
