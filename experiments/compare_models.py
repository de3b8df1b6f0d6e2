"""Exported models side by side on the current validation split (what decides which model ships).

    python experiments/compare_models.py models/fmnist-lt-tailwise models/candidate

Builds Fashion-MNIST-LT IF 100 as `tailwise data` does today (every class has validation images) and scores each
model's model.onnx with onnxruntime on those images: balanced accuracy (mean per class), overall and per group,
for plain logits and for the served (logit-adjusted) answers. A model trained on the literature's subset
(before the head class got validation images) has seen the head's validation images in training, which favours
it; the output says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="exported model folders")
    parser.add_argument("--imbalance-factor", type=float, default=100)
    args = parser.parse_args(argv)

    import tailwise
    from tailwise.training.data import build_lt_data
    from tailwise.training.metrics import evaluate_logits

    data = build_lt_data("fmnist", imbalance_factor=args.imbalance_factor)
    images = data.train_source.load(data.val_idx).numpy()
    labels = data.train_source.labels[data.val_idx]
    print(f"validation split: {len(labels)} images, index sha256 {data.index_sha256[:12]}...")
    print("| model | trained on | plain | served | served many / medium / few |\n|---|---|---:|---:|---|")
    for folder in map(Path, args.models):
        model = tailwise.load(folder, verify=False)     # as before: a model copied out of git has no manifest
        plain, served = (evaluate_logits(model.predict_logits(images, adjusted=adjusted), labels, data.counts,
                                         data.groups) for adjusted in (False, True))
        sha = (model.metadata.get("dataset") or {}).get("index_sha256") or ""
        trained = "this split" if sha == data.index_sha256 else f"other data ({sha[:8]}: saw head val images)"
        groups = " / ".join("-" if served[g] is None else f"{100 * served[g]:.1f}" for g in ("many", "medium", "few"))
        print(f"| {folder.name} | {trained} | {100 * plain['mean_per_class']:.1f} | "
              f"{100 * served['mean_per_class']:.1f} | {groups} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
