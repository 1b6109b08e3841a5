"""`tandem models`: list the model registry."""

from __future__ import annotations

import argparse

from engine.registry import load_registry


def register(sub) -> None:
    p = sub.add_parser("models", help="list the model registry")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for spec in load_registry().values():
        extra = f" ({spec.gguf_file})" if spec.gguf_file else ""
        print(f"{spec.name}\t{spec.kind}\t{spec.location}{extra}")
    return 0
