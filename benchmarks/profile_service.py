"""Where a request's CPU time goes in `tailwise serve`: py-spy samples the server (every process, every thread)
while `hey` posts one PNG at a fixed concurrency, and each sampled stack is charged to the first part of the
request path found from its innermost frame outwards. Prints CPU microseconds per request for each part.

    pip install py-spy        # a sampling profiler (a binary; it reads the server's memory, no code change)
    python benchmarks/profile_service.py                         # concurrency 32, multipart body, 20 s
    python benchmarks/profile_service.py --body raw --concurrency 1 --seconds 10
    python benchmarks/profile_service.py --app minimal           # the same for benchmarks/minimal_app.py

py-spy counts only samples where a thread is running (not waiting), so the parts add up to the CPU time of the
server per request; waiting (queueing for the model, for the GIL) shows up as latency in bench_service.py.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import signal
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_service import MinimalApp  # noqa: E402
from serving_load import BOUNDARY, SHIPPED, Server, hey, multipart, sample_png  # noqa: E402

# (part, pattern on a frame "function (file:line)"), tried on each frame from the innermost outwards
PARTS = [
    ("onnxruntime (model)", r"onnxruntime"),
    ("image decode (Pillow, load_image)", r"PIL/|load_image|image_pixels|_fit \(|_to_mode"),
    ("multipart parsing", r"multipart|formparsers|form \(starlette"),
    ("JSON encoding", r"json|render \(starlette|to_http_response|model_dump|serialize"),
    ("top-k, softmax", r"top_k|adjusted_logits|numpy"),
    ("validation (pydantic, request checks)", r"pydantic|io_models|from_http_request|schemas\.py"),
    ("tracing (OpenTelemetry)", r"opentelemetry|contextvars_context|otel|asgi/__init__"),
    ("metrics (Prometheus)", r"prometheus|instruments"),
    ("logging", r"logging/|access\.py"),
    ("batching", r"batch"),
    ("HTTP (uvicorn, h11, httptools)", r"uvicorn|h11|httptools"),
    ("BentoML and Starlette (routing, middleware)", r"bentoml|starlette|serving/"),
    ("event loop, threads (asyncio, anyio)", r"asyncio|anyio|selectors|threading|concurrent"),
]


def part_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, pattern in PARTS:
            if re.search(pattern, frame):
                return name
    return "other"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED / "model.onnx")
    parser.add_argument("--app", choices=("tailwise", "minimal"), default="tailwise")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0, help="profiled load (default 20)")
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second (default 500)")
    parser.add_argument("--body", choices=("multipart", "raw"), default="multipart")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--top", type=int, default=0, help="also print the N most sampled leaf frames")
    parser.add_argument("--inclusive", type=int, default=0, help="also print the N frames with the most "
                                                                  "samples in them or below them")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy")
    if not spy:
        sys.exit("profile_service.py needs py-spy on PATH: pip install py-spy")
    png = sample_png()
    body, content_type = ((png, "image/png") if args.body == "raw" else
                          (multipart({"image": ("bag-18.png", png)}), f"multipart/form-data; boundary={BOUNDARY}"))
    env = dict(item.split("=", 1) for item in args.env)
    server = MinimalApp(args.model) if args.app == "minimal" else Server(args.model, env)
    with server, tempfile.TemporaryDirectory() as tmp:
        url = f"{server.url}/classify"
        hey(url, body, 500, args.concurrency, content_type=content_type)  # warm-up
        out = Path(tmp) / "stacks.txt"
        profiler = subprocess.Popen([spy, "record", "--pid", str(server.process.pid), "--subprocesses", "--rate",
                                     str(args.rate), "--format", "raw",
                                     "--nonblocking", "--output", str(out)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches
        done, deadline = 0, time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            run = hey(url, body, 20 * args.concurrency, args.concurrency, content_type=content_type)
            done += int((run["statuses"] == 200).sum())
        profiler.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl+C
        profiler.wait(timeout=120)
        lines = out.read_text().splitlines() if out.exists() else []
    if not lines or not done:
        sys.exit("no samples (py-spy needs ptrace rights: run as the server's user, or as root)")
    parts, leaves, inclusive = collections.Counter(), collections.Counter(), collections.Counter()
    for line in lines:
        stack, _, count = line.rpartition(" ")
        parts[part_of(stack)] += int(count)
        leaves[stack.split(";")[-1]] += int(count)
        for frame in set(stack.split(";")):
            inclusive[frame] += int(count)
    total = sum(parts.values())
    per_request = 1e6 / args.rate / done
    print(f"{args.app}: {done} requests at concurrency {args.concurrency}, {args.body} body; py-spy at {args.rate} "
          f"Hz; CPU time per request by part (samples while a thread runs; hey shares the cores)\n")
    print("| part | CPU us per request | share |")
    print("|---|---:|---:|")
    for name, count in parts.most_common():
        print(f"| {name} | {count * per_request:,.0f} | {100 * count / total:.0f} % |")
    print(f"| total | {total * per_request:,.0f} | 100 % |")
    for title, counter, n in (("leaf frames", leaves, args.top), ("inclusive", inclusive, args.inclusive)):
        if n:
            print(f"\n{title}, CPU us per request:")
            for frame, count in counter.most_common(n):
                print(f"{count * per_request:8.1f}  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
