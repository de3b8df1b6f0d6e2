"""HTTP serving benchmark with `hey` (a Go client): requests/s and p50/p99 of POST /classify at several
concurrencies, adaptive batching on and off, and the service's requests/s as a fraction of raw onnxruntime
images/s on the same cores (what HTTP, multipart parsing, PNG decoding and JSON cost).

    python benchmarks/bench_service.py                                  # the shipped model, fp32 and int8
    python benchmarks/bench_service.py --variants fp32 --concurrency 1,32,64 --requests 1500
    python benchmarks/bench_service.py --accuracy                       # also: fp32 and int8 top-1 on the
                                                                        # full Fashion-MNIST test set

Each (variant, batching) pair starts its own `tailwise serve`; hey runs on the same machine, so it shares the
cores with the server (hey is cheap next to it, but the machine may be busy: compare ratios, not absolutes).
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_load import SHIPPED, Server, hey, machine_note, multipart, percentiles_ms, sample_png  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def raw_images_per_second(path: Path, batch: int, seconds: float = 3.0) -> float:
    """onnxruntime images/s of the model file at `batch`, default threads (as the service runs it)."""
    from serving.artifact import OnnxClassifier

    model = OnnxClassifier(path)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, *model.input_shape), dtype=np.uint8)
    model.predict_arrays(pixels)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.predict_arrays(pixels)
        done += batch
    return done / (time.perf_counter() - start)


def test_accuracy(path: Path) -> float:
    """Top-1 % of the served (logit-adjusted) predictions on the 10,000 Fashion-MNIST test images."""
    from serving.artifact import OnnxClassifier

    with gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(FMNIST / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    model = OnnxClassifier(path)
    logits = np.concatenate([model.predict_arrays(images[i:i + 500]) for i in range(0, len(images), 500)])
    return 100 * float((model.adjusted_logits(logits).argmax(1) == labels).mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED, help="model folder (default: the shipped model)")
    parser.add_argument("--variants", default="fp32,int8", help="fp32 (model.onnx), int8 (model.int8.onnx)")
    parser.add_argument("--concurrency", default="1,32,64")
    parser.add_argument("--requests", type=int, default=1500, help="requests per row (a fifth at concurrency 1)")
    parser.add_argument("--accuracy", action="store_true", help="also score each variant on the full test set")
    parser.add_argument("--workers", type=int, default=1, help="BentoML worker processes (default 1); with more, "
                                                               "each gets cores / workers onnxruntime threads")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    body = multipart({"image": ("bag-18.png", sample_png())})
    note = machine_note()
    rows, raw = [], {}
    for variant in args.variants.split(","):
        path = args.model / ("model.onnx" if variant == "fp32" else f"model.{variant}.onnx")
        raw[variant] = {batch: raw_images_per_second(path, batch) for batch in (1, 64)}
        accuracy = f"{test_accuracy(path):.2f}" if args.accuracy else ""
        for batching in ("0", "1"):
            env = {"TAILWISE_BATCHING": batching}
            if args.workers > 1:
                env.update(BENTOML_CONFIG_OPTIONS=f"services.TailwiseClassifier.workers={args.workers}",
                           TAILWISE_ORT_THREADS=str(max(1, (os.cpu_count() or 1) // args.workers)))
            with Server(path, env) as server:
                for concurrency in levels:
                    count = max(100, args.requests // 5) if concurrency == 1 else args.requests
                    hey(f"{server.url}/classify", body, min(200, count), concurrency)  # warm-up
                    run = hey(f"{server.url}/classify", body, count, concurrency)
                    ok = run["statuses"] == 200
                    p50, p99 = percentiles_ms(run["latencies"][ok])
                    rate = ok.sum() / run["seconds"]
                    other = len(run["statuses"]) - ok.sum() + run["errors"]
                    rows.append(f"| {variant} | {args.workers} | {'on' if batching == '1' else 'off'} | {concurrency} | {p50:.1f} | "
                                f"{p99:.1f} | {rate:,.0f} | {rate / raw[variant][64]:.2f} | {other} | {accuracy} |")
    print(f"model {args.model.name}; {note}; hey, {args.requests} requests per row\n")
    print("raw onnxruntime images/s, same process defaults as the service: "
          + "; ".join(f"{v}: batch 1 {r[1]:,.0f}, batch 64 {r[64]:,.0f}" for v, r in raw.items()) + "\n")
    print("| model | workers | adaptive batching | concurrency | p50 ms | p99 ms | requests/s | / raw batch-64 images/s | "
          "non-200 | test top-1 % |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
