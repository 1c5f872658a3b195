"""ManagedProcess against real programs: stop, SIGKILL escalation, grandchildren, readiness."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from windflow.infra import ChildExited, ChildNotReady, ChildSpec, ManagedProcess, pid_alive

IGNORE_SIGTERM = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('sigterm' + '-ignored', flush=True); time.sleep(60)"
)


def _proc(tmp_path: Path, *argv: str, **spec: object) -> ManagedProcess:
    name = str(spec.pop("name", "child"))
    return ManagedProcess(ChildSpec(name, argv, **spec), tmp_path / "logs" / f"{name}.log")  # type: ignore[arg-type]


def _pids_in(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


async def _read_pids(path: Path, count: int) -> list[int]:
    for _ in range(500):
        if len(pids := _pids_in(path)) >= count:
            return pids
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never listed {count} pid(s)")


async def test_stop_terminates_and_reaps(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "sleep", "30")
    proc.start()
    assert proc.pid is not None and proc.running
    assert await proc.stop() == -signal.SIGTERM
    assert not pid_alive(proc.pid) and proc.returncode == -signal.SIGTERM
    assert proc.stopped_on_request
    assert await proc.stop() == -signal.SIGTERM  # idempotent
    assert "starting child: sleep 30" in proc.log_tail()


async def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    proc = _proc(tmp_path, sys.executable, "-c", IGNORE_SIGTERM, stop_timeout_s=0.3)
    proc.start()
    await proc.wait_ready()  # no probe: started means ready
    for _ in range(500):  # the child prints this once its SIGTERM handler is set
        if "sigterm-ignored" in proc.log_tail():
            break
        await asyncio.sleep(0.02)
    started = time.monotonic()
    assert await proc.stop() == -signal.SIGKILL
    assert time.monotonic() - started < 5


async def test_stop_takes_grandchildren_down(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    proc = _proc(tmp_path, "sh", "-c", f"sleep 600 & echo $! > {pid_file}; wait")
    proc.start()
    (grandchild,) = await _read_pids(pid_file, 1)
    assert pid_alive(grandchild)
    await proc.stop()
    assert not pid_alive(grandchild)


async def test_stop_sweeps_the_group_of_a_leader_killed_from_outside(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    proc = _proc(tmp_path, "sh", "-c", f"sleep 600 & echo $! > {pid_file}; wait")
    proc.start()
    (grandchild,) = await _read_pids(pid_file, 1)
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    assert await proc.wait() == -signal.SIGKILL
    assert pid_alive(grandchild)  # the orphan lives on until someone sweeps the group
    await proc.stop()
    assert not pid_alive(grandchild)


async def test_wait_ready_reports_an_early_exit_with_its_log(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "sh", "-c", "echo boom-on-start; exit 4", health_address="127.0.0.1:9")
    proc.start()
    with pytest.raises(ChildExited) as caught:
        await proc.wait_ready(timeout_s=10)
    assert caught.value.returncode == 4
    assert "boom-on-start" in caught.value.log_tail
    assert "exited with code 4" in str(caught.value)


async def test_wait_ready_times_out_when_never_ready(tmp_path: Path) -> None:
    async def never() -> bool:
        return False

    proc = _proc(tmp_path, "sleep", "30", ready_probe=never)
    proc.start()
    try:
        with pytest.raises(ChildNotReady, match=r"not ready after 0\.3s"):
            await proc.wait_ready(timeout_s=0.3)
        assert proc.running  # wait_ready reports; stopping is the caller's call
    finally:
        await proc.stop()


async def test_concurrent_waiters_all_see_the_exit(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "sh", "-c", "sleep 0.2; exit 7")
    proc.start()
    codes = await asyncio.wait_for(asyncio.gather(proc.wait(), proc.wait(), proc.wait()), 10)
    assert codes == [7, 7, 7]


def test_start_and_stop_under_different_event_loops(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "sleep", "30")
    proc.start()
    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(proc.wait(), 0.1))  # registers on a loop that then closes
    assert asyncio.run(proc.stop()) == -signal.SIGTERM
    assert proc.pid is not None and not pid_alive(proc.pid)


ORPHAN_MAKER = """
import sys, time
from pathlib import Path
from windflow.infra import ChildSpec, ManagedProcess
proc = ManagedProcess(ChildSpec("sleeper", ("sleep", "600")), Path(sys.argv[1]))
proc.start()
print(proc.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_children_die_with_a_parent_killed_by_sigkill(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_MAKER, str(tmp_path / "sleeper.log")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert pid_alive(child)
        parent.kill()
        parent.wait()
        for _ in range(250):
            if not pid_alive(child):
                break
            time.sleep(0.02)
        assert not pid_alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
