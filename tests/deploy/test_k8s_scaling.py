"""deploy/k8s: the HPAs scale real Deployments on a queue gauge the workers export (through the
prometheus-adapter rule shipped beside them), the PDBs and Services select the pods they mean,
the GPU overlay asks for GPUs, and the external-Redis variant runs no Redis of its own."""

from __future__ import annotations

import re

import pytest
import yaml

from engine.config import EngineStats, KVUsage
from engine.grammar import GrammarStats
from tests.deploy.manifests import (
    OVERLAYS,
    SERVICES,
    container,
    deployment,
    env_entry,
    named,
    objects,
    pod_labels,
    render,
    selects,
)
from worker.metrics import EngineCollector, EngineReading
from worker.runtime import WorkerCounters


def worker_gauges() -> set[str]:
    """The gauge names a worker's /metrics exports, from its collector itself."""
    reading = EngineReading(running=0, waiting=0, max_slots=1, counters=WorkerCounters(),
                            kv=KVUsage(pages=1, used=0, cached=0, page_size=16),
                            stats=EngineStats(), grammar=GrammarStats())
    return {f.name for f in EngineCollector("m", lambda: reading).collect() if f.type == "gauge"}


def adapter_metrics(docs: list[dict]) -> dict[str, str]:
    """Custom-metrics API name -> Prometheus series, per the shipped adapter rules."""
    rules = yaml.safe_load(named(docs, "ConfigMap", "tandem-prometheus-adapter")["data"][
        "config.yaml"])["rules"]
    out = {}
    for rule in rules:
        series = re.match(r"[\w:]+", rule["seriesQuery"].strip("'\""))[0]
        exposed = re.sub(rule["name"]["matches"],
                         rule["name"]["as"].replace("${", "\\g<").replace("}", ">"), series)
        out[exposed] = series
    return out


def replicas(docs: list[dict], d: dict) -> int:
    """The fewest pods the Deployment runs: its HPA's floor, else spec.replicas."""
    hpas = [h for h in objects(docs, "HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"]["name"] == d["metadata"]["name"]]
    return hpas[0]["spec"].get("minReplicas", 1) if hpas else d["spec"].get("replicas", 1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpas_scale_worker_deployments_on_the_queue_gauge(overlay):
    docs = render(overlay)
    hpas = {h["metadata"]["name"]: h for h in objects(docs, "HorizontalPodAutoscaler")}
    assert "tandem-decode" in hpas, "decode workers must autoscale"
    exposed = adapter_metrics(docs)
    gauges = worker_gauges()
    for name, h in hpas.items():
        assert h["apiVersion"] == "autoscaling/v2"
        ref = h["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["apiVersion"] == "apps/v1"
        target = named(docs, "Deployment", ref["name"])
        # A replica count in the Deployment would fight the HPA on every apply.
        assert "replicas" not in target["spec"], name
        assert h["spec"]["minReplicas"] <= h["spec"]["maxReplicas"]
        for m in h["spec"]["metrics"]:
            assert m["type"] == "Pods", m
            metric = m["pods"]["metric"]["name"]
            assert metric in exposed, f"{name}: no adapter rule serves {metric}"
            assert exposed[metric] in gauges, f"{exposed[metric]} is not a worker gauge"
            assert exposed[metric] == "tandem:num_requests_waiting"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pdbs_select_their_pods_and_allow_a_drain(overlay):
    docs = render(overlay)
    deployments = objects(docs, "Deployment")
    covered = set()
    for pdb in objects(docs, "PodDisruptionBudget"):
        matched = [d for d in deployments if selects(pdb["spec"]["selector"], pod_labels(d))]
        names = [d["metadata"]["name"] for d in matched]
        assert names == [pdb["metadata"]["name"]], f"PDB {pdb['metadata']['name']} selects {names}"
        d = matched[0]
        covered.add(d["metadata"]["name"])
        spec, floor = pdb["spec"], replicas(docs, d)
        # At least one eviction allowed at the floor, or `kubectl drain` hangs on this pod.
        if "maxUnavailable" in spec:
            assert spec["maxUnavailable"] >= 1
        else:
            assert floor - spec["minAvailable"] >= 1, (pdb, floor)
    assert {f"tandem-{s}" for s in SERVICES} <= covered


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_their_deployment(overlay):
    docs = render(overlay)
    for svc in objects(docs, "Service"):
        matched = [d for d in objects(docs, "Deployment")
                   if selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(d))]
        assert [d["metadata"]["name"] for d in matched] == [svc["metadata"]["name"]]
        ports = {p["name"] for c in matched[0]["spec"]["template"]["spec"]["containers"]
                 for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_bundled_redis_is_the_one_configured(overlay):
    docs = render(overlay)
    url = named(docs, "ConfigMap", "tandem-config")["data"]["TANDEM_REDIS_URL"]
    host, port = re.match(r"redis://([\w-]+):(\d+)/", url).groups()
    svc = named(docs, "Service", host)
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}


def test_gpu_overlay_gives_each_worker_a_gpu():
    docs = render("gpu")
    for service in ("prefill", "decode"):
        c = container(docs, service)
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert env_entry(c, "TANDEM_DEVICE")["value"] == "cuda"
        assert c["image"] == "tandem:cuda"
        tolerations = deployment(docs, service)["spec"]["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    # The pool's budget defaults to the GPU's free memory, not the CPU base's 1 GiB.
    assert "TANDEM_KV_CACHE_BYTES" not in named(docs, "ConfigMap", "tandem-config")["data"]
    assert "nvidia.com/gpu" not in str(container(docs, "router")["resources"])


@pytest.mark.parametrize("overlay", ["cpu", "external-redis"])
def test_cpu_overlays_ask_for_no_gpu(overlay):
    assert "nvidia.com/gpu" not in str(render(overlay))


def test_external_redis_runs_no_redis_and_reads_the_url_from_a_secret():
    docs = render("external-redis")
    labels = [pod_labels(d).get("app.kubernetes.io/component") for d in
              objects(docs, "Deployment")]
    assert "redis" not in labels and sorted(labels) == sorted(SERVICES)
    assert not [d for d in docs if "redis" in d["metadata"]["name"]]
    assert "TANDEM_REDIS_URL" not in named(docs, "ConfigMap", "tandem-config")["data"]
    for service in SERVICES:
        e = env_entry(container(docs, service), "TANDEM_REDIS_URL")
        assert e is not None and e["valueFrom"]["secretKeyRef"] == {"name": "tandem-redis",
                                                                   "key": "url"}
