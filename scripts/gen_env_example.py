"""Writes .env.example from the settings classes, so it always lists every field.

    python scripts/gen_env_example.py > .env.example
"""

from __future__ import annotations

import sys

from router.settings import RouterSettings
from tandem.cmd_serve import ServeSettings
from worker.settings import WorkerSettings

SECTIONS = [
    ("Shared by every process", None),
    ("tandem serve", ServeSettings),
    ("Router (tandem router)", RouterSettings),
    ("Workers (tandem prefill / tandem decode)", WorkerSettings),
]


def render() -> str:
    lines = ["# Every tandem setting, as TANDEM_<FIELD>. Flags: --<field-with-dashes>.",
             "# Precedence: CLI flag > environment > .env > default.", ""]
    seen: set[str] = set()
    for title, cls in SECTIONS[1:]:
        lines.append(f"# --- {title}")
        for name, field in cls.model_fields.items():
            if name in seen:
                continue
            seen.add(name)
            if field.description:
                lines.append(f"# {field.description}")
            default = field.default
            value = "" if default is None else default
            if isinstance(value, list):
                value = ",".join(map(str, value))
            lines.append(f"# TANDEM_{name.upper()}={value}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
