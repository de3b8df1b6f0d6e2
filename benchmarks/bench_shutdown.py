"""Graceful shutdown: SIGTERM to `tailwise serve` while `hey` sends /classify requests. Requests in flight must
finish with 200, none may get a 5xx or lose its connection after sending (a reset or EOF); connections opened
after the signal are refused (nothing was sent, the client can go elsewhere). The process must exit within
--shutdown-timeout + the drain (at most 5 s) + a few seconds for bentoml's arbiter.

    python benchmarks/bench_shutdown.py                      # concurrency 32 and 64, SIGTERM 3 s into the load

Prints a markdown table; exits 1 on a 5xx, a dropped connection or a late exit.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_load import BOUNDARY, SHIPPED, Server, machine_note, multipart, sample_png  # noqa: E402

EXIT_MARGIN_S = 5.0  # bentoml's arbiter and the interpreter's exit, on top of drain + --shutdown-timeout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED)
    parser.add_argument("--concurrency", default="32,64")
    parser.add_argument("--after", type=float, default=3.0, help="seconds of load before SIGTERM (default 3)")
    parser.add_argument("--shutdown-timeout", type=int, default=20)
    args = parser.parse_args(argv)
    body = multipart({"image": ("bag-18.png", sample_png())})
    note, rows, bad = machine_note(), [], False
    limit = args.shutdown_timeout + 5 + EXIT_MARGIN_S
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        with tempfile.NamedTemporaryFile(suffix=".body") as file, \
                Server(args.model, args=("--shutdown-timeout", str(args.shutdown_timeout))) as server:
            file.write(body)
            file.flush()
            load = subprocess.Popen(["hey", "-z", f"{args.after + 6:g}s", "-c", str(concurrency), "-m", "POST",
                                     "-D", file.name, "-T", f"multipart/form-data; boundary={BOUNDARY}", "-t", "60",
                                     f"{server.url}/classify"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            time.sleep(args.after)
            exit_seconds = server.stop(seconds=120)
            report, _ = load.communicate(timeout=120)
        statuses = {int(code): int(count) for code, count in re.findall(r"\[(\d{3})\]\s+(\d+) responses", report)}
        errors = re.findall(r"\[(\d+)\]\s+(.*)", report.split("Error distribution:", 1)[-1]) if (
            "Error distribution:" in report) else []
        refused = sum(int(n) for n, text in errors if "connection refused" in text)
        dropped = sum(int(n) for n, text in errors if "connection refused" not in text)
        fives = sum(n for code, n in statuses.items() if code >= 500)
        late = exit_seconds > limit
        bad |= bool(fives or dropped or late)
        rows.append(f"| {concurrency} | {statuses.get(200, 0):,} | {fives} | {dropped} | {refused:,} | "
                    f"{exit_seconds:.1f} | {limit:.0f} |")
        if dropped:
            print(report, file=sys.stderr)
    print(f"model {args.model.name}, batching on, SIGTERM {args.after:g} s into the load, --shutdown-timeout "
          f"{args.shutdown_timeout}; {note}\n")
    print("| concurrency | 200 | 5xx | dropped after sending | refused after SIGTERM (not sent) | exit s | "
          "stated limit s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
