"""The Kubernetes manifests of the fleet (deploy/kubernetes): every resource the
kustomization lists is valid against the Kubernetes schemas (strict: no unknown field), and
the resources agree with each other and with ``modloc serve``'s flags."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from modloc.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
# the oldest Kubernetes whose schemas must hold them (gRPC probes are GA since 1.27) and the newest
VERSIONS = ("1.27.0", kubernetes_validate.latest_version())


@pytest.fixture(scope="module")
def resources() -> list[dict]:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert sorted(listed) == sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
    return [doc for name in listed for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def named(resources, kind: str, name: str) -> dict:
    [found] = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("version", VERSIONS)
def test_every_resource_is_valid_kubernetes(resources, version):
    kinds = sorted(r["kind"] for r in resources)
    assert kinds == ["ConfigMap", "Deployment", "Job", "PodDisruptionBudget", "PodDisruptionBudget",
                     "Service", "Service", "Service", "StatefulSet"]
    for resource in resources:
        kubernetes_validate.validate(resource, version, strict=True)


def test_validation_can_fail(resources):
    deployment = copy.deepcopy(named(resources, "Deployment", "modloc-serve"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError, match="'two' is not of type 'integer'"):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    deployment["spec"]["replicas"] = 2
    container["readinessprobe"] = container.pop("readinessProbe")  # a typo strict mode catches
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessprobe"):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)


def workload_of(resources, selector: dict) -> dict:
    [workload] = [r for r in resources if r["kind"] in ("Deployment", "StatefulSet")
                  and selector.items() <= r["spec"]["template"]["metadata"]["labels"].items()]
    return workload


def test_services_reach_named_ports_of_their_pods(resources):
    for service in (r for r in resources if r["kind"] == "Service"):
        pods = workload_of(resources, service["spec"]["selector"])["spec"]["template"]["spec"]
        ports = {p["name"]: p["containerPort"] for c in pods["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports or target in ports.values(), (service["metadata"]["name"], target)
    for budget in (r for r in resources if r["kind"] == "PodDisruptionBudget"):
        workload_of(resources, budget["spec"]["selector"]["matchLabels"])


def test_replicas_serve_what_modloc_serve_accepts(resources):
    """The container's arguments parse as ``modloc serve`` flags; the probes ask gRPC health
    on the port it binds; the drain fits in the termination grace; the rankings URL names the
    Redis Service, whose ConfigMap fsyncs every write."""
    pod = named(resources, "Deployment", "modloc-serve")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["modloc"]
    args = build_parser().parse_args(container["args"])
    port = int(args.address.rpartition(":")[2])
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": port, "metrics": args.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port}  # service "": Localize's health, not Ingest's
    assert pod["terminationGracePeriodSeconds"] > args.grace
    assert args.redis_wait_replicas >= 1 and args.state_dir is None
    host, redis_port = re.fullmatch(r"redis://([\w-]+):(\d+)", args.rankings).groups()
    assert int(redis_port) in [p["port"] for p in named(resources, "Service", host)["spec"]["ports"]]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[args.artifacts] == "artifacts" and Path(args.token_file).parent.as_posix() in mounts
    config = named(resources, "ConfigMap", "modloc-redis")["data"]
    assert "appendfsync always" in config["redis.conf"].splitlines()
    assert "appendonly yes" in config["redis.conf"].splitlines()
    redis_pod = named(resources, "StatefulSet", "modloc-redis")["spec"]["template"]["spec"]
    assert redis_pod["containers"][0]["command"] == ["sh", "/conf/start.sh"]
    assert named(resources, "StatefulSet", "modloc-redis")["spec"]["replicas"] == 6  # 3 masters x 2
