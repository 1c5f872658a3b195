"""The metrics module: one spec per instrument, the names Prometheus shows, the no-op
default, the ``/metrics`` endpoint, the docs and the Grafana dashboard agreeing with it."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path
from typing import Any, get_type_hints

import pytest

from windflow.common import metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "windflow.json"
OPERATIONS = ROOT / "docs" / "operations.md"


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


def test_every_spec_is_an_instrument_and_every_instrument_a_spec() -> None:
    annotated = set(get_type_hints(metrics.Metrics))
    by_attribute = {spec.attribute for spec in metrics.SPECS}
    assert by_attribute == annotated
    names = [spec.name for spec in metrics.SPECS]
    assert len(names) == len(set(names))
    for spec in metrics.SPECS:
        assert re.fullmatch(r"windflow_[a-z_]+", spec.name), spec.name
        assert not spec.name.endswith("_total"), "counters get _total from the exporter"
        assert spec.kind in ("counter", "updown", "histogram", "gauge", "observed_counter")
        assert (spec.kind == "histogram") == bool(spec.buckets), spec.name
        assert spec.services and spec.help


def test_instruments_are_no_ops_until_started() -> None:
    m = metrics.get()
    assert not m.live
    m.frame_latency_ms.record(3.0, {"model": "m"})
    m.admission_refusals.add(1, {"reason": "full"})
    m.sessions_active.add(lambda: [(1.0, {"model": "m"})])
    assert m.sessions_active.read() == []  # a source is not even kept
    assert metrics.scrape() == b""


async def test_metrics_endpoint_shows_every_series_under_its_documented_name() -> None:
    exporting = await metrics.start("windflow-test", listen="127.0.0.1:0")
    try:
        assert exporting.address is not None
        m = metrics.get()
        assert m.live
        for spec in metrics.SPECS:
            instrument: Any = getattr(m, spec.attribute)
            labels = {label: "x" for label in spec.labels}
            if spec.kind == "histogram":
                instrument.record(12.0, labels)
            elif spec.kind in ("counter", "updown"):
                instrument.add(1, labels)
            else:
                instrument.add(lambda labels=labels: [(2.0, labels)])
        broken = m.sessions_active

        def failing() -> list[tuple[float, dict[str, str]]]:
            raise RuntimeError("a source that fails is skipped")

        broken.add(failing)
        text = await asyncio.to_thread(_get, f"http://{exporting.address}/metrics")
        shown = set(re.findall(r"^(windflow_[a-z_]+)", text, re.MULTILINE))
        assert shown == metrics.prometheus_names()
        assert 'windflow_frame_latency_ms_bucket{le="15.0",model="x"} 1.0' in text
        assert 'service_name="windflow-test"' in text  # target_info
        assert "process_cpu_seconds_total" in text
    finally:
        await exporting.aclose()
    assert not metrics.get().live


async def test_start_without_a_listener_or_collector_records_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    exporting = await metrics.start("windflow-test")
    assert exporting.address is None and not metrics.get().live
    await exporting.aclose()


def _exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def test_the_grafana_dashboard_asks_for_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "windflow" and dashboard["panels"]
    known = metrics.prometheus_names()
    used = set()
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}"
    for title, expr in _exprs(dashboard):
        names = set(re.findall(r"\bwindflow_[a-z_]+", expr))
        assert names, f"{title}: {expr} names no Windflow metric"
        assert names <= known, f"{title}: unknown {names - known}"
        used |= names
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # every metric has a panel (histograms through their buckets)
    shown = {spec.name for spec in metrics.SPECS if set(spec.series) & used}
    assert shown == {spec.name for spec in metrics.SPECS}


def test_the_operations_doc_lists_every_metric() -> None:
    text = OPERATIONS.read_text()
    missing = [spec.prometheus for spec in metrics.SPECS if f"`{spec.prometheus}" not in text]
    assert not missing
