"""One managed child process: its spec, start, readiness, exit and stop.

Lifecycle of a ``ManagedProcess`` (one incarnation; a restart makes a new one)::

    construct(spec, log_path) -> start() -> wait_ready() -> ... -> wait() / stop()

- ``start()`` runs the program in its own session and process group (so a terminal's
  Ctrl-C reaches only the parent, which then stops children in order) with stdout and
  stderr appended to ``log_path``.
- ``wait_ready()`` polls the spec's readiness probe until it says ready; it fails fast
  (``ChildExited``) when the process exits first and with ``ChildNotReady`` on timeout.
- ``wait()`` returns the exit code; it is driven by a pidfd where the kernel has them
  (Linux >= 5.3), by polling otherwise, and is safe to await from several tasks at once.
- ``stop()`` sends SIGTERM to the whole process group, SIGKILL after ``stop_timeout_s``,
  reaps the child, then sweeps the group so no grandchild outlives it. Idempotent.

The process object is a ``subprocess.Popen``, not an asyncio transport, so it does not
belong to one event loop: a fixture may start it under one ``asyncio.run`` and stop it
under another.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from windflow.infra.errors import ChildExited, ChildNotReady
from windflow.infra.health import GrpcHealthProbe, ReadyProbe

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 20
# How far back log_tail() reads; enough for LOG_TAIL_LINES of ordinary log lines.
_LOG_TAIL_BYTES = 16 * 1024
_POLL_INTERVAL_S = 0.05


@dataclass(frozen=True)
class RestartPolicy:
    """What the supervisor does when a child exits on its own.

    A child is restarted up to ``max_restarts`` times in a row, waiting
    ``backoff_initial_s * 2**n`` (capped at ``backoff_max_s``) before the n-th restart
    (n from 0). One more exit after that and the supervisor stops every child.
    ``max_restarts=0`` means a death stops everything at once. The count (and the
    backoff) starts over when a child has served for ``reset_after_s`` before it died,
    so rare crashes over a long life do not add up to a stop.
    """

    max_restarts: int = 3
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 8.0
    reset_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if self.backoff_initial_s < 0 or self.backoff_max_s < 0:
            raise ValueError("backoff times must be >= 0")

    def backoff_s(self, restarts_done: int) -> float:
        """Delay before the restart that follows ``restarts_done`` earlier restarts."""
        return float(min(self.backoff_max_s, self.backoff_initial_s * (2**restarts_done)))


@dataclass(frozen=True)
class ChildSpec:
    """How to run one child and how to tell it is ready.

    Readiness: ``ready_probe`` when given; else a gRPC health check on ``health_address``
    (overall service "" must be SERVING); else the child counts as ready once started.
    """

    name: str
    """Unique within a supervisor; names the log file (``<log_dir>/<name>.log``)."""
    argv: tuple[str, ...]
    """Program and arguments, run without a shell."""
    health_address: str | None = None
    """``host:port`` of the child's gRPC health service."""
    ready_probe: ReadyProbe | None = field(default=None, compare=False)
    """Overrides the gRPC health check (etcd and NATS have their own)."""
    restart: RestartPolicy = RestartPolicy()
    env: Mapping[str, str] | None = None
    """Extra environment variables on top of the parent's."""
    cwd: str | None = None
    ready_timeout_s: float = 60.0
    """How long the child may take from start to ready."""
    stop_timeout_s: float = 10.0
    """How long SIGTERM gets before SIGKILL."""
    die_with_parent: bool = True
    """Ask the kernel to SIGKILL the child if the process that started it dies without
    stopping it (e.g. ``kill -9`` of ``windflow up`` or of a test run). Linux only, via
    util-linux ``setpriv --pdeathsig`` (which execs the program: same pid); skipped where
    ``setpriv`` is missing."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"child name must be non-empty and contain no '/': {self.name!r}")
        if not self.argv:
            raise ValueError(f"child {self.name!r} has an empty argv")

    def probe(self) -> ReadyProbe | None:
        """The readiness probe in effect, or None when started means ready."""
        if self.ready_probe is not None:
            return self.ready_probe
        if self.health_address is not None:
            return GrpcHealthProbe(self.health_address)
        return None


class ManagedProcess:
    """One incarnation of a child process; see the module docstring for the lifecycle."""

    def __init__(self, spec: ChildSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self._popen: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._exit: asyncio.Future[None] | None = None
        self._stopped = False

    # -- state -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return None if self._popen is None else self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the child has exited (and been reaped), else None."""
        return None if self._popen is None else self._popen.poll()

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the child's log ("" when there is none)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                size = log.tell()
                log.seek(max(0, size - _LOG_TAIL_BYTES))
                data = log.read()
        except FileNotFoundError:
            return ""
        text = data.decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the program (non-blocking); raises OSError when it cannot be executed."""
        if self._popen is not None:
            raise RuntimeError(f"{self.name} was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = None if self.spec.env is None else {**os.environ, **self.spec.env}
        argv = _with_parent_death_signal(self.spec.argv) if self.spec.die_with_parent else None
        with self.log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(
                f"=== {stamp} windflow: starting {self.name}: {' '.join(self.spec.argv)}\n".encode()
            )
            log.flush()
            self._popen = subprocess.Popen(
                argv or self.spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.spec.cwd,
                start_new_session=True,
                close_fds=True,
            )
        with contextlib.suppress(AttributeError, OSError):  # no pidfd: wait() polls
            self._pidfd = os.pidfd_open(self._popen.pid)
        logger.debug("started %s (pid %d), log %s", self.name, self._popen.pid, self.log_path)

    async def wait(self) -> int:
        """Wait for the child to exit and return its exit code (negative: killed by signal)."""
        popen = self._require_started()
        while (code := popen.poll()) is None:
            await asyncio.shield(self._exit_future())
        self._close_pidfd()
        return code

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Return once the spec's probe says ready.

        Raises ``ChildExited`` when the child exits first and ``ChildNotReady`` when the
        timeout (default: the spec's ``ready_timeout_s``) passes; it does not stop the
        child in either case.
        """
        self._require_started()
        timeout = self.spec.ready_timeout_s if timeout_s is None else timeout_s
        probe = self.spec.probe()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        interval = 0.02
        while True:
            if (code := self.returncode) is not None:
                raise ChildExited(self.name, code, self.log_tail())
            if probe is None:
                return
            remaining = deadline - loop.time()
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(max(0.05, min(2.0, remaining))):
                    if await probe():
                        if (code := self.returncode) is not None:  # served, then died
                            raise ChildExited(self.name, code, self.log_tail())
                        return
            if loop.time() >= deadline:
                raise ChildNotReady(self.name, timeout, self.log_tail())
            await self._sleep_unless_exit(min(interval, max(0.0, deadline - loop.time())))
            interval = min(0.25, interval * 2)

    async def stop(self, timeout_s: float | None = None) -> int | None:
        """Stop the child and everything in its process group; return its exit code.

        SIGTERM first, SIGKILL after the timeout (default: the spec's ``stop_timeout_s``).
        Returns None when the child was never started. Safe to call again or after the
        child has exited on its own (the group is then swept of leftovers).
        """
        if self._popen is None:
            return None
        timeout = self.spec.stop_timeout_s if timeout_s is None else timeout_s
        pgid = self._popen.pid
        if self.running:
            self._stopped = True
            logger.debug("stopping %s (pid %d) with SIGTERM", self.name, pgid)
            _signal_group(pgid, signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await self.wait()
            except TimeoutError:
                logger.warning(
                    "%s (pid %d) ignored SIGTERM for %.1fs; sending SIGKILL",
                    self.name,
                    pgid,
                    timeout,
                )
                _signal_group(pgid, signal.SIGKILL)
                await self.wait()
        code = await self.wait()
        await self._sweep_group(pgid, grace_s=min(timeout, 2.0))
        return code

    @property
    def stopped_on_request(self) -> bool:
        """True when stop() sent the signal that ended the child (not a crash)."""
        return self._stopped

    # -- internals ---------------------------------------------------------------------

    def _require_started(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self._popen

    def _exit_future(self) -> asyncio.Future[None]:
        """A future of the running loop that resolves when the child may have exited.

        With a pidfd: resolved by the loop's reader callback (one per process, shared by
        all waiters). Without: resolved after one poll interval.
        """
        loop = asyncio.get_running_loop()
        if self._exit is not None and not self._exit.done() and self._exit.get_loop() is loop:
            return self._exit
        future: asyncio.Future[None] = loop.create_future()
        if self._pidfd is None:
            loop.call_later(_POLL_INTERVAL_S, _resolve, future)
        else:
            fd = self._pidfd

            def on_readable() -> None:
                loop.remove_reader(fd)
                _resolve(future)

            loop.add_reader(fd, on_readable)
        self._exit = future
        return future

    async def _sleep_unless_exit(self, delay_s: float) -> None:
        """Sleep up to ``delay_s``, waking early when the child exits."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await self.wait()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            fd, self._pidfd = self._pidfd, None
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                if self._exit is not None and not self._exit.get_loop().is_closed():
                    self._exit.get_loop().remove_reader(fd)
            os.close(fd)

    async def _sweep_group(self, pgid: int, grace_s: float) -> None:
        """Make sure nothing is left in the child's process group.

        Members got the group-wide SIGTERM with the leader; give them ``grace_s`` to
        finish, then SIGKILL whatever remains.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        terminated = self._stopped
        while _group_alive(pgid):
            if loop.time() >= deadline:
                logger.warning("%s: killing leftover processes of group %d", self.name, pgid)
                _signal_group(pgid, signal.SIGKILL)
                return
            if not terminated:  # the leader died on its own: the group never got SIGTERM
                _signal_group(pgid, signal.SIGTERM)
                terminated = True
            await asyncio.sleep(_POLL_INTERVAL_S)


def _with_parent_death_signal(argv: tuple[str, ...]) -> tuple[str, ...] | None:
    """``argv`` behind ``setpriv --pdeathsig KILL``, or None where that is unavailable.

    The parent-death signal fires when the *thread* that forked the child exits, so
    ``start()`` belongs on a thread that outlives the child (the event loop's).
    Raises FileNotFoundError itself for a missing program, as Popen would without setpriv.
    """
    setpriv = _setpriv()
    if setpriv is None:
        return None
    if shutil.which(argv[0]) is None:
        raise FileNotFoundError(errno.ENOENT, "no such program", argv[0])
    return (setpriv, "--pdeathsig", "KILL", "--", *argv)


@functools.cache
def _setpriv() -> str | None:
    return shutil.which("setpriv") if sys.platform.startswith("linux") else None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether any process that is not a zombie is still in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # killpg(0) also succeeds for zombies that nobody reaped yet (orphans wait for init):
    # they hold no resources and cannot run, so they do not count as alive.
    pids = _all_pids()
    if not pids:  # no /proc to look in: trust killpg
        return True
    return any(_pgid_and_state(pid) == (pgid, True) for pid in pids)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (works for non-children too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = _pgid_and_state(pid)
    if state is None:  # exited meanwhile, or there is no /proc to look in
        return not Path("/proc").is_dir()
    return state[1]


def child_pids(pid: int) -> list[int]:
    """Pids of the running children of ``pid`` (from /proc; empty where there is none)."""
    children = []
    for child in _all_pids():
        fields = _stat_fields(child)
        if fields is not None and int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            children.append(child)
    return children


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) process ``pid`` has used so far, or None if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # utime and stime are fields 14 and 15 of the line, 12 and 13 after the command
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the parenthesised command (state ppid pgrp
    ...), or None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def _all_pids() -> list[int]:
    try:
        return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []


def _pgid_and_state(pid: int) -> tuple[int, bool] | None:
    """(process group, is-not-a-zombie) of ``pid`` from /proc, or None if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return int(fields[2]), fields[0] not in ("Z", "X")
