"""The exported model as serving sees it: reading its metadata, finding it, and `OnnxClassifier`.

The model folder's format (file names, the "tailwise" metadata schema and its version, the logit adjustment) is
defined once in tailwise/format.py, which export writes by; image preprocessing is the core's `load_image`. The
names serving has always offered (build_metadata, METADATA_KEY, ...) are re-exported here. No torch.

The graph maps `pixels` uint8[N, C, H, W] (0..255, normalisation is inside the graph) to `logits`
float32[N, num_classes].
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import tailwise
from tailwise import UserError
# Image decoding lives in the shared core (training decodes files exactly as serving does); re-exported here.
from tailwise._core import (DEFAULT_MAX_PIXELS, GROUP_NAMES, IMAGE_FORMATS, RESIZE_POLICIES,  # noqa: F401
                            ImageError, load_image)
from tailwise import conformal
from tailwise.format import (FORMAT_VERSION, INPUT_NAME, METADATA_KEY, MIN_FORMAT_VERSION,  # noqa: F401
                             MODEL_FILE, OUTPUT_NAME, build_metadata, metadata_from_props, parse_metadata,
                             served_logits, validate_metadata, write_metadata)
from tailwise.serving.integrity import read_verified

# The folder that holds the `tailwise` package: the repository root, a Bento's src/, or site-packages.
PACKAGE_PARENT = Path(tailwise.__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------- metadata

def read_metadata(path: str | os.PathLike, verify: bool | None = None) -> dict:
    """The "tailwise" metadata of a model file (or of a model folder's model.onnx), its bytes checked against
    the folder's manifest first (serving.integrity; `verify` None: unless TAILWISE_VERIFY=0)."""
    path = resolve_model_path(path)
    data = read_verified(path, verify)
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises its own DecodeError; onnx may raise others
        raise UserError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if not model.graph.node and not props:
        raise UserError(f"{path}: not an ONNX model (no graph)")
    return metadata_from_props(props, path)


def model_summary(meta: dict) -> str:
    """'10 classes, test top-1 82.66 %': the accuracy of what is served (logit-adjusted when the model is), in
    percent, as everywhere a person reads it."""
    metrics = meta["metrics"]
    if meta["logit_adjustment"] is not None and isinstance(metrics.get("logit_adjusted"), dict):
        metrics = metrics["logit_adjusted"]
    top1 = metrics.get("top1")
    accuracy = f", test top-1 {100 * top1:.2f} %" if isinstance(top1, (int, float)) else ""
    return f"{meta['num_classes']} classes{accuracy}"


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A model file, or a model folder's `model.onnx`; UserError naming the path if there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    return path


def default_model_path() -> Path:
    """The model file to use when none is named: `tailwise.format.default_model()` ($TAILWISE_MODEL, else the
    model shipped with tailwise), the one rule of serve, predict, tailwise.load() and the Bento. A user's own
    models are used only when named; nothing is chosen by modification time."""
    from tailwise.format import MODEL_ENV, default_model

    where = default_model()
    try:
        return resolve_model_path(where)
    except UserError as exc:
        raise UserError(f"{MODEL_ENV}: {exc}" if os.environ.get(MODEL_ENV) else str(exc)) from None


# --------------------------------------------------------------------------------------------- inference

class OnnxClassifier:
    """An exported tailwise model in an onnxruntime session.

    `providers`: onnxruntime execution providers in order of preference; default CUDA first when this
    onnxruntime has it, then CPU. `.providers` lists those the session really uses.
    `intra_op_threads`: CPU threads per inference call (default: onnxruntime's, one per physical core).
    `verify`: check the file against its folder's manifest before loading (serving.integrity; None: unless
    TAILWISE_VERIFY=0); the session is built from the very bytes that were checked.
    `spinning`: False stops onnxruntime's idle threads from busy-waiting for the next call (cores shared with
    request handling, as in the service); None keeps onnxruntime's default (spinning).
    """

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None,
                 intra_op_threads: int | None = None, verify: bool | None = None, spinning: bool | None = None):
        self.path = resolve_model_path(path)
        data = read_verified(self.path, verify)
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        if spinning is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self.session = ort.InferenceSession(data, options, providers=providers)
        except Exception as exc:  # onnxruntime's InvalidProtobuf, Fail, NoSuchFile ...
            raise UserError(f"{self.path}: onnxruntime cannot load this model ({exc})") from None
        self.meta = metadata_from_props(self.session.get_modelmeta().custom_metadata_map, self.path)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [(i.name, i.type) for i in inputs] != [(INPUT_NAME, "tensor(uint8)")] or outputs[0].name != OUTPUT_NAME:
            raise UserError(f"{self.path}: graph must take one uint8 input {INPUT_NAME!r} and output "
                            f"{OUTPUT_NAME!r}, has inputs {[(i.name, i.type) for i in inputs]}, "
                            f"outputs {[o.name for o in outputs]}")
        self.providers = self.session.get_providers()
        spec = self.meta["input"]
        self.input_shape = (spec["channels"], spec["height"], spec["width"])
        self.class_names = self.meta["class_names"]

    def predict_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits float32 [N, num_classes] for uint8 pixels [N, C, H, W]."""
        batch = np.asarray(batch)
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != self.input_shape:
            raise ValueError(f"expected uint8 [N, {', '.join(map(str, self.input_shape))}], "
                             f"got {batch.dtype} {list(batch.shape)}")
        if len(batch) == 0:
            return np.zeros((0, self.meta["num_classes"]), dtype=np.float32)
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch)})
        return logits.astype(np.float32, copy=False)

    def adjusted_logits(self, logits: np.ndarray) -> np.ndarray:
        """Logits with the metadata's logit adjustment, if any (tailwise.format.adjust_logits: logits - tau *
        log_prior, the log of the class frequencies the metadata's `prior` names), float32."""
        return served_logits(logits, self.meta)

    def check_top_k(self, k: int) -> int:
        """`k` if 1 <= k <= num_classes, else ValueError: the one top_k rule of `predict` and the service."""
        n = self.meta["num_classes"]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"top_k must be an integer from 1 to {n} (this model's classes), got {k!r}")
        return k

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """float64 [N, num_classes]: the softmax of the adjusted logits, what every answer reports."""
        return conformal.softmax(self.adjusted_logits(logits))

    def top_k(self, logits: np.ndarray, k: int = 3) -> list[list[dict]]:
        """Per image, the k most probable classes (softmax of the adjusted logits), best first, as
        {"label", "index", "probability", "group"}. `k` must pass check_top_k."""
        return self._top_k(self.probabilities(logits), self.check_top_k(k))

    def _top_k(self, probs: np.ndarray, k: int, digits: int | None = None) -> list[list[dict]]:
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[{"label": self.class_names[c], "index": int(c),
                  "probability": float(row[c]) if digits is None else round(float(row[c]), digits),
                  "group": self.meta["groups"][c]} for c in top] for row, top in zip(probs, order)]

    def sets_level(self, coverage: float | str | None = None) -> dict | None:
        """The calibrated level of this model's prediction sets that `coverage` chooses (tailwise.conformal.level:
        None the model's default, or None when it has no sets; "off" none; a number one it calibrated, else
        ValueError naming them)."""
        return conformal.level(self.meta["prediction_sets"], coverage)

    def answers(self, logits: np.ndarray, k: int = 3, coverage: float | str | dict | None = None,
                digits: int | None = None) -> list[dict]:
        """The answer for each image, as `tailwise predict`, the Python API and the service give it:
        {"predictions": top-k records (see top_k), "set": [labels] of the conformal prediction set, most probable
        first, "unsure": whether the set is other than exactly one label}; "set" and "unsure" are None when the
        model has no prediction sets or they are turned off. `coverage`: as sets_level (or a level it returned).
        `digits`: round the probabilities to that many decimals."""
        k = self.check_top_k(k)
        chosen = coverage if isinstance(coverage, dict) else self.sets_level(coverage)
        probs = self.probabilities(logits)
        tops = self._top_k(probs, k, digits)
        if chosen is None:
            return [{"predictions": top, "set": None, "unsure": None} for top in tops]
        masks = conformal.prediction_sets(probs, chosen)
        order = np.argsort(-probs, axis=1, kind="stable")
        sets = [[self.class_names[c] for c in row_order if mask[c]] for row_order, mask in zip(order, masks)]
        return [{"predictions": top, "set": labels, "unsure": len(labels) != 1} for top, labels in zip(tops, sets)]
