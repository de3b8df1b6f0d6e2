"""Where a two-stage row wins or loses: encoder quality, stage-2 re-training, or calibration (validation only).

    python experiments/diagnose.py runs/bench/fmnist-lt-r32-if100-b4/{la,bns-kdpp,tailwise-joint}-s0 ...

For each run folder of the accuracy runner (or `tailwise train`) it prints, on the validation split:
* probe: a linear probe of the stage-1 encoder (frozen; logistic regression on 100 training images per class),
  i.e. how good the representation is before stage 2;
* plain: the final classifier's balanced accuracy (mean per class) on raw logits;
* served: the same after post-hoc logit adjustment with the tau chosen on validation (what is shipped).
probe vs plain says what stage 2 adds to the encoder; served vs plain is what calibration to the prior is worth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def diagnose(run_dir: Path) -> dict:
    import numpy as np
    import torch

    from tailwise.training import checkpoint, engine
    from tailwise.training.data import rebuild_lt_data
    from tailwise.training.probe import linear_probe, stage1_encoder
    from tailwise.training.train import predict_logits
    from tailwise.training.metrics import evaluate_logits

    card1 = checkpoint.load_card(run_dir, stage=1)
    cfg, data = card1["config"], rebuild_lt_data(card1["data"]["build_args"])
    encoder = stage1_encoder(cfg, data, checkpoint.load_weights(card1))
    device = torch.device("cpu")
    row = {"run": str(run_dir), "probe": linear_probe(encoder, data, device, on="val")["mean_per_class"]}
    model, card = checkpoint.load_classifier(run_dir)
    logits = predict_logits(model, engine.DeviceImages(data.train_source, device), data.val_idx).numpy()
    labels = data.train_source.labels[data.val_idx]
    row["plain"] = evaluate_logits(logits, labels, data.counts, data.groups)["mean_per_class"]
    la = card.get("logit_adjustment")
    if la:
        adjusted = logits - la["tau"] * np.asarray(la["log_prior"])
        row["served"], row["tau"] = evaluate_logits(adjusted, labels, data.counts, data.groups)["mean_per_class"], la["tau"]
    else:
        row["served"], row["tau"] = row["plain"], None
    row["stage1"] = f"{cfg['stage1']['method']}/{cfg['stage1']['loss'] if cfg['stage1']['method'] == 'supervised' else cfg['stage1']['sup_loss']}, {card1['epoch']} ep"
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = [diagnose(Path(r)) for r in args.runs]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| run | stage 1 | probe (val) | plain (val) | served (val) | tau |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {Path(r['run']).name} | {r['stage1']} | {100 * r['probe']:.1f} | {100 * r['plain']:.1f} | "
              f"{100 * r['served']:.1f} | {r['tau'] if r['tau'] is not None else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
