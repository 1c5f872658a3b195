"""Benchmark records name the code and the machine they came from."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from pathlib import Path

from windflow.cli import bench_results


def test_a_record_names_its_command_revision_and_machine(tmp_path: Path) -> None:
    started = dt.datetime(2026, 11, 21, 19, 0, 5, tzinfo=dt.UTC)
    path = bench_results.write(
        str(tmp_path / "out"), "runtime", started, {"cores": 2}, {"summary": {"x": 1}}
    )
    assert path.name == "runtime-20261121T190005Z.json"
    record = json.loads(path.read_text())
    assert record["bench"] == "runtime" and record["command"].startswith("windflow bench runtime")
    assert record["machine"] == {"cores": 2} and record["summary"] == {"x": 1}
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    if head.returncode == 0:  # a git checkout: the record names its commit
        assert record["revision"]["commit"] == head.stdout.strip()
        assert re.fullmatch(r"[0-9a-f]{40}", record["revision"]["commit"])
        assert isinstance(record["revision"]["local_changes"], bool)
    else:
        assert record["revision"] is None
