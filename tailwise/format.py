"""The one format shared by training, export and serving: file names, the model's metadata, its manifest and the
logit adjustment. json, os and numpy only (no torch, no onnx), so every layer reads it without importing another
(docs/ARCHITECTURE.md; tests/test_import_rules.py). Nothing outside this module spells these out.

Run folder (training writes it, export reads it):

    stage{N}.json                         a stage's checkpoint card (training/checkpoint.py), written last
    stage{N}-e{epoch:04d}.safetensors     its weights
    stage{N}-e{epoch:04d}.resume.safetensors   its optimizer state (and stage 2's IP-DPP subset)
    stage{N}_metrics.jsonl                one line per epoch
    stage2_redraws.jsonl                  one line per IP-DPP draw
    eval/report.json, eval/per_class.png  the final classifier's test report

Model folder (export writes it, serving reads it):

    model.onnx              pixels uint8[N, C, H, W] -> logits float32[N, num_classes], with the metadata below
    model.{fp16,int8}.onnx  optional variants (same metadata), model.{variant}.json their reports
    weights.safetensors     the torch weights
    card.json               {"metadata", "export", "training"}: the metadata, the export report, the training card
    manifest.json           size and sha256 of each file above (MANIFEST_FORMAT), checked before loading
    README.md, per_class.png, samples/   the model card (not in the manifest)

Metadata: `model.onnx` carries one `metadata_props` entry, key METADATA_KEY ("tailwise"), whose value is a JSON
object (format FORMAT_VERSION):

    format_version     int, FORMAT_VERSION
    tailwise_version   str, the tailwise that exported the model
    class_names        [str] * num_classes
    num_classes        int
    input              {"name": "pixels", "dtype": "uint8", "layout": "NCHW", "range": [0, 255],
                        "channels": 1 or 3, "height": int, "width": int, "resize_policy": one of RESIZE_POLICIES}
    train_counts       [int] * num_classes, training images per class
    groups             ["many" | "medium" | "few"] * num_classes
    group_thresholds   {"many_above": int, "few_below": int}: many = count > many_above, few = count < few_below
    logit_adjustment   null or {"tau": float, "log_prior": [float] * num_classes, "prior": one of PRIORS}:
                        served logits = logits - tau * log_prior (adjust_logits), log_prior = log of the class
                        frequencies `prior` names: "stage2-subset" (the class counts of stage 2's last IP-DPP
                        subset, what the stage-2 classifier trained on) or "train" (the training set's counts)
    metrics            dict, the test report of the exported model (may be empty)
    weights_sha256     sha256 of the weights.safetensors shipped next to model.onnx (or null)
    dataset            {"name": str, "index_sha256": str or null}, the training set and its LT index hash
    prediction_sets    null or the conformal calibration of this model file (tailwise/conformal.py): {"score":
                        "lac", "split": "validation", "num_images": int, "class_counts": [int] * num_classes,
                        "confidence": float or null, "default": float, "levels": [{"coverage": float in (0, 1), "conditional": "class" |
                        "group" | "marginal", "thresholds": [float] * num_classes}]}; class c is in an answer's
                        set when 1 - its served probability <= thresholds[c]
    created_at         ISO 8601 UTC time of the export

Older formats are read as the current one: format 1 (before `prior`) as format 2, since a format-1 model adjusts
only stage-2 classifiers, by their subset's counts, so its prior is "stage2-subset"; format 2 (before
`prediction_sets`) as format 3 without sets.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from tailwise import UserError, __version__
from tailwise._core import GROUP_NAMES, RESIZE_POLICIES, sha256_bytes

# --------------------------------------------------------------------------------------------- run folder

STAGE_CARDS = "stage*.json"                 # glob of a run's checkpoint cards
REDRAWS_LOG = "stage2_redraws.jsonl"
EVAL_DIR = "eval"                           # the final classifier's test report, in the run folder
REPORT_FILE = "report.json"
PER_CLASS_PLOT = "per_class.png"


def stage_card(stage: int) -> str:
    """A stage's checkpoint card, the commit point of its checkpoint: stage{N}.json."""
    return f"stage{stage}.json"


def stage_weights(stage: int, epoch: int) -> str:
    return f"stage{stage}-e{epoch:04d}.safetensors"


def stage_resume(stage: int, epoch: int) -> str:
    return f"stage{stage}-e{epoch:04d}.resume.safetensors"


def stage_tensor_files(stage: int) -> str:
    """Glob of a stage's weights and resume files, of every epoch."""
    return f"stage{stage}-e*.safetensors"


def stage_metrics_log(stage: int) -> str:
    return f"stage{stage}_metrics.jsonl"


# --------------------------------------------------------------------------------------------- model folder

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.json"
MANIFEST_FILE = "manifest.json"
README_FILE = "README.md"
SAMPLES_DIR = "samples"
VARIANTS = ("fp16", "int8")   # the variants export can write beside model.onnx (model.<variant>.onnx)


def variant_model(variant: str) -> str:
    """model.{variant}.onnx: an extra precision of model.onnx (fp16, int8)."""
    return f"model.{variant}.onnx"


def variant_report(variant: str) -> str:
    return f"model.{variant}.json"


# The files a manifest lists (those export writes, as globs), never itself.
MODEL_FILES = (MODEL_FILE, variant_model("*"), variant_report("*"), WEIGHTS_FILE, CARD_FILE)


# Everything export writes into a model folder (the model card's files too): a folder that holds these and
# nothing else is one that `export --force` may replace.
MODEL_FOLDER_FILES = (*MODEL_FILES, MANIFEST_FILE, README_FILE, PER_CLASS_PLOT)


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """The names in `folder` that export did not write there (sorted): everything but MODEL_FOLDER_FILES and a
    samples/ folder of PNGs. Empty for a tailwise model folder (or an empty folder)."""
    folder = Path(folder)
    foreign = []
    for entry in folder.iterdir():
        if entry.name == SAMPLES_DIR and entry.is_dir() and not entry.is_symlink():
            foreign += [f"{SAMPLES_DIR}/{p.name}" for p in entry.iterdir()
                        if not (p.suffix == ".png" and p.is_file() and not p.is_symlink())]
        elif not (entry.is_file() and not entry.is_symlink()
                  and any(entry.match(pattern) for pattern in MODEL_FOLDER_FILES)):
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return sorted(foreign)


def is_model_folder(folder: str | os.PathLike) -> bool:
    """A folder with a manifest and a model.onnx and nothing export would not have written."""
    folder = Path(folder)
    return ((folder / MANIFEST_FILE).is_file() and (folder / MODEL_FILE).is_file()
            and not foreign_files(folder))


def model_file_of(path: str | os.PathLike) -> Path:
    """A model folder's model.onnx, or `path` itself when it names a file (no check that it exists)."""
    path = Path(path)
    return path / MODEL_FILE if path.is_dir() else path


# --------------------------------------------------------------------------------------------- the default model

SHIPPED_MODEL = "models/fmnist-lt-tailwise"   # the model tailwise ships, relative to the source tree's root
MODEL_ENV = "TAILWISE_MODEL"
# Where a shipped model can be: the source tree (a checkout, a Bento's src/) above the package, or inside it (a
# wheel that carries the model as package data).
_PACKAGE = Path(__file__).resolve().parent
SHIPPED_ROOTS = (_PACKAGE.parent, _PACKAGE)


def shipped_model() -> Path | None:
    """The model folder shipped with this tailwise, or None where this install does not carry it."""
    for root in SHIPPED_ROOTS:
        if (root / SHIPPED_MODEL / MODEL_FILE).is_file():
            return root / SHIPPED_MODEL
    return None


def default_model() -> Path:
    """The model used when none is named (one rule for serve, predict, tailwise.load() and the Bento):
    $TAILWISE_MODEL (a model folder or .onnx file), else the model shipped with tailwise. A user's own models
    are used only when named; nothing is chosen by modification time. UserError saying how, when neither is
    there."""
    env = os.environ.get(MODEL_ENV)
    if env:
        if not Path(env).exists():
            raise UserError(f"{MODEL_ENV}={env}: no such model folder or file")
        return Path(env)
    found = shipped_model()
    if found is None:
        raise UserError(f"no model named, {MODEL_ENV} is not set, and this install does not carry the shipped "
                        f"model ({SHIPPED_MODEL} is in the tailwise repository): name a model folder, or set "
                        f"{MODEL_ENV}")
    return found


def find_model(path: str | os.PathLike) -> Path:
    """`path` as given when it exists; the shipped model when `path` names it (models/fmnist-lt-tailwise) and
    the current folder has no such folder (outside the checkout); else UserError saying how."""
    path = Path(path)
    if path.exists():
        return path
    if not path.is_absolute():
        rel = Path(os.path.normpath(path))
        shipped = shipped_model()
        if shipped is not None and rel in (Path(SHIPPED_MODEL), Path(SHIPPED_MODEL) / MODEL_FILE):
            return shipped / rel.relative_to(SHIPPED_MODEL)
        if rel in (Path(SHIPPED_MODEL), Path(SHIPPED_MODEL) / MODEL_FILE):
            raise UserError(f"{path}: not here, and this install does not carry the shipped model (it is in the "
                            f"tailwise repository: run from a checkout, or pass the full path of a model folder)")
    raise UserError(f"{path}: no such model folder or file")


# --------------------------------------------------------------------------------------------- preprocessing

# Data sets whose images are stored at their native small size: a user's image is resized to it whole. Cards
# written before training recorded `resize_policy` are read by this rule (the one export used to guess with).
_NATIVE_SIZE_DATASETS = ("fmnist", "cifar10", "cifar100")


def resize_policy_of(data_card: dict) -> str:
    """The resize policy a training card's `data` records (training.data.LTData.card: "resize" for the in-memory
    sets, "shorter-center-crop" for file data, which training decodes that way); for an older card without it,
    the rule those cards were exported by: "resize" for fmnist/cifar, else "shorter-center-crop"."""
    policy = data_card.get("resize_policy")
    if policy is not None:
        if policy not in RESIZE_POLICIES:
            raise UserError(f"training card: data.resize_policy {policy!r} is not one of {RESIZE_POLICIES}")
        return policy
    dataset = (data_card.get("build_args") or {}).get("dataset", data_card.get("name"))
    return "resize" if dataset in _NATIVE_SIZE_DATASETS else "shorter-center-crop"


# --------------------------------------------------------------------------------------------- logit adjustment

PRIOR_STAGE2_SUBSET = "stage2-subset"   # the class counts of stage 2's (last) IP-DPP subset
PRIOR_TRAIN = "train"                   # the training set's class counts
PRIORS = (PRIOR_STAGE2_SUBSET, PRIOR_TRAIN)


def log_prior(counts) -> list[float]:
    """log(counts / sum(counts)) per class (computed in float64): the prior a logit adjustment subtracts."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.log(counts / counts.sum()).tolist()


def adjust_logits(logits, tau: float, log_prior) -> np.ndarray:
    """The one logit adjustment: logits - tau * log_prior, in float32 (what serving returns, what training scores
    and chooses tau by). `logits` [N, num_classes] (numpy or anything np.asarray takes)."""
    return (np.asarray(logits, dtype=np.float32)
            - np.float32(tau) * np.asarray(log_prior, dtype=np.float32))


def served_logits(logits, meta: dict) -> np.ndarray:
    """`logits` with the metadata's logit adjustment, if it has one (float32)."""
    la = meta["logit_adjustment"]
    return np.asarray(logits, dtype=np.float32) if la is None else adjust_logits(logits, la["tau"], la["log_prior"])


# --------------------------------------------------------------------------------------------- metadata

# The metadata format this tailwise writes. Reading: a newer format is refused (upgrade tailwise); an older one
# is read if it is at least MIN_FORMAT_VERSION (upgraded to the current fields by parse_metadata), else refused
# (re-export the run). Format 3 added prediction_sets, format 2 named the served prior (logit_adjustment.prior);
# format 1 is the first.
FORMAT_VERSION = 3
MIN_FORMAT_VERSION = 1
METADATA_KEY = "tailwise"
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"


def build_metadata(*, class_names, channels, height, width, resize_policy, train_counts, groups, group_thresholds,
                   dataset, weights_sha256=None, metrics=None, logit_adjustment=None, prediction_sets=None,
                   created_at=None) -> dict:
    """Assemble and validate the metadata object (see the module docstring for the fields). `logit_adjustment`:
    None or {"tau", "log_prior", "prior"}; `prediction_sets`: None or tailwise.conformal.calibrate's record."""
    class_names = [str(name) for name in class_names]
    meta = {
        "format_version": FORMAT_VERSION,
        "tailwise_version": __version__,
        "class_names": class_names,
        "num_classes": len(class_names),
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW", "range": [0, 255],
                  "channels": int(channels), "height": int(height), "width": int(width),
                  "resize_policy": resize_policy},
        "train_counts": [int(n) for n in train_counts],
        "groups": list(groups),
        "group_thresholds": {key: int(value) for key, value in dict(group_thresholds).items()},
        "logit_adjustment": None if logit_adjustment is None else {
            "tau": float(logit_adjustment["tau"]),
            "log_prior": [float(v) for v in logit_adjustment["log_prior"]],
            "prior": logit_adjustment.get("prior")},
        "metrics": dict(metrics or {}),
        "weights_sha256": weights_sha256,
        "dataset": {"name": str(dataset["name"]), "index_sha256": dataset.get("index_sha256")},
        "prediction_sets": prediction_sets,
        "created_at": created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return validate_metadata(meta)


def validate_metadata(meta: dict) -> dict:
    """Check a metadata object against the schema; raises ValueError naming the first bad field. Returns `meta`."""
    def need(ok, field, what):
        if not ok:
            raise ValueError(f"tailwise metadata: {field} must be {what}, got {meta.get(field, '<missing>')!r:.200}")

    need(isinstance(meta, dict), "<root>", "a JSON object")
    need(meta.get("format_version") == FORMAT_VERSION, "format_version", f"{FORMAT_VERSION}")
    names = meta.get("class_names")
    need(isinstance(names, list) and names and all(isinstance(n, str) for n in names), "class_names",
         "a non-empty list of strings")
    n = len(names)
    need(meta.get("num_classes") == n, "num_classes", f"len(class_names) = {n}")
    spec = meta.get("input")
    need(isinstance(spec, dict), "input", "an object")
    fixed = {"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW", "range": [0, 255]}
    need(all(spec.get(k) == v for k, v in fixed.items()), "input", f"an object with {fixed}")
    need(spec.get("channels") in (1, 3), "input", "an object with channels 1 or 3")
    need(all(isinstance(spec.get(k), int) and spec[k] > 0 for k in ("height", "width")), "input",
         "an object with positive integer height and width")
    need(spec.get("resize_policy") in RESIZE_POLICIES, "input", f"an object with resize_policy in {RESIZE_POLICIES}")
    counts = meta.get("train_counts")
    need(isinstance(counts, list) and len(counts) == n and all(isinstance(c, int) and c >= 0 for c in counts),
         "train_counts", f"{n} non-negative integers")
    groups = meta.get("groups")
    need(isinstance(groups, list) and len(groups) == n and all(g in GROUP_NAMES for g in groups), "groups",
         f"{n} of {GROUP_NAMES}")
    thresholds = meta.get("group_thresholds")
    need(isinstance(thresholds, dict) and set(thresholds) == {"many_above", "few_below"}
         and all(isinstance(v, int) for v in thresholds.values()), "group_thresholds",
         "{'many_above': int, 'few_below': int}")
    la = meta.get("logit_adjustment")
    need(la is None or (isinstance(la, dict) and set(la) == {"tau", "log_prior", "prior"}
                        and isinstance(la["tau"], (int, float)) and math.isfinite(la["tau"])
                        and isinstance(la["log_prior"], list) and len(la["log_prior"]) == n
                        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in la["log_prior"])
                        and la["prior"] in PRIORS),
         "logit_adjustment", f"null or {{'tau': float, 'log_prior': {n} finite floats, 'prior': one of {PRIORS}}}")
    need(isinstance(meta.get("metrics"), dict), "metrics", "an object")
    sha = meta.get("weights_sha256")
    need(sha is None or (isinstance(sha, str) and len(sha) == 64), "weights_sha256", "null or a sha256 hex digest")
    ds = meta.get("dataset")
    need(isinstance(ds, dict) and isinstance(ds.get("name"), str) and "index_sha256" in ds, "dataset",
         "{'name': str, 'index_sha256': str or null}")
    need("prediction_sets" in meta and _valid_sets(meta["prediction_sets"], n), "prediction_sets",
         f"null or {{'score': 'lac', 'split', 'num_images', 'class_counts', 'confidence', 'default', 'levels': [{{'coverage', "
         f"'conditional', 'thresholds': {n} floats}}]}}")
    need(isinstance(meta.get("tailwise_version"), str), "tailwise_version", "a string")
    need(isinstance(meta.get("created_at"), str), "created_at", "an ISO 8601 string")
    return meta


def _valid_sets(record, n: int) -> bool:
    """The shape of a prediction_sets record (tailwise/conformal.py) for n classes, or None."""
    if record is None:
        return True
    if not isinstance(record, dict):
        return False

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    levels = record.get("levels")
    confidence = record.get("confidence")   # absent in the first format-3 records: the classic rank
    return (set(record) - {"confidence"} == {"score", "split", "num_images", "class_counts", "default", "levels"}
            and record["score"] == "lac" and isinstance(record["split"], str)
            and (confidence is None or number(confidence) and 0 < confidence < 1)
            and isinstance(record["num_images"], int)
            and isinstance(record["class_counts"], list) and len(record["class_counts"]) == n
            and all(isinstance(c, int) and c >= 0 for c in record["class_counts"])
            and isinstance(levels, list) and len(levels) >= 1
            and all(isinstance(lv, dict) and set(lv) == {"coverage", "conditional", "thresholds"}
                    and number(lv["coverage"]) and 0 < lv["coverage"] < 1
                    and lv["conditional"] in ("class", "group", "marginal")
                    and isinstance(lv["thresholds"], list) and len(lv["thresholds"]) == n
                    and all(number(t) for t in lv["thresholds"]) for lv in levels)
            and len({lv["coverage"] for lv in levels}) == len(levels)
            and record["default"] in [lv["coverage"] for lv in levels])


def _upgrade(meta: dict) -> dict:
    """An older format's metadata in the current format's fields (format 1 -> 2: the served prior named; 2 -> 3:
    no prediction sets)."""
    if meta.get("format_version") == 1:
        la = meta.get("logit_adjustment")
        meta = dict(meta, format_version=2,
                    logit_adjustment=dict(la, prior=PRIOR_STAGE2_SUBSET) if isinstance(la, dict) else la)
    if meta.get("format_version") == 2:
        meta = dict(meta, format_version=3, prediction_sets=None)
    return meta


def parse_metadata(text: str | None, where: str | os.PathLike) -> dict:
    """The metadata object from its JSON text (an older format upgraded); UserError naming `where` if it is
    absent, invalid, or of a format this tailwise does not read."""
    if text is None:
        raise UserError(f"{where}: no '{METADATA_KEY}' metadata in this ONNX model (export it with `tailwise export`)")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: '{METADATA_KEY}' metadata is not valid JSON ({exc})") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise UserError(f"{where}: model format {version} is newer than this tailwise {__version__} reads "
                        f"(format {FORMAT_VERSION}); upgrade tailwise (pip install -U tailwise)")
    if isinstance(meta, dict) and (not isinstance(version, int) or version < MIN_FORMAT_VERSION):
        raise UserError(f"{where}: model format {version} is older than this tailwise {__version__} reads "
                        f"(formats {MIN_FORMAT_VERSION}..{FORMAT_VERSION}); re-export the run with `tailwise export`")
    try:
        return validate_metadata(_upgrade(meta))
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None


def metadata_from_props(props, where: str | os.PathLike) -> dict:
    """The metadata of an ONNX model from its metadata properties (a {key: value} mapping, as onnxruntime's
    custom_metadata_map or {p.key: p.value for p in proto.metadata_props})."""
    return parse_metadata(props.get(METADATA_KEY), where)


def write_metadata(onnx_model, meta: dict) -> None:
    """Validate `meta` and store it as the ONNX ModelProto's METADATA_KEY metadata_props entry (replacing an older
    one). Duck-typed on the proto, so this module needs no onnx."""
    text = json.dumps(validate_metadata(meta), sort_keys=True)
    kept = [p for p in onnx_model.metadata_props if p.key != METADATA_KEY]
    del onnx_model.metadata_props[:]
    onnx_model.metadata_props.extend(kept)
    onnx_model.metadata_props.add(key=METADATA_KEY, value=text)


# --------------------------------------------------------------------------------------------- manifest

MANIFEST_FORMAT = 1   # {"format_version": 1, "files": {name: {"size": int, "sha256": str}}}


def model_files(folder: str | os.PathLike) -> list[str]:
    """The names in `folder` that a manifest covers (MODEL_FILES that exist), sorted."""
    folder = Path(folder)
    return sorted({p.name for pattern in MODEL_FILES for p in folder.glob(pattern) if p.is_file()})


def build_manifest(folder: str | os.PathLike, names: list[str] | None = None) -> dict:
    """The manifest of `names` (default: model_files(folder)) in `folder`."""
    folder = Path(folder)
    names = model_files(folder) if names is None else sorted(names)
    files = {}
    for name in names:
        data = (folder / name).read_bytes()
        files[name] = {"size": len(data), "sha256": sha256_bytes(data)}
    return {"format_version": MANIFEST_FORMAT, "files": files}


def write_manifest(folder: str | os.PathLike, names: list[str] | None = None) -> Path:
    """Write `folder`/manifest.json for `names` (default: model_files(folder)), atomically; returns its path."""
    folder = Path(folder)
    manifest = build_manifest(folder, names)
    if not manifest["files"]:
        raise UserError(f"{folder}: no model files ({', '.join(MODEL_FILES)}) to put in a manifest")
    path, tmp = folder / MANIFEST_FILE, folder / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def parse_manifest(text: str, where: str | os.PathLike) -> dict:
    """A manifest from its JSON text, checked for shape; UserError naming `where` if it is not one."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: unreadable manifest ({exc})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    ok = (isinstance(files, dict) and manifest.get("format_version") == MANIFEST_FORMAT
          and all(isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
                  and len(v["sha256"]) == 64 for v in files.values()))
    if not ok:
        raise UserError(f"{where}: not a tailwise manifest (format {MANIFEST_FORMAT}: "
                        "{\"format_version\", \"files\": {name: {\"size\", \"sha256\"}}})")
    return manifest
