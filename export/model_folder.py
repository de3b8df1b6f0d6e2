"""`export_run`: a run's final classifier to a model folder, whole or not at all. `tailwise export` (export/cli.py)
and `tailwise.export` call it.

The folder is built in a temporary sibling `.NAME.new-*` (staged_folder) and only then moved to `out`; the
format of what it writes (file names, metadata, manifest) is tailwise/format.py's. Importing this module imports
no torch (export_run imports it when called).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tailwise import OptionError, UserError
from tailwise import format as fmt
from tailwise.conformal import DEFAULT_COVERAGE

DEFAULT_OPSET = 18  # the lowest the dynamo exporter writes; the one default (export_classifier's too)
VARIANTS = fmt.VARIANTS
CALIBRATION_IMAGES = 256  # validation images (disjoint from the parity images) that calibrate int8


def check_out(out: Path, force: bool, run: str | os.PathLike | None = None) -> None:
    """Refuse an `out` whose replacing could delete what export did not write: a file; the current folder, a
    folder above it, or the run (`run`) or a folder above it; a folder with any file a model folder does not
    hold (named, force or not); a model folder (manifest.json + model.onnx) unless `force`."""
    if out.exists() and not out.is_dir():
        raise OptionError(f"{{out}} {out} exists and is not a folder", "out")
    where = out.resolve()
    inside = [Path.cwd().resolve()] + ([Path(run).resolve()] if run is not None else [])
    for path in inside:
        if where == path or where in path.parents:
            what = "the current folder" if path == inside[0] else f"the run {run}"
            raise OptionError(f"{{out}} {out} is {what}{' or a folder above it' if where != path else ''}; "
                              "export into a new folder, e.g. {out=models/NAME}", "out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    foreign = fmt.foreign_files(out)
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise OptionError(f"{{out}} {out} holds files export did not write ({shown}); replacing it would delete "
                          "them, so export refuses (even with {force}): choose another {out}", "out", "force")
    if not fmt.is_model_folder(out):
        raise OptionError(f"{{out}} {out} holds model files but no {fmt.MANIFEST_FILE} and {fmt.MODEL_FILE} "
                          "(not a whole tailwise model folder), so export does not replace it: choose another {out}",
                          "out")
    if not force:
        raise OptionError(f"{{out}} {out} already holds a tailwise model; pass {{force=True}} to replace it, "
                          "or choose another {out}", "out", "force")


@contextlib.contextmanager
def staged_folder(out: Path, force: bool = False, run: str | os.PathLike | None = None):
    """Yield a new empty folder beside `out` to write into; when the block succeeds it becomes `out` as a whole.

    An existing `out` (non-empty only when it holds a tailwise model and nothing else, and `force`; check_out)
    is renamed aside and deleted after the new folder is in place;
    if the block fails, the new folder is deleted and `out` is left exactly as it was.
    """
    out = Path(out)
    check_out(out, force, run)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)   # mkdtemp makes it owner-only
        check_out(out, force, run)  # nothing appeared there while we exported
        swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_in(new: Path, out: Path) -> None:
    """Move the folder `new` to `out`: an existing `out` is renamed aside first (and put back if the move fails),
    then deleted."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old)  # old is empty, so the folder moves onto it
    try:
        os.replace(new, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def served_adjustment(card: dict) -> dict | None:
    """The logit adjustment a classifier card serves ({"tau", "log_prior", "prior"}), or None (none chosen, or
    tau 0). A card from before the prior was named is a stage-2 card (only those chose one): its prior is the
    stage-2 subset's class counts."""
    la = card.get("logit_adjustment")
    if not la or not la.get("tau"):
        return None
    return {"tau": la["tau"], "log_prior": la["log_prior"], "prior": la.get("prior", fmt.PRIOR_STAGE2_SUBSET)}


def metadata_from_card(card: dict) -> dict:
    """The model's metadata (tailwise.format.build_metadata) of a classifier checkpoint card."""
    from tailwise.training.data import group_thresholds

    data = card["data"]
    build = data.get("build_args", {})
    counts = data["counts"]
    bands = data.get("group_thresholds")   # cards before they recorded their bands: computed as they were
    many, few = ((bands["many_above"], bands["few_below"]) if bands else
                 group_thresholds(len(counts), build.get("many_threshold"), build.get("few_threshold")))
    height, width = data["image_size"]
    return fmt.build_metadata(
        class_names=data["class_names"], channels=data["channels"], height=height, width=width,
        resize_policy=fmt.resize_policy_of(data), train_counts=counts, groups=data["groups"],
        group_thresholds={"many_above": many, "few_below": few},
        dataset={"name": build.get("dataset", data.get("name")), "index_sha256": data.get("index_sha256")},
        weights_sha256=card.get("weights_sha256"),
        metrics=card.get("test") or {},  # training writes the final test report under "test"
        logit_adjustment=served_adjustment(card))


def export_run(run: str | os.PathLike, out: str | os.PathLike, *, force: bool = False, variants: Sequence[str] = (),
               parity_images: int = 256, opset: int = DEFAULT_OPSET, samples: int = 0,
               coverage: float | Sequence[float] | None = DEFAULT_COVERAGE) -> dict:
    """Export a run's final classifier (`run`: a run folder, or a classifier checkpoint card or weights file) to
    the model folder `out` and return the export report (also in the folder's card).

    The folder holds the ONNX model (uint8 pixels in, logits out, the metadata), its weights, its card and
    manifest, the model card README and, with `samples` K > 0, K test images per class with their predictions.
    It is kept only if onnxruntime reproduces torch on `parity_images` validation images (else
    ExportParityError, and `out` is left as it was); an `out` that holds a tailwise model is replaced only with
    `force`, one that holds anything else never (check_out).
    `variants`: extra precisions of the model to write ("fp16", "int8"; one that cannot be made here is
    reported as skipped in report["variants"]).
    `coverage`: the coverage (or coverages, the first the default an answer carries) of the conformal
    prediction sets to calibrate on the run's validation split (export.calibrate); None: a model without sets. A coverage the split is too
    small for is left out, and said so in report["prediction_sets"]["skipped"]."""
    import numpy as np

    from tailwise.export.calibrate import add_prediction_sets, check_coverages
    from tailwise.export.model_card import write_model_card, write_samples
    from tailwise.export.onnx_export import export_classifier
    from tailwise.training.checkpoint import load_classifier
    from tailwise.training.data import rebuild_lt_data

    variants = tuple(dict.fromkeys(variants))
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise OptionError(f"{{variants}}: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}",
                          "variants")
    if parity_images < 1:
        raise OptionError(f"{{parity_images}} must be >= 1, got {parity_images}", "parity_images")
    coverages = () if coverage is None else check_coverages(coverage)
    out = Path(out)
    check_out(out, force, run)  # before the slow part
    model, card = load_classifier(run)
    meta = metadata_from_card(card)
    data = rebuild_lt_data(card["data"]["build_args"], card["data"].get("index_sha256"), run)
    if not len(data.val_idx):
        raise UserError(f"{run}: its data has no validation split (val_per_class 0) to check parity on")
    order = np.random.default_rng(0).permutation(data.val_idx)  # a class-balanced draw from the sorted split
    parity_idx = np.sort(order[:parity_images])
    sample_idx = np.sort(order[parity_images:parity_images + CALIBRATION_IMAGES])
    parity = data.train_source.load(parity_idx)
    calibration = data.train_source.load(sample_idx) if len(sample_idx) else parity
    weights_file = Path(card["_dir"]) / card["weights"] if "_dir" in card and "weights" in card else None
    with staged_folder(out, force, run) as staging:
        report = export_classifier(model, meta, staging, calibration, parity, opset=opset, variants=variants,
                                   parity_labels=data.train_source.labels[parity_idx], weights_file=weights_file,
                                   card=card)
        report["prediction_sets"] = add_prediction_sets(staging, data, coverages) if coverages else None
        sampled = write_samples(staging, data, samples) if samples > 0 else None
        write_model_card(staging, card, report, sampled, name=out.name)
    report["files"] = [str(out / Path(f).name) for f in report["files"]]
    return report
