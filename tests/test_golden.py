"""Greedy ids of the shared trained models equal golden_greedy.json (llama2.c / transformers)."""


import pytest
import torch

from strata import LLM, SamplingParams
from tests.conftest import GOLDEN, SHARED_MODELS, record_logits


@pytest.mark.parametrize("name", ["stories260K", "TinyStories-656K"])
def test_greedy_ids_match_golden(name):
    golden = GOLDEN[name]
    llm = LLM(str(SHARED_MODELS / name))
    prompt_len = len(golden["prompt_ids"])
    max_tokens = len(golden["greedy_ids_48"]) - prompt_len
    logits = record_logits(llm)

    out = llm.generate(golden["prompt"], SamplingParams(temperature=0, max_tokens=max_tokens,
                                                        ignore_eos=True), use_tqdm=False)[0]

    assert out.prompt_token_ids == golden["prompt_ids"]
    assert out.outputs[0].token_ids == golden["greedy_ids_48"][prompt_len:]
    # golden text is the decode of prompt + output
    assert golden["prompt"] + out.outputs[0].text == golden["text"]
    # top-5 logits at the prompt's last position (first sampling step), as transformers gave
    values, ids = torch.topk(logits[0][0], 5)
    assert ids.tolist() == [i for i, _ in golden["last_logits_top5"]]
    assert values.tolist() == pytest.approx([v for _, v in golden["last_logits_top5"]], abs=1e-4)
