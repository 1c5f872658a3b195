"""A model served from its own process: the model step gets an interpreter (and a GIL) of
its own.

Why: a model step is hundreds of small torch calls, and the interpreter lock is re-taken
after each. In the worker's process the event loop (gRPC reads and writes, planning, acks)
takes it in between, so the step waits for the loop's Python work: measured on this
project's 2-core machine (``tools/bench_model_host.py``), a batch-8 step + encode of the
built-in model took 1.40x as long beside a thread doing 0.3 ms of Python every 1.3 ms, a
batch-1 step 1.56x (docs/runtime.md, "Model hosts"). A host runs the same model code in a
child process and answers over a socket; the worker's event loop awaits a batch's reply
without holding the lock, blocking calls wait on it from the step thread.

The host is a ``WorldModel``: ``new_state``/``restore``/``copy`` return handles
(``HostedState``) whose real state lives in the child, ``step``/``snapshot`` run there,
errors come back as the same typed errors. One batch's step, captures (snapshot bytes,
copies kept in the child) and encoding are one round trip (``stepping.step_and_encode``).
A handle the worker drops frees its state in the child (sent with the next request).
If the child dies, every call raises ``Unavailable``, ``lost`` turns true and
``wait_exit`` returns: the worker exits (``exit_worker``), and its sessions recover
elsewhere.

Protocol (a socket pair wrapped as a ``multiprocessing`` connection, pickled tuples):
request ``(op, args, released)``, reply ``("ok", value)`` or ``("error", exc)``; the child
starts with ``("ok", ModelInfo)``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from asyncio import Future
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import numpy as np

from services.worker.models.base import Control, SessionState, WorldModel
from services.worker.stepping import (
    Capture,
    Encoding,
    RemoteBatches,
    StepResult,
    step_and_encode,
)
from windflow.common import telemetry
from windflow.errors import Internal, InvalidArgument, Unavailable, WindflowError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0
"""How long a host may take to import its model's code and load its weights."""
CLOSE_TIMEOUT_S = 5.0
EXIT_MODEL_HOST_DIED = 70
"""The worker's exit status when a model host dies under it (EX_SOFTWARE)."""
T = TypeVar("T")


class HostedState(SessionState):
    """The worker's handle on a session state that lives in a model host."""

    __slots__ = ("frame_index", "handle", "host_id", "seed")

    def __init__(self, handle: int, frame_index: int, seed: int, host_id: int) -> None:
        self.handle = handle
        self.frame_index = frame_index
        self.seed = seed
        self.host_id = host_id


class ModelHost(RemoteBatches, WorldModel):
    """``model_id`` loaded and stepped in a child process (see the module docstring)."""

    def __init__(
        self,
        model_id: str,
        *,
        threads: int = 1,
        options: dict[str, Any] | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        ours, theirs = socket.socketpair()
        self.model_id = model_id
        # A fresh interpreter (never a fork of a process that runs threads), started as a
        # module so that nothing of the caller's main module runs in it.
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                __name__,
                "--fd",
                str(theirs.fileno()),
                "--model",
                model_id,
                "--threads",
                str(threads),
                "--options",
                json.dumps(options or {}),
            ],
            pass_fds=(theirs.fileno(),),
            env=_child_env(),
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._lock = threading.Lock()
        """Held by a blocking call, or by the event loop while any of its calls are out."""
        self._waiting = threading.Lock()
        self._threads_waiting = 0
        self._pending: collections.deque[tuple[Future[Any], Callable[[Any], Any]]] = (
            collections.deque()
        )
        """The event loop's calls whose replies are still to come, oldest first."""
        self._gate: asyncio.Lock | None = None
        self._backlog = 0
        """The loop's calls waiting to be written (``_write_later``)."""
        self._loop_thread: int | None = None
        """The thread whose event loop holds the lock while calls are out."""
        self._drained: asyncio.Future[None] | None = None
        self._released: collections.deque[int] = collections.deque()
        """Handles of states the worker dropped (appended by their finalizers, any thread)."""
        self._dead: str | None = None
        self._closing = False
        if not self._conn.poll(start_timeout_s):
            self.process.kill()
            self.process.wait()
            raise Unavailable(
                f"model host for {model_id!r} did not start in {start_timeout_s:.0f} s"
            )
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            raise Unavailable(
                f"model host for {model_id!r} exited while loading "
                f"(exit code {self.process.wait()}; its log says why)"
            ) from None
        if status != "ok":
            self.process.wait(CLOSE_TIMEOUT_S)
            raise value
        self.info = value

    # ---- the WorldModel contract ----

    def new_state(self, seed: int) -> SessionState:
        return self._handle(self._call("new_state", seed))

    def step(
        self, states: Sequence[SessionState], controls: Sequence[Control], steps: int
    ) -> np.ndarray:
        handles = self._handles(states)
        shape, data, indices = self._call("step", handles, list(controls), steps)
        self._advance(states, indices)
        return np.frombuffer(bytearray(data), dtype=np.uint8).reshape(shape)  # writable

    def step_and_encode(
        self,
        states: Sequence[SessionState],
        controls: Sequence[Control],
        steps: int,
        encodings: Sequence[Encoding],
        captures: Sequence[Capture],
    ) -> StepResult:
        request = _batch(self._handles(states), controls, steps, encodings, captures, 0)
        return self._stepped(states, self._call(*request))

    def submit_step_and_encode(
        self,
        states: Sequence[SessionState],
        controls: Sequence[Control],
        steps: int,
        encodings: Sequence[Encoding],
        captures: Sequence[Capture],
        *,
        start_at_us: int = 0,
    ) -> asyncio.Future[StepResult]:
        """Send a batch from the event loop; the future of its result. The request is
        written at once (unless a thread's call is under way) and the reply is read by the
        loop itself, no thread in between; calls queue (``_submit``). The host starts
        the batch at ``start_at_us`` (wall clock) if that is still ahead: a batch sent a
        little early starts on time, not when the idle host has woken up."""
        request = _batch(self._handles(states), controls, steps, encodings, captures, start_at_us)

        def stepped(value: Any) -> StepResult:
            return self._stepped(states, value)

        return self._submit(request[0], request[1:], stepped)

    def snapshot(self, state: SessionState) -> bytes:
        return self._call("snapshot", self._handles([state])[0])

    def restore(self, data: bytes) -> SessionState:
        return self._handle(self._call("restore", bytes(data)))

    def copy(self, state: SessionState) -> SessionState:
        """A copy made and kept in the host: nothing crosses the socket but handles."""
        return self._handle(self._call("copy", self._handles([state])[0]))

    def live_states(self) -> int:
        """How many session states the host holds (dropped handles are freed first)."""
        return self._call("live_states")

    # ---- lifecycle ----

    @property
    def lost(self) -> bool:
        """The child is gone and nobody closed it."""
        return not self._closing and self.process.poll() is not None

    def wait_exit(self) -> int:
        """Block until the child exits (for a watcher thread); its exit code."""
        return self.process.wait()

    def close(self) -> None:
        """Ask the child to exit; kill it if it does not within a few seconds. Blocking:
        from a thread, never the event loop."""
        self._closing = True
        if self.process.poll() is None:
            # (calls still out finish first; never wait for the lock on the event loop)
            if self._lock.acquire(timeout=CLOSE_TIMEOUT_S):
                try:
                    self._conn.send(("close", (), []))
                except (OSError, ValueError):
                    pass
                finally:
                    self._lock.release()
            try:
                self.process.wait(CLOSE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._dead = self._dead or "closed"
        self._conn.close()

    # ---- internals ----

    def _call(self, op: str, *args: Any) -> Any:
        """A blocking call (from a thread, never the event loop)."""
        if self._pending and self._loop_thread == threading.get_ident():
            # it would wait for the lock this thread's loop holds until it reads replies
            raise Internal(
                f"blocking {op} on model host {self.model_id!r} from the event loop while "
                "its batches are out (a deadlock): run it in the step thread"
            )
        with self._waiting:
            self._threads_waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._waiting:
                self._threads_waiting -= 1
        try:
            self._send(op, args)
            reply = self._receive(op)
        finally:
            self._lock.release()
        return _unwrap(reply)

    def _submit(self, op: str, args: tuple[Any, ...], convert: Callable[[Any], T]) -> Future[T]:
        """Send a call from the event loop; the future of ``convert(its reply's value)``.
        Calls queue: a request is written at once even while earlier ones run in the host
        (which answers them one after the other, in order), so the host finds its next
        batch waiting when it finishes one. The loop holds the connection's lock while
        any of its calls are out; a blocking call (a thread's) waiting for it makes new
        calls wait until the queue has drained. A caller that gives up leaves its reply
        to be read and dropped: the replies stay matched to their calls."""
        loop = asyncio.get_running_loop()
        queued = self._backlog or (self._threads_waiting and self._pending)
        if not queued and (self._pending or self._lock.acquire(blocking=False)):
            return self._write(loop, op, args, convert)
        self._backlog += 1  # later calls wait behind this one
        return asyncio.ensure_future(self._write_later(op, args, convert))

    async def _write_later(self, op: str, args: tuple[Any, ...], convert: Callable[[Any], T]) -> T:
        """``_submit``'s way when a thread's call stands in the way: wait for it, in turn."""
        loop = asyncio.get_running_loop()
        if self._gate is None:
            self._gate = asyncio.Lock()
        try:
            async with self._gate:  # requests go out in the order of the calls
                if self._threads_waiting and self._pending:
                    self._drained = self._drained or loop.create_future()
                    await asyncio.shield(self._drained)
                if not self._pending:
                    await self._acquire_async()
                reply = self._write(loop, op, args, convert)
        finally:
            self._backlog -= 1
        return await reply

    def _write(
        self,
        loop: asyncio.AbstractEventLoop,
        op: str,
        args: tuple[Any, ...],
        convert: Callable[[Any], T],
    ) -> Future[T]:
        """Write a request (the lock is the loop's); its reply goes to the future."""
        if not self._pending:
            loop.add_reader(self._conn.fileno(), self._readable)
            self._loop_thread = threading.get_ident()
        reply: Future[T] = loop.create_future()
        try:
            self._send(op, args)
        except BaseException:
            if not self._pending:
                self._drain()
            raise
        self._pending.append((reply, convert))
        return reply

    async def _acquire_async(self) -> None:
        if self._lock.acquire(blocking=False):
            return
        # a thread's call (a restore, a snapshot) is under way: wait in a thread
        acquiring = asyncio.ensure_future(asyncio.to_thread(self._lock.acquire))
        try:
            await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            acquiring.add_done_callback(lambda _: self._lock.release())
            raise

    def _readable(self) -> None:
        """The loop's reader: every reply that has arrived, to its call, in order."""
        try:
            while self._pending and self._conn.poll():
                reply = self._receive("a queued call")  # written whole by the child
                waiter, convert = self._pending.popleft()
                if waiter.done():
                    continue  # its caller gave up
                try:
                    waiter.set_result(convert(_unwrap(reply)))
                except Exception as exc:  # the call's typed error
                    waiter.set_exception(exc)
        except Unavailable as exc:
            while self._pending:
                waiter, _ = self._pending.popleft()
                if not waiter.done():
                    waiter.set_exception(exc)
        if not self._pending:
            self._drain()

    def _drain(self) -> None:
        """No call of the loop's is out: stop reading and let a thread's call in."""
        asyncio.get_running_loop().remove_reader(self._conn.fileno())
        self._lock.release()
        if self._drained is not None:
            if not self._drained.done():
                self._drained.set_result(None)
            self._drained = None

    def _send(self, op: str, args: tuple[Any, ...]) -> None:
        if self._dead is not None:
            raise Unavailable(f"model host for {self.model_id!r} is gone ({self._dead})")
        released = [self._released.popleft() for _ in range(len(self._released))]
        try:
            self._conn.send((op, args, released))
        except OSError as exc:
            raise self._died(op) from exc

    def _receive(self, op: str) -> tuple[str, Any]:
        try:
            reply: tuple[str, Any] = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise self._died(op) from exc
        return reply

    def _died(self, op: str) -> Unavailable:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(1.0)
        self._dead = f"exit code {self.process.returncode}"
        return Unavailable(f"model host for {self.model_id!r} died during {op} ({self._dead})")

    def _handle(self, reply: tuple[int, int, int]) -> HostedState:
        handle, frame_index, seed = reply
        state = HostedState(handle, frame_index, seed, id(self))
        weakref.finalize(state, self._released.append, handle)
        return state

    def _handles(self, states: Sequence[SessionState]) -> list[int]:
        handles = []
        for s in states:
            if not isinstance(s, HostedState) or s.host_id != id(self):
                raise InvalidArgument(f"a state not made by model host {self.model_id!r}")
            handles.append(s.handle)
        return handles

    def _stepped(
        self,
        states: Sequence[SessionState],
        reply: tuple[StepResult, list[int], list[tuple[int, int, int] | None]],
    ) -> StepResult:
        result, indices, copies = reply
        self._advance(states, indices)
        result.copies = [None if c is None else self._handle(c) for c in copies]
        return result

    @staticmethod
    def _advance(states: Sequence[SessionState], indices: Sequence[int]) -> None:
        for s, index in zip(states, indices, strict=True):
            s.frame_index = index


def _batch(
    handles: list[int],
    controls: Sequence[Control],
    steps: int,
    encodings: Sequence[Encoding],
    captures: Sequence[Capture],
    start_at_us: int,
) -> tuple[Any, ...]:
    """A ``step_and_encode`` request (the child's arguments, in order)."""
    return (
        "step_and_encode",
        handles,
        list(controls),
        steps,
        list(encodings),
        [int(c) for c in captures],
        start_at_us,
    )


def exit_worker(host: ModelHost) -> NoReturn:
    """A worker whose model host died has lost its sessions' states: it exits at once, as
    a crash, so that the mesh recovers them on another worker from their logs, as for a
    killed worker. (A graceful stop would drain through the event loop and the dead host's
    calls first; exiting needs neither, and the recovery is the same.)"""
    log.critical(
        "model host for %r (pid %d) died (exit code %s): the worker exits so that its "
        "sessions recover elsewhere",
        host.model_id,
        host.process.pid,
        host.process.poll(),
    )
    logging.shutdown()
    os._exit(EXIT_MODEL_HOST_DIED)


# ---- the child ----


def _child_env() -> dict[str, str]:
    """This process's environment, with the directory this code was imported from first
    on the child's path (the worker may run from anywhere)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _serve(conn: Connection, model_id: str, options: dict[str, Any], threads: int) -> None:
    """The host process: load the model, then answer requests until told to close or
    until the worker's end of the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the worker, which closes us
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s model-host[{model_id}] %(levelname)s %(message)s",
    )
    try:
        import torch

        from services.worker.models.registry import load_model
        from windflow.common.malloc import keep_freed_memory

        torch.set_num_threads(threads)
        keep_freed_memory()  # as the worker does: steps reuse their buffers
        model = load_model(model_id, **options)
    except BaseException as exc:  # every load failure goes back as a reply
        conn.send(("error", _portable(exc)))
        return
    conn.send(("ok", model.info))
    states: dict[int, SessionState] = {}
    handles = iter(range(1, 1 << 62))

    def keep(state: SessionState) -> tuple[int, int, int]:
        handle = next(handles)
        states[handle] = state
        return handle, state.frame_index, state.seed

    def lookup(hs: Sequence[int]) -> list[SessionState]:
        try:
            return [states[h] for h in hs]
        except KeyError as exc:
            raise Internal(f"model host has no state {exc.args[0]} (released?)") from None

    while True:
        try:
            op, args, released = conn.recv()
        except (EOFError, OSError):
            return  # the worker is gone
        for h in released:
            states.pop(h, None)
        try:
            if op == "close":
                return
            if op == "new_state":
                value: Any = keep(model.new_state(*args))
            elif op == "restore":
                value = keep(model.restore(*args))
            elif op == "live_states":
                value = len(states)
            elif op == "snapshot":
                value = model.snapshot(lookup([args[0]])[0])
            elif op == "copy":
                value = keep(model.copy(lookup([args[0]])[0]))
            elif op == "step":
                batch = lookup(args[0])
                rgb = np.ascontiguousarray(model.step(batch, args[1], args[2]))
                value = (rgb.shape, rgb.tobytes(), [s.frame_index for s in batch])
            elif op == "step_and_encode":
                batch = lookup(args[0])
                _wait_until(args[-1])
                result = step_and_encode(model, batch, *args[1:-1])
                # copies stay here: the worker gets handles on them
                copies = [None if c is None else keep(c) for c in result.copies]
                result.copies = [None] * len(batch)
                value = (result, [s.frame_index for s in batch], copies)
            else:
                raise Internal(f"model host: unknown request {op!r}")
        except Exception as exc:  # errors go back to the caller, typed
            if not isinstance(exc, WindflowError):
                log.error("%s failed:\n%s", op, traceback.format_exc())
            conn.send(("error", _portable(exc)))
            continue
        conn.send(("ok", value))


SPIN_US = 300
"""A batch sent ahead of its start sleeps until this long before it, then spins: a
millisecond's sleep leaves the host warm (its round trip after 1 ms idle is ~50 us, after
35 ms ~300 us), and a spin of at most this long costs little CPU."""


def _wait_until(start_at_us: int) -> None:
    """Return at ``start_at_us`` (wall clock), or at once if that has passed."""
    ahead = start_at_us - telemetry.now_us()
    if ahead > SPIN_US:
        time.sleep((ahead - SPIN_US) / 1e6)
    while telemetry.now_us() < start_at_us:
        pass


def _unwrap(reply: tuple[str, Any]) -> Any:
    status, value = reply
    if status != "ok":
        raise value
    return value


def _portable(exc: BaseException) -> Exception:
    """``exc`` as it can cross the pipe: Windflow's typed errors as they are, anything
    else as ``Internal`` naming the original type."""
    if isinstance(exc, WindflowError):
        return exc
    return Internal(f"model host: {type(exc).__name__}: {exc}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a model host (started by the worker)")
    parser.add_argument("--fd", type=int, required=True, help="the worker's socket")
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--options", default="{}", help="the model's load options, JSON")
    args = parser.parse_args(argv)
    _serve(Connection(args.fd), args.model, json.loads(args.options), args.threads)


if __name__ == "__main__":
    main()
