"""Score an exported model folder with onnxruntime: on the test set of the data it was trained on
(evaluate_exported), or on a labelled folder of new images (evaluate_folder).

The data is rebuilt from the training card that export stores in the folder's card (tailwise.format.CARD_FILE)
and must have the index sha256 the model's metadata records. The served numbers apply the model's own logit
adjustment (tailwise.format.served_logits, as `tailwise predict` and the service do). The metadata is read by
the shared format module; no serving/ or export/ import (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np

from tailwise import UserError, conformal
from tailwise import format as fmt
from tailwise.training.data import LTData, check_same_data, rebuild_lt_data
from tailwise.training.metrics import evaluate_logits, save_report


def is_exported_model(path: Path) -> bool:
    """An exported model folder (models/NAME with its model file) or one of its .onnx files (e.g. a variant)."""
    return (path.is_dir() and (path / fmt.MODEL_FILE).is_file()) or (path.suffix == ".onnx" and path.is_file())


def _read(model_file: Path):
    model_dir = model_file.parent
    session, meta = _session_and_meta(model_file)
    try:
        card = json.loads((model_dir / fmt.CARD_FILE).read_text())
        build_args = card["training"]["data"]["build_args"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{model_dir / fmt.CARD_FILE}: missing, or records no training data (training.data."
                        "build_args), so the test set to score on is unknown") from None
    return session, meta, card, build_args


def _say(say, message: str) -> None:
    if say is not None:
        say(message)


def _class_key(name: str) -> str:
    """A class name as a folder can spell it: "T-shirt/top" and the folder "T-shirt-top" are both t-shirt-top."""
    return re.sub(r"[^0-9a-z]+", "-", name.lower()).strip("-")


def _session_and_meta(model_file: Path):
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types
        raise UserError(f"{model_file}: onnxruntime cannot load this model ({exc})") from None
    return session, fmt.metadata_from_props(session.get_modelmeta().custom_metadata_map, model_file)


def _run(session, pixels_of, n: int, say, what: str) -> np.ndarray:
    """Logits of n images (pixels_of(start, stop) -> uint8 [B, C, H, W]) in batches of 256, saying how far it
    got every 10 s."""
    name_in, name_out = session.get_inputs()[0].name, session.get_outputs()[0].name
    chunks, last = [], time.monotonic()
    for i in range(0, n, 256):
        chunks.append(session.run([name_out], {name_in: pixels_of(i, min(i + 256, n))})[0])
        if time.monotonic() - last > 10:
            _say(say, f"  {min(i + 256, n)} / {n} {what}")
            last = time.monotonic()
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, 0), np.float32)


def evaluate_folder(model: Path, folder: str | os.PathLike, out_dir: Path | None = None,
                    say=None) -> tuple[dict, list]:
    """(report, class_names) of an exported model on a labelled folder laid out as for training (one subfolder
    of images per class, named as the model's classes; "T-shirt-top" matches "T-shirt/top"; classes may be
    missing): the report of the test set, plain and served, with the model's own training counts and
    many/medium/few groups. Each image is decoded as `tailwise predict` and the service decode it
    (tailwise._core.load_image); files that do not decode are left out and counted in report["skipped"]."""
    from concurrent.futures import ThreadPoolExecutor

    from tailwise._core import ImageError, load_image
    from tailwise.training.data import _image_files

    model_file = fmt.model_file_of(Path(model))
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (a folder with one subfolder of images per class)")
    session, meta = _session_and_meta(model_file)
    names = meta["class_names"]
    index = {_class_key(n): c for c, n in enumerate(names)}
    subfolders = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    unknown = [s for s in subfolders if _class_key(s) not in index]
    if not subfolders or unknown:
        raise UserError(f"{folder}: " + (f"subfolders {', '.join(unknown[:5])} are not classes of the model"
                                          if unknown else "no class subfolders")
                        + f" (its classes: {', '.join(names)})")
    paths, labels = [], []
    for sub in subfolders:
        files, _ = _image_files(str(folder / sub))
        paths += files
        labels += [index[_class_key(sub)]] * len(files)
    _say(say, f"tailwise evaluate: decoding {len(paths)} images of {folder} as the service does ...")

    def decode(path):
        try:
            return load_image(path, meta)
        except ImageError as exc:
            return str(exc)

    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        decoded = list(pool.map(decode, paths, chunksize=64))
    skipped = [d for d in decoded if isinstance(d, str)]
    keep = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
    if not keep:
        raise UserError(f"{folder}: no image decodes" + (f" ({skipped[0]})" if skipped else ""))
    pixels = np.stack([decoded[i] for i in keep])
    labels = np.asarray(labels, dtype=np.int64)[keep]
    _say(say, f"tailwise evaluate: scoring {len(keep)} images with onnxruntime ..."
         + (f" ({len(skipped)} left out: {skipped[0]})" if skipped else ""))
    logits = _run(session, lambda a, b: pixels[a:b], len(keep), say, "images")
    report = _report(logits, labels, meta, meta["train_counts"], meta["groups"])
    report.update(model=str(model_file), data=str(folder), skipped=len(skipped))
    if out_dir is not None:
        save_report(report, out_dir, names, title=f"{model_file.parent.name} on {folder.name} (onnxruntime)")
    return report, names


def _report(logits, labels, meta, counts, groups) -> dict:
    """Plain, plus "logit_adjusted" (what is served) when the model carries a logit adjustment, plus
    "prediction_sets" ({coverage: tailwise.conformal.set_report}, the default coverage first) when it carries
    prediction sets."""
    report = evaluate_logits(logits, labels, counts, groups)
    la = meta["logit_adjustment"]
    if la:  # what is served (serving.artifact.OnnxClassifier.adjusted_logits is the same function)
        report["logit_adjusted"] = dict(evaluate_logits(fmt.served_logits(logits, meta), labels, counts, groups),
                                        tau=la["tau"])
    sets = meta["prediction_sets"]
    if sets:   # the sets every answer carries (serving.artifact.OnnxClassifier.answers: the same functions)
        probs = conformal.softmax(fmt.served_logits(logits, meta))
        levels = sorted(sets["levels"], key=lambda lv: lv["coverage"] != sets["default"])
        report["prediction_sets"] = {f"{lv['coverage']:g}": conformal.set_report(probs, labels, lv, meta["groups"])
                                     for lv in levels}
    return report


def evaluate_exported(model: Path, out_dir: Path | None = None, data: LTData | None = None,
                      say=None) -> tuple[dict, list]:
    """(report, class_names) of an exported model (a folder's model file, or a given .onnx file beside its
    card) on its test set: plain logits, plus "logit_adjusted" (the served answers) when the model carries a
    logit adjustment. Writes report.json + per_class.png to out_dir when given."""
    model = Path(model)
    model_file = fmt.model_file_of(model)
    model_dir = model_file.parent
    session, meta, card, build_args = _read(model_file)
    expected = meta["dataset"]["index_sha256"]
    if data is None:
        _say(say, f"tailwise evaluate: reading the data {model_dir.name} was trained on ({build_args.get('dataset')}"
                  f" at {build_args.get('root') or 'its default root'}) and checking it is that data ...")
        data = rebuild_lt_data(build_args, expected, model_dir)
    elif expected is not None:
        check_same_data(data, expected, model_dir)
    if data.test_source is None:
        raise UserError(f"{model_dir}: its data ({build_args.get('dataset')}) has no test set to score on")
    if data.class_names != meta["class_names"]:
        raise UserError(f"{model_dir}: the rebuilt data's classes differ from the model's")
    n = len(data.test_source)
    _say(say, f"tailwise evaluate: scoring {n} test images with onnxruntime ...")
    logits = _run(session, lambda a, b: data.test_source.load(np.arange(a, b)).numpy(), n, say, "test images")
    report = _report(logits, data.test_source.labels, meta, data.counts, data.groups)
    report["model"] = str(model_file)
    if out_dir is not None:
        save_report(report, out_dir, data.class_names, title=f"{model_dir.name}/{model_file.name} (onnxruntime)")
    return report, data.class_names
