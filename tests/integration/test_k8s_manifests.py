"""deploy/k8s: every manifest lints (yamllint) and every kustomization renders and
validates against the Kubernetes schemas (kubernetes-validate, strict, offline); then
what the deployment must hold: quorums of 3, replicated stateless services, probes,
drains that fit their grace period, the real command lines, only the gateway and the
bridge exposed. docs/operations.md, "Kubernetes"."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest

from windflow.cli import build_parser
from windflow.ops import k8s

ROOT = k8s.K8S_DIR
OVERLAYS = ("cpu", "gpu")
WINDFLOW_IMAGES = ("windflow", "windflow-cuda")
EXPOSED = {"gateway", "bridge"}
DEFAULT_DRAIN_S = 30.0  # `windflow serve worker --drain-deadline-s`'s default
DRAIN_MARGIN_S = 10.0  # deregistering, closing model hosts: after the drain, before SIGKILL


def _rendered(overlay: str) -> list[dict[str, Any]]:
    return k8s.render(ROOT / "overlays" / overlay)


@pytest.fixture(scope="module", params=OVERLAYS)
def docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return _rendered(str(request.param))


def _of(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = doc["spec"]["template"]["spec"]["containers"]
    return containers


def _is_windflow(container: dict[str, Any]) -> bool:
    return k8s.split_image(container["image"])[0] in WINDFLOW_IMAGES


def _serve_args(container: dict[str, Any]) -> argparse.Namespace:
    """The container's command line parsed by the real `windflow` parser ($(VAR)s as
    Kubernetes would expand them)."""
    args = [re.sub(r"\$\((\w+)\)", lambda m: m.group(1).lower(), a) for a in container["args"]]
    assert args[0] == "serve", args
    try:
        return build_parser().parse_args(args)
    except SystemExit as exc:  # argparse said why on stderr
        raise AssertionError(f"`windflow {' '.join(args)}` does not parse") from exc


def test_yamllint_is_clean() -> None:
    files = k8s.yaml_files(ROOT)
    assert len(files) >= 14
    assert k8s.lint(files, ROOT / k8s.YAMLLINT_CONFIG) == []


def test_every_kustomization_renders_and_validates_strict() -> None:
    found = k8s.kustomizations(ROOT)
    assert {p.relative_to(ROOT).as_posix() for p in found} >= {
        "base",
        "overlays/cpu",
        "overlays/gpu",
    }
    for directory in found:
        docs = k8s.render(directory)
        assert docs, directory
        assert k8s.validate(docs) == [], directory


def test_the_validator_rejects_what_it_should() -> None:
    """The check is not vacuous: an unknown field, a wrong type and an unknown kind fail."""
    worker = _of(_rendered("cpu"), "StatefulSet")["worker"]
    worker["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    worker["spec"]["replicas"] = "2"
    problems = k8s.validate([worker, {"apiVersion": "v9", "kind": "Nope", "metadata": {}}])
    assert len(problems) == 2 and "Nope" in problems[1], problems


def test_check_covers_everything() -> None:
    assert k8s.check(ROOT) == []


def test_quorums_of_three(docs: list[dict[str, Any]]) -> None:
    sets = _of(docs, "StatefulSet")
    services = _of(docs, "Service")
    for name in ("etcd", "nats"):
        spec = sets[name]["spec"]
        assert spec["replicas"] == 3
        assert spec["podManagementPolicy"] == "Parallel"  # a quorum needs peers to start
        headless = services[spec["serviceName"]]["spec"]
        assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"]
        assert spec["volumeClaimTemplates"], name

    etcd = _containers(sets["etcd"])[0]["command"]
    cluster = next(a for a in etcd if a.startswith("--initial-cluster="))
    assert cluster == "--initial-cluster=" + ",".join(
        f"etcd-{i}=http://etcd-{i}.etcd:2380" for i in range(3)
    )

    conf = _of(docs, "ConfigMap")["nats-config"]["data"]["nats.conf"]
    assert re.search(r"jetstream\s*\{[^}]*store_dir:\s*/data", conf)
    assert re.findall(r"nats://(nats-\d)\.nats:6222", conf) == ["nats-0", "nats-1", "nats-2"]
    mounts = {m["name"]: m["mountPath"] for m in _containers(sets["nats"])[0]["volumeMounts"]}
    assert mounts["data"] == "/data"  # JetStream's store on the member's volume


def test_windflow_streams_are_replicated_across_the_nats_members(
    docs: list[dict[str, Any]],
) -> None:
    """Every Windflow container creates its JetStream streams and buckets with 3 replicas
    (WINDFLOW_JETSTREAM_REPLICAS), so losing one NATS member loses no log."""
    for doc in _workloads(docs):
        for container in filter(_is_windflow, _containers(doc)):
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("WINDFLOW_JETSTREAM_REPLICAS") == "3", doc["metadata"]["name"]


def test_every_service_serves_metrics_to_the_monitoring_namespace_only(
    docs: list[dict[str, Any]],
) -> None:
    """Each Windflow container serves /metrics on 9464 (--metrics-listen), its pod says so
    to Prometheus, and a NetworkPolicy lets only the `monitoring` namespace reach it."""
    for doc in _workloads(docs):
        template = doc["spec"]["template"]
        for container in filter(_is_windflow, _containers(doc)):
            assert "--metrics-listen=0.0.0.0:9464" in container["args"], doc["metadata"]["name"]
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["metrics"] == 9464
            annotations = template["metadata"].get("annotations", {})
            assert annotations.get("prometheus.io/scrape") == "true"
            assert annotations.get("prometheus.io/port") == "9464"
    policy = _of(docs, "NetworkPolicy")["metrics"]["spec"]
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 9464}]
    (source,) = rule["from"]
    assert source == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    }


def test_replicated_stateless_services(docs: list[dict[str, Any]]) -> None:
    deployments = _of(docs, "Deployment")
    assert set(deployments) == {"router", "gateway", "bridge", "session"}
    for name in ("router", "gateway", "bridge"):
        assert deployments[name]["spec"]["replicas"] >= 2, name
    assert deployments["session"]["spec"]["replicas"] >= 1


def test_probes_everywhere(docs: list[dict[str, Any]]) -> None:
    for doc in _workloads(docs):
        for container in _containers(doc):
            where = f"{doc['metadata']['name']}/{container['name']}"
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                assert probe in container, f"{where}: no {probe}"
            if not _is_windflow(container):
                continue
            args = _serve_args(container)
            port = int(args.listen.rpartition(":")[2])
            assert args.listen.startswith("0.0.0.0:")
            assert port in {p["containerPort"] for p in container["ports"]}, where
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if args.service == "bridge":
                    assert container[probe]["httpGet"]["path"] == "/healthz", where
                else:  # gRPC health, served on the service's own port
                    assert container[probe]["grpc"] == {"port": port}, where


def test_command_lines_parse_and_name_real_services(docs: list[dict[str, Any]]) -> None:
    services = _of(docs, "Service")

    def served(address: str) -> None:
        host, _, port = address.removeprefix("nats://").rpartition(":")
        assert host in services, f"{address}: no Service {host}"
        assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}, address

    kinds = set()
    for doc in _workloads(docs):
        for container in filter(_is_windflow, _containers(doc)):
            args = _serve_args(container)
            kinds.add(args.service)
            env = {
                e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
                for e in container.get("env", [])
                if "valueFrom" in e
            }
            assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == args.service
            if args.service != "bridge":
                served(args.etcd)
                served(args.nats)
            for flag in ("router", "session_service", "gateway"):
                if getattr(args, flag, ""):
                    served(getattr(args, flag))
            if args.service in ("router", "worker"):  # others dial it at this address
                assert args.advertise == "pod_ip:50051"
                assert env["POD_IP"] == "status.podIP"
            if args.service == "worker":
                assert args.worker_id == "pod_name"  # stable: the StatefulSet's pod name
                assert env["POD_NAME"] == "metadata.name"
                assert args.router, "a worker without --router does not drain on SIGTERM"
    assert kinds == {"router", "session", "worker", "gateway", "bridge"}


def test_worker_drain_fits_its_grace_period(docs: list[dict[str, Any]]) -> None:
    workers = [d for d in _of(docs, "StatefulSet").values() if d["metadata"]["name"] == "worker"]
    assert workers
    for doc in workers:
        drain = k8s.drain_deadline_s(doc)
        grace = doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= (drain or DEFAULT_DRAIN_S) + DRAIN_MARGIN_S


def test_gpu_workers_get_a_gpu() -> None:
    worker = _of(_rendered("gpu"), "StatefulSet")["worker"]
    pod = worker["spec"]["template"]["spec"]
    container = _containers(worker)[0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert k8s.split_image(container["image"])[0] == "windflow-cuda"
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert _serve_args(container).models.startswith("wan")
    cpu = _containers(_of(_rendered("cpu"), "StatefulSet")["worker"])[0]
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert _serve_args(cpu).models == "windflow-world"


def test_only_gateway_and_bridge_are_exposed(docs: list[dict[str, Any]]) -> None:
    services = _of(docs, "Service")
    exposed = {
        name
        for name, svc in services.items()
        if svc["spec"].get("type", "ClusterIP") in ("LoadBalancer", "NodePort")
    }
    assert exposed == EXPOSED
    assert not [d for d in docs if d["kind"] == "Ingress"]


def test_network_policies(docs: list[dict[str, Any]]) -> None:
    policies = _of(docs, "NetworkPolicy")
    deny = policies["default-deny-ingress"]["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"]
    assert "ingress" not in deny

    covered: dict[str, list[dict[str, Any]]] = {}
    for name, policy in policies.items():
        if name in ("default-deny-ingress", "metrics"):
            continue  # (metrics: every service's 9464, its own test)
        target = policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        covered[target] = policy["spec"]["ingress"]
    components = {d["metadata"]["labels"]["app.kubernetes.io/name"] for d in _workloads(docs)}
    assert set(covered) == components

    for name, rules in covered.items():
        open_to_all = [r for r in rules if not r.get("from")]
        assert bool(open_to_all) == (name in EXPOSED), name
        for rule in rules:  # every rule names its ports
            assert rule["ports"], name
    # etcd holds the token signing keys: never from outside, never from the bridge
    for rule in covered["etcd"]:
        for peer in rule["from"]:
            selector = peer["podSelector"]
            names = selector.get("matchLabels", {}).get("app.kubernetes.io/name")
            values = [names] if names else selector["matchExpressions"][0]["values"]
            assert "bridge" not in values and "namespaceSelector" not in peer


def test_disruption_budgets(docs: list[dict[str, Any]]) -> None:
    budgets = _of(docs, "PodDisruptionBudget")
    assert set(budgets) >= {"etcd", "nats", "router", "gateway", "bridge", "worker"}
    for name in ("etcd", "nats"):  # a quorum of 3 loses one at most
        assert budgets[name]["spec"]["maxUnavailable"] == 1
    for budget in budgets.values():
        labels = budget["spec"]["selector"]["matchLabels"]
        assert any(
            labels.items() <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in _workloads(docs)
        ), budget["metadata"]["name"]


def test_images_are_set_by_kustomize(docs: list[dict[str, Any]]) -> None:
    for doc in _workloads(docs):
        for container in _containers(doc):
            _, tag, digest = k8s.split_image(container["image"])
            assert tag or digest, container["image"]


def test_render_cli_writes_each_kustomization(tmp_path: Path) -> None:
    assert k8s.main(["render", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "base.yaml",
        "overlays-cpu.yaml",
        "overlays-gpu.yaml",
    ]
    assert k8s.lint(sorted(tmp_path.iterdir()), ROOT / k8s.YAMLLINT_CONFIG) == []
