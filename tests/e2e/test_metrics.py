"""Metrics and status against a live mesh: every service serves ``/metrics``, the figures
move as frames flow, ``windflow status`` sees the worker, the leading router and the
session, and ``windflow sessions close`` closes it."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from services.worker.models.registry import DEFAULT_MODEL
from tests.e2e.mesh import Mesh
from windflow.common import metrics
from windflow.sdk import Client

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(address: str) -> Samples:
    """One ``GET /metrics``: every sample by (name, labels)."""

    def get() -> str:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
            return str(reply.read().decode())

    text = await asyncio.to_thread(get)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and wanted <= got)


async def windflow(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "windflow",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def eventually(check: Any, timeout_s: float = 15.0) -> None:
    """Poll ``check()`` (async, truthy when done) until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.3)


async def test_metrics_move_as_frames_flow(tmp_path: Path) -> None:
    async with Mesh(tmp_path, workers=1) as mesh:
        before = {name: await scrape(address) for name, address in mesh.metrics.items()}
        for name, samples in before.items():
            services = [v for (n, labels), v in samples.items() if n == "target_info"]
            assert services, f"{name} serves no target_info"
        ours = metrics.prometheus_names()
        for name, samples in before.items():  # nothing unknown under our prefix
            unknown = {n for n, _ in samples if n.startswith("windflow_")} - ours
            assert not unknown, f"{name}: {unknown}"
        worker, gateway = "worker-1", "gateway"
        assert value(before[worker], "windflow_sessions_active") == 0
        assert value(before["router"], "windflow_router_leader") == 1

        async with (
            Client(mesh.gateway) as client,
            client.session(DEFAULT_MODEL, seed=5, close=False) as session,
        ):
            got = 0
            async for frame in session.frames():
                got += 1
                if got == 3:
                    await session.send(action=1, frame_index=0)  # in the past: refused
                if got % 4 == 0:
                    await session.send(action=2, frame_index=frame.index + 2)
                if got >= 40:
                    break
            await eventually(lambda: _has_error(session))
            # still attached (its frames wait for acks): the gauges say so
            during = {name: await scrape(mesh.metrics[name]) for name in (worker, gateway)}
            code, out, err = await windflow("status", "--etcd", mesh.etcd.endpoint, "--json")
            assert code == 0, err
            status = json.loads(out)
            code, listing, err = await windflow(
                "sessions", "list", "--etcd", mesh.etcd.endpoint, "--json"
            )
            assert code == 0, err
            code, table, err = await windflow("status", "--etcd", mesh.etcd.endpoint)
            assert code == 0, err

        w = during[worker]
        assert value(w, "windflow_sessions_active", model=DEFAULT_MODEL) == 1
        assert value(w, "windflow_sessions_attached", model=DEFAULT_MODEL) == 1
        assert value(during[gateway], "windflow_streams_active") == 1
        delivered = "windflow_frames_delivered_total"
        assert value(w, delivered, model=DEFAULT_MODEL) - value(before[worker], delivered) >= 40
        latency = "windflow_frame_latency_ms_count"
        assert value(w, latency, model=DEFAULT_MODEL) - value(before[worker], latency) >= 40
        assert value(w, "windflow_frame_latency_ms_sum") > 0
        assert value(w, "windflow_control_to_frame_ms_count") >= 1
        assert value(w, "windflow_controls_refused_total", code="INVALID_ARGUMENT") >= 1
        assert value(w, "windflow_queue_depth", queue="frames_out") >= 0

        assert [x["worker_id"] for x in status["workers"]] == [worker]
        assert status["workers"][0]["sessions"] == 1
        assert status["leader"] == mesh.addresses["router"]
        assert status["routers"] == [{"address": mesh.addresses["router"], "leader": True}]
        (row,) = [s for s in status["sessions"] if s["session_id"] == session.id]
        assert row["worker"] == worker and row["model"] == DEFAULT_MODEL
        assert row["state"] == "streaming" and row["head_frame"] >= 40 and row["fps"] > 0
        assert [r["session_id"] for r in json.loads(listing)] == [session.id]
        assert "WORKERS (1)" in table and session.id in table and "leader" in table

        # the stream ended: the gauges come down, usage was metered and billed
        async def streams_closed() -> bool:
            return value(await scrape(mesh.metrics[gateway]), "windflow_streams_active") == 0

        await eventually(streams_closed)
        after = await scrape(mesh.metrics[worker])
        assert value(after, "windflow_sessions_attached") == 0
        assert value(after, "windflow_usage_seconds_total", model=DEFAULT_MODEL) > 0
        assert value(await scrape(mesh.metrics[gateway]), "windflow_sessions_created_total") == 1
        router = await scrape(mesh.metrics["router"])
        assert value(router, "windflow_placements_total", outcome="placed") == 1
        assert value(router, "windflow_workers", state="live") == 1

        async def billed() -> bool:
            session_service = await scrape(mesh.metrics["session"])
            return value(session_service, "windflow_usage_billed_seconds_total") > 0

        await eventually(billed)

        code, out, err = await windflow(
            "sessions", "close", session.id, "--session-service", mesh.addresses["session"]
        )
        assert code == 0, err
        assert json.loads(out)["state"] == "closed"
        assert value(await scrape(mesh.metrics[worker]), "windflow_sessions_active") == 0
        code, out, err = await windflow("sessions", "list", "--etcd", mesh.etcd.endpoint, "--json")
        assert code == 0 and json.loads(out) == [], err
        code, out, err = await windflow(
            "sessions", "close", "nope", "--session-service", mesh.addresses["session"]
        )
        assert code == 1 and "NOT_FOUND" in err


async def _has_error(session: Any) -> bool:
    return any(e.code_name == "INVALID_ARGUMENT" for e in session.errors)
