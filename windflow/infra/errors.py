"""Errors of the process layer (launchers, supervisor, stack).

They subclass the project's one hierarchy (``windflow.errors``) so a caller can treat them
like any other deliberate Windflow error; none of them crosses a gRPC boundary.
"""

from __future__ import annotations

from windflow.errors import FailedPrecondition, Internal, Unavailable


class InfraError(Internal):
    """Base of the errors raised while starting, supervising or stopping processes."""


class BinaryNotFound(FailedPrecondition):
    """A server binary (``etcd``, ``nats-server``) is neither in the venv nor on PATH."""


class ChildExited(Unavailable):
    """A child process exited while it was expected to run (or to become ready).

    ``log_tail`` holds the last lines of its log so the report can say why.
    """

    def __init__(self, name: str, returncode: int, log_tail: str) -> None:
        super().__init__(
            f"{name} exited with code {returncode}"
            + (f"; last log lines:\n{log_tail}" if log_tail else "")
        )
        self.name = name
        self.returncode = returncode
        self.log_tail = log_tail


class ChildNotReady(Unavailable):
    """A child process kept running but did not become ready within its timeout."""

    def __init__(self, name: str, timeout_s: float, log_tail: str) -> None:
        super().__init__(
            f"{name} was not ready after {timeout_s:.1f}s"
            + (f"; last log lines:\n{log_tail}" if log_tail else "")
        )
        self.name = name
        self.timeout_s = timeout_s
        self.log_tail = log_tail


class StackFailed(InfraError):
    """The supervised stack could not start, or stopped because a child kept dying."""
