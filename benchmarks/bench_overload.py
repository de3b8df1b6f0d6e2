"""Overload: `hey` at concurrency 64 and 256 against `tailwise serve` (the shipped model, batching on). Every
request must get an answer, 200 or 503 (TAILWISE_MAX_IN_FLIGHT reached, with Retry-After), none dropped, and
the p99 of the 200s stays bounded because the server queues at most TAILWISE_MAX_IN_FLIGHT requests.

    python benchmarks/bench_overload.py                          # 5000 requests per concurrency
    python benchmarks/bench_overload.py --requests 10000 --max-in-flight 128

hey ignores Retry-After: a refused hey worker sends its next request at once, so at concurrency 256 about 190
workers spin on 503s; a real client waits. That is the worst case for the admitted requests.

Prints a markdown table; exits 1 if any request got no response or a status other than 200/503.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_load import SHIPPED, Server, hey, machine_note, multipart, percentiles_ms, sample_png  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED)
    parser.add_argument("--concurrency", default="64,256")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--paced", default="256:2", help="CONCURRENCY:QPS rows where each hey worker sends at most "
                                                         "QPS requests/s, as clients that wait between requests "
                                                         "(Retry-After) do; '' for none (default 256:2)")
    parser.add_argument("--max-in-flight", type=int, default=None, help="TAILWISE_MAX_IN_FLIGHT (default: the "
                                                                         "service's, TAILWISE_MAX_BATCH_SIZE)")
    args = parser.parse_args(argv)
    env = {} if args.max_in_flight is None else {"TAILWISE_MAX_IN_FLIGHT": str(args.max_in_flight)}
    body = multipart({"image": ("bag-18.png", sample_png())})
    note, rows, bad = machine_note(), [], False
    with Server(args.model, env) as server:
        limit = __import__("httpx").post(f"{server.url}/model_info", json={}, timeout=10).json()["limits"][
            "max_in_flight"]
        hey(f"{server.url}/classify", body, 200, 16)  # warm-up
        settings = [(int(c), None) for c in args.concurrency.split(",")]
        settings += [tuple(int(v) for v in p.split(":")) for p in args.paced.split(",") if p]
        for concurrency, qps in settings:
            run = hey(f"{server.url}/classify", body, args.requests, concurrency,
                      extra=("-q", str(qps)) if qps else ())
            statuses, latencies = run["statuses"], run["latencies"]
            ok, busy = statuses == 200, statuses == 503
            other = int(len(statuses) - ok.sum() - busy.sum())
            p50, p99 = percentiles_ms(latencies[ok])
            p99_503 = percentiles_ms(latencies[busy])[1]
            bad |= bool(run["errors"] or other)
            pace = f"{qps} req/s each" if qps else "as fast as answered"
            rows.append(f"| {concurrency} | {pace} | {run['requests']:,} | {ok.sum():,} | {busy.sum():,} | {other} | "
                        f"{run['errors']} | {p50:.0f} | {p99:.0f} | {p99_503:.0f} | "
                        f"{ok.sum() / run['seconds']:,.0f} |")
    print(f"model {args.model.name}, batching on, TAILWISE_MAX_IN_FLIGHT {limit}; {note}\n")
    print("| concurrency | clients send | requests | 200 | 503 | other status | no response | p50 ms (200s) | p99 ms (200s) | "
          "p99 ms (503s) | 200s per s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
