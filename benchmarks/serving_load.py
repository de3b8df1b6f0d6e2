"""Shared parts of the serving benchmarks: start `tailwise serve` in its own process, build multipart bodies,
drive load with `hey` (a Go client, so the Python client does not share the server's interpreter), sample RSS.

Traffic goes to 127.0.0.1 only; every run is bounded in requests or time.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "fmnist-lt-tailwise"
BOUNDARY = "tailwisebench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def multipart(fields: dict[str, tuple[str | None, bytes]]) -> bytes:
    """A multipart/form-data body with BOUNDARY: {name: (filename or None, bytes)}."""
    parts = []
    for name, (filename, data) in fields.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        parts.append(f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def sample_png() -> bytes:
    return (SHIPPED / "samples" / "bag-18.png").read_bytes()


def wait_ready(process: subprocess.Popen, url: str, what: str, seconds: float, ready=lambda response: True) -> None:
    """Poll `url` every 0.2 s until `ready(response)`; RuntimeError if `process` exits or `seconds` pass first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            if ready(httpx.get(url, timeout=2)):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready at {url} after {seconds:g} s")


class Server:
    """`tailwise serve` for `model` with `env`, in its own process; a context manager that stops it with SIGTERM."""

    def __init__(self, model: Path, env: dict | None = None, args=(), log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = tempfile.mkdtemp(prefix="tailwise-bench-")
        env = {**os.environ, "BENTOML_HOME": self.home, "BENTOML_DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1",
               **(env or {})}
        self.log = open(log, "wb") if log else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tailwise", "serve", "--model", str(model), "--port", str(self.port), *args],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self):
        try:
            wait_ready(self.process, f"{self.url}/readyz", "tailwise serve", 120,
                       ready=lambda response: response.status_code == 200)
        except RuntimeError:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self, seconds: float = 60) -> float:
        """SIGTERM; the seconds until the process exited."""
        start = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=seconds)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()
        shutil.rmtree(self.home, ignore_errors=True)
        return time.monotonic() - start

    def worker_pids(self) -> list[int]:
        import psutil

        return [self.process.pid] + [c.pid for c in psutil.Process(self.process.pid).children(recursive=True)]


def hey(url: str, body: bytes, requests: int, concurrency: int, extra=(), content_type: str | None = None) -> dict:
    """POST `body` `requests` times from `concurrency` hey workers; per-response latencies and statuses from
    hey's CSV. "errors": requests that got no HTTP response (requests - responses). hey sends
    requests // concurrency per worker, so `requests` is rounded down to a multiple of `concurrency`."""
    requests = max(1, requests // concurrency) * concurrency
    with tempfile.NamedTemporaryFile(suffix=".body") as file:
        file.write(body)
        file.flush()
        start = time.perf_counter()
        result = subprocess.run(
            ["hey", "-n", str(requests), "-c", str(concurrency), "-m", "POST", "-D", file.name, "-T",
             content_type or f"multipart/form-data; boundary={BOUNDARY}", "-t", "60", "-o", "csv", *extra, url],
            capture_output=True, text=True, timeout=900)
        elapsed = time.perf_counter() - start
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    latencies = np.array([float(r["response-time"]) for r in rows])
    statuses = np.array([int(r["status-code"]) for r in rows])
    offsets = np.array([float(r["offset"]) for r in rows])
    duration = float((offsets + latencies).max()) if len(rows) else elapsed
    return {"latencies": latencies, "statuses": statuses, "errors": requests - len(rows), "seconds": duration,
            "requests": requests}


def percentiles_ms(latencies: np.ndarray) -> tuple[float, float]:
    if not len(latencies):
        return float("nan"), float("nan")
    p50, p99 = np.percentile(latencies * 1000, [50, 99])
    return float(p50), float(p99)


def machine_note() -> str:
    import platform

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs shared with other jobs "
            f"(load average {os.getloadavg()[0]:.1f} at the start)")
