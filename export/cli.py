"""Subcommand owned by export/: `tailwise export RUN_OR_CHECKPOINT --out models/NAME/`.

Registering imports no torch; the handler imports what it needs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tailwise import UserError

DEFAULT_OPSET = 18  # the lowest the dynamo exporter writes; the one default (export_classifier's too)
VARIANTS = ("fp16", "int8")  # export.onnx_export.VARIANTS, repeated so registering imports no torch
ARRAY_DATASETS = ("fmnist", "cifar10", "cifar100")  # small native sizes: user images are resized to them
CALIBRATION_IMAGES = 256  # validation images (disjoint from the parity images) that calibrate int8


def register(subparsers) -> None:
    """Add the `export` subcommand to the `tailwise` parser."""
    export = subparsers.add_parser(
        "export", help="export a trained classifier to ONNX (with a parity check against torch)",
        description="Export a run's final classifier to models/NAME/: model.onnx (uint8 pixels in, logits out, "
                    "tailwise metadata), weights.safetensors and card.json. The export is kept only if "
                    "onnxruntime reproduces torch on validation images (max |logit diff| <= 1e-4, same top-1). "
                    "The folder is written beside --out and moved into place whole; an existing model folder is "
                    "replaced only with --force.")
    export.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                        help="run folder, or a classifier checkpoint card / weights file")
    export.add_argument("--out", required=True, help="output folder, e.g. models/NAME/")
    export.add_argument("--force", action="store_true",
                        help="replace --out if it already holds files (the whole folder, only once the new export "
                             "passed its checks)")
    export.add_argument("--variants", default="", help="comma-separated extra files to write: fp16, int8")
    export.add_argument("--parity-images", type=int, default=256,
                        help="validation images the ONNX graph must reproduce torch on (default 256)")
    export.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (default {DEFAULT_OPSET}, the lowest the dynamo exporter writes)")
    export.add_argument("--samples", type=int, default=0, metavar="K",
                        help="also write K test images per class as PNG into OUT/samples/, with the model's "
                             "predictions for them in the model card (default 0)")
    export.set_defaults(handler=run_export)


def parse_variants(text: str) -> tuple[str, ...]:
    """'fp16,int8' -> ('fp16', 'int8'); UserError naming --variants for anything else."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return names


def check_out(out: Path, force: bool) -> None:
    """Refuse an --out that is a file, or a folder with files in it unless `force`."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        names = sorted(p.name for p in out.iterdir())
        raise UserError(f"--out {out} already holds a model ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); "
                        "pass --force to replace the whole folder, or choose another --out")


@contextlib.contextmanager
def staged_folder(out: Path, force: bool = False):
    """Yield a new empty folder beside `out` to write into; when the block succeeds it becomes `out` as a whole.

    An existing `out` (non-empty only with `force`) is renamed aside and deleted after the new folder is in place;
    if the block fails, the new folder is deleted and `out` is left exactly as it was.
    """
    out = Path(out)
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)   # mkdtemp makes it owner-only
        check_out(out, force)  # nothing appeared there while we exported
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old)  # old is empty, so the folder moves onto it
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def metadata_from_card(card: dict) -> dict:
    """The ONNX metadata (serving.artifact.build_metadata) of a classifier checkpoint card."""
    from tailwise.serving.artifact import build_metadata
    from tailwise.training.data import group_thresholds

    data = card["data"]
    build = data.get("build_args", {})
    dataset = build.get("dataset", data.get("name"))
    counts = data["counts"]
    bands = data.get("group_thresholds")   # cards before they recorded their bands: computed as they were
    many, few = ((bands["many_above"], bands["few_below"]) if bands else
                 group_thresholds(len(counts), build.get("many_threshold"), build.get("few_threshold")))
    height, width = data["image_size"]
    la = card.get("logit_adjustment")
    return build_metadata(
        class_names=data["class_names"], channels=data["channels"], height=height, width=width,
        resize_policy="resize" if dataset in ARRAY_DATASETS else "shorter-center-crop",
        train_counts=counts, groups=data["groups"],
        group_thresholds={"many_above": many, "few_below": few},
        dataset={"name": dataset, "index_sha256": data.get("index_sha256")},
        weights_sha256=card.get("weights_sha256"),
        metrics=card.get("test") or {},  # training writes the final test report under "test"
        logit_adjustment={"tau": la["tau"], "log_prior": la["log_prior"]} if la and la.get("tau") else None)


def run_export(args) -> int:
    import numpy as np

    from tailwise.export.onnx_export import ExportParityError, export_classifier
    from tailwise.training.checkpoint import load_classifier
    from tailwise.training.data import rebuild_lt_data

    variants = parse_variants(args.variants)
    if args.parity_images < 1:
        raise UserError(f"--parity-images must be >= 1, got {args.parity_images}")
    out = Path(args.out)
    check_out(out, args.force)  # before the slow part
    model, card = load_classifier(args.checkpoint)
    meta = metadata_from_card(card)
    data = rebuild_lt_data(card["data"]["build_args"])
    if data.index_sha256 != card["data"].get("index_sha256"):
        raise UserError(f"{args.checkpoint}: the data rebuilt from its card ({data.build_args.get('root')}) is not "
                        f"the data it was trained on (index sha256 {data.index_sha256[:12]}... vs "
                        f"{str(card['data'].get('index_sha256'))[:12]}...)")
    if not len(data.val_idx):
        raise UserError(f"{args.checkpoint}: its data has no validation split (val_per_class 0) to check parity on")
    order = np.random.default_rng(0).permutation(data.val_idx)  # a class-balanced draw from the sorted split
    parity_idx = np.sort(order[:args.parity_images])
    sample_idx = np.sort(order[args.parity_images:args.parity_images + CALIBRATION_IMAGES])
    parity_images = data.train_source.load(parity_idx)
    sample_images = data.train_source.load(sample_idx) if len(sample_idx) else parity_images
    weights_file = Path(card["_dir"]) / card["weights"] if "_dir" in card and "weights" in card else None
    from tailwise.export.model_card import write_model_card, write_samples

    try:
        with staged_folder(out, args.force) as staging:
            report = export_classifier(model, meta, staging, sample_images, parity_images, opset=args.opset,
                                       variants=variants, parity_labels=data.train_source.labels[parity_idx],
                                       weights_file=weights_file, card=card)
            samples = write_samples(staging, data, args.samples) if args.samples > 0 else None
            write_model_card(staging, card, report, samples, name=out.name)
    except ExportParityError as exc:
        print(f"tailwise export: parity check failed, {out} left as it was: {exc}", file=sys.stderr)
        return 1
    readme = out / "README.md"
    parity = report["parity"]
    print(f"tailwise export: model card {readme}")
    print(f"tailwise export: {out / 'model.onnx'} ({report['exporter']} exporter, opset {report['opset']}); "
          f"parity on {parity['n_images']} validation images: max |logit diff| {parity['max_abs_logit_diff']:.2g}, "
          f"same top-1; validation accuracy {100 * parity['accuracy']:.2f} %")
    if report["exporter_fallback_reason"]:
        print(f"  (dynamo exporter failed: {report['exporter_fallback_reason'][:300]})")
    for name, result in report["variants"].items():
        if "skipped" in result:
            print(f"  {name}: skipped: {result['skipped']}", file=sys.stderr)
        else:
            print(f"  {name}: {result['file']}, validation accuracy {100 * result['accuracy']:.2f} % "
                  f"({100 * result['accuracy_change']:+.2f} points), top-1 agreement with fp32 "
                  f"{100 * result['top1_agreement']:.2f} %")
    return 1 if any("skipped" in result for result in report["variants"].values()) else 0
