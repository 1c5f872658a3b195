"""The lifecycle etcd and NATS share: one managed server process, started on its own."""

from __future__ import annotations

import abc
from pathlib import Path
from types import TracebackType
from typing import Self

from windflow.infra.procs import ChildSpec, ManagedProcess, RestartPolicy


class ServerProcess(abc.ABC):
    """A server binary as one ``ManagedProcess``: ``start()`` -> use -> ``aclose()``.

    ``child_spec`` also lets a ``Supervisor`` run it instead (then ``process`` is None).
    """

    def __init__(
        self, state_dir: Path, name: str, restart: RestartPolicy, ready_timeout_s: float
    ) -> None:
        self.name = name
        self.log_path = state_dir / "logs" / f"{name}.log"
        self._restart = restart
        self._ready_timeout_s = ready_timeout_s
        self._proc: ManagedProcess | None = None

    @property
    @abc.abstractmethod
    def child_spec(self) -> ChildSpec:
        """How to run it and how to tell it is ready."""

    @property
    def process(self) -> ManagedProcess | None:
        """The process started by ``start()`` (None when supervised elsewhere)."""
        return self._proc

    async def start(self) -> None:
        """Run the server and wait until it serves; on failure it is stopped and this raises."""
        if self._proc is not None:
            raise RuntimeError(f"{self.name} was already started")
        self._proc = ManagedProcess(self.child_spec, self.log_path)
        self._proc.start()
        try:
            await self._proc.wait_ready()
        except BaseException:
            await self._proc.stop()
            raise

    async def aclose(self) -> None:
        """Stop the server (idempotent); its data stays."""
        if self._proc is not None:
            await self._proc.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
