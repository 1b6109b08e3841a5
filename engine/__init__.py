"""Model loading, KV layout, batched execution and sampling. No HTTP, no Redis."""
