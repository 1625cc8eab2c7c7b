"""The benchmark harness itself: a smoke run of every scenario, so it never rots.

No speed is asserted here (the bar lives in the benchmark's own report); only that
every server it could start answered, and that the report is complete.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from benchmarks.load import parse_wrk

pytestmark = pytest.mark.timeout(600)

WRK_OUTPUT = """Running 4s test @ http://127.0.0.1:9303/
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.28ms  645.21us  15.50ms   83.26%
    Req/Sec     3.09k   208.74     3.53k    72.50%
  Latency Distribution
     50%    1.14ms
     75%    1.46ms
     90%    1.94ms
     99%    3.69ms
  24645 requests in 4.00s, 2.75MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:   6160.27
Transfer/sec:    703.46KB
"""


def test_wrk_output_is_parsed() -> None:
    result = parse_wrk(WRK_OUTPUT)
    assert (result.requests, result.seconds, result.errors) == (24645, 4.0, 6)
    assert (result.p50_ms, result.p99_ms, result.max_ms) == (1.14, 3.69, 15.5)
    assert round(result.rps) == 6161


def test_smoke_run_produces_the_full_report(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert [s["key"] for s in report["scenarios"]] == ["close", "keepalive", "echo", "crunch"]
    for scenario in report["scenarios"]:
        for row in scenario["rows"]:
            assert row["rps"] > 0, (scenario["key"], row)
        for name, why in scenario["skipped"].items():
            assert "install" in why, (name, why)  # a skip always says how to fix it
        served = {row["server"] for row in scenario["rows"]} | set(scenario["skipped"])
        assert any(name.startswith("prefork") for name in served)
    echo = {row["server"]: row for row in report["scenarios"][2]["rows"]}
    assert echo["prefork sync -w 2"]["errors"] == 0
    assert echo["prefork sync -w 2"]["jain"] is not None  # read through prefork status
    extras = report["extras"]
    assert extras["respawn"][0]["server"].startswith("prefork")
    (reload,) = extras["reload"]  # smoke: prefork only
    assert reload["failed"] == 0 and reload["reloads"] == 2 and reload["requests"] > 0
    answered = {r["server"]: r["answered"] for r in extras["keepalive_clients"]}
    assert answered["prefork thread -w 2"] == 16  # every keep-alive client gets a thread
    assert {r["server"] for r in extras["memory"]} == {
        "prefork sync -w 2",
        "prefork sync -w 2 --preload",
    }
    markdown = (tmp_path / "smoke.md").read_text()
    assert "## The bar" in markdown and "TCP echo" in markdown
