"""Helpers for the Kubernetes manifest tests: render an overlay with `kubectl kustomize`, find
its objects, and resolve a container's environment the way the kubelet would."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "external-redis")
SERVICES = ("router", "prefill", "decode")  # tandem's own containers
POD_IP = "10.1.2.3"  # what the downward API would put in status.podIP
FAKE_SECRET = "f" * 64  # stands in for every secretKeyRef; no real secret is ever read
KUBECTL_MISSING = (
    "kubectl is not on PATH: the Kubernetes manifest tests need `kubectl kustomize` (offline, "
    "no cluster). Run `make system-deps`, or install it: "
    "https://kubernetes.io/docs/tasks/tools/#kubectl (Debian/Ubuntu: the `kubectl` package "
    "from pkgs.k8s.io)"
)


@functools.cache
def _render(overlay: str) -> tuple[dict, ...]:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.fail(KUBECTL_MISSING, pytrace=False)
    r = subprocess.run([exe, "kustomize", str(K8S / overlay)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"kubectl kustomize deploy/k8s/{overlay} failed:\n{r.stderr}"
    return tuple(d for d in yaml.safe_load_all(r.stdout) if d)


def render(overlay: str) -> list[dict]:
    """Every object `kubectl kustomize deploy/k8s/<overlay>` prints (rendered once per run)."""
    return list(_render(overlay))


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in objects(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def deployment(docs: list[dict], service: str) -> dict:
    return named(docs, "Deployment", f"tandem-{service}")


def container(docs: list[dict], service: str) -> dict:
    (c,) = [c for c in deployment(docs, service)["spec"]["template"]["spec"]["containers"]
            if c["name"] == service]
    return c


def env_entry(c: dict, name: str) -> dict | None:
    return next((e for e in c.get("env", []) if e["name"] == name), None)


def pod_labels(d: dict) -> dict:
    return d["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict, labels: dict) -> bool:
    """matchLabels only: every selector here uses nothing else (asserted by the callers)."""
    assert set(selector) == {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def resolved_env(docs: list[dict], c: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps first, then
    `env` in order (later wins), with $(VAR) expanded from what came before. A secretKeyRef
    resolves to FAKE_SECRET, unless optional (then, like a missing Secret, to nothing)."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(named(docs, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
    for e in c.get("env", []):
        value = _value(e, env)
        if value is not None:
            env[e["name"]] = value
    return env


def _value(e: dict, env: dict[str, str]) -> str | None:
    if "value" in e:
        return re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), e["value"])
    ref = e["valueFrom"]
    if "fieldRef" in ref:
        assert ref["fieldRef"]["fieldPath"] == "status.podIP", ref
        return POD_IP
    secret = ref["secretKeyRef"]
    return None if secret.get("optional") else FAKE_SECRET
