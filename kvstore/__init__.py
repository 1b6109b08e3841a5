"""Tiered, content-addressed KV block store (memory, disk, Redis). No HTTP."""
