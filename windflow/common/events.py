"""Lifecycle events on NATS (subjects windflow.v1.<area>.<event>), trace context in headers."""

from __future__ import annotations

import logging
import time

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from windflow.common import telemetry
from windflow.v1 import internal_pb2

log = logging.getLogger(__name__)


class EventBus:
    """Publishes ``LifecycleEvent`` protos. Lifecycle: ``connect`` -> publish -> ``aclose``."""

    def __init__(self, url: str, name: str) -> None:
        self._url = url
        self._name = name
        self.nc: NATS | None = None

    async def connect(self) -> None:
        self.nc = await nats.connect(
            self._url, name=self._name, max_reconnect_attempts=-1, reconnect_time_wait=0.5
        )

    def jetstream(self) -> JetStreamContext:
        if self.nc is None:
            raise RuntimeError("EventBus.jetstream before connect")
        return self.nc.jetstream()

    async def publish(
        self,
        subject: str,
        *,
        session_id: str = "",
        worker_id: str = "",
        epoch: int = 0,
        model_id: str = "",
        detail: str = "",
    ) -> None:
        if self.nc is None:
            raise RuntimeError("EventBus.publish before connect")
        event = internal_pb2.LifecycleEvent(
            subject=subject,
            session_id=session_id,
            worker_id=worker_id,
            epoch=epoch,
            model_id=model_id,
            detail=detail,
            unix_ms=int(time.time() * 1000),
        )
        try:
            await self.nc.publish(
                subject, event.SerializeToString(), headers=telemetry.inject_headers()
            )
        except Exception:  # events are best-effort; the state of record is in etcd
            log.warning("could not publish %s", subject, exc_info=True)

    async def aclose(self) -> None:
        nc, self.nc = self.nc, None
        if nc is not None and not nc.is_closed:
            await nc.drain()
