"""prefork beside its peers, in one run on one machine: python -m benchmarks

    python -m benchmarks                 # the full table: 3 runs of 5 s per server
    python -m benchmarks --smoke         # a second per server, one run (the tests use it)
    python -m benchmarks --only keepalive --runs 5 --seconds 10

Every server serves the same bytes (benchmarks/apps.py) on 127.0.0.1, is started,
waited for until it answers, driven for a fixed time (wrk for HTTP, a Python client
for raw TCP), and stopped by PID. Runs go round-robin over the servers of a scenario,
so slow drift of this shared machine spreads over all of them; each figure is the
median of the runs, with the min-max beside it. Ratios within one run are what to
read: absolute numbers move from one run to the next.

Output: benchmarks/results/latest.{md,json} and, with matplotlib installed
(pip install -e ".[bench]"), latest.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import measure
from benchmarks.load import WRK_MISSING, LoadResult, have_wrk, run_tcp, run_wrk
from benchmarks.servers import Server, running

RESULTS = Path(__file__).resolve().parent / "results"
WARMUP_S = 1.0  # full runs only: the first requests pay for imports and caches


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    load: str  # wrk-close, wrk-keepalive, tcp
    connections: int
    servers: tuple[Server, ...]


def _prefork(handler: str, workers: int, worker_class: str = "sync") -> Server:
    bare = " (bare app)" if handler == "bare" else ""
    name = f"prefork {worker_class} -w {workers}{bare}"
    return Server(name, "prefork", handler, workers, worker_class)


def _floor(handler: str, workers: int) -> Server:
    return Server(f"floor (hand-written pre-fork) -w {workers}", "floor", handler, workers)


def _stdlib(handler: str, kind: str) -> Server:
    name = {"threading": "ThreadingTCPServer", "forking": "ForkingTCPServer"}[kind]
    if handler == "hello" and kind == "threading":
        name = "ThreadingHTTPServer"
    return Server(f"stdlib {name}", "stdlib", handler, 1, kind)


def _gunicorn(workers: int, worker_class: str) -> Server:
    threads = " --threads 16" if worker_class == "gthread" else ""
    return Server(
        f"gunicorn {worker_class} -w {workers}{threads}", "gunicorn", "hello", workers, worker_class
    )


NGINX = Server("nginx return 200, 2 workers", "nginx", "hello", 2)

SCENARIOS = (
    Scenario(
        "close",
        "HTTP hello, a new connection per request (wrk -c 16, Connection: close)",
        "wrk-close",
        16,
        (
            _prefork("hello", 1),
            _prefork("hello", 2),
            _prefork("hello", 1, "thread"),
            _prefork("hello", 2, "thread"),
            _floor("hello", 1),
            _floor("hello", 2),
            _stdlib("hello", "threading"),
            _gunicorn(1, "sync"),
            _gunicorn(2, "sync"),
            _gunicorn(2, "gthread"),
            NGINX,
        ),
    ),
    Scenario(
        "keepalive",
        "HTTP hello, keep-alive (wrk -c 16)",
        "wrk-keepalive",
        16,
        (
            _prefork("hello", 1, "thread"),
            _prefork("hello", 2, "thread"),
            _stdlib("hello", "threading"),
            _gunicorn(1, "gthread"),
            _gunicorn(2, "gthread"),
            NGINX,
        ),
    ),
    Scenario(
        "echo",
        "TCP echo, one line per connection (4 Python client processes)",
        "tcp",
        4,
        (
            _prefork("echo", 1),
            _prefork("echo", 2),
            _prefork("echo", 1, "thread"),
            _prefork("echo", 2, "thread"),
            _floor("echo", 2),
            _stdlib("echo", "threading"),
            _stdlib("echo", "forking"),
        ),
    ),
    Scenario(
        "crunch",
        "TCP echo after ~1 ms of CPU per request (4 Python client processes)",
        "tcp",
        4,
        (
            _prefork("crunch", 2),
            _floor("crunch", 2),
            _stdlib("crunch", "threading"),
        ),
    ),
)

# The bar: (scenario, numerator, denominator, at least)
BAR = (
    ("close", "prefork sync -w 2", "floor (hand-written pre-fork) -w 2", 0.95),
    ("close", "prefork sync -w 2", "gunicorn sync -w 2", 1.5),
    ("keepalive", "prefork thread -w 2", "gunicorn gthread -w 2 --threads 16", 1.5),
    ("crunch", "prefork sync -w 2", "stdlib ThreadingTCPServer", 1.7),
    ("echo", "prefork sync -w 2", "stdlib ForkingTCPServer", 3.0),
    # Tight handlers: prefork's own cost per request, beside the least a loop can do.
    ("echo", "prefork sync -w 2", "floor (hand-written pre-fork) -w 2", 0.95),
    ("crunch", "prefork sync -w 2", "floor (hand-written pre-fork) -w 2", 0.95),
)


def drive(scenario: Scenario, port: int, seconds: float) -> LoadResult:
    if scenario.load == "tcp":
        return run_tcp(port, seconds, scenario.connections)
    return run_wrk(port, seconds, scenario.connections, close=scenario.load == "wrk-close")


def run_scenario(
    scenario: Scenario, runs: int, seconds: float, warmup: float, log: Any
) -> dict[str, Any]:
    servers = []
    skipped = {}
    for server in scenario.servers:
        why = server.missing()
        if why is None and scenario.load != "tcp" and not have_wrk():
            why = WRK_MISSING
        if why:
            skipped[server.name] = why
        else:
            servers.append(server)
    results: dict[str, list[LoadResult]] = {s.name: [] for s in servers}
    spreads: dict[str, Any] = {}
    for attempt in range(runs):
        for server in servers:
            with running(server) as run:
                if warmup:
                    drive(scenario, run.port, warmup)
                result = drive(scenario, run.port, seconds)
                if server.kind == "prefork":
                    spreads[server.name] = measure.fairness(run)
            results[server.name].append(result)
            log(
                f"  {scenario.key} run {attempt + 1}/{runs}  {server.name:42} "
                f"{result.rps:9.0f} req/s  p99 {result.p99_ms or 0:7.2f} ms  "
                f"errors {result.errors}"
            )
    rows = []
    for server in servers:
        runs_of = results[server.name]
        rps = [r.rps for r in runs_of]
        rows.append(
            {
                "server": server.name,
                "rps": round(statistics.median(rps)),
                "rps_min": round(min(rps)),
                "rps_max": round(max(rps)),
                "p50_ms": _median([r.p50_ms for r in runs_of]),
                "p99_ms": _median([r.p99_ms for r in runs_of]),
                "errors": sum(r.errors for r in runs_of),
                "jain": (spreads.get(server.name) or {}).get("jain"),
                "runs": [asdict(r) | {"rps": round(r.rps)} for r in runs_of],
            }
        )
    return {"key": scenario.key, "title": scenario.title, "rows": rows, "skipped": skipped}


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def check_bar(scenarios: list[dict[str, Any]], extras: dict[str, Any]) -> list[dict[str, Any]]:
    by_name = {(s["key"], r["server"]): r["rps"] for s in scenarios for r in s["rows"]}
    checks = []
    for key, numerator, denominator, least in BAR:
        top, bottom = by_name.get((key, numerator)), by_name.get((key, denominator))
        ratio = round(top / bottom, 2) if top and bottom else None
        checks.append(
            {
                "what": f"{key}: {numerator} / {denominator}",
                "ratio": ratio,
                "at_least": least,
                "met": None if ratio is None else ratio >= least,
            }
        )
    respawn = extras.get("respawn", [])
    mine = next((r for r in respawn if r["server"].startswith("prefork")), None)
    if mine:
        checks.append(
            {
                "what": "worker replacement after SIGKILL, median ms",
                "ratio": mine["median_ms"],
                "at_most": 15,
                "met": mine["median_ms"] <= 15,
            }
        )
    reload = next((r for r in extras.get("reload", []) if r["server"].startswith("prefork")), None)
    if reload:
        checks.append(
            {
                "what": "HUP under load: failed requests; reloads whose worst request "
                "exceeded 2 x normal p99 (quiet windows as long, for scale)",
                "ratio": f"{reload['failed']} failed; {reload['reloads_over_bound']} of "
                f"{reload['reloads']} (quiet: {reload['quiet_over_bound']} of "
                f"{reload['quiet_windows']})",
                "met": reload["failed"] == 0 and reload["reloads_over_bound"] == 0,
            }
        )
    startup = {r["server"]: r["ready_ms"] for r in extras.get("startup", [])}
    gunicorn = startup.get("gunicorn sync -w 2")
    for name in ("prefork sync -w 2", "prefork sync -w 2 (bare app)"):
        if gunicorn and name in startup:
            ratio = round(startup[name] / gunicorn, 2)
            checks.append(
                {
                    "what": f"start-up, median: {name} / gunicorn sync -w 2",
                    "ratio": ratio,
                    "at_most": 1.0,
                    "met": ratio <= 1.0,
                }
            )
    return checks


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Benchmarks: {report['when']}",
        "",
        f"`{report['command']}` on {report['machine']}: {report['runs']} runs of "
        f"{report['seconds']:g} s per server, median (min-max). Ratios hold within one "
        "run; absolute figures drift on a shared machine.",
        "",
    ]
    for scenario in report["scenarios"]:
        rows = []
        for row in sorted(scenario["rows"], key=lambda r: -r["rps"]):
            jain = "" if row["jain"] is None else f"{row['jain']:.3f}"
            rows.append(
                f"| {row['server']} | {row['rps']} | {row['rps_min']}-{row['rps_max']} | "
                f"{_fmt(row['p50_ms'])} | {_fmt(row['p99_ms'])} | {row['errors']} | {jain} |"
            )
        rows += [
            f"| {name} | skipped: {why} | | | | | |" for name, why in scenario["skipped"].items()
        ]
        columns = ["server", "req/s", "min-max", "p50 ms", "p99 ms", "errors", "Jain"]
        lines += _section(scenario["title"], columns, "lrrrrrr", rows)
    extras = report["extras"]
    if extras.get("respawn"):
        lines += _section(
            "Worker replacement after SIGKILL (to the replacement's first answer)",
            ["server", "kills", "median ms", "max ms"],
            "lrrr",
            [
                f"| {r['server']} | {r['kills']} | {r['median_ms']} | {r['max_ms']} |"
                for r in extras["respawn"]
            ],
        )
    if extras.get("reload"):
        lines += _section(
            "HUP reload under load (4 client processes, a new connection per request)",
            [
                "server",
                "reloads",
                "requests",
                "failed",
                "reload ms",
                "normal p99 ms",
                "worst during, median (max) ms",
                "reloads over bound",
                "quiet windows: worst, median (max) ms",
                "quiet over bound",
            ],  # fmt: skip
            "lrrrrrrrrr",
            [
                f"| {r['server']} | {r['reloads']} | {r['requests']} | {r['failed']} "
                f"| {r['reload_ms']} | {r['normal_p99_ms']} "
                f"| {r['worst_during_median_ms']} ({r['worst_during_ms']}) "
                f"| {r['reloads_over_bound']} of {r['reloads']} "
                f"| {r['quiet_worst_median_ms']} ({r['quiet_worst_max_ms']}) "
                f"| {r['quiet_over_bound']} of {r['quiet_windows']} |"
                for r in extras["reload"]
            ],
            intro="A reload's window runs from the HUP until the old workers have exited, "
            f"plus {measure.SETTLE_S * 1000:g} ms; bound: 2 x the p99 before the first HUP. "
            "Quiet windows: as long as the reload's, cut from the time between reloads.",
        )
    if extras.get("keepalive_clients"):
        lines += _section(
            "Keep-alive clients answered (16 connections open at once, one request each)",
            ["server", "answered within 2 s"],
            "lr",
            [
                f"| {r['server']} | {r['answered']} of {r['clients']} |"
                for r in extras["keepalive_clients"]
            ],
        )
    if extras.get("startup"):
        lines += _section(
            "Start-up to the first answered request (median and fastest of the rounds, "
            'servers taking turns; "bare": an app that imports nothing, as gunicorn\'s)',
            ["server", "median ms", "fastest ms", "rounds"],
            "lrrr",
            [
                f"| {r['server']} | {r['ready_ms']} | {r.get('fastest_ms', '')} "
                f"| {r.get('rounds', 1)} |"
                for r in extras["startup"]
            ],
        )
    if extras.get("memory"):
        lines += _section(
            "Memory (USS: what only that process holds)",
            ["server", "per worker MB", "master MB"],
            "lrr",
            [
                f"| {r['server']} | {r['uss_per_worker_mb']} | {r['master_uss_mb']} |"
                for r in extras["memory"]
            ],
        )
    checks = []
    for check in report["bar"]:
        wanted = (
            f">= {check['at_least']}"
            if "at_least" in check
            else f"<= {check['at_most']}"
            if "at_most" in check
            else "0 failed; 0 reloads over"
        )
        met = {True: "yes", False: "**no**", None: "not measured"}[check["met"]]
        checks.append(f"| {check['what']} | {check['ratio']} | {wanted} | {met} |")
    lines += _section("The bar", ["ratio", "measured", "wanted", "met"], "lrrl", checks)
    return "\n".join(lines[:-1]) + "\n"  # no blank line after the last table


def _section(
    title: str, columns: list[str], align: str, rows: list[str], intro: str = ""
) -> list[str]:
    """A ``## title`` section: the intro paragraph if any, then a table of ``rows``
    (already formatted) under ``columns``, aligned by ``align`` (l/r per column)."""
    separator = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return [
        f"## {title}",
        "",
        *([intro, ""] if intro else []),
        "| " + " | ".join(columns) + " |",
        separator,
        *rows,
        "",
    ]


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def render_chart(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scenarios = [s for s in report["scenarios"] if s["rows"]]
    fig, axes = plt.subplots(len(scenarios), 1, figsize=(9, 2.2 + 2.4 * len(scenarios)))
    axes = axes if len(scenarios) > 1 else [axes]
    for ax, scenario in zip(axes, scenarios, strict=True):
        rows = sorted(scenario["rows"], key=lambda r: r["rps"])
        names = [r["server"] for r in rows]
        colours = ["tab:green" if n.startswith("prefork") else "tab:grey" for n in names]
        ax.barh(names, [r["rps"] for r in rows], color=colours)
        ax.errorbar(
            [r["rps"] for r in rows],
            names,
            xerr=[[r["rps"] - r["rps_min"] for r in rows], [r["rps_max"] - r["rps"] for r in rows]],
            fmt="none",
            ecolor="black",
            capsize=3,
        )
        ax.set_title(scenario["title"], fontsize=9)
        ax.set_xlabel("requests/s (median; bars: min-max)", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--only", action="append", help="scenario keys: close, keepalive, echo, crunch"
    )
    parser.add_argument("--smoke", action="store_true", help="1 run of 1 s each: the harness works")
    parser.add_argument(
        "--no-extras", action="store_true", help="skip respawn, reload, start-up, memory"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs, args.seconds = 1, 1.0

    def log(line: str) -> None:
        print(line, flush=True)

    started = time.time()
    chosen = [s for s in SCENARIOS if not args.only or s.key in args.only]
    if not have_wrk():
        log(f"note: {WRK_MISSING}; the HTTP scenarios are skipped")
    scenarios = []
    for scenario in chosen:
        log(f"{scenario.title}")
        warmup = 0.0 if args.smoke else WARMUP_S
        scenarios.append(run_scenario(scenario, args.runs, args.seconds, warmup, log))
    extras: dict[str, Any] = {}
    if not args.no_extras:
        log("supervision: respawn, reload, start-up, memory")
        kills = 3 if args.smoke else 10
        extras["respawn"] = [measure.respawn(_prefork("hello", 1), kills)]
        gunicorn = _gunicorn(1, "sync")
        if not gunicorn.missing():
            extras["respawn"].append(measure.respawn(gunicorn, kills))
        reloaded = [_prefork("hello", 2)] + ([] if args.smoke or gunicorn.missing() else [
            _gunicorn(2, "sync")])  # fmt: skip
        extras["reload"] = [
            measure.reload_under_load(server, 0.5, reloads=2)
            if args.smoke
            else measure.reload_under_load(server, 1.0, reloads=10)
            for server in reloaded
        ]
        extras["keepalive_clients"] = [
            measure.keepalive_clients(_prefork("hello", 2)),
            measure.keepalive_clients(_prefork("hello", 2, "thread")),
        ]
        extras["startup"] = measure.startup(
            [_prefork("hello", 2), _prefork("bare", 2), _floor("hello", 2),
             _stdlib("hello", "threading"), _gunicorn(2, "sync")],
            rounds=1 if args.smoke else 21,
        )  # fmt: skip
        extras["memory"] = measure.memory()
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
        "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {_cores()} cores, Python {platform.python_version()}",
        "runs": args.runs,
        "seconds": args.seconds,
        "scenarios": scenarios,
        "extras": extras,
    }
    report["bar"] = check_bar(scenarios, extras)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "smoke" if args.smoke else "latest"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (args.out / f"{stem}.md").write_text(markdown)
    chart = render_chart(report, args.out / f"{stem}.png")
    log("")
    log(markdown)
    log(
        f"written: {args.out / stem}.md, .json"
        + (", .png" if chart else " (no matplotlib: no chart)")
    )
    log(f"took {time.time() - started:.0f} s")
    return 0


def _cores() -> int:
    import os

    return os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
