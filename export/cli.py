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
    export.add_argument("--coverage", action="append", metavar="C[,C...]",
                        help="calibrate conformal prediction sets at these coverages on the run's validation split "
                             "(comma list or repeated; the first is the default every answer carries; default "
                             "0.9); off: a model without sets")
    export.set_defaults(handler=run_export)

    calibrate = subparsers.add_parser(
        "calibrate", help="add or replace the conformal prediction sets of an exported model folder",
        description="Calibrate the prediction sets of an exported model folder (as `tailwise export --coverage` "
                    "does) on the validation split of the data it was trained on, rebuilt from its card.json and "
                    "checked by its index sha256, with each ONNX file's own served probabilities; rewrite its "
                    "metadata, card, manifest and model card. The folder is copied beside itself, calibrated there "
                    "and moved into place whole (every file in it kept); on failure it is left as it was.")
    calibrate.add_argument("model_dir", metavar="MODEL_DIR", help="exported model folder, e.g. models/NAME")
    calibrate.add_argument("--coverage", action="append", metavar="C[,C...]",
                           help="coverages to calibrate (comma list or repeated; the first is the default; "
                                "default 0.9)")
    calibrate.set_defaults(handler=run_calibrate)


def parse_coverages(values: list[str] | None) -> tuple[float, ...] | None:
    """--coverage 0.9,0.8 --coverage 0.95 -> (0.9, 0.8, 0.95); not given -> (0.9,); "off" -> None."""
    from tailwise import OptionError
    from tailwise.conformal import DEFAULT_COVERAGE, OFF

    parts = [part.strip() for value in values or [] for part in value.split(",") if part.strip()]
    if not parts:
        return (DEFAULT_COVERAGE,)
    if OFF in parts:
        if parts != [OFF]:
            raise OptionError("{coverage}: off turns the sets off, give it alone", "coverage")
        return None
    try:
        return tuple(float(part) for part in parts)
    except ValueError:
        raise OptionError(f"{{coverage}}: expected numbers such as 0.9 (or off), got {', '.join(parts)}",
                          "coverage") from None


def run_calibrate(args) -> int:
    from tailwise.export.calibrate import calibrate_model, say_stderr
    from tailwise import OptionError

    coverages = parse_coverages(args.coverage)
    if coverages is None:
        raise OptionError("{coverage}: off is for export; calibrate needs coverages", "coverage")
    report = calibrate_model(args.model_dir, coverages, say=say_stderr)
    print_sets(report, "tailwise calibrate")
    return 0 if report["levels"] else 1


def print_sets(report: dict | None, who: str) -> None:
    """One line per calibrated coverage (and its test coverage), one per coverage left out."""
    if report is None:
        print(f"{who}: no prediction sets (--coverage off)")
        return
    for lv in report["levels"]:
        test = (report.get("test") or {}).get(f"{lv['coverage']:g}")
        on_test = (f"; on {test['num_images']} test images: coverage {100 * test['coverage']:.2f} % "
                   f"(many {_pct(test['per_group']['many'])}, medium {_pct(test['per_group']['medium'])}, few "
                   f"{_pct(test['per_group']['few'])}), mean set size {test['mean_size']:.2f}") if test else ""
        print(f"{who}: prediction sets at {100 * lv['coverage']:g} % coverage, {lv['conditional']}-conditional, "
              f"calibrated on {report['num_images']} validation images{on_test}")
    for reason in report["skipped"]:
        print(f"{who}: prediction sets left out: {reason}", file=sys.stderr)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


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
                            parity_images=args.parity_images, opset=args.opset, samples=args.samples,
                            coverage=parse_coverages(args.coverage))
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
    print_sets(report["prediction_sets"], "tailwise export")
    return 1 if any("skipped" in result for result in report["variants"].values()) else 0
