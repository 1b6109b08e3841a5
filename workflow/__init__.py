"""DAGs of prompts (workflow/dag.py) and the order they run in (workflow/schedule.py).

Pure Python: the router, the in-process LLM and the HTTP client share it.
"""
