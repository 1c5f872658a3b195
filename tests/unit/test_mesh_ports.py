"""The test mesh gives every address and metrics port of its services a port of its own
(tests/e2e/mesh.py): a port picked twice would let two gRPC servers share it (gRPC binds
with SO_REUSEPORT), and a call to a router could land on a worker ("unknown service
windflow.v1.Router", seen in tests/e2e/test_router_ha.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import mesh as mesh_module
from tests.e2e.mesh import Mesh


def test_a_port_picked_again_is_never_handed_out_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    picks = iter([[7001], [7001], [7001], [7002], [7003], [7003], [7004]])
    monkeypatch.setattr(mesh_module, "free_ports", lambda count, besides=(): next(picks))
    mesh = Mesh.__new__(Mesh)
    mesh._used_ports = set()
    got = [mesh._port() for _ in range(4)]
    assert got == [7001, 7002, 7003, 7004]


def test_every_address_and_metrics_port_is_distinct(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path, workers=4, routers=3)
    for name in mesh.addresses:
        mesh._spec(name)
    ports = [a.rsplit(":", 1)[1] for a in [*mesh.addresses.values(), *mesh.metrics.values()]]
    assert len(ports) == len(set(ports)) == 2 * (3 + 2 + 4)


class _Kernel:
    """A stand-in socket module whose kernel hands out scripted ports."""

    def __init__(self, ports: list[int]) -> None:
        self._ports = iter(ports)

    def socket(self, *_: object) -> _Kernel.Sock:
        return _Kernel.Sock(next(self._ports))

    class Sock:
        def __init__(self, port: int) -> None:
            self.port = port

        def __enter__(self) -> _Kernel.Sock:
            return self

        def __exit__(self, *_: object) -> None:
            pass

        def bind(self, _: object) -> None:
            pass

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)


def test_free_ports_skips_the_ports_handed_out_before(monkeypatch: pytest.MonkeyPatch) -> None:
    from windflow.infra import ports

    fake = _Kernel([9001, 9002, 9003, 9004])
    monkeypatch.setattr(ports.socket, "socket", fake.socket)
    assert ports.free_ports(2, besides={9001, 9003}) == [9002, 9004]
