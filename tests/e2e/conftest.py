"""End-to-end tests: a failing test's report carries the tails of its mesh's service logs;
a test about to time out prints where each of its coroutines waits."""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import AsyncIterator, Generator

import pytest

from tests.e2e.mesh import MESHES


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed:
        for mesh in MESHES:
            if mesh.closed_at is None or mesh.closed_at >= call.start:
                report.sections.append((f"service logs ({mesh.log_dir})", mesh.log_tails()))
    return report


DUMP_BEFORE_TIMEOUT_S = 20.0


def _dump_tasks() -> None:
    """Every task of the running loop with the line it waits on (pytest-timeout's own dump
    shows threads only, and an async test stuck on an await shows as an idle loop)."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        print(f"--- {task.get_name()}", file=out)
        task.print_stack(limit=12, file=out)
    print(f"=== asyncio tasks of a test about to time out ===\n{out.getvalue()}", file=sys.stderr)


@pytest.fixture(autouse=True)
async def _tasks_dumped_before_timeout(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    timeout = float(request.config.getini("timeout") or 0)
    handle = None
    if timeout > DUMP_BEFORE_TIMEOUT_S:
        handle = asyncio.get_running_loop().call_later(timeout - DUMP_BEFORE_TIMEOUT_S, _dump_tasks)
    yield
    if handle is not None:
        handle.cancel()
