"""windflow/ops/k8s.py: the overlay ``windflow plan --emit-k8s`` writes from a plan, and
the kustomize subset that renders the manifests for validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from windflow.ops import k8s

PLAN: list[dict[str, Any]] = [
    {
        "worker_class": "h100",
        "region": "us-east",
        "model": "wan-causal-tiny",
        "rung": 0,
        "steps": 4,
        "fps": 16,
        "replicas": 3,
        "spot": False,
    },
    {
        "worker_class": "h100",
        "region": "us-east",
        "model": "wan-causal-tiny",
        "rung": 1,
        "steps": 2,
        "fps": 16,
        "replicas": 2,
        "spot": True,
    },
    {
        "worker_class": "cpu-2core",
        "region": "eu-west",
        "model": "windflow-world",
        "demand": "arena-eu",  # keys the overlay has no use for are ignored
        "rung": 0,
        "steps": 2,
        "fps": 24,
        "replicas": 4,
        "spot": False,
        "sessions_per_replica": 6,
    },
    {
        "worker_class": "cpu-2core",
        "region": "eu-west",
        "model": "windflow-world",
        "rung": 1,
        "steps": 1,
        "fps": 24,
        "replicas": 1,
        "spot": False,
        "sessions_per_replica": 11,
    },
]


def _statefulsets(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "StatefulSet"}


def _worker(doc: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = doc["spec"]["template"]["spec"]["containers"][0]
    return container


def test_overlay_files_and_names(tmp_path: Path) -> None:
    paths = k8s.write_overlay(PLAN, tmp_path / "plan")
    assert [p.name for p in paths] == [
        "kustomization.yaml",
        "delete-base-worker.yaml",
        "worker-cpu-2core-eu-west.yaml",
        "worker-h100-us-east.yaml",
        "worker-h100-us-east-spot.yaml",
    ]
    kustomization = yaml.safe_load(paths[0].read_text())
    base = (tmp_path / "plan" / kustomization["resources"][0]).resolve()
    assert base == (k8s.K8S_DIR / "base").resolve()
    assert kustomization["namespace"] == "windflow"
    assert all(p.read_text().startswith(k8s.EMITTED_HEADER) for p in paths)


def test_overlay_is_deterministic(tmp_path: Path) -> None:
    first = k8s.write_overlay(PLAN, tmp_path / "a")
    second = k8s.write_overlay(list(reversed(PLAN)), tmp_path / "b")
    assert [p.name for p in first] == [p.name for p in second]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_overlay_renders_validates_and_lints(tmp_path: Path) -> None:
    paths = k8s.write_overlay(PLAN, tmp_path / "plan")
    assert k8s.lint(paths) == []
    docs = k8s.render(tmp_path / "plan")
    assert k8s.validate(docs) == []
    sets = _statefulsets(docs)
    # the base's worker gave way; etcd and NATS stay
    assert set(sets) == {
        "etcd",
        "nats",
        "worker-cpu-2core-eu-west",
        "worker-h100-us-east",
        "worker-h100-us-east-spot",
    }
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
        "windflow"
    }
    # the other workloads are the base's
    base = {(d["kind"], d["metadata"]["name"]) for d in k8s.render(k8s.K8S_DIR / "base")}
    mine = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert base - mine == {("StatefulSet", "worker")}


def test_each_group_is_its_plan(tmp_path: Path) -> None:
    k8s.write_overlay(PLAN, tmp_path / "plan")
    sets = _statefulsets(k8s.render(tmp_path / "plan"))

    cpu = sets["worker-cpu-2core-eu-west"]
    assert cpu["spec"]["replicas"] == 5  # the two rungs' replicas
    assert cpu["metadata"]["annotations"]["windflow.dev/plan-rung"] == "0,1"
    assert cpu["metadata"]["annotations"]["windflow.dev/plan-steps"] == "1,2"
    args = _worker(cpu)["args"]
    assert "--region=eu-west" in args and "--models=windflow-world" in args
    assert "--worker-id=$(POD_NAME)" in args  # pod names are unique across groups
    assert [a for a in args if a.startswith("--capacity=")] == ["--capacity=11"]
    pod = cpu["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {
        "topology.kubernetes.io/region": "eu-west",
        "windflow.dev/worker-class": "cpu-2core",
    }
    assert "tolerations" not in pod
    assert "nvidia.com/gpu" not in _worker(cpu)["resources"].get("limits", {})

    gpu = sets["worker-h100-us-east"]
    assert gpu["spec"]["replicas"] == 3
    assert _worker(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _worker(gpu)["image"] == "windflow-cuda:latest"
    assert "--capacity=4" in _worker(gpu)["args"]  # the GPU overlay's, none planned
    assert "--drain-deadline-s=60" in _worker(gpu)["args"]
    assert gpu["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert "windflow.dev/capacity" not in gpu["spec"]["template"]["spec"]["nodeSelector"]

    spot = sets["worker-h100-us-east-spot"]
    assert spot["spec"]["replicas"] == 2
    pod = spot["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["windflow.dev/capacity"] == "spot"
    assert {"key": "windflow.dev/capacity", "operator": "Equal", "value": "spot"}.items() <= next(
        t for t in pod["tolerations"] if t["key"] == "windflow.dev/capacity"
    ).items()
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])

    for name, doc in sets.items():
        if not name.startswith("worker-"):
            continue
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert doc["spec"]["selector"]["matchLabels"] == {
            "app.kubernetes.io/name": "worker",  # the PDB, the headless Service, the policy
            "app.kubernetes.io/instance": name,  # its own pods only
        }
        assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
        drain = k8s.drain_deadline_s(doc) or 30.0
        assert doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain


def test_models_sharing_a_class_and_region_are_named_apart(tmp_path: Path) -> None:
    plan = [
        {"worker_class": "L4", "region": "us_west", "model": "wan2.1-causal", "replicas": 1},
        {"worker_class": "L4", "region": "us_west", "model": "matrix-game-2", "replicas": 0},
    ]
    paths = k8s.write_overlay(plan, tmp_path / "o")
    assert [p.name for p in paths[2:]] == [
        "worker-l4-us-west-matrix-game-2.yaml",
        "worker-l4-us-west-wan2-1-causal.yaml",
    ]
    sets = _statefulsets(k8s.render(tmp_path / "o"))
    assert sets["worker-l4-us-west-matrix-game-2"]["spec"]["replicas"] == 0  # scaled to none
    assert "--models=wan2.1-causal" in _worker(sets["worker-l4-us-west-wan2-1-causal"])["args"]
    assert "--region=us_west" in _worker(sets["worker-l4-us-west-wan2-1-causal"])["args"]


def test_long_names_are_shortened_stably(tmp_path: Path) -> None:
    plan = [
        {
            "worker_class": "a-very-long-gpu-class-name",
            "region": "somewhere-far-away-region-1",
            "model": "m",
            "replicas": 1,
            "spot": True,
        }
    ]
    name = k8s.write_overlay(plan, tmp_path / "o")[2].stem
    assert len(name) <= 52 and name.startswith("worker-a-very-long")
    assert k8s.write_overlay(plan, tmp_path / "p")[2].stem == name
    assert k8s.validate(k8s.render(tmp_path / "o")) == []


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"region": "r", "model": "m", "replicas": 1}, "worker_class"),
        ({"worker_class": "c", "region": "", "model": "m", "replicas": 1}, "region"),
        ({"worker_class": "c", "region": "r", "model": "m", "replicas": -1}, "replicas"),
        ({"worker_class": "c", "region": "r", "model": "m", "replicas": True}, "replicas"),
    ],
)
def test_bad_plans_are_refused(tmp_path: Path, entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        k8s.write_overlay([entry], tmp_path / "o")


def test_gpu_classes() -> None:
    assert not k8s.is_gpu_class("cpu-2core") and not k8s.is_gpu_class("CPU")
    assert k8s.is_gpu_class("h100") and k8s.is_gpu_class("l4-spot")


# ------------------------------------------------------------------ the kustomize subset


def _write(directory: Path, files: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        text = content if isinstance(content, str) else yaml.safe_dump_all(content)
        (directory / name).write_text(text)
    return directory


def _deployment(name: str, image: str = "app") -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "template": {
                "spec": {
                    "containers": [
                        {"name": "main", "image": image, "args": ["a", "b"], "env": []},
                        {"name": "side", "image": "registry:5000/side:1"},
                    ]
                }
            },
        },
    }


def test_render_patches_images_replicas_namespace(tmp_path: Path) -> None:
    _write(
        tmp_path / "base",
        {
            "kustomization.yaml": [{"resources": ["app.yaml"], "namespace": "ns"}],
            "app.yaml": [_deployment("app"), {"apiVersion": "v1", "kind": "Namespace",
                                              "metadata": {"name": "ns"}}],
        },
    )  # fmt: skip
    patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "app"},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": "main", "args": ["c"], "env": [{"name": "X", "value": "1"}]}
                    ],
                    "nodeSelector": {"k": "v"},
                }
            }
        },
    }
    overlay = _write(
        tmp_path / "overlay",
        {
            "kustomization.yaml": [
                {
                    "resources": ["../base"],
                    "patches": [{"path": "patch.yaml"}],
                    "replicas": [{"name": "app", "count": 3}],
                    "images": [
                        {"name": "app", "newTag": "v2"},
                        {"name": "registry:5000/side", "newName": "other/side"},
                    ],
                }
            ],
            "patch.yaml": [patch],
        },
    )
    app, namespace = k8s.render(overlay)
    assert namespace["metadata"] == {"name": "ns"}  # cluster-scoped: no namespace
    assert app["metadata"]["namespace"] == "ns"
    assert app["spec"]["replicas"] == 3
    main, side = app["spec"]["template"]["spec"]["containers"]
    assert main == {
        "name": "main",
        "image": "app:v2",
        "args": ["c"],  # lists without a merge key are replaced
        "env": [{"name": "X", "value": "1"}],
    }
    assert side == {"name": "side", "image": "other/side:1"}  # merged by name, kept
    assert app["spec"]["template"]["spec"]["nodeSelector"] == {"k": "v"}


def test_render_deletes_and_refuses(tmp_path: Path) -> None:
    _write(
        tmp_path / "base",
        {"kustomization.yaml": [{"resources": ["a.yaml"]}], "a.yaml": [_deployment("a")]},
    )
    deleted = _write(
        tmp_path / "deleted",
        {
            "kustomization.yaml": [{"resources": ["../base"], "patches": [{"path": "d.yaml"}]}],
            "d.yaml": "$patch: delete\napiVersion: apps/v1\nkind: Deployment\n"
            "metadata:\n  name: a\n",
        },
    )
    assert k8s.render(deleted) == []

    unknown = _write(
        tmp_path / "unknown",
        {"kustomization.yaml": [{"resources": ["../base"], "commonLabels": {"a": "b"}}]},
    )
    with pytest.raises(k8s.KustomizeError, match="commonLabels"):
        k8s.render(unknown)
    twice = _write(
        tmp_path / "twice",
        {
            "kustomization.yaml": [{"resources": ["../base", "a.yaml"]}],
            "a.yaml": [_deployment("a")],
        },
    )
    with pytest.raises(k8s.KustomizeError, match="twice"):
        k8s.render(twice)
    stray = _write(
        tmp_path / "stray",
        {
            "kustomization.yaml": [{"resources": ["../base"], "patches": [{"path": "p.yaml"}]}],
            "p.yaml": [_deployment("b")],
        },
    )
    with pytest.raises(k8s.KustomizeError, match="matches no resource"):
        k8s.render(stray)


def test_split_image() -> None:
    assert k8s.split_image("windflow") == ("windflow", "", "")
    assert k8s.split_image("quay.io/coreos/etcd:v3.5.17") == ("quay.io/coreos/etcd", "v3.5.17", "")
    assert k8s.split_image("host:5000/x@sha256:ab") == ("host:5000/x", "", "sha256:ab")
