"""The embedded stack and ``windflow up`` with real etcd and NATS and stand-in services.

The services are the conftest's fake ``serve`` program (gRPC health only), passed in as
the service command, so these tests exercise the wiring and the supervision, not the
services themselves.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from etcd3aio import Etcd3Client

from windflow.infra import GrpcHealthProbe, RestartPolicy, Stack, StackConfig, pid_alive

READY_LINE = re.compile(r"ready.*gateway (\S+:\d+)")


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def _children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (read from /proc; our children run in own sessions)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
                found.append(int(entry))
    return found


async def test_stack_wires_every_service_and_stops_clean(
    tmp_path: Path, fake_service_program: Path
) -> None:
    config = StackConfig(
        state_dir=tmp_path,
        workers=2,
        region="eu-test",
        service_command=(sys.executable, str(fake_service_program)),
        restart=RestartPolicy(max_restarts=0),
        bridge=False,  # (the fake service answers gRPC health, not the bridge's HTTP)
    )
    stack = Stack(config)
    async with stack:
        pids = stack.supervisor.pids()
        assert list(pids) == [
            "etcd", "nats", "router", "session", "worker-1", "worker-2", "gateway"
        ]  # fmt: skip
        assert await GrpcHealthProbe(stack.gateway_address)()
        async with Etcd3Client([stack.etcd_endpoint]) as client:
            assert client.kv is not None
            await client.kv.put("/windflow/test/stack", b"up")
        assert stack.nats_url.startswith("nats://127.0.0.1:")

        common = ["--etcd", stack.etcd_endpoint, "--nats", stack.nats_url]
        worker = _cmdline(pids["worker-2"])
        assert worker[2:5] == ["worker", "--listen", stack.addresses["worker-2"]]
        assert _contains(worker, common)
        assert _contains(worker, ["--worker-id", "worker-2"])
        assert _contains(worker, ["--region", "eu-test"])
        gateway = _cmdline(pids["gateway"])
        assert gateway[2:5] == ["gateway", "--listen", stack.gateway_address]
        assert _contains(gateway, ["--router", stack.addresses["router"]])
        assert _contains(gateway, ["--session-service", stack.addresses["session"]])
        assert _contains(_cmdline(pids["router"]), ["--region", "eu-test"])
        assert stack.failure is None
    assert [name for name, pid in pids.items() if pid_alive(pid)] == []
    assert (tmp_path / "logs" / "gateway.log").read_text().count("fake gateway serving") == 1


def _exists(path: Path) -> bool:
    return path.exists()


def _contains(argv: list[str], part: list[str]) -> bool:
    return any(argv[i : i + len(part)] == part for i in range(len(argv)))


def _start_up(*args: str) -> subprocess.Popen[str]:
    """``windflow up`` with fake services (so no browser bridge: it answers HTTP)."""
    return subprocess.Popen(
        [sys.executable, "-m", "windflow", "up", "--no-bridge", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_windflow_up_serves_and_stops_on_sigterm(fake_service_program: Path) -> None:
    command = f"{sys.executable} {fake_service_program}"
    up = _start_up("--workers", "1", "--service-command", command)
    try:
        assert up.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(up.stdout.readline), 60)
        match = READY_LINE.search(line)
        state = re.search(r"state in (\S+?)\)", line)
        assert match and state, f"no ready line: {line!r}"
        assert await GrpcHealthProbe(match.group(1))()
        assert _exists(Path(state.group(1), "logs", "gateway.log"))
        children = _children_of(up.pid)
        assert len(children) == 6  # etcd, nats, router, session, worker-1, gateway
        up.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(asyncio.to_thread(up.wait), 30)
        assert code == 0, up.stderr.read() if up.stderr else ""
        assert [pid for pid in children if pid_alive(pid)] == []
        assert not _exists(Path(state.group(1)))  # the default temporary state dir is removed
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for stream in (up.stdout, up.stderr):
            if stream is not None:
                stream.close()


async def test_windflow_up_runs_several_gateways(
    tmp_path: Path, fake_service_program: Path
) -> None:
    """``--gateways 2``: two supervised gateway processes, each on its own port; the ready
    line keeps the first where scripts look for it and lists both after "gateways="."""
    command = f"{sys.executable} {fake_service_program}"
    up = _start_up(
        "--workers", "0", "--gateways", "2", "--state-dir", str(tmp_path),
        "--service-command", command,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(up.stdout.readline), 60)
        first = READY_LINE.search(line)
        every = re.search(r"gateways=(\S+)", line)
        assert first and every and f"state in {tmp_path})" in line, f"ready line: {line!r}"
        gateways = every.group(1).split(",")
        assert len(set(gateways)) == 2 and gateways[0] == first.group(1)
        for gateway in gateways:
            assert await GrpcHealthProbe(gateway)()
        children = _children_of(up.pid)
        listening = {_listen_address(pid) for pid in children}
        assert listening >= set(gateways)  # each gateway a process of its own
        assert len(children) == 6  # etcd, nats, router, session, gateway, gateway-2
        assert _exists(tmp_path / "logs" / "gateway-2.log")
        up.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(asyncio.to_thread(up.wait), 30)
        assert code == 0, up.stderr.read() if up.stderr else ""
        assert [pid for pid in children if pid_alive(pid)] == []
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for stream in (up.stdout, up.stderr):
            if stream is not None:
                stream.close()


def _listen_address(pid: int) -> str | None:
    argv = _cmdline_or_empty(pid)
    return argv[argv.index("--listen") + 1] if "--listen" in argv else None


async def test_windflow_up_exits_nonzero_when_the_stack_cannot_start(
    tmp_path: Path, fake_service_program: Path
) -> None:
    command = f"{sys.executable} {fake_service_program} --exit-before-ready 5"
    started = time.monotonic()
    up = _start_up("--workers", "1", "--state-dir", str(tmp_path), "--service-command", command)
    out, err = await asyncio.wait_for(asyncio.to_thread(up.communicate), 60)
    assert up.returncode == 1
    assert "ready" not in out
    assert "failed to start" in err and "exited with code 5" in err
    assert "failing on purpose" in err  # the child's own last words
    assert time.monotonic() - started < 60


async def test_windflow_up_stops_everything_when_a_child_keeps_dying(
    tmp_path: Path, fake_service_program: Path
) -> None:
    command = f"{sys.executable} {fake_service_program}"
    up = _start_up("--workers", "0", "--state-dir", str(tmp_path), "--service-command", command)
    try:
        assert up.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(up.stdout.readline), 60)
        assert READY_LINE.search(line), line
        children = _children_of(up.pid)
        killed: list[int] = []
        async with asyncio.timeout(60):
            while up.poll() is None:  # kill the router whenever it is back, until up gives up
                routers = [
                    pid for pid in _children_of(up.pid) if "router" in _cmdline_or_empty(pid)
                ]
                fresh = [pid for pid in routers if pid not in killed]
                if fresh:
                    os.kill(fresh[0], signal.SIGKILL)
                    killed.append(fresh[0])
                await asyncio.sleep(0.05)
        _, err = await asyncio.to_thread(up.communicate)
        assert up.returncode == 1, err
        assert len(killed) == 4  # the default policy allows 3 restarts
        assert "the stack stopped" in err and "router" in err and "signal SIGKILL" in err
        assert [pid for pid in [*children, *killed] if pid_alive(pid)] == []
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()


async def test_windflow_up_stops_cleanly_on_sigterm_while_starting(
    tmp_path: Path, fake_service_program: Path
) -> None:
    command = f"{sys.executable} {fake_service_program} --never-ready"
    up = _start_up("--workers", "1", "--state-dir", str(tmp_path), "--service-command", command)
    try:
        children: list[int] = []
        for _ in range(1500):  # etcd, nats, router and session: the last two never get ready
            if len(children := _children_of(up.pid)) >= 4:
                break
            await asyncio.sleep(0.02)
        assert len(children) == 4
        up.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(asyncio.to_thread(up.communicate), 30)
        assert up.returncode == 0, err
        assert "ready" not in out
        assert [pid for pid in children if pid_alive(pid)] == []
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()


def _cmdline_or_empty(pid: int) -> list[str]:
    try:
        return _cmdline(pid)
    except OSError:
        return []


async def test_windflow_up_serves_the_models_it_is_asked_for(
    tmp_path: Path, fake_service_program: Path
) -> None:
    """``--models A,B``: every worker is started serving both; an unknown model id exits 2
    before anything starts, naming the registered ones."""
    command = f"{sys.executable} {fake_service_program}"
    up = _start_up(
        "--workers", "1", "--models", "windflow-world,wan-causal-tiny",
        "--state-dir", str(tmp_path), "--service-command", command,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(up.stdout.readline), 60)
        assert READY_LINE.search(line), f"no ready line: {line!r}"
        workers = [
            argv for argv in map(_cmdline_or_empty, _children_of(up.pid)) if "worker" in argv
        ]
        assert len(workers) == 1
        assert _contains(workers[0], ["--models", "windflow-world,wan-causal-tiny"])
        up.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(asyncio.to_thread(up.wait), 30) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for stream in (up.stdout, up.stderr):
            if stream is not None:
                stream.close()
    bad = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "windflow", "up", "--models", "windflow-world,nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "unknown model(s) nope" in bad.stderr and "wan-causal-tiny" in bad.stderr
