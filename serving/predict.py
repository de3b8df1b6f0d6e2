"""Batch prediction over image files with an exported model: the engine of `tailwise predict`.

Inputs are files, folders (searched recursively for IMAGE_EXTENSIONS, hidden files and folders skipped),
glob patterns (`**` recurses) or `@list.txt` files holding one input a line (blank lines and `#` comments
skipped; relative paths are relative to the current directory). The expanded list is de-duplicated and
sorted, so `--shard i/n` (keep every file whose position in that sorted list, mod n, is i) splits one job
into n disjoint parts that together cover every file, on any machine that sees the same paths.

Each file gives one record, in sorted order:
    {"path": str, "predictions": [{"label", "index", "probability", "group"}, ...], "set": [str, ...],
     "unsure": bool, "error": null}
("set": the labels of the image's conformal prediction set at the chosen coverage, most probable first; "unsure":
the set is not exactly one label; both null when the model has no prediction sets or `coverage` is "off"),
or, for a file that cannot be read as an image, {"path": str, "predictions": [], "set": null, "unsure": null,
"error": "reason"}.

Two engines give the same records in the same order, each input exactly once: "local" (predict_files: a
thread pool decodes, this process classifies) and "ray" (serving/ray_engine.py: Ray Data tasks decode, an
actor pool classifies, on one machine or a cluster). Both decode with decode() and classify with classify().
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

import numpy as np
from tqdm import tqdm

from tailwise.serving.artifact import (DEFAULT_MAX_PIXELS, ImageError, OnnxClassifier, default_model_path,
                                       load_image, model_summary)
from tailwise import UserError
from tailwise._core import IMAGE_EXTENSIONS

FORMATS = ("jsonl", "csv", "parquet")  # parquet: the Ray engine only (pyarrow comes with tailwise[ray])
ENGINES = ("local", "ray")


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Sorted, de-duplicated file paths from files, folders, globs and @list files (see the module docstring).
    A path that does not exist (or a glob matching nothing) is kept, so that it is reported as an error."""
    found: set[str] = set()
    for item in inputs:
        if item.startswith("@"):
            list_file = Path(item[1:])
            try:
                lines = list_file.read_text().splitlines()
            except OSError as exc:
                raise UserError(f"{list_file}: cannot read list file ({exc.strerror or exc})") from None
            entries = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        else:
            entries = [item]
        for entry in entries:
            found.update(_expand_one(entry))
    return sorted(found)


def _expand_one(entry: str) -> list[str]:
    if os.path.isdir(entry):
        return _walk(entry)
    if os.path.exists(entry) or not glob.has_magic(entry):
        return [os.path.normpath(entry)]
    matches = glob.glob(entry, recursive=True)
    if not matches:
        return [os.path.normpath(entry)]
    return [p for m in matches for p in (_walk(m) if os.path.isdir(m) else [os.path.normpath(m)])]


def _walk(folder: str) -> list[str]:
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        paths += [os.path.normpath(os.path.join(root, f)) for f in files
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return paths


def describe_sets(chosen: dict | None, meta: dict) -> str:
    """'at 90 % coverage (class-conditional)', or why an answer carries none, for the command's stderr."""
    if chosen is not None:
        return f"at {100 * chosen['coverage']:g} % coverage ({chosen['conditional']}-conditional)"
    return "off" if meta["prediction_sets"] is not None else "none (the model was exported without them)"


def answer_options(classifier: OnnxClassifier, top_k, coverage,
                   names: tuple[str, str] = ("--top-k", "--coverage")) -> tuple[int, dict | None]:
    """(k, the prediction-set level) that `top_k` and `coverage` ask of this model; UserError naming the option as
    the caller spells it (`names`) when the model cannot give it."""
    try:
        k = classifier.check_top_k(top_k)
    except ValueError as exc:
        raise UserError(f"{names[0]}: {exc}") from None
    try:
        return k, classifier.sets_level(coverage)
    except ValueError as exc:
        raise UserError(f"{names[1]}: {exc}") from None


def parse_shard(text: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {text}: need 0 <= i < n")
    return index, count


def select_shard(paths: list[str], index: int, count: int) -> list[str]:
    """The files whose position in `paths` (already sorted) mod `count` equals `index`."""
    return paths[index::count]


def decode(source: str | bytes, meta: dict, max_pixels: int | None = DEFAULT_MAX_PIXELS
           ) -> tuple[np.ndarray | None, str | None]:
    """One image file (or its bytes) -> (the model's input uint8 [C, H, W], None), or (None, reason) for a file
    that cannot be read as an image. Both engines decode with this."""
    try:
        return load_image(source, meta, max_pixels=max_pixels), None
    except ImageError as exc:
        return None, str(exc)


def classify(classifier: OnnxClassifier, paths: list, decoded: list, top_k: int,
             coverage: float | str | None = None) -> list[dict]:
    """The records of one batch (see the module docstring): `decoded` holds decode()'s (array, error) per path;
    the decoded images go through the model in one call (OnnxClassifier.answers: top-k, set, unsure at
    `coverage`). Both engines classify with this."""
    good = [array for array, _ in decoded if array is not None]
    answers = iter(classifier.answers(classifier.predict_arrays(np.stack(good)), top_k, coverage) if good else ())
    failed = {"predictions": [], "set": None, "unsure": None}
    return [{"path": path, **(next(answers) if array is not None else failed), "error": error}
            for path, (array, error) in zip(paths, decoded)]


def predict_files(classifier: OnnxClassifier, paths: list[str], top_k: int = 3, batch_size: int = 64,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS, workers: int | None = None,
                  coverage: float | str | None = None) -> Iterator[dict]:
    """One record per path, in order (see the module docstring): the local engine. Images are decoded by a
    thread pool, one batch ahead of inference."""
    def load(path):
        return decode(path, classifier.meta, max_pixels)

    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        pending = [pool.submit(load, p) for p in batches[0]] if batches else []
        for b, batch in enumerate(batches):
            loaded = [future.result() for future in pending]
            pending = [pool.submit(load, p) for p in batches[b + 1]] if b + 1 < len(batches) else []
            yield from classify(classifier, batch, loaded, top_k, coverage)


def write_jsonl(records: Iterable[dict], stream: TextIO) -> Iterator[dict]:
    for record in records:
        stream.write(json.dumps(record) + "\n")
        yield record


def write_csv(records: Iterable[dict], stream: TextIO, k: int) -> Iterator[dict]:
    """Columns: path, label_1, probability_1, group_1, ..., label_k, probability_k, group_k, set, unsure, error;
    "\n" line ends. `set`: the set's labels joined by "|" (empty for an empty set), `unsure`: true or false; both
    empty cells where the record has none (no sets, or an error)."""
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["path", *(f"{col}_{i}" for i in range(1, k + 1) for col in ("label", "probability", "group")),
                     "set", "unsure", "error"])
    for record in records:
        cells = [value for p in record["predictions"] for value in (p["label"], p["probability"], p["group"])]
        has_set = record.get("set") is not None
        writer.writerow([record["path"], *cells, *[""] * (3 * k - len(cells)),
                         "|".join(record["set"]) if has_set else "",
                         ("true" if record["unsure"] else "false") if has_set else "", record["error"] or ""])
        yield record


def run_predict(inputs: list[str], model: str | None = None, top_k: int = 3, batch_size: int = 64,
                fmt: str = "jsonl", output: str | None = None, shard: str | None = None,
                max_pixels: int | None = DEFAULT_MAX_PIXELS, verify: bool | None = None, engine: str = "local",
                ray_address: str | None = None, actors: int | None = None,
                coverage: float | str | None = None) -> int:
    """`tailwise predict`: write one record per input file; returns 1 if any file failed, else 0.
    `coverage`: the prediction sets' coverage, one the model calibrated (None: its default; "off": no sets).
    `verify`: check the model against its manifest first (None: unless TAILWISE_VERIFY=0). `engine`: "local"
    (this process) or "ray" (serving.ray_engine: a Ray cluster at `ray_address`, default a local one, with
    `actors` model actors); both give the same records in the same order."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if fmt == "parquet" and engine != "ray":
        raise UserError("--format parquet is written by --engine ray (pip install 'tailwise[ray]')")
    if fmt == "parquet" and not output:
        raise UserError("--format parquet needs --output FILE")
    if actors is not None and actors < 1:
        raise UserError(f"--actors must be >= 1, got {actors}")
    if engine == "ray":
        from tailwise.serving import ray_engine

        ray_engine.require_ray()  # the missing extra is a one-line error before any work
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if max_pixels is not None and max_pixels < 1:
        raise UserError(f"--max-pixels must be >= 1, got {max_pixels}")
    index, count = parse_shard(shard)
    all_paths = expand_inputs(inputs)
    if not all_paths:
        raise UserError(f"no input files in {' '.join(inputs)}")
    paths = select_shard(all_paths, index, count)
    classifier = OnnxClassifier(model if model is not None else default_model_path(), verify=verify)
    k, chosen = answer_options(classifier, top_k, coverage)
    c, h, w = classifier.input_shape
    print(f"tailwise predict: model {classifier.path} ({model_summary(classifier.meta)}, input {c}x{h}x{w}, "
          f"{classifier.meta['input']['resize_policy']}); providers: {', '.join(classifier.providers)}",
          file=sys.stderr)
    print(f"tailwise predict: prediction sets {describe_sets(chosen, classifier.meta)}", file=sys.stderr)
    print(f"tailwise predict: {len(paths)} of {len(all_paths)} files (shard {index}/{count})", file=sys.stderr)

    if engine == "ray":
        ray_engine.connect(ray_address)  # a cluster that cannot be reached is an error before the output is opened
    try:
        stream = ((open(output, "wb") if fmt == "parquet" else open(output, "w", newline="")) if output
                  else sys.stdout)
    except OSError as exc:
        raise UserError(f"--output {output}: cannot write ({exc.strerror or exc})") from None
    failed = 0
    try:
        if engine == "ray":
            records = ray_engine.predict_records(classifier, paths, top_k=k, batch_size=batch_size,
                                                 max_pixels=max_pixels, verify=verify, address=ray_address,
                                                 actors=actors, coverage=chosen["coverage"] if chosen else "off")
        else:
            records = predict_files(classifier, paths, top_k=k, batch_size=batch_size, max_pixels=max_pixels,
                                    coverage=chosen or "off")
        records = (write_jsonl(records, stream) if fmt == "jsonl" else write_csv(records, stream, k)
                   if fmt == "csv" else ray_engine.write_parquet(records, stream, k))
        with tqdm(total=len(paths), unit="img", file=sys.stderr, desc="predict") as bar:
            for record in records:
                if record["error"]:
                    failed += 1
                    bar.write(f"tailwise predict: skipped {record['error']}", file=sys.stderr)
                bar.update(1)
    finally:
        if output:
            stream.close()
        else:
            stream.flush()
    print(f"tailwise predict: {len(paths) - failed} predicted, {failed} failed", file=sys.stderr)
    return 1 if failed else 0
