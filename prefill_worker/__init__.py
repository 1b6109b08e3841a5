"""Prefill service: computes prompt KV into the store and samples the first token."""
