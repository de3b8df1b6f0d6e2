"""Score an exported model folder (model.onnx + card.json) on the test set with onnxruntime.

The data is rebuilt from the training card that export stores in card.json and must have the index sha256 the
model's metadata records. The served numbers apply the model's own logit adjustment (from the ONNX metadata,
as `tailwise predict` and the service do). No serving/ or export/ import (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tailwise import UserError
from training.data import LTData, rebuild_lt_data
from training.metrics import evaluate_logits, save_report

METADATA_KEY = "tailwise"   # serving/artifact.py's key of the metadata property


def is_exported_model(path: Path) -> bool:
    """An exported model folder (models/NAME with model.onnx) or one of its .onnx files (e.g. model.int8.onnx)."""
    return (path.is_dir() and (path / "model.onnx").is_file()) or (path.suffix == ".onnx" and path.is_file())


def _read(model_file: Path):
    import onnxruntime as ort

    model_dir = model_file.parent
    try:
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types
        raise UserError(f"{model_file}: onnxruntime cannot load this model ({exc})") from None
    meta_text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if not meta_text:
        raise UserError(f"{model_file}: no tailwise metadata (not exported by tailwise export)")
    try:
        card = json.loads((model_dir / "card.json").read_text())
        build_args = card["training"]["data"]["build_args"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{model_dir / 'card.json'}: missing, or records no training data (training.data."
                        "build_args), so the test set to score on is unknown") from None
    return session, json.loads(meta_text), card, build_args


def evaluate_exported(model: Path, out_dir: Path | None = None, data: LTData | None = None) -> tuple[dict, list]:
    """(report, class_names) of an exported model (a folder's model.onnx, or a given .onnx file beside its
    card.json) on its test set: plain logits, plus "logit_adjusted" (the served answers) when the model carries a
    logit adjustment. Writes report.json + per_class.png to out_dir when given."""
    model = Path(model)
    model_file = model / "model.onnx" if model.is_dir() else model
    model_dir = model_file.parent
    session, meta, card, build_args = _read(model_file)
    if data is None:
        data = rebuild_lt_data(build_args)
    expected = (meta.get("dataset") or {}).get("index_sha256")
    if expected and data.index_sha256 != expected:
        raise UserError(f"{model_dir}: the data rebuilt from card.json (root {build_args.get('root')}) is not the "
                        f"data this model was trained on (index sha256 {data.index_sha256[:12]}... vs "
                        f"{expected[:12]}...)")
    if data.test_source is None:
        raise UserError(f"{model_dir}: its data ({build_args.get('dataset')}) has no test set to score on")
    if data.class_names != meta["class_names"]:
        raise UserError(f"{model_dir}: the rebuilt data's classes differ from the model's")
    name_in, name_out = session.get_inputs()[0].name, session.get_outputs()[0].name
    n = len(data.test_source)
    logits = np.concatenate([session.run([name_out], {name_in: data.test_source.load(np.arange(i, min(i + 256, n)))
                                                      .numpy()})[0] for i in range(0, n, 256)]).astype(np.float32)
    labels = data.test_source.labels
    report = evaluate_logits(logits, labels, data.counts, data.groups)
    la = meta.get("logit_adjustment")
    if la:  # exactly serving.artifact.OnnxClassifier.adjusted_logits
        adjusted = logits - np.float32(la["tau"]) * np.asarray(la["log_prior"], dtype=np.float32)
        report["logit_adjusted"] = dict(evaluate_logits(adjusted, labels, data.counts, data.groups), tau=la["tau"])
    report["model"] = str(model_file)
    if out_dir is not None:
        save_report(report, out_dir, data.class_names, title=f"{model_dir.name}/{model_file.name} (onnxruntime)")
    return report, data.class_names
