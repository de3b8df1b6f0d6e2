"""Time one IP-DPP draw per class size: our exact k-DPP sampler next to DPPy's exact k-DPP sampler and the
paper's Algorithm 1, all on the same kernel S = diag(d) + pp^T/N, k = N/10. Prints a markdown table.

    .venv/bin/python benchmarks/bench_sampler.py [--sizes 1000 3000 10000 100000] [--limit-s 120]

p ~ Beta(8, 1) (mean 0.89, like a model that fits most of its training images). DPPy's time is a whole draw
for a new kernel (build S, eigendecompose it, select eigenvectors, Gram-Schmidt), because stage 2 redraws the
subset from a new p every time. Methods whose predicted time (cubic extrapolation of the previous size)
exceeds --limit-s are skipped. Needs `pip install dppy` for the DPPy column (pyproject extra "bench").
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tailwise.training.ipdpp import kernel_diagonal, kernel_matrix, sample_kdpp, sample_paper_alg1  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def check_subset(y, n: int, k: int) -> None:
    y = np.asarray(y)
    assert y.size == k and np.unique(y).size == k and y.min() >= 0 and y.max() < n, "not k unique indices"


def log10_esp(values: np.ndarray, k: int) -> float:
    """log10 e_k(values), rescaled at every step so it never overflows (O(N k))."""
    e, log_scale = np.zeros(k + 1), 0.0
    e[0] = 1.0
    for x in values:
        e[1:] += x * e[:-1]
        top = e.max()
        e /= top
        log_scale += math.log10(top)
    return log_scale + math.log10(e[k]) if e[k] > 0 else -math.inf


def dppy_draw(p: np.ndarray, k: int, seed: int):
    from dppy.finite_dpps import FiniteDPP

    dpp = FiniteDPP("likelihood", L=kernel_matrix(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dpp.sample_exact_k_dpp(size=k, mode="GS", random_state=np.random.RandomState(seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10_000, 100_000])
    parser.add_argument("--limit-s", type=float, default=120.0, help="skip a method predicted to take longer")
    parser.add_argument("--repeats", type=int, default=5, help="draws timed per cell (median; 1 for slow ones)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    try:
        import dppy  # noqa: F401

        have_dppy = True
    except ImportError:
        have_dppy = False

    rng = np.random.default_rng(args.seed)
    rows, notes, previous = [], [], {}  # previous[method] = (N, seconds), for the cubic extrapolation
    for n in args.sizes:
        k = n // 10
        p = rng.beta(8.0, 1.0, n)
        ours, y = timed(lambda: sample_kdpp(p, k, rng), args.repeats)
        check_subset(y, n, k)
        cells = {}
        for name, draw, available in (
            ("dppy", lambda: dppy_draw(p, k, args.seed), have_dppy),
            ("alg1", lambda: sample_paper_alg1(p, k, rng), True),
        ):
            gigabytes = 3 * 8 * n * n / 1e9  # S, its eigenvectors, LAPACK workspace
            predicted = previous[name][1] * (n / previous[name][0]) ** 3 if name in previous else 0.0
            if not available:
                cells[name] = "not installed"
            elif predicted > args.limit_s or gigabytes > 0.5 * _memory_gb():
                cells[name] = f"skipped (N x N eigendecomposition, ~{gigabytes:.1f} GB, ~{predicted:.0f} s)"
            else:
                seconds, y = timed(draw, 1 if predicted > 5 else min(args.repeats, 3))
                check_subset(y, n, k)
                previous[name] = (n, seconds)
                cells[name] = (seconds, seconds / ours)
        if have_dppy and not isinstance(cells["dppy"], tuple):
            log_ek = log10_esp(kernel_diagonal(p), k)  # S's eigenvalues interlace d: a close proxy
            if log_ek > 308:
                notes.append(f"N={n}: DPPy's unscaled e_k(eigenvalues) ~ 1e{log_ek:.0f} would overflow float64.")
        rows.append((n, k, ours, cells))

    print(f"\nIP-DPP sampler, one draw, k = N/10, p ~ Beta(8, 1); {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f}; median of {args.repeats} draws where fast\n")
    print("| N | k | ours: exact k-DPP (s) | DPPy exact k-DPP, GS (s) | DPPy / ours | paper Alg. 1 (s) "
          "| Alg. 1 / ours |")
    print("|---|---|---|---|---|---|---|")
    for n, k, ours, cells in rows:
        columns = [f"{n:,}", f"{k:,}", f"{ours:.3f}"]
        for name in ("dppy", "alg1"):
            cell = cells[name]
            columns += [f"{cell[0]:.2f}", f"{cell[1]:,.0f}x"] if isinstance(cell, tuple) else [cell, ""]
        print("| " + " | ".join(columns) + " |")
    for note in notes:
        print(f"\n{note}")


def _memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


if __name__ == "__main__":
    main()
