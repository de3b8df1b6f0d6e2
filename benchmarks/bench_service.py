"""HTTP serving benchmark: latency p50/p99 and requests/second of POST /classify at concurrency 1 and 32, with
the service's adaptive batching on and off (TAILWISE_BATCHING=1/0), in one run.

    python benchmarks/bench_service.py                        # ResNet-32 (random weights), 1x28x28, exported here
    python benchmarks/bench_service.py --model models/NAME    # an exported model

Each setting starts its own server (bentoml.serve on 127.0.0.1) and a client on the same machine: one asyncio
loop (aiohttp), `concurrency` connections that each send one 28x28 PNG after the other for --seconds (after a
warm-up).
Client and server share the CPU, so the numbers are for the whole loop, not the server alone. "images/call" is
the mean batch the model ran (from the server's tailwise_batch_size histogram). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a source checkout


def export_resnet32(out_dir: Path) -> Path:
    """bench_inference's ResNet-32 (random weights, 1x28x28, 10 classes), exported to `out_dir`."""
    import torch

    from bench_inference import resnet32
    from tailwise.export.onnx_export import export_classifier
    from tailwise.serving.artifact import build_metadata

    torch.manual_seed(0)
    meta = build_metadata(class_names=[str(c) for c in range(10)], channels=1, height=28, width=28,
                          resize_policy="resize", train_counts=[5000 // 2**c for c in range(10)],
                          groups=["many"] * 4 + ["medium"] * 2 + ["few"] * 4,
                          group_thresholds={"many_above": 500, "few_below": 200},
                          dataset={"name": "random", "index_sha256": None})
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    export_classifier(resnet32().eval(), meta, out_dir, images, images)
    return out_dir


def png_images(count: int, size: int = 28) -> list[bytes]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


def model_calls(url: str) -> tuple[float, float]:
    """(model calls, images) so far, from the server's tailwise_batch_size histogram."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(("tailwise_batch_size_count", "tailwise_batch_size_sum")):
            values[line.split("{")[0].split(" ")[0]] = float(line.rsplit(" ", 1)[1])
    return values.get("tailwise_batch_size_count", 0.0), values.get("tailwise_batch_size_sum", 0.0)


async def load(url: str, images: list[bytes], concurrency: int, seconds: float) -> tuple[list[float], float]:
    """Latencies (s) of the requests `concurrency` connections complete in `seconds`, and the elapsed time."""
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        start = time.perf_counter()
        deadline = start + seconds

        async def connection(worker: int) -> None:
            i = worker
            while time.perf_counter() < deadline:
                form = aiohttp.FormData()
                form.add_field("image", images[i % len(images)], filename="x.png", content_type="image/png")
                sent = time.perf_counter()
                async with session.post("/classify", data=form) as response:
                    body = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{response.status}: {body[:500]!r}")
                latencies.append(time.perf_counter() - sent)
                i += concurrency

        await asyncio.gather(*(connection(w) for w in range(concurrency)))
        return latencies, time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="an exported model folder (default: export ResNet-32 here)")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated (default 1,32)")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed load per setting (default 8)")
    args = parser.parse_args(argv)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    levels = [int(c) for c in args.concurrency.split(",")]
    load_average = f"{os.getloadavg()[0]:.1f}"

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("BENTOML_HOME", str(Path(tmp) / "bentoml"))
        model_dir = args.model or export_resnet32(Path(tmp) / "resnet32")
        os.environ["TAILWISE_MODEL"] = str(model_dir)
        import bentoml

        images, rows = png_images(64), []
        for batching in ("0", "1"):
            os.environ["TAILWISE_BATCHING"] = batching
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            with bentoml.serve("tailwise.serving.service:TailwiseClassifier", host="127.0.0.1", port=port,
                               working_dir=str(REPO)):
                deadline = time.monotonic() + 120
                while True:
                    try:
                        if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"server at {url} not ready")
                    time.sleep(0.2)
                provider = httpx.post(f"{url}/model_info", json={}, timeout=10).json()["provider"]
                for concurrency in levels:
                    asyncio.run(load(url, images, concurrency, min(2.0, args.seconds)))  # warm-up
                    calls_before, images_before = model_calls(url)
                    latencies, elapsed = asyncio.run(load(url, images, concurrency, args.seconds))
                    calls, served = (after - before for after, before in zip(model_calls(url),
                                                                             (calls_before, images_before)))
                    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
                    rows.append(f"| {'on' if batching == '1' else 'off'} | {concurrency} | {p50:.1f} | {p99:.1f} | "
                                f"{len(latencies) / elapsed:,.0f} | {served / max(calls, 1):.1f} |")

    print(f"model: {model_dir if args.model else 'ResNet-32 (random weights), 1x28x28, 10 classes'}; "
          f"onnxruntime {provider}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"client on the same machine; load average before the run {load_average}; {args.seconds:g} s per row\n")
    print("| adaptive batching | concurrency | p50 ms | p99 ms | requests/s | images/call |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
