"""deploy/k8s: every overlay renders (`kubectl kustomize`), passes the Kubernetes API schemas
(kubernetes-validate, offline, strict), and runs tandem the way the code needs: probes on
routes the apps serve, the token from a Secret, workers bound beyond loopback that advertise
their pod IP, and a termination grace that covers the drain.

HPA, PDB, GPU and external-Redis checks: test_k8s_scaling.py."""

from __future__ import annotations

import os

import kubernetes_validate
import pytest
from fastapi import FastAPI
from starlette.routing import Match

from decode_worker.app import create_app as decode_app
from prefill_worker.app import create_app as prefill_app
from router.service import build_router_app
from router.settings import RouterSettings
from tandem.cli import build_parser
from tandem.flags import settings_from_args
from tests.deploy.manifests import (
    FAKE_SECRET,
    OVERLAYS,
    POD_IP,
    SERVICES,
    container,
    deployment,
    env_entry,
    render,
    resolved_env,
)
from worker.settings import WorkerSettings, is_loopback

# The oldest minor these manifests target (they use only APIs GA by then: apps/v1,
# autoscaling/v2, policy/v1); its schema rejects a newer field a cluster that old would reject.
K8S_VERSION = "1.31.0"
# tandem/cmd_serve.py runs uvicorn with timeout_graceful_shutdown=10 after the drain.
UVICORN_GRACE_S = 10
SETTINGS = {"router": RouterSettings, "prefill": WorkerSettings, "decode": WorkerSettings}


@pytest.fixture(scope="module")
def apps() -> dict[str, FastAPI]:
    """The real apps, built but not started (nothing loads until the lifespan runs)."""
    worker = WorkerSettings(_env_file=None, host="127.0.0.1")
    return {"router": build_router_app(RouterSettings(_env_file=None)),
            "prefill": prefill_app(worker), "decode": decode_app(worker)}


def serves_get(app: FastAPI, path: str) -> bool:
    """Whether a GET of `path` reaches one of the app's routes (Starlette's own matching)."""
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": [],
             "query_string": b""}
    return any(r.matches(scope)[0] == Match.FULL for r in app.router.routes)


def settings_of(docs: list[dict], service: str, monkeypatch, tmp_path):
    """The settings the container's process would build: its command line through tandem's
    own parser, over the environment the kubelet gives it (and no .env)."""
    c = container(docs, service)
    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith("TANDEM_")]:
        monkeypatch.delenv(name)
    for name, value in resolved_env(docs, c).items():
        monkeypatch.setenv(name, value)
    assert c["command"][0] == "tandem" and c["command"][1] == service, c["command"]
    return settings_from_args(SETTINGS[service], build_parser().parse_args(c["command"][1:]))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_the_api_schemas(overlay):
    docs = render(overlay)
    assert docs, f"deploy/k8s/{overlay} rendered nothing"
    failures = []
    for d in docs:
        what = f"{d['kind']}/{d['metadata']['name']}"
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            failures.append(f"{what}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:  # a CRD: cannot be checked here
            failures.append(f"{what}: {e.message}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_is_shipped(overlay):
    assert not [d for d in render(overlay) if d["kind"] == "Secret"]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES)
def test_probes_hit_routes_the_app_serves(overlay, service, apps):
    c = container(render(overlay), service)
    (port,) = [p for p in c["ports"] if p["name"] == "http"]
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = c.get(kind)
        assert probe and "httpGet" in probe, f"{service} has no HTTP {kind}"
        assert probe["httpGet"]["port"] in ("http", port["containerPort"]), probe
        assert serves_get(apps[service], probe["httpGet"]["path"]), (service, kind, probe)
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    # The router is ready once it has workers; a worker's /health turns 503 while it drains.
    ready = "/ready" if service == "router" else "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == ready


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES)
def test_prometheus_annotations_name_the_metrics_route(overlay, service, apps):
    docs = render(overlay)
    notes = deployment(docs, service)["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == container(docs, service)["ports"][0][
        "containerPort"]
    assert notes["prometheus.io/path"] == "/metrics"
    assert serves_get(apps[service], "/metrics")


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES)
def test_internal_token_comes_from_a_secret(overlay, service):
    e = env_entry(container(render(overlay), service), "TANDEM_INTERNAL_TOKEN")
    assert e is not None and "value" not in e, e
    assert e["valueFrom"]["secretKeyRef"] == {"name": "tandem-internal", "key": "token"}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", ["prefill", "decode"])
def test_worker_binds_beyond_loopback_and_advertises_its_pod_ip(overlay, service, monkeypatch,
                                                                tmp_path):
    docs = render(overlay)
    s = settings_of(docs, service, monkeypatch, tmp_path)
    assert s.role == service
    assert not is_loopback(s.host), "the router could not reach a worker bound to loopback"
    assert s.internal_token == FAKE_SECRET
    s.check_exposure()  # the worker's own refusal to serve open to the network
    port = container(docs, service)["ports"][0]["containerPort"]
    assert s.port == port
    assert s.advertised_url() == f"http://{POD_IP}:{port}"
    assert s.redis_url, "without TANDEM_REDIS_URL a worker never heartbeats: no router finds it"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", ["prefill", "decode"])
def test_termination_grace_covers_the_drain(overlay, service, monkeypatch, tmp_path):
    docs = render(overlay)
    s = settings_of(docs, service, monkeypatch, tmp_path)
    grace = deployment(docs, service)["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"]
    assert grace >= s.drain_grace_s + UVICORN_GRACE_S, (grace, s.drain_grace_s)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_router_finds_workers_only_through_redis(overlay, monkeypatch, tmp_path):
    s = settings_of(render(overlay), "router", monkeypatch, tmp_path)
    assert s.decode_urls == [] and s.prefill_urls == []  # no 127.0.0.1:8200 default
    assert s.redis_url and s.internal_token == FAKE_SECRET
    assert not is_loopback(s.host)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES)
def test_cpu_requests_and_limits_are_set(overlay, service):
    r = container(render(overlay), service)["resources"]
    for key in ("cpu", "memory"):
        assert key in r["requests"] and key in r["limits"], (service, r)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", ["prefill", "decode"])
def test_torch_threads_fit_the_cpu_limit(overlay, service, monkeypatch, tmp_path):
    """torch counts the node's cores, not the pod's quota: more threads than the limit only
    get throttled."""
    docs = render(overlay)
    s = settings_of(docs, service, monkeypatch, tmp_path)
    limit = container(docs, service)["resources"]["limits"]["cpu"]
    cores = int(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)
    assert s.torch_threads is not None and s.torch_threads <= cores, (s.torch_threads, limit)
