"""Exported models side by side on the current validation split (what decides which model ships).

    python benchmarks/compare_models.py models/fmnist-lt-tailwise models/candidate

Builds Fashion-MNIST-LT IF 100 as `tailwise data` does today (every class has validation images) and scores each
model's model.onnx with onnxruntime on those images: balanced accuracy (mean per class), overall and per group,
for plain logits and for the served (logit-adjusted) answers. A model trained on the literature's subset
(before the head class got validation images) has seen the head's validation images in training, which favours
it; the output says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="exported model folders")
    parser.add_argument("--imbalance-factor", type=float, default=100)
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from tailwise.training.data import build_lt_data
    from tailwise.training.metrics import evaluate_logits

    data = build_lt_data("fmnist", imbalance_factor=args.imbalance_factor)
    images = data.train_source.load(data.val_idx).numpy()
    labels = data.train_source.labels[data.val_idx]
    print(f"validation split: {len(labels)} images, index sha256 {data.index_sha256[:12]}...")
    print("| model | trained on | plain | served | served many / medium / few |\n|---|---|---:|---:|---|")
    for folder in map(Path, args.models):
        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        meta = json.loads(session.get_modelmeta().custom_metadata_map["tailwise"])
        logits = np.concatenate([session.run(None, {session.get_inputs()[0].name: images[i:i + 256]})[0]
                                 for i in range(0, len(images), 256)])
        plain = evaluate_logits(logits, labels, data.counts, data.groups)
        la = meta.get("logit_adjustment")
        served = evaluate_logits(logits - la["tau"] * np.asarray(la["log_prior"]), labels, data.counts, data.groups) \
            if la else plain
        sha = (meta.get("dataset") or {}).get("index_sha256") or ""
        trained = "this split" if sha == data.index_sha256 else f"other data ({sha[:8]}: saw head val images)"
        groups = " / ".join("-" if served[g] is None else f"{100 * served[g]:.1f}" for g in ("many", "medium", "few"))
        print(f"| {folder.name} | {trained} | {100 * plain['mean_per_class']:.1f} | "
              f"{100 * served['mean_per_class']:.1f} | {groups} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
