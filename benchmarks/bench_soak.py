"""Soak: minutes of mixed valid and malformed /classify requests (`wrk` with a Lua script) against
`tailwise serve`, the server's RSS (the serve process and its children) sampled every few seconds. Passes if the
RSS grows by at most --max-growth-mib from the end of the first sample window (warm-up) to the end, no request
gets a 5xx or no response, and /readyz still answers 200.

    python benchmarks/bench_soak.py                      # 300 s, 4 connections, ~1 request per 30 ms each
    python benchmarks/bench_soak.py --seconds 30         # a short run

Request mix, in turn: 3 valid PNGs, then not an image, a truncated PNG, a wrong field name, top_k above the
classes, a malformed multipart body (so 3 in 8 are valid). Prints a summary and a markdown table.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_load import BOUNDARY, SHIPPED, Server, machine_note, multipart, sample_png  # noqa: E402

LUA = r"""
local requests = {%s}
local i = 0
local counts = {c2 = 0, c4 = 0, c5 = 0}
function setup(thread) table.insert(threads, thread) end
threads = {}
request = function()
  i = i + 1
  local r = requests[(i %% #requests) + 1]
  return wrk.format("POST", "/classify", {["Content-Type"] = r[1]}, r[2])
end
delay = function() return %d end
response = function(status, headers, body)
  if status >= 500 then c5 = (c5 or 0) + 1 elseif status >= 400 then c4 = (c4 or 0) + 1 else c2 = (c2 or 0) + 1 end
end
done = function(summary, latency, requests)
  local a, b, c = 0, 0, 0
  for _, t in ipairs(threads) do a = a + (t:get("c2") or 0); b = b + (t:get("c4") or 0); c = c + (t:get("c5") or 0) end
  io.write(string.format("STATUS 2xx=%%d 4xx=%%d 5xx=%%d\n", a, b, c))
  local e = summary.errors
  io.write(string.format("ERRORS connect=%%d read=%%d write=%%d timeout=%%d\n", e.connect, e.read, e.write, e.timeout))
  io.write(string.format("LATENCY p50=%%.1f p99=%%.1f\n", latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def lua_string(data: bytes) -> str:
    return '"' + "".join(f"\\{b}" for b in data) + '"'


def mix() -> list[tuple[str, bytes]]:
    png = sample_png()
    form = f"multipart/form-data; boundary={BOUNDARY}"
    valid = (form, multipart({"image": ("ok.png", png)}))
    return [valid, valid, valid,
            (form, multipart({"image": ("a.png", b"name,label\nfoo.png,3\n")})),
            (form, multipart({"image": ("t.png", png[: len(png) // 2])})),
            (form, multipart({"file": ("a.png", png)})),
            (form, multipart({"image": ("a.png", png), "top_k": (None, b"11")})),
            (form, b"--" + BOUNDARY.encode() + b"\r\ngarbage")]


def rss_mib(pids: list[int]) -> float:
    import psutil

    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED)
    parser.add_argument("--seconds", type=int, default=300)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--delay-ms", type=int, default=30, help="pause per connection between requests")
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--max-growth-mib", type=float, default=64.0)
    args = parser.parse_args(argv)
    note = machine_note()
    script = LUA % (", ".join(f"{{{lua_string(t.encode())}, {lua_string(b)}}}" for t, b in mix()), args.delay_ms)
    samples: list[tuple[float, float]] = []
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua, tempfile.TemporaryDirectory() as tmp, \
            Server(args.model, log=Path(tmp) / "server.log") as server:
        lua.write(script)
        lua.flush()
        pids = server.worker_pids()
        start = time.monotonic()
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                samples.append((time.monotonic() - start, rss_mib(pids)))
                stop.wait(args.sample_every)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = subprocess.run(["wrk", "-t", "1", "-c", str(args.connections), "-d", f"{args.seconds}s",
                                 "--timeout", "30s", "-s", lua.name, server.url], capture_output=True, text=True,
                                timeout=args.seconds + 120)
        stop.set()
        sampler.join()
        samples.append((time.monotonic() - start, rss_mib(pids)))
        ready = httpx.get(f"{server.url}/readyz", timeout=10).status_code
        log_lines = (Path(tmp) / "server.log").read_text().count("\n")
        tracebacks = (Path(tmp) / "server.log").read_text().count("Traceback")
    out = result.stdout
    status = dict(re.findall(r"(\dxx)=(\d+)", out))
    errors = dict(re.findall(r"(connect|read|write|timeout)=(\d+)", out))
    requests = re.search(r"(\d+) requests in", out)
    p50, p99 = re.search(r"LATENCY p50=([\d.]+) p99=([\d.]+)", out).groups()
    warm = [rss for t, rss in samples if t <= 60] or [samples[0][1]]
    baseline, final, peak = warm[-1], samples[-1][1], max(rss for _, rss in samples)
    growth = final - baseline
    ok = (growth <= args.max_growth_mib and ready == 200 and int(status.get("5xx", 0)) == 0
          and not any(int(v) for v in errors.values()))
    print(f"model {args.model.name}, {args.seconds} s, {args.connections} connections, {args.delay_ms} ms pause; "
          f"{note}\n")
    print("| requests | 2xx | 4xx | 5xx | no response | p50 ms | p99 ms | RSS after warm-up MiB | RSS end MiB | "
          "peak MiB | growth MiB (bound) | /readyz at end | log lines | tracebacks |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {int(requests.group(1)) if requests else 0:,} | {int(status.get('2xx', 0)):,} | "
          f"{int(status.get('4xx', 0)):,} | {status.get('5xx', 0)} | {sum(int(v) for v in errors.values())} | "
          f"{float(p50):.1f} | {float(p99):.1f} | {baseline:.0f} | {final:.0f} | {peak:.0f} | "
          f"{growth:+.1f} ({args.max_growth_mib:g}) | {ready} | {log_lines:,} | {tracebacks} |")
    print("\nRSS samples (s, MiB): " + ", ".join(f"{t:.0f}:{rss:.0f}" for t, rss in samples[::max(1, len(samples) // 20)]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
