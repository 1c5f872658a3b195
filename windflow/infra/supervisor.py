"""A generic supervisor: start children in stages, keep them alive, stop them in reverse.

Lifecycle::

    sup = Supervisor(stages, log_dir)   # stages: lists of ChildSpec
    await sup.start()    # stage by stage; children of one stage start concurrently and
                         # the next stage starts once all of them are ready
    await sup.wait()     # returns after aclose(); raises StackFailed when the stack failed
    await sup.aclose()   # stops every child in reverse start order; idempotent

``async with Supervisor(...) as sup:`` does start() and aclose().

On a child's death (once started) its watcher task logs a report (name, exit code or
signal, the tail of its log) and restarts it with the same argv after its policy's
backoff. When a child dies once more than its ``RestartPolicy.max_restarts`` allows in a
row (the count starts over after ``reset_after_s`` of service), or a restart cannot be
executed, the supervisor stops every child and records a
``StackFailed`` whose message says which child failed and why; ``wait()`` raises it.
If ``start()`` fails, everything it started is stopped before ``StackFailed`` is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from windflow.infra.errors import ChildExited, ChildNotReady, StackFailed
from windflow.infra.procs import ChildSpec, ManagedProcess

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChildExit:
    """One unexpected exit of a child, as the supervisor reported it."""

    name: str
    pid: int
    returncode: int
    log_tail: str
    restarting: bool
    """Whether the supervisor restarted the child after this exit."""

    @property
    def description(self) -> str:
        return describe_exit(self.returncode)


def describe_exit(returncode: int) -> str:
    """Say how a child ended, e.g. ``exit code 3`` or ``signal SIGKILL``.

    Popen reports a death by signal as a negative return code (``-signum``).
    """
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


class _Child:
    """The supervisor's record of one child: its spec, current incarnation and watcher."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.proc: ManagedProcess | None = None
        self.restarts = 0
        """Restarts in a row (reset once an incarnation served ``reset_after_s``)."""
        self.ready_at = 0.0
        """Loop time at which the current incarnation became ready."""
        self.watcher: asyncio.Task[None] | None = None


class Supervisor:
    """Starts, watches, restarts and stops child processes; see the module docstring."""

    def __init__(
        self, stages: Sequence[Sequence[ChildSpec]], log_dir: Path, *, name: str = "stack"
    ) -> None:
        self.name = name
        self.log_dir = log_dir
        self._stages: list[list[_Child]] = [[_Child(spec) for spec in stage] for stage in stages]
        self._children: dict[str, _Child] = {}
        for child in self._all_children():
            if child.spec.name in self._children:
                raise ValueError(f"duplicate child name {child.spec.name!r}")
            self._children[child.spec.name] = child
        self._exits: list[ChildExit] = []
        self._started = False
        self._closing = False
        self._failure: StackFailed | None = None
        self._done = asyncio.Event()
        self._stop_lock = asyncio.Lock()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None

    # -- queries -----------------------------------------------------------------------

    @property
    def failure(self) -> StackFailed | None:
        """Why the stack stopped on its own, or None."""
        return self._failure

    @property
    def exits(self) -> tuple[ChildExit, ...]:
        """Every unexpected child exit so far, oldest first."""
        return tuple(self._exits)

    @property
    def names(self) -> list[str]:
        """Child names in start order."""
        return [child.spec.name for child in self._all_children()]

    def process(self, name: str) -> ManagedProcess | None:
        """The current incarnation of child ``name`` (None before its first start)."""
        return self._children[name].proc

    def pids(self) -> dict[str, int]:
        """Pids of the children that are running now."""
        return {
            name: child.proc.pid
            for name, child in self._children.items()
            if child.proc is not None and child.proc.pid is not None and child.proc.running
        }

    def restarts(self, name: str) -> int:
        """Restarts of child ``name`` in a row (see ``RestartPolicy.reset_after_s``)."""
        return self._children[name].restarts

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Supervisor:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start every stage in order; return when all children are ready.

        Raises ``StackFailed`` (after stopping what it started) when a child cannot be
        executed, exits before it is ready, or is not ready in time.
        """
        if self._started:
            raise RuntimeError(f"{self.name} supervisor was already started")
        self._started = True
        try:
            for stage in self._stages:
                async with asyncio.TaskGroup() as group:
                    for child in stage:
                        group.create_task(
                            self._launch(child), name=f"{self.name}:start:{child.spec.name}"
                        )
                for child in stage:
                    child.watcher = asyncio.create_task(
                        self._watch(child), name=f"{self.name}:watch:{child.spec.name}"
                    )
                    child.watcher.add_done_callback(self._on_watcher_done)
                if self._failure is not None:  # a child of an earlier stage died for good
                    raise self._failure
        except BaseException as exc:
            await self.aclose()
            if isinstance(exc, StackFailed | asyncio.CancelledError | KeyboardInterrupt):
                raise
            raise StackFailed(f"{self.name} failed to start: {_reasons(exc)}") from exc
        logger.info("%s: %d children ready", self.name, len(self._children))

    async def wait(self) -> None:
        """Wait until the stack has stopped; raise ``StackFailed`` if it stopped on its own."""
        await self._done.wait()
        if self._failure is not None:
            raise self._failure

    async def aclose(self) -> None:
        """Stop every child in reverse start order and end the watchers. Idempotent."""
        if self._close_task is None:
            self._close_task = asyncio.create_task(self._close(), name=f"{self.name}:close")
        await asyncio.shield(self._close_task)

    # -- internals ---------------------------------------------------------------------

    def _all_children(self) -> list[_Child]:
        return [child for stage in self._stages for child in stage]

    async def _launch(self, child: _Child) -> None:
        """Start one incarnation of ``child`` and wait until it is ready.

        On any failure (or cancellation) the new process is stopped before this raises.
        """
        proc = ManagedProcess(child.spec, self.log_path(child.spec.name))
        child.proc = proc
        try:
            try:
                proc.start()
            except OSError as exc:
                raise StackFailed(
                    f"{child.spec.name} could not be executed ({child.spec.argv[0]}): {exc}"
                ) from exc
            await proc.wait_ready()
        except BaseException:
            await proc.stop()
            raise
        child.ready_at = asyncio.get_running_loop().time()
        logger.info("%s: %s ready (pid %s)", self.name, child.spec.name, proc.pid)

    async def _watch(self, child: _Child) -> None:
        """Wait for ``child`` to exit; restart it within its budget or fail the stack."""
        policy = child.spec.restart
        while True:
            proc = child.proc
            if proc is None:  # pragma: no cover - a watcher starts after a launch
                return
            code = await proc.wait()
            if self._closing:
                return
            if asyncio.get_running_loop().time() - child.ready_at >= policy.reset_after_s:
                child.restarts = 0  # it served long enough: a fresh budget
            tail = proc.log_tail()
            restarting = child.restarts < policy.max_restarts
            self._exits.append(
                ChildExit(child.spec.name, proc.pid or -1, code, tail, restarting=restarting)
            )
            if not restarting:
                message = (
                    f"{child.spec.name} (pid {proc.pid}) exited with {describe_exit(code)} "
                    f"after {child.restarts} restart(s) in a row, the most its policy allows; "
                    f"stopping the {self.name}. Last lines of {proc.log_path}:\n{tail}"
                )
                logger.error("%s", message)
                self._fail(StackFailed(message))
                return
            delay = policy.backoff_s(child.restarts)
            logger.error(
                "%s: %s (pid %s) exited with %s; restarting in %.1fs (restart %d of %d). "
                "Last lines of %s:\n%s",
                self.name,
                child.spec.name,
                proc.pid,
                describe_exit(code),
                delay,
                child.restarts + 1,
                policy.max_restarts,
                proc.log_path,
                tail,
            )
            await asyncio.sleep(delay)
            if self._closing:
                return
            child.restarts += 1
            try:
                await self._launch(child)
            except (ChildExited, ChildNotReady) as exc:
                # The new incarnation is stopped; the next loop turn counts it as an exit.
                logger.error("%s: restart of %s failed: %s", self.name, child.spec.name, exc)
            except OSError as exc:
                message = (
                    f"{child.spec.name} could not be restarted: {exc}; stopping the {self.name}"
                )
                logger.error("%s", message)
                self._fail(StackFailed(message))
                return

    def _on_watcher_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        logger.error("%s: watcher %s crashed", self.name, task.get_name(), exc_info=exc)
        self._fail(StackFailed(f"{self.name}: watcher {task.get_name()} crashed: {exc!r}"))

    def _fail(self, failure: StackFailed) -> None:
        """Record the first failure and stop every child in the background."""
        if self._failure is None:
            self._failure = failure
        if self._closing:
            return
        self._closing = True
        self._shutdown_task = asyncio.create_task(self._shutdown(), name=f"{self.name}:shutdown")

    async def _shutdown(self) -> None:
        await self._stop_children()
        self._done.set()

    async def _close(self) -> None:
        self._closing = True
        watchers = [child.watcher for child in self._all_children() if child.watcher is not None]
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        if self._shutdown_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._shutdown_task
        await self._stop_children()
        self._done.set()

    async def _stop_children(self) -> None:
        """Stop children in reverse start order (each stop is idempotent)."""
        async with self._stop_lock:
            for child in reversed(self._all_children()):
                if child.proc is None:
                    continue
                try:
                    await child.proc.stop()
                except Exception:
                    logger.exception("%s: error while stopping %s", self.name, child.spec.name)


def _reasons(exc: BaseException) -> str:
    """The messages of ``exc`` or of the leaves of an exception group, one per line."""
    if isinstance(exc, BaseExceptionGroup):
        return "\n".join(_reasons(inner) for inner in exc.exceptions)
    return str(exc) or repr(exc)
