"""Pure parts of windflow.infra: ports, restart policy, child specs, exit descriptions."""

from __future__ import annotations

import argparse
import re
import signal
import socket
from pathlib import Path

import pytest

from windflow.cli.up import parse_regions, ready_line
from windflow.infra import ChildSpec, GrpcHealthProbe, RestartPolicy, Stack, StackConfig
from windflow.infra.ports import address, free_port, free_ports
from windflow.infra.supervisor import Supervisor, describe_exit


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    assert 0 < free_port() < 65536
    assert free_ports(0) == []
    with pytest.raises(ValueError):
        free_ports(-1)


def test_address_brackets_ipv6() -> None:
    assert address("127.0.0.1", 80) == "127.0.0.1:80"
    assert address("::1", 80) == "[::1]:80"


def test_backoff_doubles_and_is_capped() -> None:
    policy = RestartPolicy(max_restarts=5, backoff_initial_s=0.5, backoff_max_s=3.0)
    assert [policy.backoff_s(n) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    with pytest.raises(ValueError):
        RestartPolicy(max_restarts=-1)


def test_child_spec_probe_choice_and_validation() -> None:
    assert ChildSpec("a", ("true",)).probe() is None
    probe = ChildSpec("a", ("true",), health_address="127.0.0.1:1").probe()
    assert isinstance(probe, GrpcHealthProbe) and probe.address == "127.0.0.1:1"

    async def custom() -> bool:
        return True

    assert ChildSpec("a", ("true",), health_address="x:1", ready_probe=custom).probe() is custom
    with pytest.raises(ValueError):
        ChildSpec("", ("true",))
    with pytest.raises(ValueError):
        ChildSpec("a/b", ("true",))
    with pytest.raises(ValueError):
        ChildSpec("a", ())


def test_describe_exit() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"


def test_supervisor_rejects_duplicate_names(tmp_path: Path) -> None:
    spec = ChildSpec("same", ("true",))
    with pytest.raises(ValueError, match="duplicate"):
        Supervisor([[spec], [spec]], tmp_path)


def test_stack_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        StackConfig(state_dir=tmp_path, workers=-1)
    with pytest.raises(ValueError):
        StackConfig(state_dir=tmp_path, service_command=())
    with pytest.raises(ValueError):
        StackConfig(state_dir=tmp_path, gateways=0)


def test_stack_gateways_names_ports_and_ready_line(tmp_path: Path) -> None:
    """Several gateways: the first keeps the one gateway's name, port and place in the
    ready line (scripts take the address after "gateway "); all follow "gateways="."""
    port = free_port()
    stack = Stack(StackConfig(state_dir=tmp_path, workers=1, gateways=3, gateway_port=port))
    assert stack.gateway_names == ["gateway", "gateway-2", "gateway-3"]
    # the gateways' stage, in order, then the browser bridge, a client of theirs
    assert stack.supervisor.names[-4:] == [*stack.gateway_names, "bridge"]
    assert stack.bridge_url is not None and stack.bridge_url.startswith("http://127.0.0.1:")
    addresses = stack.gateway_addresses
    assert addresses[0] == stack.gateway_address == f"127.0.0.1:{port}"
    assert len(set(addresses)) == 3 and all(a.startswith("127.0.0.1:") for a in addresses)
    assert [stack.addresses[name] for name in stack.gateway_names] == addresses

    line = ready_line(stack)
    first = re.search(r"ready.*gateway (\S+:\d+)", line)  # as tests/integration parse it
    every = re.search(r"gateways=(\S+)", line)
    state = re.search(r"state in (\S+?)\)", line)
    assert first and every and state, line
    assert first.group(1) == addresses[0]
    assert every.group(1).split(",") == addresses
    assert state.group(1) == str(tmp_path)
    assert line.startswith(f"windflow ready: gateway {addresses[0]} ")

    one = Stack(StackConfig(state_dir=tmp_path, workers=0))
    assert one.gateway_names == ["gateway"] and one.gateway_addresses == [one.gateway_address]
    assert f"gateways={one.gateway_address} routers={one.router_addresses} (0 workers" in (
        ready_line(one)
    )


def test_stack_router_replicas_and_worker_regions(tmp_path: Path) -> None:
    """``--routers 2``: replicas ``router`` and ``router-2``, started together, and every
    service that dials the router is given both; ``--regions``: one region per worker."""
    workers, regions = parse_regions("us-east:2,eu-west:1")
    assert workers == 3
    assert regions == {"worker-1": "us-east", "worker-2": "us-east", "worker-3": "eu-west"}
    for bad in ("us-east", "us-east:0", ":2", "a:2,b"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_regions(bad)
    stack = Stack(
        StackConfig(state_dir=tmp_path, workers=workers, worker_regions=regions, routers=2)
    )
    assert stack.router_names == ["router", "router-2"]
    both = stack.router_addresses
    assert both == f"{stack.addresses['router']},{stack.addresses['router-2']}"
    assert f"routers={both} " in ready_line(stack)
    argv = {
        child.name: child.argv
        for stage in stack._stages()  # (the specs as the supervisor starts them)
        for child in stage
    }
    assert {"router", "router-2"} <= set(argv)
    for name in ("session", "gateway", "worker-1"):
        args = list(argv[name])
        assert args[args.index("--router") + 1] == both, name
    for name, region in regions.items():
        args = list(argv[name])
        assert args[args.index("--region") + 1] == region
    with pytest.raises(ValueError, match="routers must be >= 1"):
        StackConfig(state_dir=tmp_path, routers=0)
