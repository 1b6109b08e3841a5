"""The compose file validates, and its services' commands and env match the real CLI."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from router.settings import RouterSettings
from tandem.cli import build_parser
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_BY_COMMAND = {
    "router": RouterSettings, "prefill": WorkerSettings, "decode": WorkerSettings
}


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.mark.parametrize("files", [["docker-compose.yml"],
                                   ["docker-compose.yml", "docker-compose.gpu.yml"]])
def test_compose_config_validates(files):
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose missing: `make test` installs it (apt-get install docker-compose)"
    args = [a for f in files for a in ("-f", f)]
    r = subprocess.run([exe, *args, "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_services_have_healthchecks_and_gated_startup():
    services = _compose()["services"]
    assert {"redis", "router", "prefill", "decode", "prometheus"} <= set(services)
    for name, svc in services.items():
        assert "healthcheck" in svc, name
        for dep, cond in svc.get("depends_on", {}).items():
            assert cond == {"condition": "service_healthy"}, (name, dep)


@pytest.mark.parametrize("service", ["router", "prefill", "decode"])
def test_service_commands_parse_with_the_cli(service):
    svc = _compose()["services"][service]
    command = svc["command"]
    assert command[0] == "tandem"
    args = build_parser().parse_args(command[1:])  # exits (fails the test) on an unknown flag
    assert args.command == service
    fields = SETTINGS_BY_COMMAND[service].model_fields
    for var in svc["environment"]:
        assert var.startswith("TANDEM_") and var[7:].lower() in fields, var


def test_published_ports_bind_loopback():
    for name, svc in _compose()["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_env_example_lists_every_setting():
    from scripts.gen_env_example import render

    assert (ROOT / ".env.example").read_text() == render(), "run scripts/gen_env_example.py"
