"""tandem: the command line, the plumbing shared by its services, and the Python API.

    from tandem import LLM, SamplingParams, DAG, Client

`LLM` runs prompts and DAGs in process on the engine (tandem/llm.py); `Client` runs the same
over HTTP against `tandem serve` (tandem/client.py). They load lazily, so `import tandem` (and
every service process, which imports tandem.cli) does not pay for torch until it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "tandem.llm",
    "RequestOutput": "tandem.llm",
    "NodeFailed": "tandem.llm",
    "Client": "tandem.client",
    "SamplingParams": "engine.sampling_params",
    "Guide": "engine.sampling_params",
    "DAG": "workflow.dag",
    "DAGError": "workflow.dag",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tandem' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
