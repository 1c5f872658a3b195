"""Kubernetes manifests (``deploy/k8s``): render, check, and the overlay a plan becomes.

- ``render(directory)``: what ``kubectl apply -k DIR`` would apply, for the subset of
  kustomize the manifests use (``resources``, ``namespace``, ``images``, ``replicas``,
  strategic-merge ``patches`` given by ``path`` or inline). Kustomize is not on PyPI; this
  renderer exists to validate offline, and refuses any field it does not implement
  rather than render it wrong.
- ``validate(docs)``: every rendered document against the Kubernetes OpenAPI schemas that
  ``kubernetes-validate`` bundles, strict (unknown fields are errors).
- ``lint(paths)``: yamllint with ``deploy/k8s/.yamllint.yaml``.
- ``write_overlay(plan, out_dir)``: ``windflow plan --emit-k8s``: an overlay of the base
  with one worker StatefulSet per (worker class, region, model, spot) of the plan.
- ``python -m windflow.ops.k8s render|check``: what ``make k8s-lint`` runs.

docs/operations.md, "Kubernetes".
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

K8S_DIR = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
"""The repo's manifests (a source checkout; an installed package has none)."""
KUBERNETES_VERSION = "1.33.0"
"""The Kubernetes version manifests are validated against (a bundled schema set)."""
YAMLLINT_CONFIG = ".yamllint.yaml"
"""yamllint's configuration, at the top of the manifests' directory."""
KUSTOMIZATION = "kustomization.yaml"

DRAIN_FLAG = "--drain-deadline-s="
EMITTED_HEADER = (
    "# Written by `windflow plan --emit-k8s` (windflow/ops/k8s.py) from a capacity plan:\n"
    "# change the plan and emit again rather than edit this file.\n"
)

# kustomization fields the renderer implements; any other one is refused
_KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "images",
    "replicas",
    "patches",
}
# kinds without a namespace (the ones a Windflow manifest could hold)
_CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "PriorityClass",
    "StorageClass",
    "RuntimeClass",
}
_SCALED = {"Deployment", "StatefulSet", "ReplicaSet", "ReplicationController"}
# strategic merge: lists merged item by item on this key (the API's patchMergeKey);
# every other list is replaced whole, as the API does for args, command, tolerations ...
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "topologySpreadConstraints": "topologyKey",
}
_DNS_LABEL = re.compile(r"[^a-z0-9-]+")
_MAX_NAME = 52  # a StatefulSet's pods carry a controller-revision-hash label of name + 11


class KustomizeError(ValueError):
    """A kustomization this renderer cannot render (or kustomize would refuse)."""


# ---------------------------------------------------------------------------- rendering


def render(directory: Path) -> list[dict[str, Any]]:
    """The documents ``kustomize build DIRECTORY`` makes, in resource order."""
    return _build(Path(directory).resolve(), ())


def _build(directory: Path, seen: tuple[Path, ...]) -> list[dict[str, Any]]:
    if directory in seen:
        raise KustomizeError(f"{directory}: a cycle of kustomizations")
    path = directory / KUSTOMIZATION
    if not path.is_file():
        raise KustomizeError(f"{directory}: no {KUSTOMIZATION}")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise KustomizeError(f"{path}: not a mapping")
    unknown = sorted(set(spec) - _KUSTOMIZATION_FIELDS)
    if unknown:
        raise KustomizeError(f"{path}: fields this renderer does not implement: {unknown}")
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{path}: kind {spec.get('kind')!r}, not Kustomization")

    docs: list[dict[str, Any]] = []
    for entry in spec.get("resources") or []:
        target = (directory / str(entry)).resolve()
        if target.is_dir():
            docs += _build(target, (*seen, directory))
        elif target.is_file():
            docs += load_documents(target)
        else:
            raise KustomizeError(f"{path}: resource {entry!r} does not exist")
    _check_unique(docs, path)

    for patch in spec.get("patches") or []:
        _apply_patch(docs, _patch_document(patch, directory, path), path)
    namespace = spec.get("namespace")
    if namespace:
        for doc in docs:
            if doc.get("kind") not in _CLUSTER_SCOPED:
                doc.setdefault("metadata", {})["namespace"] = str(namespace)
    for replica in spec.get("replicas") or []:
        _set_replicas(docs, replica, path)
    for image in spec.get("images") or []:
        _set_images(docs, image, path)
    return docs


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty documents of a YAML file, each a mapping with a kind."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            raise KustomizeError(f"{path}: a document without apiVersion and kind")
    return docs


def _ident(doc: dict[str, Any]) -> tuple[str, str, str, str]:
    group = str(doc.get("apiVersion", "")).rpartition("/")[0]
    meta = doc.get("metadata") or {}
    return group, str(doc.get("kind")), str(meta.get("namespace", "")), str(meta.get("name"))


def _check_unique(docs: list[dict[str, Any]], where: Path) -> None:
    seen: set[tuple[str, str, str, str]] = set()
    for doc in docs:
        ident = _ident(doc)
        if ident in seen:
            raise KustomizeError(f"{where}: {ident[1]}/{ident[3]} is defined twice")
        seen.add(ident)


def _patch_document(entry: Any, directory: Path, where: Path) -> dict[str, Any]:
    if not isinstance(entry, dict) or set(entry) - {"path", "patch"}:
        raise KustomizeError(f"{where}: a patch with fields other than path or patch: {entry!r}")
    if "path" in entry:
        docs = load_documents(directory / str(entry["path"]))
    else:
        docs = [d for d in yaml.safe_load_all(str(entry.get("patch", ""))) if d is not None]
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise KustomizeError(f"{where}: a patch must be one strategic-merge document")
    return docs[0]


def _apply_patch(docs: list[dict[str, Any]], patch: dict[str, Any], where: Path) -> None:
    group, kind, namespace, name = _ident(patch)
    for i, doc in enumerate(docs):
        g, k, ns, n = _ident(doc)
        if (g, k, n) == (group, kind, name) and (not namespace or ns == namespace):
            if patch.get("$patch") == "delete":
                del docs[i]
            else:
                docs[i] = _merge(doc, patch)
            return
    raise KustomizeError(f"{where}: the patch for {kind}/{name} matches no resource")


def _merge(base: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge of ``patch`` into ``base`` (a copy; the inputs stay as they were)."""
    if isinstance(patch, dict):
        if "$patch" in patch or any(str(k).startswith("$") for k in patch):
            raise KustomizeError(f"{field or 'patch'}: directives other than a whole delete")
        if not isinstance(base, dict):
            return copy.deepcopy(patch)
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = _merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(patch, list) and isinstance(base, list):
        key = _MERGE_KEYS.get(field)
        if field == "ports":
            key = "containerPort" if all("containerPort" in p for p in patch) else "port"
        if key is None or not all(isinstance(p, dict) and key in p for p in patch):
            return copy.deepcopy(patch)
        merged = copy.deepcopy(base)
        for item in patch:
            for i, existing in enumerate(merged):
                if isinstance(existing, dict) and existing.get(key) == item[key]:
                    merged[i] = _merge(existing, item, field)
                    break
            else:
                merged.append(copy.deepcopy(item))
        return merged
    return copy.deepcopy(patch)


def _set_replicas(docs: list[dict[str, Any]], entry: dict[str, Any], where: Path) -> None:
    hits = [
        d
        for d in docs
        if d.get("kind") in _SCALED and (d.get("metadata") or {}).get("name") == entry.get("name")
    ]
    if not hits or not isinstance(entry.get("count"), int):
        raise KustomizeError(f"{where}: replicas {entry!r} match no workload (or no count)")
    for doc in hits:
        doc.setdefault("spec", {})["replicas"] = entry["count"]


def split_image(image: str) -> tuple[str, str, str]:
    """``name[:tag][@digest]`` -> (name, tag, digest); a registry's port is not a tag."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest


def _containers(doc: dict[str, Any]) -> Iterable[dict[str, Any]]:
    stack: list[Any] = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    yield from (c for c in value if isinstance(c, dict))
                else:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)


def _set_images(docs: list[dict[str, Any]], entry: dict[str, Any], where: Path) -> None:
    if not entry.get("name") or set(entry) - {"name", "newName", "newTag", "digest"}:
        raise KustomizeError(f"{where}: an image entry this renderer cannot apply: {entry!r}")
    for doc in docs:
        for container in _containers(doc):
            name, tag, digest = split_image(str(container.get("image", "")))
            if name != entry["name"]:
                continue
            name = str(entry.get("newName", name))
            if "digest" in entry:  # a digest replaces tag and digest
                container["image"] = f"{name}@{entry['digest']}"
            elif "newTag" in entry:  # a tag replaces tag and digest
                container["image"] = f"{name}:{entry['newTag']}"
            else:  # a new name keeps what followed the old one
                container["image"] = (
                    name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
                )


# --------------------------------------------------------------------------- validation


def validate(docs: Iterable[dict[str, Any]], version: str = KUBERNETES_VERSION) -> list[str]:
    """Each document against the bundled schema of its kind, strict; a kind without a
    schema is an error too. Returns the problems, one line each ([] when all pass)."""
    from kubernetes_validate import utils  # a dev dependency: only checks need it

    problems: list[str] = []
    for doc in docs:
        what = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        try:
            utils.validate(doc, version, strict=True)
        except utils.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{what}: {path}: {exc.message}")
        except (utils.SchemaNotFoundError, utils.VersionNotSupportedError) as exc:
            problems.append(f"{what}: {exc.message}")
    return problems


def yaml_files(root: Path) -> list[Path]:
    """Every YAML file under ``root``, sorted."""
    return sorted(p for p in Path(root).rglob("*") if p.suffix in (".yaml", ".yml"))


def lint(paths: Iterable[Path], config: Path | None = None) -> list[str]:
    """yamllint over ``paths`` with ``config`` (default deploy/k8s/.yamllint.yaml); every
    problem, warnings included, one line each."""
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(file=str(config or K8S_DIR / YAMLLINT_CONFIG))
    problems: list[str] = []
    for path in paths:
        for problem in linter.run(Path(path).read_text(), conf, str(path)):
            problems.append(
                f"{path}:{problem.line}:{problem.column}: {problem.level} {problem.message} "
                f"({problem.rule})"
            )
    return problems


def kustomizations(root: Path = K8S_DIR) -> list[Path]:
    """The directories under ``root`` holding a kustomization, sorted (base and overlays)."""
    return sorted(p.parent for p in Path(root).rglob(KUSTOMIZATION))


def check(root: Path = K8S_DIR, version: str = KUBERNETES_VERSION) -> list[str]:
    """yamllint over every YAML file under ``root``, then every kustomization rendered and
    validated. The problems, one line each."""
    root = Path(root)
    problems = lint(yaml_files(root), root / YAMLLINT_CONFIG)
    for directory in kustomizations(root):
        try:
            docs = render(directory)
        except KustomizeError as exc:
            problems.append(str(exc))
            continue
        problems += [f"{directory.relative_to(root)}: {p}" for p in validate(docs, version)]
    return problems


# ------------------------------------------------------------------------------ output


class _Dumper(yaml.SafeDumper):
    """Block style with sequences indented under their key (what yamllint's config asks)."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)

    def choose_scalar_style(self) -> str:
        style = super().choose_scalar_style()
        return '"' if style == "'" else style  # one quote style: double


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(docs: Sequence[dict[str, Any]]) -> str:
    """The documents as one YAML stream (``---`` between them), keys in their order."""
    return "---\n".join(
        yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
        for doc in docs
    )


# --------------------------------------------------------------------- plan -> overlay


def write_overlay(
    plan: list[dict[str, Any]], out_dir: Path, *, k8s_dir: Path = K8S_DIR
) -> list[Path]:
    """Write ``plan`` (the planner's lines, ``Plan.to_json()``: dicts with ``worker_class``,
    ``region``, ``model``, ``replicas``, ``spot``, the quality planned: ``rung``, ``steps``,
    ``fps``, and ``sessions_per_replica``; other keys are ignored) as a kustomize overlay
    in ``out_dir``: the base of ``k8s_dir`` with its worker StatefulSet replaced by one per
    (worker class, region, model, spot), named ``worker-<class>-<region>`` (``-<model>``
    when the class serves several models in that region, ``-spot`` on spot capacity).

    Each is the CPU or GPU overlay's worker (a class named ``cpu...`` is CPU, any other a
    GPU class) with the group's replicas summed, ``--region``, ``--models``,
    ``--capacity`` (the most sessions per replica planned, so the slot cap never binds
    below the plan), node selectors for its class (``windflow.dev/worker-class``), region
    (``topology.kubernetes.io/region``) and spot capacity (``windflow.dev/capacity: spot``,
    its taint tolerated), and the plan's figures as annotations. Same plan, same bytes.
    Returns the files written, kustomization.yaml first; ``kubectl apply -k OUT_DIR``
    applies it."""
    k8s_dir = Path(k8s_dir).resolve()
    base = k8s_dir / "base"
    if not (base / KUSTOMIZATION).is_file():
        raise FileNotFoundError(f"no kustomize base at {base} (a source checkout's deploy/k8s)")
    groups = _groups(plan)
    names = _names(list(groups))
    templates = {kind: _worker_template(k8s_dir / "overlays" / kind) for kind in ("cpu", "gpu")}
    namespace = (yaml.safe_load((base / KUSTOMIZATION).read_text()) or {}).get("namespace")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    files: list[str] = []
    for key, entries in groups.items():
        name = names[key]
        doc = _worker_for(templates, key, entries, name)
        path = out / f"{name}.yaml"
        path.write_text(EMITTED_HEADER + dump([doc]))
        files.append(path.name)
        written.append(path)
    delete = out / "delete-base-worker.yaml"
    delete.write_text(
        EMITTED_HEADER
        + "# the base's one worker StatefulSet gives way to the plan's\n"
        + dump(
            [
                {
                    "$patch": "delete",
                    "apiVersion": "apps/v1",
                    "kind": "StatefulSet",
                    "metadata": {"name": "worker"},
                }
            ]
        )
    )
    kustomization: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
    }
    if namespace:
        kustomization["namespace"] = namespace
    kustomization["resources"] = [_relative(base, out.resolve()), *files]
    kustomization["patches"] = [{"path": delete.name}]
    kustomization["images"] = [
        {"name": "windflow", "newTag": "latest"},
        {"name": "windflow-cuda", "newTag": "latest"},
    ]
    path = out / KUSTOMIZATION
    path.write_text(EMITTED_HEADER + dump([kustomization]))
    return [path, delete, *written]


_GroupKey = tuple[str, str, str, bool]


def _groups(plan: list[dict[str, Any]]) -> dict[_GroupKey, list[dict[str, Any]]]:
    groups: dict[_GroupKey, list[dict[str, Any]]] = {}
    for i, entry in enumerate(plan):
        for field in ("worker_class", "region", "model"):
            if not isinstance(entry.get(field), str) or not entry[field]:
                raise ValueError(f"plan[{i}].{field}: expected a non-empty string")
        replicas = entry.get("replicas")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ValueError(f"plan[{i}].replicas: expected a whole number >= 0")
        key = (entry["worker_class"], entry["region"], entry["model"], bool(entry.get("spot")))
        groups.setdefault(key, []).append(entry)
    return dict(sorted(groups.items()))


def _slug(text: str) -> str:
    return _DNS_LABEL.sub("-", text.lower()).strip("-") or "x"


def _names(keys: list[_GroupKey]) -> dict[_GroupKey, str]:
    models: dict[tuple[str, str, bool], set[str]] = {}
    for cls, region, model, spot in keys:
        models.setdefault((cls, region, spot), set()).add(model)
    names: dict[_GroupKey, str] = {}
    for key in keys:
        cls, region, model, spot = key
        parts = ["worker", _slug(cls), _slug(region)]
        if len(models[(cls, region, spot)]) > 1:
            parts.append(_slug(model))
        if spot:
            parts.append("spot")
        name = re.sub("-+", "-", "-".join(parts))
        if len(name) > _MAX_NAME:
            digest = hashlib.sha256(repr(key).encode()).hexdigest()[:6]
            name = f"{name[: _MAX_NAME - 7].rstrip('-')}-{digest}"
        if name in names.values():
            raise ValueError(f"two groups of the plan make the same StatefulSet name {name!r}")
        names[key] = name
    return names


def _worker_template(overlay: Path) -> dict[str, Any]:
    for doc in render(overlay):
        if doc.get("kind") == "StatefulSet" and doc["metadata"]["name"] == "worker":
            return doc
    raise KustomizeError(f"{overlay}: no worker StatefulSet")


def is_gpu_class(worker_class: str) -> bool:
    """Whether a plan's worker class runs on GPUs: every class not named ``cpu...``."""
    return not worker_class.lower().startswith("cpu")


def _worker_for(
    templates: dict[str, dict[str, Any]],
    key: _GroupKey,
    entries: list[dict[str, Any]],
    name: str,
) -> dict[str, Any]:
    cls, region, model, spot = key
    doc = copy.deepcopy(templates["gpu" if is_gpu_class(cls) else "cpu"])
    meta = doc["metadata"]
    meta.pop("namespace", None)
    meta["name"] = name
    meta["labels"]["app.kubernetes.io/instance"] = name

    def values(field: str) -> str:
        seen = {str(e[field]) for e in entries if e.get(field) is not None}
        return ",".join(sorted(seen, key=lambda v: (len(v), v)))

    annotations = {
        "windflow.dev/worker-class": cls,
        "windflow.dev/region": region,
        "windflow.dev/model": model,
        "windflow.dev/spot": "true" if spot else "false",
    }
    for field in ("rung", "steps", "fps"):
        if values(field):
            annotations[f"windflow.dev/plan-{field}"] = values(field)
    meta["annotations"] = annotations

    spec = doc["spec"]
    spec["replicas"] = sum(int(e["replicas"]) for e in entries)
    spec["selector"]["matchLabels"]["app.kubernetes.io/instance"] = name
    pod = spec["template"]
    pod["metadata"]["labels"]["app.kubernetes.io/instance"] = name
    pod_spec = pod["spec"]
    selector = dict(pod_spec.get("nodeSelector") or {})
    selector["topology.kubernetes.io/region"] = region
    selector["windflow.dev/worker-class"] = cls
    if spot:
        selector["windflow.dev/capacity"] = "spot"
        pod_spec["tolerations"] = [
            *(pod_spec.get("tolerations") or []),
            {
                "key": "windflow.dev/capacity",
                "operator": "Equal",
                "value": "spot",
                "effect": "NoSchedule",
            },
        ]
    pod_spec["nodeSelector"] = dict(sorted(selector.items()))
    container = next(c for c in pod_spec["containers"] if c["name"] == "worker")
    flags = {"--region": region, "--models": model}
    # the planner's sessions per replica (the most of the group's rungs): the worker's slot
    # cap must not bind below what the plan counts on (admission by fps still applies)
    per_replica = [
        e["sessions_per_replica"]
        for e in entries
        if isinstance(e.get("sessions_per_replica"), int)
        and not isinstance(e["sessions_per_replica"], bool)
        and e["sessions_per_replica"] > 0
    ]
    if per_replica:
        flags["--capacity"] = str(max(per_replica))
    args = [a for a in container["args"] if a.partition("=")[0] not in flags]
    container["args"] = args + [f"{flag}={value}" for flag, value in flags.items()]
    return doc


def _relative(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def drain_deadline_s(doc: dict[str, Any]) -> float | None:
    """A worker StatefulSet's ``--drain-deadline-s`` (None: not given, the flag's 30 s)."""
    for container in doc["spec"]["template"]["spec"]["containers"]:
        for arg in container.get("args") or []:
            if str(arg).startswith(DRAIN_FLAG):
                return float(str(arg)[len(DRAIN_FLAG) :])
    return None


# --------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m windflow.ops.k8s", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("render", help="render kustomizations (a kustomize build subset)")
    one.add_argument("directories", nargs="*", type=Path, help="default: every one in --root")
    one.add_argument("--root", type=Path, default=K8S_DIR)
    one.add_argument("--out", type=Path, help="write <dir path with '-'>.yaml files here")
    every = sub.add_parser("check", help="yamllint, render and validate everything in --root")
    every.add_argument("--root", type=Path, default=K8S_DIR)
    every.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    args = parser.parse_args(argv)

    if args.command == "check":
        problems = check(args.root, args.kubernetes_version)
        for problem in problems:
            print(problem, file=sys.stderr)
        count = len(kustomizations(args.root))
        if problems:
            print(f"{args.root}: {len(problems)} problem(s)", file=sys.stderr)
            return 1
        print(
            f"{args.root}: yamllint clean, {count} kustomizations render and validate "
            f"(kubernetes {args.kubernetes_version}, strict)"
        )
        return 0

    directories = args.directories or kustomizations(args.root)
    try:
        for directory in directories:
            text = dump(render(directory))
            if args.out is None:
                sys.stdout.write(text)
                continue
            args.out.mkdir(parents=True, exist_ok=True)
            try:
                label = Path(directory).resolve().relative_to(Path(args.root).resolve())
            except ValueError:
                label = Path(Path(directory).name)
            (args.out / f"{'-'.join(label.parts) or 'root'}.yaml").write_text(text)
    except KustomizeError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
