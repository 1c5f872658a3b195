"""Process lifecycle shared by the services' mains: wait for a stop signal or a crash."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

log = logging.getLogger(__name__)


async def wait_for_stop(*watch: asyncio.Task[object]) -> int:
    """Block until SIGINT/SIGTERM (returns 0) or one of ``watch`` ends (returns 1)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait(), name="stop-signal")
    try:
        done, _ = await asyncio.wait({stopper, *watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopper
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    for task in done:
        if task is not stopper:
            exc = task.exception() if not task.cancelled() else None
            log.error("%s ended unexpectedly: %r", task.get_name(), exc)
            return 1
    return 0
