"""Time one call of the BNS losses (forward, and forward + backward) per batch size. Prints a markdown table.

    .venv/bin/python benchmarks/bench_bns_loss.py [--batch 256 512 1024 4096] [--dim 128] [--repeats 5]

The released form (`bns_loss_released`, over all 2B views) and the paper's Eq. 12 (`bns_loss_paper`, m extra same-label anchors)
on L2-normalised random embeddings, 10 classes, float32, on the CPU with torch's default threads. Both are
vectorised over the batch (tests/test_losses.py checks that without timing anything); this prints what a call
costs, which stage 1 pays once per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tailwise.training.losses import bns_loss_paper, bns_loss_released  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 512, 1024, 4096])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--m", type=int, default=2, help="extra same-label anchors of the paper's form")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    losses = {"released": lambda z1, z2, y: bns_loss_released(torch.cat([z1, z2]), y.repeat(2)),
              "paper": lambda z1, z2, y: bns_loss_paper(z1, z2, y, m=args.m, generator=torch.Generator().manual_seed(0))}
    print(f"BNS loss, D = {args.dim}, 10 classes, float32, {torch.get_num_threads()} CPU thread(s), "
          f"median of {args.repeats}\n")
    print("| batch | form | forward (ms) | forward + backward (ms) |")
    print("|---:|---|---:|---:|")
    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        z1 = F.normalize(torch.randn(batch, args.dim, generator=g), dim=1)
        z2 = F.normalize(torch.randn(batch, args.dim, generator=g), dim=1)
        labels = torch.randint(0, 10, (batch,), generator=g)
        for name, loss_fn in losses.items():
            with torch.no_grad():
                forward = median_seconds(lambda: loss_fn(z1, z2, labels), args.repeats)
            a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
            both = median_seconds(lambda: loss_fn(a, b, labels).backward(), args.repeats)
            print(f"| {batch:,} | {name} | {1000 * forward:.2f} | {1000 * both:.2f} |")


if __name__ == "__main__":
    main()
