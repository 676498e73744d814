"""Model layer: Hugging Face checkpoints of the Llama family, run over a paged KV cache."""
