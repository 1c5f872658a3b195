"""End-to-end tests: a failing test's report carries the tails of its mesh's service logs."""

from __future__ import annotations

from collections.abc import Generator

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
