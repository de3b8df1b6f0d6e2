"""Write a small long-tailed image folder from the real Fashion-MNIST, as a user's own data would look.

    python experiments/make_folder.py --out data/fmnist-folder            # train/ (IF 10, 240 images) and test/

`train/<class>/<n>.png` keeps int(n_max * IF^(-c/9)) images of class c (the LT profile of the benchmarks, on a
few hundred images); `test/<class>/<n>.png` holds `--test-per-class` images of each class from the real test
set. Images are 28 x 28 grayscale PNGs; the draw is fixed by `--seed`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to create (must not exist)")
    parser.add_argument("--n-max", type=int, default=60, help="training images of the head class (default 60)")
    parser.add_argument("--imbalance-factor", type=float, default=10)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", help="Fashion-MNIST folder (default /usr/share/datasets/fashion-mnist)")
    args = parser.parse_args(argv)

    from tailwise.training.data import FMNIST_CLASSES, FMNIST_ROOT, load_fmnist, lt_counts

    out = Path(args.out)
    if out.exists():
        parser.error(f"{out} exists: choose a new folder")
    train, test = load_fmnist(args.root or FMNIST_ROOT)
    rng = np.random.default_rng(args.seed)
    counts = lt_counts(args.n_max, len(FMNIST_CLASSES), args.imbalance_factor)
    for split, source, per_class in (("train", train, counts), ("test", test, [args.test_per_class] * 10)):
        for c, name in enumerate(FMNIST_CLASSES):
            folder = out / split / name.replace("/", "-")
            folder.mkdir(parents=True)
            for i, row in enumerate(rng.permutation(np.flatnonzero(source.labels == c))[:per_class[c]]):
                Image.fromarray(source.images[row, 0].numpy(), mode="L").save(folder / f"{i:04d}.png")
    print(f"{out}: train {sum(counts)} images ({' '.join(map(str, counts))}), "
          f"test {10 * args.test_per_class} images, 10 classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
