"""Subcommand owned by export/: `tailwise export RUN_OR_CHECKPOINT --out models/NAME/`.

It parses the options and calls export.model_folder.export_run. Registering imports no torch.
"""

from __future__ import annotations

import sys

from tailwise.export.model_folder import DEFAULT_OPSET


def register(subparsers) -> None:
    """Add the `export` subcommand to the `tailwise` parser."""
    export = subparsers.add_parser(
        "export", help="export a trained classifier to ONNX (with a parity check against torch)",
        description="Export a run's final classifier to models/NAME/: the ONNX model (uint8 pixels in, logits out, "
                    "tailwise metadata), its weights, card and manifest, and a model card README. The export is kept only if "
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
    """'fp16,int8' -> ('fp16', 'int8') (export_run checks the names)."""
    return tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def run_export(args) -> int:
    from pathlib import Path

    from tailwise.export.model_folder import export_run
    from tailwise.export.onnx_export import ExportParityError
    from tailwise.format import MODEL_FILE, README_FILE

    out = Path(args.out)
    try:
        report = export_run(args.checkpoint, out, force=args.force, variants=parse_variants(args.variants),
                            parity_images=args.parity_images, opset=args.opset, samples=args.samples)
    except ExportParityError as exc:
        print(f"tailwise export: parity check failed, {out} left as it was: {exc}", file=sys.stderr)
        return 1
    parity = report["parity"]
    print(f"tailwise export: model card {out / README_FILE}")
    print(f"tailwise export: {out / MODEL_FILE} ({report['exporter']} exporter, opset {report['opset']}); "
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
