"""Load generators: wrk for HTTP, and a bounded Python one for raw TCP lines.

Both run for a fixed time and report requests/s, latency p50/p99 and errors. Every
connection goes to 127.0.0.1.
"""

from __future__ import annotations

import multiprocessing
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

WRK_MISSING = "wrk is not installed: apt-get install wrk (Debian/Ubuntu), brew install wrk"


@dataclass
class LoadResult:
    requests: int
    seconds: float
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> LoadResult:
    totals = re.search(r"(\d+) requests in ([\d.]+(?:us|ms|s|m)),", output)
    if totals is None:
        raise ValueError(f"wrk printed no totals: {output[-300:]!r}")
    requests, duration = int(totals.group(1)), _ms(totals.group(2)) / 1000
    errors = 0
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    wrong = re.search(r"Wrong answers: (\d+)", output)  # printed by UPLOAD_SCRIPT
    if wrong:
        errors += int(wrong.group(1))
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)\s*$", output, re.M))
    latency_max = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", output)
    return LoadResult(
        requests=requests,
        seconds=duration,
        errors=errors,
        p50_ms=_ms(percentiles["50"]) if "50" in percentiles else None,
        p99_ms=_ms(percentiles["99"]) if "99" in percentiles else None,
        max_ms=_ms(latency_max.group(1)) if latency_max else None,
    )


# wrk's Lua: every request POSTs the same body; a 200 whose body is not the body's length
# (what the /upload routes answer) is counted, so that a server that hands the app less
# than the whole body is not faster for it. wrk runs one Lua state per thread: the
# counts are summed from them at the end.
UPLOAD_SCRIPT = """
wrk.method = "POST"
wrk.body = string.rep("x", {size})
wrk.headers["Content-Type"] = "application/octet-stream"
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
wrong = 0
function response(status, headers, body)
  if status == 200 and body ~= "{size}\\n" then wrong = wrong + 1 end
end
function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do total = total + thread:get("wrong") end
  io.write(string.format("Wrong answers: %d\\n", total))
end
"""


def run_wrk(
    port: int,
    seconds: float,
    connections: int,
    threads: int = 2,
    close: bool = False,
    upload_bytes: int = 0,
) -> LoadResult:
    """GET / for ``seconds``; with ``upload_bytes``, POST that many bytes to /upload."""
    command = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
        "--latency", "--timeout", "5s",
    ]  # fmt: skip
    if close:
        command += ["-H", "Connection: close"]
    with tempfile.TemporaryDirectory(prefix="prefork-bench-wrk-") as tmp:
        path = "/"
        if upload_bytes:
            script = Path(tmp) / "upload.lua"
            script.write_text(UPLOAD_SCRIPT.format(size=upload_bytes))
            command += ["-s", str(script)]
            path = "/upload"
        command.append(f"http://127.0.0.1:{port}{path}")
        output = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + 30, check=True
        ).stdout
    return parse_wrk(output)


# -- raw TCP: one line per connection --------------------------------------------------------
def _tcp_client(port: int, seconds: float, payload: bytes, queue: multiprocessing.Queue) -> None:
    latencies: list[float] = []
    errors = 0
    clock = time.perf_counter
    deadline = clock() + seconds
    address = ("127.0.0.1", port)
    while clock() < deadline:
        started = clock()
        try:
            with socket.create_connection(address, timeout=5) as conn:
                conn.sendall(payload)
                answer = b""
                while not answer.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
            if answer != payload:
                errors += 1
                continue
        except OSError:
            errors += 1
            continue
        latencies.append(clock() - started)
    queue.put((latencies, errors))


def run_tcp(port: int, seconds: float, clients: int, payload: bytes = b"ping\n") -> LoadResult:
    """``clients`` processes (not threads: one Python client loop would be the bottleneck),
    each sending one line per connection until ``seconds`` have passed."""
    queue: multiprocessing.Queue = multiprocessing.Queue()
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=_tcp_client, args=(port, seconds, payload, queue))
        for _ in range(clients)
    ]
    started = time.perf_counter()
    for process in processes:
        process.start()
    results = [queue.get(timeout=seconds + 30) for _ in processes]
    elapsed = time.perf_counter() - started
    for process in processes:
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()
    latencies = sorted(x for lat, _ in results for x in lat)
    errors = sum(e for _, e in results)
    return LoadResult(
        requests=len(latencies),
        seconds=min(elapsed, seconds) if latencies else elapsed,
        errors=errors,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        max_ms=latencies[-1] * 1000 if latencies else None,
    )


def percentile(sorted_seconds: list[float], pct: float) -> float | None:
    if not sorted_seconds:
        return None
    index = min(len(sorted_seconds) - 1, round(pct / 100 * (len(sorted_seconds) - 1)))
    return sorted_seconds[index] * 1000
