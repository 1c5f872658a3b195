"""What the built-in models (``world``, ``restyle``) share: a step's argument checks, torch's
thread count inside a step, their snapshot framing and their weight files' version digest.

A snapshot is ``MAGIC`` (8 bytes) | header length (u32 LE) | JSON header | body | SHA-256
of everything before it. No pickle: restoring bytes from elsewhere runs no code.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from services.worker.models.base import Control, SessionState, WorldModel
from windflow.errors import InvalidArgument, SnapshotError

_HEADER = struct.Struct("<8sI")  # magic, header length
_DIGEST = 32  # trailing SHA-256 of everything before it


def check_step(
    model: WorldModel,
    states: Sequence[SessionState],
    controls: Sequence[Control],
    steps: int,
) -> None:
    """``WorldModel.step``'s argument rules, before any state is touched: ``steps`` on the
    ladder, one control per state, each control valid, no state twice."""
    if steps not in model.info.steps:
        raise InvalidArgument(f"steps must be one of {model.info.steps}, got {steps}")
    if len(states) != len(controls):
        raise InvalidArgument(
            f"one control per session state: {len(states)} states, {len(controls)} controls"
        )
    for control in controls:
        model.validate_control(control)
    if len({id(s) for s in states}) != len(states):
        raise InvalidArgument("a session state appears twice in one batch")


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads inside the block (None: leave as it is)."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pack_snapshot(magic: bytes, header: dict[str, Any], body: bytes) -> bytes:
    """A snapshot of ``header`` (JSON, keys sorted) and ``body``, framed and checksummed."""
    head = json.dumps(header, sort_keys=True).encode()
    payload = _HEADER.pack(magic, len(head)) + head + body
    return payload + hashlib.sha256(payload).digest()


def read_snapshot(data: bytes, magic: bytes, model_id: str) -> tuple[dict[str, Any], bytes]:
    """Check ``magic`` and the checksum; the JSON header and the raw body
    (``SnapshotError`` naming ``model_id`` when anything is off)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SnapshotError(f"a snapshot is bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _HEADER.size + _DIGEST or not data.startswith(magic):
        raise SnapshotError(f"not a {model_id} snapshot (bad magic or too short)")
    payload, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError(f"{model_id} snapshot is corrupted or truncated (checksum mismatch)")
    _, head_len = _HEADER.unpack_from(payload)
    if _HEADER.size + head_len > len(payload):
        raise SnapshotError(f"{model_id} snapshot header runs past the end of the data")
    try:
        header = json.loads(payload[_HEADER.size : _HEADER.size + head_len])
    except ValueError as exc:
        raise SnapshotError(f"{model_id} snapshot header is unreadable: {exc}") from exc
    if not isinstance(header, dict):
        raise SnapshotError(f"{model_id} snapshot header is not a JSON object")
    return header, payload[_HEADER.size + head_len :]


class NetConfig(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


class Net(Protocol):
    @property
    def cfg(self) -> NetConfig: ...

    def state_dict(self) -> Mapping[str, torch.Tensor]: ...


def weights_digest(tensors: Mapping[str, torch.Tensor], cfg: NetConfig) -> str:
    """12 hex digits of a SHA-256 over the network's config and the tensors (names, dtypes,
    shapes, bytes): the same weights in the same network give the same model version
    whatever the file's header order, and a config switch without weights of its own that
    changes the frames gives another."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:12]


def save_weights(net: Net, path: Path, meta: dict[str, str] | None = None) -> None:
    """``net``'s weights as safetensors at ``path``, its config (and ``meta``) in the
    metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"config": json.dumps(net.cfg.to_dict()), **(meta or {})}
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)
