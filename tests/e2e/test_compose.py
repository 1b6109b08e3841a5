"""The compose file validates, its services' commands and env match the real CLI, and it
refuses to start without the internal token and Grafana's admin password."""

from __future__ import annotations

import os
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
SECRETS = {"TANDEM_INTERNAL_TOKEN": "a" * 64, "GRAFANA_ADMIN_PASSWORD": "not-admin"}


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_config(tmp_path: Path, files: list[str], env: dict[str, str],
                   *flags: str) -> subprocess.CompletedProcess:
    """`docker-compose config` with exactly `env` on top of the shell's (minus the secrets),
    ignoring any .env in the checkout."""
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose missing: `make test` installs it (apt-get install docker-compose)"
    (tmp_path / "empty.env").write_text("")
    base = {k: v for k, v in os.environ.items() if k not in SECRETS}
    args = [a for f in files for a in ("-f", f)]
    return subprocess.run(
        [exe, "--env-file", str(tmp_path / "empty.env"), *args, "config", *flags],
        cwd=ROOT, capture_output=True, text=True, env={**base, **env})


@pytest.mark.parametrize("files", [["docker-compose.yml"],
                                   ["docker-compose.yml", "docker-compose.gpu.yml"],
                                   ["docker-compose.yml", "docker-compose.two-models.yml"]])
def test_compose_config_validates(files, tmp_path):
    r = compose_config(tmp_path, files, SECRETS, "-q")
    assert r.returncode == 0, r.stderr


def test_two_models_overlay_serves_both_with_their_own_workers(tmp_path):
    r = compose_config(tmp_path, ["docker-compose.yml", "docker-compose.two-models.yml"],
                       {**SECRETS, "TANDEM_MODEL_B": "my-model"})
    assert r.returncode == 0, r.stderr
    services = yaml.safe_load(r.stdout)["services"]
    router = services["router"]
    args = build_parser().parse_args(router["command"][1:])
    settings = RouterSettings(_env_file=None, model=router["environment"]["TANDEM_MODEL"],
                              prefill_urls=args.prefill_urls, decode_urls=args.decode_urls)
    assert settings.model == ["HuggingFaceTB/SmolLM2-135M-Instruct", "my-model"]
    assert settings.decode_urls == ["http://decode:8200", "http://decode-b:8200"]
    for name in ("prefill-b", "decode-b"):
        assert services[name]["environment"]["TANDEM_MODEL"] == "my-model"
        assert services[name]["environment"]["TANDEM_INTERNAL_TOKEN"] == SECRETS[
            "TANDEM_INTERNAL_TOKEN"]
        assert router["depends_on"][name] == {"condition": "service_healthy"}
    # Prometheus scrapes the second model's workers too.
    assert any(v.endswith("prometheus.two-models.yml:/etc/prometheus/prometheus.yml:ro")
               for v in services["prometheus"]["volumes"])
    jobs = yaml.safe_load((ROOT / "configs" / "prometheus.two-models.yml").read_text())
    names = {job["job_name"]: job.get("dns_sd_configs", [{}])[0].get("names")
             for job in jobs["scrape_configs"]}
    assert names["tandem-prefill"] == ["prefill", "prefill-b"]
    assert names["tandem-decode"] == ["decode", "decode-b"]


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_to_start_without_a_secret(missing, tmp_path):
    env = {k: v for k, v in SECRETS.items() if k != missing}
    r = compose_config(tmp_path, ["docker-compose.yml"], env, "-q")
    assert r.returncode != 0 and f"set {missing} in .env" in r.stderr, r.stderr
    r = compose_config(tmp_path, ["docker-compose.yml"], {**env, missing: ""}, "-q")
    assert r.returncode != 0, "an empty value must not pass either"


def test_every_tandem_service_gets_the_token_and_grafana_the_password(tmp_path):
    r = compose_config(tmp_path, ["docker-compose.yml"], SECRETS)
    assert r.returncode == 0, r.stderr
    services = yaml.safe_load(r.stdout)["services"]
    for name in ("router", "prefill", "decode"):
        env = services[name]["environment"]
        assert env["TANDEM_INTERNAL_TOKEN"] == SECRETS["TANDEM_INTERNAL_TOKEN"], name
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]


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

    text = render()
    assert (ROOT / ".env.example").read_text() == text, "run scripts/gen_env_example.py"
    # the same on every machine: no home directory, no unrendered default
    assert "PydanticUndefined" not in text and str(Path.home()) + "/" not in text
    values = dict(line[2:].split("=", 1) for line in text.splitlines()
                  if line.startswith("# TANDEM_") and "=" in line)
    for cls in SETTINGS_BY_COMMAND.values():
        assert {f"TANDEM_{name.upper()}" for name in cls.model_fields} <= set(values)
    for secret in ("TANDEM_API_KEYS", "TANDEM_INTERNAL_TOKEN"):
        assert values[secret] == "", secret
    assert values["TANDEM_DISK_CACHE_DIR"].startswith("~/")


def test_the_image_copies_every_package():
    """The Dockerfile copies each top-level package pyproject installs (a package added to the
    layers but not to the image would fail at import inside every container)."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ")}
    assert {name.rstrip("*") for name in include} <= copied
