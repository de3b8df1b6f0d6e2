"""Conformal prediction sets for a model folder: calibrated on the validation split of the data the model was
trained on (never the test set), with the served logits of each ONNX file itself in onnxruntime, stored in each
file's metadata (`prediction_sets`, tailwise/format.py; the math is tailwise/conformal.py).

`add_prediction_sets` does it inside a folder being written (export's staging folder, or a copy); `calibrate_model`
(`tailwise calibrate MODEL_DIR`) adds or replaces the sets of an exported model folder: the data rebuilt from its
card and checked by its index sha256, the folder copied beside itself, calibrated there, the model card rewritten,
and only then moved into place (every file of the folder kept, the user's own ones included).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tailwise import OptionError, UserError
from tailwise import conformal
from tailwise import format as fmt

BATCH = 256


def model_files(folder: Path) -> list[str]:
    """The ONNX files of a model folder: model.onnx and the variants beside it."""
    return [name for name in (fmt.MODEL_FILE, *(fmt.variant_model(v) for v in fmt.VARIANTS))
            if (folder / name).is_file()]


def served_probabilities(model_file: Path, source, indices: np.ndarray) -> np.ndarray:
    """float64 [N, C]: what `model_file` serves (softmax of its logit-adjusted logits, as every answer reports)
    for the images `source.load(indices)` gives, run in onnxruntime on CPU."""
    from tailwise.serving.artifact import OnnxClassifier

    model = OnnxClassifier(model_file, providers=["CPUExecutionProvider"], verify=False)
    chunks = [model.probabilities(model.predict_arrays(np.asarray(source.load(indices[i:i + BATCH]))))
              for i in range(0, len(indices), BATCH)]
    return np.concatenate(chunks) if chunks else np.zeros((0, model.meta["num_classes"]))


def check_coverages(coverages: float | Sequence[float]) -> tuple[float, ...]:
    """`coverage` (one number or several) as a tuple of distinct coverages in (0, 1); OptionError otherwise."""
    coverages = (coverages,) if isinstance(coverages, (int, float)) else tuple(coverages)
    if not coverages:
        raise OptionError("{coverage}: give at least one coverage (0.9 for 90 %)", "coverage")
    try:
        return tuple(dict.fromkeys(conformal.check_coverage(c) for c in coverages))
    except ValueError as exc:
        raise OptionError(f"{{coverage}}: {exc}", "coverage") from None


def add_prediction_sets(folder: Path, data, coverages: Sequence[float], say=None) -> dict:
    """Calibrate every ONNX file in `folder` on `data`'s validation split (an LTData, the model's own data), at
    `coverages` (the first the default), write each file's sets into its metadata, the same into card.json
    (its "metadata", and the report below as its export report's "prediction_sets"), and the manifest again.
    The report: {"score", "split", "num_images", "coverages", "skipped": [why a coverage was left out], "levels":
    model.onnx's levels without thresholds, "test": {coverage: set_report on the test set} or None}."""
    import onnx

    coverages = check_coverages(coverages)
    folder = Path(folder)
    val_idx = np.asarray(data.val_idx)
    if not len(val_idx):
        raise UserError(f"{folder.name}: its data has no validation split (val_per_class 0) to calibrate on")
    labels = np.asarray(data.train_source.labels)[val_idx]
    card_path = folder / fmt.CARD_FILE
    card = json.loads(card_path.read_text())
    report = None
    for name in model_files(folder):
        if say:
            say(f"calibrating {name} on {len(val_idx)} validation images ...")
        proto = onnx.load(str(folder / name))
        meta = fmt.metadata_from_props({p.key: p.value for p in proto.metadata_props}, folder / name)
        groups = meta["groups"]
        probs = served_probabilities(folder / name, data.train_source, val_idx)
        record, skipped = conformal.calibrate(probs, labels, groups, coverages)
        meta = dict(meta, prediction_sets=record)
        fmt.write_metadata(proto, meta)
        onnx.save(proto, str(folder / name))
        if name == fmt.MODEL_FILE:
            card["metadata"] = meta
            report = {"score": conformal.SCORE, "split": "validation", "num_images": int(len(val_idx)),
                      "coverages": list(coverages), "skipped": skipped,
                      "levels": [{"coverage": lv["coverage"], "conditional": lv["conditional"]}
                                 for lv in (record or {}).get("levels", [])],
                      "test": test_report(folder / name, data, record, groups, say)}
    card.setdefault("export", {})["prediction_sets"] = report
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    fmt.write_manifest(folder, fmt.model_files(folder))
    return report


def test_report(model_file: Path, data, record: dict | None, groups: list[str], say=None) -> dict | None:
    """{str(coverage): conformal.set_report} of every calibrated level on the test set (None without one)."""
    if record is None or data.test_source is None:
        return None
    indices = np.arange(len(data.test_source))
    if say:
        say(f"scoring the sets on {len(indices)} test images ...")
    probs = served_probabilities(model_file, data.test_source, indices)
    labels = np.asarray(data.test_source.labels)
    return {f"{lv['coverage']:g}": conformal.set_report(probs, labels, lv, groups) for lv in record["levels"]}


def check_folder_unchanged(folder: Path) -> None:
    """Every file the manifest lists matches it; UserError naming the first that does not."""
    manifest_path = folder / fmt.MANIFEST_FILE
    if not manifest_path.is_file():
        raise UserError(f"{folder}: no {fmt.MANIFEST_FILE}: not an exported tailwise model folder")
    manifest = fmt.parse_manifest(manifest_path.read_text(), manifest_path)
    for name, expected in manifest["files"].items():
        if not (folder / name).is_file():
            raise UserError(f"{folder}: {name} is listed in {fmt.MANIFEST_FILE} but missing")
        if fmt.build_manifest(folder, [name])["files"][name] != expected:
            raise UserError(f"{folder / name}: does not match {fmt.MANIFEST_FILE} (changed since export); "
                            f"calibrate only an exported model as it was written")


def calibrate_model(model_dir: str | os.PathLike, coverage: float | Sequence[float] = conformal.DEFAULT_COVERAGE,
                    say=None) -> dict:
    """`tailwise calibrate MODEL_DIR`: (re)calibrate the prediction sets of an exported model folder at
    `coverage` (one or several, the first the default) and return the report of add_prediction_sets. The folder's data is rebuilt
    from its card (and must have the index sha256 its metadata records); the folder is copied beside itself,
    calibrated and its model card rewritten there, then moved into place; on any failure it is left as it was."""
    from tailwise.export.model_card import rewrite_model_card
    from tailwise.export.model_folder import swap_in
    from tailwise.training.data import rebuild_lt_data

    coverages = check_coverages(coverage)
    folder = Path(model_dir)
    if folder.is_symlink():
        raise UserError(f"{folder}: a symbolic link; calibrate the folder it points to ({folder.resolve()})")
    if not (folder / fmt.MODEL_FILE).is_file():
        raise UserError(f"{folder}: no {fmt.MODEL_FILE}: not an exported tailwise model folder")
    check_folder_unchanged(folder)
    card = json.loads((folder / fmt.CARD_FILE).read_text())
    try:
        build_args = card["training"]["data"]["build_args"]
    except (KeyError, TypeError):
        raise UserError(f"{folder / fmt.CARD_FILE}: records no training data (training.data.build_args), so the "
                        "validation split to calibrate on is unknown") from None
    if say:
        say(f"reading the data {folder.name} was trained on ({build_args.get('dataset')} at "
            f"{build_args.get('root') or 'its default root'}) and checking it is that data ...")
    data = rebuild_lt_data(build_args, card["metadata"]["dataset"]["index_sha256"], folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.new-", dir=folder.parent))
    try:
        shutil.copytree(folder, tmp, symlinks=True, dirs_exist_ok=True)
        report = add_prediction_sets(tmp, data, coverages, say)
        rewrite_model_card(tmp, name=folder.name)
        os.chmod(tmp, os.stat(folder).st_mode & 0o7777)
        swap_in(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def say_stderr(message: str) -> None:
    print(f"tailwise calibrate: {message}", file=sys.stderr, flush=True)
