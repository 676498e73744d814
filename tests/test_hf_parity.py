"""Random-weight checkpoints of each architecture: greedy ids and logits equal transformers'."""

import torch

from strata import LLM, SamplingParams
from tests.conftest import record_logits, transformers_greedy

PROMPTS = [[1, 5, 77, 300, 12, 9], [1] + list(range(20, 60)), [1, 400]]
NEW_TOKENS = 24


def test_greedy_ids_and_logits_match_transformers(tiny_checkpoint):
    arch, path = tiny_checkpoint
    llm = LLM(str(path), skip_tokenizer_init=True)
    logits = record_logits(llm)
    for prompt in PROMPTS:
        logits.clear()
        expected_ids, expected_last_logits = transformers_greedy(path, prompt, NEW_TOKENS)
        out = llm.generate({"prompt_token_ids": prompt},
                           SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                           use_tqdm=False)[0]
        assert out.outputs[0].token_ids == expected_ids, arch
        assert torch.allclose(logits[-1][0], expected_last_logits, atol=1e-4, rtol=0), arch
