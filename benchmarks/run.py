"""prefork beside its peers, in one run on one machine: python -m benchmarks

    python -m benchmarks                 # the full table: 3 runs of 5 s per server
                                         # (3 s for the WSGI framework scenarios)
    python -m benchmarks --smoke         # a second per server, one run (the tests use it)
    python -m benchmarks --only keepalive --runs 5 --seconds 10
    python -m benchmarks --only flask-close --only flask-keepalive

Every server serves the same bytes (benchmarks/apps.py) on 127.0.0.1, is started,
waited for until it answers, driven for a fixed time (wrk for HTTP, a Python client
for raw TCP), and stopped by PID. Runs go round-robin over the servers of a scenario,
so slow drift of this shared machine spreads over all of them; each figure is the
median of the runs, with the min-max beside it. Ratios within one run are what to
read: absolute numbers move from one run to the next. The framework scenarios serve
the same hello app in Flask, Django and Bottle (benchmarks/frameworks/) from prefork
and from gunicorn; a server that fails to start is reported as failed, and the run
goes on.

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
from benchmarks.frameworks import FRAMEWORKS
from benchmarks.load import WRK_MISSING, LoadResult, have_wrk, run_tcp, run_wrk
from benchmarks.servers import Server, ServerDidNotStart, running

RESULTS = Path(__file__).resolve().parent / "results"
WARMUP_S = 1.0  # full runs only: the first requests pay for imports and caches
SECONDS = 5.0  # per server and run, unless --seconds says otherwise
# The framework scenarios are 7 of 11 but only 2 servers each: at 3 s they add about
# 3.5 minutes to the default run instead of 5, and a framework's few thousand
# requests/s still give some ten thousand latencies a run for the p99.
FRAMEWORK_SECONDS = 3.0
UPLOAD_BYTES = 10 * 1024


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    load: str  # wrk-close, wrk-keepalive, tcp
    connections: int
    servers: tuple[Server, ...]
    seconds: float = SECONDS  # per server and run, unless --seconds says otherwise
    upload_bytes: int = 0  # wrk only: POST this many bytes to /upload instead of GET /


def _prefork(
    handler: str, workers: int, worker_class: str = "sync", threads: int | None = None
) -> Server:
    bare = " (bare app)" if handler == "bare" else ""
    extra = ("--threads", str(threads)) if threads else ()  # else prefork's default, 16
    shown = f" --threads {threads}" if threads else ""
    name = f"prefork {worker_class} -w {workers}{shown}{bare}"
    return Server(name, "prefork", handler, workers, worker_class, extra)


def _floor(handler: str, workers: int) -> Server:
    return Server(f"floor (hand-written pre-fork) -w {workers}", "floor", handler, workers)


def _stdlib(handler: str, kind: str) -> Server:
    name = {"threading": "ThreadingTCPServer", "forking": "ForkingTCPServer"}[kind]
    if handler == "hello" and kind == "threading":
        name = "ThreadingHTTPServer"
    return Server(f"stdlib {name}", "stdlib", handler, 1, kind)


def _gunicorn(workers: int, worker_class: str, handler: str = "hello") -> Server:
    threads = " --threads 16" if worker_class == "gthread" else ""
    return Server(
        f"gunicorn {worker_class} -w {workers}{threads}", "gunicorn", handler, workers, worker_class
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


def _framework_scenarios(framework: str) -> tuple[Scenario, Scenario]:
    """A framework's hello app, a new connection per request (sync workers) and
    keep-alive (thread workers, 16 threads each as gunicorn's gthread here)."""
    name = {"flask": "Flask", "django": "Django", "bottle": "Bottle"}[framework]
    close = Scenario(
        f"{framework}-close",
        f"{name} hello, a new connection per request (wrk -c 16, Connection: close)",
        "wrk-close",
        16,
        (_prefork(framework, 2), _gunicorn(2, "sync", framework)),
        seconds=FRAMEWORK_SECONDS,
    )
    keepalive = Scenario(
        f"{framework}-keepalive",
        f"{name} hello, keep-alive (wrk -c 16)",
        "wrk-keepalive",
        16,
        (_prefork(framework, 2, "thread", threads=16), _gunicorn(2, "gthread", framework)),
        seconds=FRAMEWORK_SECONDS,
    )
    return close, keepalive


UPLOAD = Scenario(
    "upload-keepalive",
    f"Flask, POST of {UPLOAD_BYTES // 1024} KB read whole, answered with its length "
    "(wrk -c 16, keep-alive)",
    "wrk-keepalive",
    16,
    (_prefork("flask", 2, "thread", threads=16), _gunicorn(2, "gthread", "flask")),
    seconds=FRAMEWORK_SECONDS,
    upload_bytes=UPLOAD_BYTES,
)
SCENARIOS += (*(s for f in FRAMEWORKS for s in _framework_scenarios(f)), UPLOAD)

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
    # The framework's own time per request is in both servers' figures, so these ask
    # more of the server than the hello rows above do.
    *(
        row
        for f in FRAMEWORKS
        for row in (
            (f"{f}-close", "prefork sync -w 2", "gunicorn sync -w 2", 1.5),
            (
                f"{f}-keepalive",
                "prefork thread -w 2 --threads 16",
                "gunicorn gthread -w 2 --threads 16",
                1.5,
            ),
        )
    ),
    (
        "upload-keepalive",
        "prefork thread -w 2 --threads 16",
        "gunicorn gthread -w 2 --threads 16",
        1.5,
    ),
)


def drive(scenario: Scenario, port: int, seconds: float) -> LoadResult:
    if scenario.load == "tcp":
        return run_tcp(port, seconds, scenario.connections)
    return run_wrk(
        port,
        seconds,
        scenario.connections,
        close=scenario.load == "wrk-close",
        upload_bytes=scenario.upload_bytes,
    )


def run_scenario(
    scenario: Scenario, runs: int, seconds: float | None, warmup: float, log: Any
) -> dict[str, Any]:
    """``runs`` rounds over the scenario's servers; ``seconds`` of load each (None: the
    scenario's own). A server that cannot run here is skipped, one printed line per
    reason; one that fails to start is reported as failed and not started again."""
    seconds = scenario.seconds if seconds is None else seconds
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
    for why in dict.fromkeys(skipped.values()):
        names = [name for name, reason in skipped.items() if reason == why]
        who = "every server" if len(names) == len(scenario.servers) else ", ".join(names)
        log(f"  {scenario.key}: skipped {who}: {why}")
    results: dict[str, list[LoadResult]] = {s.name: [] for s in servers}
    spreads: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for attempt in range(runs):
        for server in servers:
            if server.name in failed:
                continue
            try:
                with running(server) as run:
                    if warmup:
                        drive(scenario, run.port, warmup)
                    result = drive(scenario, run.port, seconds)
                    if server.kind == "prefork":
                        spreads[server.name] = measure.fairness(run)
            except ServerDidNotStart as exc:
                failed[server.name] = exc.why
                log(
                    f"  {scenario.key} run {attempt + 1}/{runs}  {server.name:42} failed: {exc.why}"
                )
                continue
            results[server.name].append(result)
            log(
                f"  {scenario.key} run {attempt + 1}/{runs}  {server.name:42} "
                f"{result.rps:9.0f} req/s  p99 {result.p99_ms or 0:7.2f} ms  "
                f"errors {result.errors}"
            )
    rows = []
    for server in servers:
        runs_of = results[server.name]
        if not runs_of:
            continue  # failed on its first start
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
    return {
        "key": scenario.key,
        "title": scenario.title,
        "seconds": seconds,
        "rows": rows,
        "skipped": skipped,
        "failed": failed,
    }


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def check_bar(scenarios: list[dict[str, Any]], extras: dict[str, Any]) -> list[dict[str, Any]]:
    by_name = {(s["key"], r["server"]): r["rps"] for s in scenarios for r in s["rows"]}
    run = {s["key"] for s in scenarios}
    checks = []
    for key, numerator, denominator, least in BAR:
        if key not in run:
            continue  # not chosen (--only); a scenario run but not measured still shows
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
            f"| {name} | failed to start: {why} | | | | | |"
            for name, why in scenario.get("failed", {}).items()
        ]
        rows += [
            f"| {name} | skipped: {why} | | | | | |" for name, why in scenario["skipped"].items()
        ]
        columns = ["server", "req/s", "min-max", "p50 ms", "p99 ms", "errors", "Jain"]
        seconds = scenario.get("seconds", report["seconds"])
        intro = "" if seconds == report["seconds"] else f"{seconds:g} s per server and run."
        lines += _section(scenario["title"], columns, "lrrrrrr", rows, intro=intro)
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
    if not scenarios:
        return False
    # Each panel as tall as its bars (the framework panels have two), plus its titles.
    heights = [len(s["rows"]) + 2 for s in scenarios]
    fig, axes = plt.subplots(
        len(scenarios),
        1,
        figsize=(9, 1.0 + 0.3 * sum(heights)),
        gridspec_kw={"height_ratios": heights},
    )
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
    parser.add_argument(
        "--seconds",
        type=float,
        help=f"per server and run (default: {SECONDS:g}; {FRAMEWORK_SECONDS:g} for the "
        "framework scenarios)",
    )
    keys = [s.key for s in SCENARIOS]
    parser.add_argument(
        "--only",
        action="append",
        choices=keys,
        metavar="KEY",
        help="a scenario, repeatable: " + ", ".join(keys),
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
        "seconds": SECONDS if args.seconds is None else args.seconds,
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
