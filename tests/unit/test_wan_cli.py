"""``windflow bench wan --tiny --json`` streams frames and reports key parity."""

from __future__ import annotations

import json

from windflow.cli import main as cli_main


def test_bench_wan_tiny_json(capsys) -> None:
    assert cli_main(["bench", "wan", "--tiny", "--json", "--frames", "12"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(last)
    assert report["frames"] == 12
    assert report["fps"] > 0
    assert report["key_parity"] is True
    assert report["kernels"] == "torch" and report["device"] == "cpu"


def test_bench_wan_rejects_short_runs(capsys) -> None:
    assert cli_main(["bench", "wan", "--tiny", "--frames", "4"]) == 2
    assert "at least 12" in capsys.readouterr().err
