"""End-to-end tests: a failing test's report carries the tails of its mesh's service logs;
a test about to time out prints where each of its coroutines waits."""

from __future__ import annotations

import asyncio
import io
import sys
import threading
from collections.abc import Generator, Iterator
from typing import Any

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
    """Every unfinished asyncio task, of any loop, with the line it waits on (pytest-timeout's
    own dump shows threads only, where a test stuck on an await is an idle loop). Runs in a
    timer thread: the tests' loops may be module-scoped, so no one loop is known here."""
    out = io.StringIO()
    tasks: Any = getattr(asyncio.tasks, "_all_tasks", ())
    for task in list(tasks):
        if not task.done():
            print(f"--- {task.get_name()}", file=out)
            try:  # the task's frames may move under this thread: best effort
                for frame in task.get_stack(limit=12):
                    code = frame.f_code  # (a running frame's f_lineno may be None)
                    print(f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}", file=out)
            except Exception as exc:
                print(f"(stack unavailable: {exc!r})", file=out)
    print(f"=== asyncio tasks of a test about to time out ===\n{out.getvalue()}", file=sys.stderr)


@pytest.fixture(autouse=True)
def _tasks_dumped_before_timeout(request: pytest.FixtureRequest) -> Iterator[None]:
    timeout = float(request.config.getini("timeout") or 0)
    timer = None
    if timeout > DUMP_BEFORE_TIMEOUT_S:
        timer = threading.Timer(timeout - DUMP_BEFORE_TIMEOUT_S, _dump_tasks)
        timer.daemon = True
        timer.start()
    yield
    if timer is not None:
        timer.cancel()
