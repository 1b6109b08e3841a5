"""Logging setup: readable lines on stderr, tagged with the process role."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "info", role: str = "tandem") -> None:
    fmt = f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)
