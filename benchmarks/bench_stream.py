"""Stream a folder larger than we would hold decoded through one training epoch: images/s, the share of the
epoch spent waiting for decoded images, and the peak memory (issue 16).

    python benchmarks/bench_stream.py --folder /tmp/stream115k                # 115,000 PNGs, 100 classes
    python benchmarks/bench_stream.py --folder /tmp/stream115k --no-prefetch  # decode inline, for comparison

The folder is generated on first use (32 x 32 RGB PNGs, long-tailed over the classes like ImageNet-LT:
imbalance factor 256, `--images` in all) and reused afterwards. The epoch runs through `training.engine.fit`,
reading the images with `FileSource` (decoded on demand, the next batch on a background thread), on a small
convolutional network, so the figures show the data path rather than the network.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def class_counts(total: int, classes: int, imbalance_factor: float) -> list[int]:
    """Exponential profile (the LT benchmarks'), scaled so the counts add up to `total`."""
    shares = imbalance_factor ** (-np.arange(classes) / (classes - 1))
    counts = np.maximum(1, np.floor(shares / shares.sum() * total)).astype(int)
    counts[0] += total - counts.sum()
    return counts.tolist()


def _write_class(args) -> int:
    from PIL import Image

    folder, label, count, size = args
    rng = np.random.default_rng(label)
    base = rng.integers(0, 256, 3)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        pixels = np.clip(base + rng.normal(0, 24, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(os.path.join(folder, f"{i:05d}.png"), compress_level=1)
    return count


def generate(folder: Path, total: int, classes: int, size: int) -> float:
    """Write the folder (one subfolder per class); returns the seconds it took."""
    t0 = time.perf_counter()
    jobs = [(str(folder / f"class{c:03d}"), c, n, size) for c, n in enumerate(class_counts(total, classes, 256))]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        written = sum(pool.map(_write_class, jobs))
    (folder / ".complete").write_text(str(written))
    return time.perf_counter() - t0


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # ru_maxrss is in KiB on Linux


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", help="image folder (generated there if not complete; default: a temp folder)")
    parser.add_argument("--images", type=int, default=115_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--no-prefetch", action="store_true", help="decode each batch inline (the old loop)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    folder = Path(args.folder or tempfile.mkdtemp(prefix="tailwise-stream-"))
    generated = None
    if not (folder / ".complete").exists():
        generated = generate(folder, args.images, args.classes, args.size)

    import torch
    from torch import nn

    from tailwise.training import engine
    from tailwise.training.data import build_lt_data

    torch.manual_seed(0)
    rss_start = peak_rss_mib()
    t0 = time.perf_counter()
    data = build_lt_data("folder", root=str(folder), val_per_class=0, image_size=args.size)
    scan_seconds = time.perf_counter() - t0
    rss_after_scan = peak_rss_mib()

    model = engine.to_device(nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, data.num_classes)), torch.device("cpu"))
    cfg = {"epochs": 1, "batch_size": args.batch, "lr": 1e-3, "lr_scale_batch": 0, "weight_decay": 0.0,
           "betas": [0.9, 0.999], "warmup_epochs": 0}

    def step_fn(x, y, epoch):
        return nn.functional.cross_entropy(model(x.float().div_(255)), y)

    images = engine.DeviceImages(data.train_source, torch.device("cpu"), prefetch=not args.no_prefetch)
    stage = engine.Stage(number=1, cfg=cfg, model=model, optimizer=engine.make_optimizer(model, cfg, model.parameters()),
                         step_fn=step_fn, train_indices=lambda epoch: data.train_idx, labels=data.train_source.labels,
                         images=images, card=lambda epoch, last: {})
    with tempfile.TemporaryDirectory() as run_dir:
        metrics = engine.fit(stage, Path(run_dir), seed=0, d=engine.Dist(), progress=False)
    decoded_mib = len(data.train_idx) * 3 * args.size * args.size / 2**20
    report = {
        "images": len(data.train_idx), "classes": data.num_classes, "image_size": args.size, "batch": args.batch,
        "prefetch": not args.no_prefetch, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "generate_seconds": None if generated is None else round(generated, 1),
        "scan_seconds": round(scan_seconds, 1), "epoch_seconds": metrics["seconds"],
        "images_per_second": metrics["images_per_second"], "data_wait_fraction": metrics["data_wait_fraction"],
        "peak_rss_mib_at_start": round(rss_start), "peak_rss_mib_after_scan": round(rss_after_scan),
        "peak_rss_mib": round(peak_rss_mib()), "all_images_decoded_mib": round(decoded_mib),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
