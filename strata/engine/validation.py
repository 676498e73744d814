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
    # vLLM's wording, offline and online alike: both numbers, and which to reduce.
    num_prompt, max_tokens = len(prompt_token_ids), params.max_tokens
    if max_tokens is not None and num_prompt + max_tokens > max_model_len:
        raise ValueError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt + max_tokens} tokens ({num_prompt} in the prompt, "
            f"{max_tokens} in the completion). Please reduce the length of the prompt or "
            "completion.")
    if num_prompt >= max_model_len:  # no max_tokens: it may run to max_model_len, if it can
        raise ValueError(
            f"This model's maximum context length is {max_model_len} tokens. However, the "
            f"prompt has {num_prompt} tokens, which leaves no room to generate. Please reduce "
            "the length of the prompt.")
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
