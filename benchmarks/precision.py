"""What each lower precision costs in agreement: greedy outputs and first-step logits of
every setting against float32, per model.

    python benchmarks/precision.py [--model DIR ...] [--tokens 64]

Default models: the two trained ones in ../shared/models (stories260K, whose head is its
embedding, and TinyStories-656K), whose golden prompt and fifteen more story openings are
the prompts. For each setting: the share of prompts whose whole greedy output equals
float32's, the mean share of tokens generated before the first difference, and the
largest difference in the first step's logits (the prompt's last position) over all
prompts, against float32's and as a share of their largest magnitude.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from harness import machine, markdown_table

from strata import LLM, SamplingParams

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
OPENINGS = ["Tom and Sue went to the park.", "The little cat was sad because",
            "One day, a big dog", "Lily had a red ball. She", "There was a tiny bird who",
            "Mom said, \"Let's go", "Ben wanted to play with", "The sun was hot, so",
            "A boy named Tim found a box.", "Sam and his friend", "The old tree in the garden",
            "Once there was a happy frog.", "Anna liked to draw", "It was raining and",
            "The toy car was broken."]
SETTINGS = {
    "float32": {},
    "kv float16": {"kv_cache_dtype": "float16"},
    "kv bfloat16": {"kv_cache_dtype": "bfloat16"},
    "int8": {"quantization": "int8"},
    "int8, kv float16": {"quantization": "int8", "kv_cache_dtype": "float16"},
    "bfloat16, kv float32": {"dtype": "bfloat16", "kv_cache_dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
}


def run(model: Path, prompts: list[str], tokens: int, settings: dict
        ) -> tuple[list[list[int]], list]:
    """Greedy ids of every prompt, and the first step's logits of each."""
    llm = LLM(str(model), **settings)
    logits = []
    original = llm.engine.runner.model.compute_logits

    def keep_first(hidden):
        out = original(hidden)
        if len(logits) < len(prompts):
            logits.append(out[0].float().clone())
        return out

    ids = []
    llm.engine.runner.model.compute_logits = keep_first
    for prompt in prompts:  # one at a time: each first step is that prompt's alone
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=tokens,
                                                  ignore_eos=True), use_tqdm=False)[0]
        ids.append(out.outputs[0].token_ids)
    return ids, logits


def agreement(ids: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    same = sum(a == b for a, b in zip(ids, reference)) / len(ids)
    prefix = []
    for a, b in zip(ids, reference):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
        prefix.append(n / len(b))
    return same, statistics.mean(prefix)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, nargs="+",
                        default=[SHARED / "stories260K", SHARED / "TinyStories-656K"])
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    golden = json.loads((SHARED / "golden_greedy.json").read_text())
    rows = []
    for model in args.model:
        prompts = [golden[model.name]["prompt"]] if model.name in golden else []
        prompts += OPENINGS
        reference_ids, reference_logits = run(model, prompts, args.tokens, {})
        for name, settings in SETTINGS.items():
            ids, logits = (reference_ids, reference_logits) if not settings else \
                run(model, prompts, args.tokens, settings)
            same, prefix = agreement(ids, reference_ids)
            error = max((a - b).abs().max().item() for a, b in zip(logits, reference_logits))
            scale = max(b.abs().max().item() for b in reference_logits)
            rows.append([model.name, name, f"{same:.0%}", f"{prefix:.1%}", f"{error:.2e}",
                         f"{error / scale:.2e}"])
            print(f"{model.name} {name}: {same:.0%} identical", file=sys.stderr, flush=True)
    print(f"{machine()}; {len(OPENINGS) + 1} prompts, {args.tokens} greedy tokens each\n")
    print(markdown_table(["model", "setting", "outputs identical to float32",
                          "tokens before the first difference", "first-step logits: max error",
                          "relative to their max"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
