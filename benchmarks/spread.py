"""How evenly prefork spreads connections across its workers.

    python -m benchmarks.spread [--workers 2] [--clients 8] [--requests 4000]

Starts ``prefork run examples.hello_http:HelloHandler`` on a socket this script binds
on 127.0.0.1 (passed as fd://N), sends a bounded number of one-request connections
to ``/pid`` from several client threads, and counts the answers per worker PID. It
prints, for each configuration, the requests per worker, max/min and Jain's fairness
index (1.0 = perfectly even, 1/N = one worker took everything).
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from prefork.status import fairness

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 60.0  # no configuration runs longer than this, whatever the counts


def jain(counts: list[int]) -> float:
    return fairness(counts)["jain"] or 0.0  # prefork status computes the same index


def get_pid(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"GET /pid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    return int(data.rsplit(b"\r\n\r\n", 1)[1])


def wait_answering(port: int, master: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if master.poll() is not None:
            raise SystemExit(f"server exited with {master.returncode}")
        try:
            get_pid(port)
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("server did not answer within 10 s")


def measure(workers: int, clients: int, requests: int, extra: list[str]) -> dict[int, int]:
    if "--reuse-port" in extra:  # each worker binds its own socket: let the master bind
        sock = None
        bind = ["-b", "127.0.0.1:0"]
    else:
        sock = socket.create_server(("127.0.0.1", 0), backlog=2048)
        sock.set_inheritable(True)
        bind = ["-b", f"fd://{sock.fileno()}"]
    cmd = [
        sys.executable,
        "-m",
        "prefork",
        "run",
        "examples.hello_http:HelloHandler",
        "-w",
        str(workers),
        *bind,
        *extra,
    ]
    master = subprocess.Popen(
        cmd, cwd=ROOT, pass_fds=(sock.fileno(),) if sock else (), stderr=subprocess.PIPE
    )
    try:
        port = sock.getsockname()[1] if sock else _port_from_log(master)
        wait_answering(port, master)
        counts: collections.Counter[int] = collections.Counter()
        lock = threading.Lock()
        stop_at = time.monotonic() + DEADLINE_S

        def client(n: int) -> None:
            local: collections.Counter[int] = collections.Counter()
            for _ in range(n):
                if time.monotonic() > stop_at:
                    break
                local[get_pid(port)] += 1
            with lock:
                counts.update(local)

        threads = [
            threading.Thread(target=client, args=(requests // clients,)) for _ in range(clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return dict(counts)
    finally:
        master.send_signal(signal.SIGTERM)
        try:
            master.wait(10)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait()
        if sock:
            sock.close()


def _port_from_log(master: subprocess.Popen[bytes]) -> int:
    assert master.stderr is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        line = master.stderr.readline().decode()
        if "serving 127.0.0.1:" in line:
            threading.Thread(target=master.stderr.read, daemon=True).start()  # keep draining
            return int(line.split("serving 127.0.0.1:")[1].split()[0])
    raise SystemExit("no 'serving' line from the server")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4000)
    args = parser.parse_args()
    print(
        f"{args.workers} workers, {args.clients} client threads, {args.requests} "
        "connections of one request each, on 127.0.0.1"
    )
    print(f"{'configuration':28} {'requests per worker':34} {'max/min':>8} {'Jain':>6}")
    for label, extra in [
        ("sync (shared socket)", []),
        ("sync --reuse-port", ["--reuse-port"]),
        ("thread (shared socket)", ["-k", "thread"]),
    ]:
        counts = sorted(
            measure(args.workers, args.clients, args.requests, extra).values(), reverse=True
        )
        counts += [0] * (args.workers - len(counts))
        ratio = f"{counts[0] / counts[-1]:.2f}" if counts[-1] else "inf"
        print(f"{label:28} {' '.join(map(str, counts)):34} {ratio:>8} {jain(counts):6.3f}")


if __name__ == "__main__":
    main()
