"""The public OpenAI-compatible HTTP service."""
