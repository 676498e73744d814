"""Random-weight checkpoints of each architecture: greedy ids and logits equal transformers'."""

import torch
import transformers

from strata import LLM, SamplingParams
from tests.conftest import record_logits

PROMPTS = [[1, 5, 77, 300, 12, 9], [1] + list(range(20, 60)), [1, 400]]
NEW_TOKENS = 24


def _transformers_reference(path, prompt):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), out.logits[-1][0]


def test_greedy_ids_and_logits_match_transformers(tiny_checkpoint):
    arch, path = tiny_checkpoint
    llm = LLM(str(path), skip_tokenizer_init=True)
    logits = record_logits(llm)
    for prompt in PROMPTS:
        logits.clear()
        expected_ids, expected_last_logits = _transformers_reference(path, prompt)
        out = llm.generate({"prompt_token_ids": prompt},
                           SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                           use_tqdm=False)[0]
        assert out.outputs[0].token_ids == expected_ids, arch
        assert torch.allclose(logits[-1][0], expected_last_logits, atol=1e-4, rtol=0), arch
