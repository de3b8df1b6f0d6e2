"""`tailwise serve` against the smallest honest service of the same model (benchmarks/minimal_app.py: Starlette +
python-multipart + Pillow + onnxruntime, same decoding, no batching), on the same cores, with `hey`:

    python benchmarks/bench_service.py                       # the shipped model, 3 rounds, one table
    python benchmarks/bench_service.py --rounds 1 --requests 1000 --body raw --model models/NAME/model.int8.onnx

Each round starts the minimal app, runs every concurrency, stops it, then does the same with `tailwise serve`
(concurrency 256 too, past TAILWISE_MAX_IN_FLIGHT: 503s are expected there and counted). A row is the median
over the rounds; ratios are tailwise / minimal. hey runs on the same machine: on a busy machine compare the
ratios, which alternating the two servers keeps fair, not the absolute numbers. Also printed: raw onnxruntime
images/s of the model in this process (batch 1 and 64, default threads).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_load import (REPO, SHIPPED, Server, free_port, hey, machine_note, multipart,  # noqa: E402
                          percentiles_ms, sample_png, wait_ready)


class MinimalApp:
    """benchmarks/minimal_app.py under uvicorn (log level warning: no access lines), a context manager."""

    def __init__(self, model: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "TAILWISE_MODEL": str(model), "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(REPO / "benchmarks"), "minimal_app:app", "--port",
             str(self.port), "--log-level", "warning"], cwd=REPO, env=env)

    def __enter__(self):
        try:
            wait_ready(self.process, f"{self.url}/", "minimal app", 60)   # any answer: it is listening
        except RuntimeError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=30)


def raw_images_per_second(path: Path, batch: int, seconds: float = 3.0) -> float:
    """onnxruntime images/s of the model file at `batch`, onnxruntime's default threads."""
    from tailwise.serving.artifact import OnnxClassifier

    model = OnnxClassifier(path)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, *model.input_shape), dtype=np.uint8)
    model.predict_arrays(pixels)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.predict_arrays(pixels)
        done += batch
    return done / (time.perf_counter() - start)


def measure(url: str, body: bytes, content_type: str, concurrency: int, requests: int) -> dict:
    hey(url, body, min(200, requests), concurrency, content_type=content_type)  # warm-up
    run = hey(url, body, requests, concurrency, content_type=content_type)
    ok = run["statuses"] == 200
    p50, p99 = percentiles_ms(run["latencies"][ok])
    return {"rate": ok.sum() / run["seconds"], "p50": p50, "p99": p99,
            "503": int((run["statuses"] == 503).sum()), "other": int(len(ok) - ok.sum()) + run["errors"]
            - int((run["statuses"] == 503).sum())}


def median_row(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED / "model.onnx", help="model file or folder "
                                                                                   "(default: the shipped model)")
    parser.add_argument("--concurrency", default="1,32,64", help="levels for both servers (default 1,32,64)")
    parser.add_argument("--overload", type=int, default=256, help="extra level for tailwise only (0: none)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per level (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two servers (default 3)")
    parser.add_argument("--body", choices=("multipart", "raw"), default="multipart",
                        help="how the PNG is sent: a multipart file field (default) or the raw body (image/png)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of `tailwise serve` (e.g. TAILWISE_BATCHING=0); repeatable")
    args = parser.parse_args(argv)
    model = args.model / "model.onnx" if args.model.is_dir() else args.model
    levels = [int(c) for c in args.concurrency.split(",")]
    png = sample_png()
    if args.body == "raw":
        body, content_type = png, "image/png"
    else:
        from serving_load import BOUNDARY

        body, content_type = multipart({"image": ("bag-18.png", png)}), f"multipart/form-data; boundary={BOUNDARY}"
    note = machine_note()
    raw = {batch: raw_images_per_second(model, batch) for batch in (1, 64)}
    env = dict(item.split("=", 1) for item in args.env)
    results = {"minimal": {c: [] for c in levels}, "tailwise": {c: [] for c in levels + [args.overload] if c}}
    for _ in range(args.rounds):
        for name in ("minimal", "tailwise"):
            server = MinimalApp(model) if name == "minimal" else Server(model, env)
            with server:
                for concurrency in results[name]:
                    results[name][concurrency].append(measure(f"{server.url}/classify", body, content_type,
                                                              concurrency, args.requests))
    print(f"model {model.relative_to(REPO) if model.is_relative_to(REPO) else model}; {note}; "
          f"load average at the end {os.getloadavg()[0]:.1f}; hey, {args.requests} requests per level "
          f"after 200 of warm-up, {args.body} body, median of {args.rounds} alternating rounds"
          + (f"; tailwise with {' '.join(args.env)}" if args.env else ""))
    print(f"raw onnxruntime, this process, default threads: {raw[1]:,.0f} images/s at batch 1, "
          f"{raw[64]:,.0f} at batch 64\n")
    print("| concurrency | minimal req/s | p50 ms | p99 ms | tailwise req/s | p50 ms | p99 ms | 503 | req/s ratio | "
          "p99 ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for concurrency, runs in results["tailwise"].items():
        t = median_row(runs)
        m = median_row(results["minimal"][concurrency]) if concurrency in results["minimal"] else None
        left = f"{m['rate']:,.0f} | {m['p50']:.1f} | {m['p99']:.1f}" if m else "- | - | -"
        ratios = f"{t['rate'] / m['rate']:.2f} | {t['p99'] / m['p99']:.2f}" if m else "- | -"
        print(f"| {concurrency} | {left} | {t['rate']:,.0f} | {t['p50']:.1f} | {t['p99']:.1f} | {t['503']:.0f} | "
              f"{ratios} |")
    failed = sum(run["other"] for runs in results["tailwise"].values() for run in runs)
    failed += sum(run["other"] for runs in results["minimal"].values() for run in runs)
    if failed:
        print(f"\n{failed} requests got neither 200 nor 503 (or no answer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
