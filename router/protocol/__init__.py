"""The OpenAI wire models, grouped by endpoint (as vLLM's entrypoints do)."""
