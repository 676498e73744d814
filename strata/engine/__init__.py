"""Engine layer: scheduler, paged KV cache, model runner; knows no HTTP."""
