"""Writes .env.example from the settings classes, so it always lists every field.

    python scripts/gen_env_example.py > .env.example

The file is the same on every machine: a default under the home directory is written `~/...`
(the disk tier expands it), and a secret is always written empty, so uncommenting a line never
sets a guessable key or token.
"""

from __future__ import annotations

import sys
from pathlib import Path

from router.settings import RouterSettings
from tandem.cmd_serve import ServeSettings
from worker.settings import WorkerSettings

SECTIONS = [
    ("Shared by every process", None),
    ("tandem serve", ServeSettings),
    ("Router (tandem router)", RouterSettings),
    ("Workers (tandem prefill / tandem decode)", WorkerSettings),
]


SECRET_SUFFIXES = ("_token", "_key", "_keys", "_password", "_secret")


def shown_default(name: str, field) -> str:
    """The default as an env value: empty for secrets and None, lists comma-separated."""
    if name.endswith(SECRET_SUFFIXES):
        return ""
    value = field.get_default(call_default_factory=True)
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, Path) and value.is_relative_to(Path.home()):
        return f"~/{value.relative_to(Path.home()).as_posix()}"
    return str(value)


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
            if name.endswith(SECRET_SUFFIXES):
                lines.append("# (a secret: no default; make one with `openssl rand -hex 32`)")
            lines.append(f"# TANDEM_{name.upper()}={shown_default(name, field)}")
        lines.append("")
    return "\n".join(lines + COMPOSE)


# Read by docker-compose.yml, not by tandem: compose refuses to start without both of these.
COMPOSE = [
    "# --- docker compose (docker-compose.yml): required, compose refuses to start without them",
    "# TANDEM_INTERNAL_TOKEN (above): workers listen on the compose network",
    "# Grafana's admin password (no default)",
    "# GRAFANA_ADMIN_PASSWORD=",
    "",
]


if __name__ == "__main__":
    sys.stdout.write(render())
