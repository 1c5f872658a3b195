"""The supervisor with small gRPC-health children: restart, restart budget, clean stop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from windflow.infra import (
    ChildSpec,
    GrpcHealthProbe,
    RestartPolicy,
    StackFailed,
    Supervisor,
    free_ports,
    healthcheck,
    pid_alive,
)

FAST_RESTART = RestartPolicy(max_restarts=2, backoff_initial_s=0.05, backoff_max_s=0.1)


def _service(
    program: Path, name: str, port: int, *flags: str, restart: RestartPolicy = FAST_RESTART
) -> ChildSpec:
    listen = f"127.0.0.1:{port}"
    argv = (sys.executable, str(program), name, "--listen", listen, *flags)
    return ChildSpec(name, argv, health_address=listen, restart=restart, ready_timeout_s=30)


async def _until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout_s}s")


async def test_a_killed_child_is_reported_and_restarted(
    tmp_path: Path, fake_service_program: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="windflow.infra.supervisor")
    port_a, port_b = free_ports(2)
    stages = [[_service(fake_service_program, "alpha", port_a)]]
    stages.append([_service(fake_service_program, "beta", port_b)])
    async with Supervisor(stages, tmp_path / "logs") as sup:
        first = sup.pids()
        assert set(first) == {"alpha", "beta"}
        os.kill(first["alpha"], signal.SIGKILL)
        await _until(lambda: sup.restarts("alpha") == 1 and "alpha" in sup.pids())
        proc = sup.process("alpha")
        assert proc is not None
        await proc.wait_ready(timeout_s=30)
        assert await GrpcHealthProbe(f"127.0.0.1:{port_a}")()  # same port, serving again
        assert sup.pids()["alpha"] != first["alpha"]
        assert sup.pids()["beta"] == first["beta"]  # the others are left alone
        (death,) = sup.exits
        assert (death.name, death.pid, death.returncode) == ("alpha", first["alpha"], -9)
        assert death.restarting and "fake alpha serving on" in death.log_tail
        report = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        assert "alpha" in report and "signal SIGKILL" in report
        assert "fake alpha serving on" in report  # the tail of its log
        assert sup.failure is None
    assert not any(pid_alive(pid) for pid in [*first.values(), proc.pid or 0])


async def test_after_the_restart_budget_the_stack_stops_with_a_clear_message(
    tmp_path: Path, fake_service_program: Path
) -> None:
    port_a, port_b = free_ports(2)
    policy = RestartPolicy(max_restarts=1, backoff_initial_s=0.05)
    flaky = _service(fake_service_program, "flaky", port_b, "--exit-after", "0.3", restart=policy)
    steady = _service(fake_service_program, "steady", port_a)
    sup = Supervisor([[steady], [flaky]], tmp_path / "logs")
    await sup.start()
    steady_pid = sup.pids()["steady"]
    try:
        with pytest.raises(StackFailed) as caught:
            await asyncio.wait_for(sup.wait(), 30)
    finally:
        await sup.aclose()
    message = str(caught.value)
    assert "flaky" in message and "exit code 3" in message and "1 restart(s)" in message
    assert "exiting with 3 on purpose" in message  # the log tail says why
    assert sup.failure is caught.value
    assert [(e.name, e.returncode, e.restarting) for e in sup.exits] == [
        ("flaky", 3, True),
        ("flaky", 3, False),
    ]
    assert not pid_alive(steady_pid) and sup.pids() == {}


async def test_a_child_that_served_long_enough_gets_a_fresh_budget(
    tmp_path: Path, fake_service_program: Path
) -> None:
    # One restart allowed in a row, but each incarnation serves 0.6 s > reset_after_s.
    policy = RestartPolicy(max_restarts=1, backoff_initial_s=0.05, reset_after_s=0.3)
    spec = _service(
        fake_service_program, "rare", free_ports(1)[0], "--exit-after", "0.6", restart=policy
    )
    async with Supervisor([[spec]], tmp_path / "logs") as sup:
        await _until(lambda: len(sup.exits) >= 3, timeout_s=30)
        assert sup.failure is None
        assert all(death.restarting for death in sup.exits)


async def test_a_program_that_cannot_be_executed_fails_start(tmp_path: Path) -> None:
    sup = Supervisor([[ChildSpec("ghost", (str(tmp_path / "no-such-program"),))]], tmp_path)
    with pytest.raises(StackFailed, match="ghost could not be executed"):
        await sup.start()


async def test_a_child_that_cannot_start_fails_start_and_stops_the_rest(
    tmp_path: Path, fake_service_program: Path
) -> None:
    port_a, port_b = free_ports(2)
    good = _service(fake_service_program, "good", port_a)
    bad = _service(fake_service_program, "bad", port_b, "--exit-before-ready", "5")
    sup = Supervisor([[good], [bad]], tmp_path / "logs")
    with pytest.raises(StackFailed) as caught:
        await sup.start()
    assert "bad exited with code 5" in str(caught.value)
    assert "failing on purpose" in str(caught.value)
    good_proc = sup.process("good")
    assert good_proc is not None and good_proc.pid is not None
    assert not pid_alive(good_proc.pid)


async def test_aclose_leaves_no_process_behind(tmp_path: Path, fake_service_program: Path) -> None:
    grandchildren = tmp_path / "grandchildren.pids"
    *ports, stubborn_port = free_ports(4)
    specs = [
        _service(
            fake_service_program, f"svc-{i}", port, "--grandchild-pid-file", str(grandchildren)
        )
        for i, port in enumerate(ports)
    ]
    stubborn = _service(fake_service_program, "stubborn", stubborn_port, "--ignore-sigterm")
    stubborn = dataclasses.replace(stubborn, stop_timeout_s=0.5)
    sup = Supervisor([specs[:2], [specs[2], stubborn]], tmp_path / "logs")
    await sup.start()
    pids = list(sup.pids().values())
    pids += [int(line) for line in grandchildren.read_text().split()]
    assert len(pids) == 4 + 3 and all(pid_alive(pid) for pid in pids)
    await sup.aclose()
    await sup.aclose()  # idempotent
    assert [pid for pid in pids if pid_alive(pid)] == []
    await asyncio.wait_for(sup.wait(), 1)  # stopped on request: no failure raised


async def test_cancelling_start_stops_what_was_started(
    tmp_path: Path, fake_service_program: Path
) -> None:
    port_a, port_b = free_ports(2)
    first = _service(fake_service_program, "first", port_a)
    never = _service(fake_service_program, "never", port_b, "--never-ready")
    sup = Supervisor([[first], [never]], tmp_path / "logs")
    starting = asyncio.create_task(sup.start())
    await _until(lambda: "never" in sup.pids())
    pids = list(sup.pids().values())
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert [pid for pid in pids if pid_alive(pid)] == []


async def test_healthcheck_command_exits_zero_only_when_serving(
    tmp_path: Path, fake_service_program: Path
) -> None:
    serving_port, closed_port = free_ports(2)
    async with Supervisor(
        [[_service(fake_service_program, "svc", serving_port)]], tmp_path / "logs"
    ):
        assert await asyncio.to_thread(healthcheck.main, [f"127.0.0.1:{serving_port}"]) == 0
        assert await asyncio.to_thread(healthcheck.main, [f"127.0.0.1:{closed_port}"]) == 1
