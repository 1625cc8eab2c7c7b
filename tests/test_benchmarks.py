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

from benchmarks import servers
from benchmarks.load import parse_wrk
from benchmarks.run import SCENARIOS, Scenario, run_scenario
from benchmarks.servers import Server

pytestmark = pytest.mark.timeout(600)

FRAMEWORK_KEYS = [
    "flask-close",
    "flask-keepalive",
    "django-close",
    "django-keepalive",
    "bottle-close",
    "bottle-keepalive",
    "upload-keepalive",
]

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
    keys = [s["key"] for s in report["scenarios"]]
    assert keys == ["close", "keepalive", "echo", "crunch", *FRAMEWORK_KEYS]
    for scenario in report["scenarios"]:
        for row in scenario["rows"]:
            assert row["rps"] > 0, (scenario["key"], row)
        for name, why in scenario["skipped"].items():
            assert "install" in why, (name, why)  # a skip always says how to fix it
        assert scenario["failed"] == {}, scenario["key"]
        served = {row["server"] for row in scenario["rows"]}
        served |= set(scenario["skipped"]) | set(scenario["failed"])
        assert any(name.startswith("prefork") for name in served)
        gunicorn = {s.name for s in scenario_servers(scenario["key"]) if s.kind == "gunicorn"}
        assert gunicorn <= served - set(scenario["failed"])  # it serves every app here
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


def scenario_servers(key: str) -> tuple[Server, ...]:
    return next(s.servers for s in SCENARIOS if s.key == key)


def test_a_server_that_fails_to_start_is_reported_and_the_run_goes_on() -> None:
    broken = Server("prefork sync -w 1", "prefork", "echo", 1, "sync", ("--no-such-option",))
    scenario = Scenario("broken", "a server that exits at once", "tcp", 1, (broken,), seconds=1)
    lines: list[str] = []
    result = run_scenario(scenario, runs=2, seconds=None, warmup=0, log=lines.append)
    assert result["rows"] == [] and list(result["failed"]) == ["prefork sync -w 1"]
    assert "exited" in result["failed"]["prefork sync -w 1"]
    assert "--no-such-option" in result["failed"]["prefork sync -w 1"]  # prefork's own words
    (line,) = lines  # not started again for the second run
    assert "failed: exited" in line


def test_a_missing_framework_skips_its_scenario_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(servers, "_importable", lambda module: module != "bottle")
    (scenario,) = (s for s in SCENARIOS if s.key == "bottle-keepalive")
    lines: list[str] = []
    result = run_scenario(scenario, runs=1, seconds=1, warmup=0, log=lines.append)
    assert result["rows"] == [] and result["failed"] == {}
    assert set(result["skipped"]) == {s.name for s in scenario.servers}
    why = 'bottle is not installed: pip install -e ".[bench]"'
    assert lines == [f"  bottle-keepalive: skipped every server: {why}"]  # one line, no start
