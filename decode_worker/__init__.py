"""Decode service: continuous batching over KV loaded from the store, streaming tokens."""
