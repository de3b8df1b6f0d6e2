"""Score an exported model folder on the test set with onnxruntime.

The data is rebuilt from the training card that export stores in the folder's card (tailwise.format.CARD_FILE)
and must have the index sha256 the model's metadata records. The served numbers apply the model's own logit
adjustment (tailwise.format.served_logits, as `tailwise predict` and the service do). The metadata is read by
the shared format module; no serving/ or export/ import (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tailwise import UserError
from tailwise import format as fmt
from tailwise.training.data import LTData, check_same_data, rebuild_lt_data
from tailwise.training.metrics import evaluate_logits, save_report


def is_exported_model(path: Path) -> bool:
    """An exported model folder (models/NAME with its model file) or one of its .onnx files (e.g. a variant)."""
    return (path.is_dir() and (path / fmt.MODEL_FILE).is_file()) or (path.suffix == ".onnx" and path.is_file())


def _read(model_file: Path):
    import onnxruntime as ort

    model_dir = model_file.parent
    try:
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types
        raise UserError(f"{model_file}: onnxruntime cannot load this model ({exc})") from None
    meta = fmt.metadata_from_props(session.get_modelmeta().custom_metadata_map, model_file)
    try:
        card = json.loads((model_dir / fmt.CARD_FILE).read_text())
        build_args = card["training"]["data"]["build_args"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{model_dir / fmt.CARD_FILE}: missing, or records no training data (training.data."
                        "build_args), so the test set to score on is unknown") from None
    return session, meta, card, build_args


def evaluate_exported(model: Path, out_dir: Path | None = None, data: LTData | None = None) -> tuple[dict, list]:
    """(report, class_names) of an exported model (a folder's model file, or a given .onnx file beside its
    card) on its test set: plain logits, plus "logit_adjusted" (the served answers) when the model carries a
    logit adjustment. Writes report.json + per_class.png to out_dir when given."""
    model = Path(model)
    model_file = fmt.model_file_of(model)
    model_dir = model_file.parent
    session, meta, card, build_args = _read(model_file)
    expected = meta["dataset"]["index_sha256"]
    if data is None:
        data = rebuild_lt_data(build_args, expected, model_dir)
    elif expected is not None:
        check_same_data(data, expected, model_dir)
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
    la = meta["logit_adjustment"]
    if la:  # what is served (serving.artifact.OnnxClassifier.adjusted_logits is the same function)
        report["logit_adjusted"] = dict(evaluate_logits(fmt.served_logits(logits, meta), labels, data.counts,
                                                        data.groups), tau=la["tau"])
    report["model"] = str(model_file)
    if out_dir is not None:
        save_report(report, out_dir, data.class_names, title=f"{model_dir.name}/{model_file.name} (onnxruntime)")
    return report, data.class_names
