"""A Python stand-in for `promtool check metrics`, used by the router and end-to-end tests.

promtool's lint (client_golang promlint) checks: HELP present, counters end in `_total` and
nothing else does, no `_bucket/_count/_sum` names or `le` labels outside histograms, snake_case,
base units, no type in the name, and no ':' in names. The last one we waive: the issue asks for
vLLM's `tandem:` names, which promtool flags on every family ("metric names should not contain
':'"), as it does vLLM's own. On top we check what the parser alone would let through:
duplicate series, and a `model_name` label on every `tandem:` request/engine family.
"""

from __future__ import annotations

import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

SNAKE = re.compile(r"^[a-z_:][a-z0-9_:]*$")
# promlint's unit rules: non-base units and abbreviations it rejects.
BAD_UNITS = ("_milliseconds", "_microseconds", "_nanoseconds", "_minutes", "_hours", "_days",
             "_kilobytes", "_megabytes", "_gigabytes", "_ms", "_sec", "_secs", "_us")
TYPE_WORDS = ("_counter", "_gauge", "_histogram", "_summary")
RESERVED = ("_bucket", "_count", "_sum")


def type_lines(text: str) -> dict[str, str]:
    """`# TYPE name type` as exposed (counters keep their `_total` here)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            out[name] = kind
    return out


def _name_problems(name: str, kind: str) -> list[str]:
    problems = []
    if kind == "counter" and not name.endswith("_total"):
        problems.append(f"{name}: counter metrics should have '_total' suffix")
    if kind != "counter" and name.endswith("_total"):
        problems.append(f"{name}: non-counter metrics should not have '_total' suffix")
    if kind not in ("histogram", "summary") and name.endswith(RESERVED):
        problems.append(f"{name}: non-histogram metrics should not have reserved suffixes")
    if not SNAKE.match(name):
        problems.append(f"{name}: metric names should be snake_case")
    if any(u in name + "_" for u in (b + "_" for b in BAD_UNITS)):
        problems.append(f"{name}: use base units (seconds, bytes)")
    if any(t in name for t in TYPE_WORDS):
        problems.append(f"{name}: metric name should not include the type")
    return problems


def lint_exposition(text: str) -> list[str]:
    """Problems in a /metrics body; [] when clean. Raises if the text does not parse."""
    families = list(text_string_to_metric_families(text))
    problems = []
    for name, kind in type_lines(text).items():
        problems += _name_problems(name, kind)
    seen: set[tuple] = set()
    for fam in families:
        if not fam.documentation:
            problems.append(f"{fam.name}: no help text")
        for s in fam.samples:
            if "le" in s.labels and fam.type != "histogram":
                problems.append(f"{fam.name}: 'le' label outside a histogram")
            if not all(SNAKE.match(k) for k in s.labels):
                problems.append(f"{fam.name}: label names should be snake_case")
            key = (s.name, tuple(sorted(s.labels.items())))
            if key in seen:
                problems.append(f"{s.name}{s.labels}: duplicate series")
            seen.add(key)
    return problems


def family_names(text: str) -> set[str]:
    """Every name a PromQL query may use: family names, plus `_total/_bucket/_sum/_count`."""
    names = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
        if fam.type == "counter":
            names.add(fam.name + "_total")
    return names


GOOD = """\
# HELP tandem:requests_total Requests.
# TYPE tandem:requests_total counter
tandem:requests_total{model_name="m"} 3.0
# HELP tandem:load_perc Load.
# TYPE tandem:load_perc gauge
tandem:load_perc{model_name="m"} 0.5
"""


def test_clean_exposition_has_no_problems():
    assert lint_exposition(GOOD) == []
    assert family_names(GOOD) >= {"tandem:requests", "tandem:requests_total", "tandem:load_perc"}


@pytest.mark.parametrize("bad, expected", [
    ("# HELP x_bytes B.\n# TYPE x_bytes counter\nx_bytes 1\n", "'_total' suffix"),
    ("# HELP x_total B.\n# TYPE x_total gauge\nx_total 1\n", "should not have '_total'"),
    ("# TYPE x_total counter\nx_total 1\n", "no help text"),
    ("# HELP x_ms T.\n# TYPE x_ms gauge\nx_ms 1\n", "base units"),
    ("# HELP xCamel C.\n# TYPE xCamel gauge\nxCamel 1\n", "snake_case"),
    ("# HELP x_gauge G.\n# TYPE x_gauge gauge\nx_gauge 1\n", "include the type"),
    ('# HELP x G.\n# TYPE x gauge\nx{a="1"} 1\nx{a="1"} 2\n', "duplicate series"),
])
def test_lint_flags_what_promtool_flags(bad, expected):
    assert any(expected in p for p in lint_exposition(bad)), lint_exposition(bad)
