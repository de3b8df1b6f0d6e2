"""The Ray engine of `tailwise predict --engine ray` and `tailwise.predict_dataset`: the same records as the local
engine (serving/predict.py), computed by Ray Data on one machine or a cluster.

    input rows {"path"} or {"path", "bytes"}      (from_items of paths, or ray.data.read_binary_files)
      -> map_batches(_decode_batch)  tasks       predict.decode(): the model's input, or the error record's reason
      -> map_batches(_Classify)      actor pool  one onnxruntime session per actor, loaded and verified once;
                                                 predict.classify(): the records of the batch
      -> rows {"path", "predictions", "set", "unsure", "error", "label", "index", "probability", "group"}
         (top-1 columns: None for an error; set and unsure as predict.py's records)

Decoding scales with the cluster's CPUs (stateless tasks); classifying with the number of actors (`actors`,
default half the cluster's CPUs, at least 1; one CPU and one onnxruntime thread each). Ray Data retries the
work of a task or actor that dies (actors restart), so a killed worker costs time, never a record.
`predict_records` (what the CLI runs) keeps Ray Data's output in input order and checks that the records are
exactly the input paths, each once, in order, before it yields them.

Ray is imported only here, and only when this engine is used; without it, require_ray() is a one-line error
naming the extra.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import numpy as np

from tailwise import UserError
from tailwise.serving.artifact import DEFAULT_MAX_PIXELS, OnnxClassifier
from tailwise.serving.integrity import verify_enabled
from tailwise.serving.predict import answer_options, classify, decode

MISSING = "the Ray engine needs Ray Data: pip install 'tailwise[ray]'"
ACTOR_MEMORY = 256 * 2**20  # bytes an actor asks of the scheduler besides its model file


def require_ray():
    """The `ray` module with Ray Data, or UserError naming the extra."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError(MISSING) from None
    return ray


def connect(address: str | None = None):
    """Join the Ray cluster at `address` ("auto", "ray://host:10001", ...), or start a local one (all this
    machine's CPUs) when None; a Ray already initialised in this process is used as it is."""
    ray = require_ray()
    if not ray.is_initialized():
        _probe(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level="WARNING", configure_logging=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"--ray-address {address}" if address else "a local Ray cluster"
            raise UserError(f"{where}: cannot connect or start ({str(exc).splitlines()[0] if str(exc) else exc!r})"
                            ) from None
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-job INFO lines on the command's stderr
    return ray


def _probe(address: str | None) -> None:
    """A HOST:PORT address that nothing answers on is a one-line error within seconds (ray.init would wait for
    minutes); "auto", ray:// addresses and None are left to Ray."""
    if not address or address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise UserError(f"--ray-address {address}: no Ray cluster answers there ({reason}); start one with "
                        "`ray start --head` or pass its address") from None


def default_actors() -> int:
    """Half the cluster's CPUs (the rest decode), at least 1."""
    ray = require_ray()
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // 2)


def _output_schema():
    import pyarrow as pa

    prediction = pa.struct([("label", pa.string()), ("index", pa.int64()), ("probability", pa.float64()),
                            ("group", pa.string())])
    return pa.schema([("path", pa.string()), ("predictions", pa.list_(prediction)),
                      ("set", pa.list_(pa.string())), ("unsure", pa.bool_()), ("error", pa.string()),
                      ("label", pa.string()), ("index", pa.int64()), ("probability", pa.float64()),
                      ("group", pa.string())])


def _decode_batch(batch: dict, meta: dict, max_pixels: int | None) -> dict:
    """Ray Data task: rows with "path" and/or "bytes" -> "path", "pixels" (uint8 [N, C, H, W]; zeros where the
    image failed) and "error" ("" where it did not)."""
    spec = meta["input"]
    n = len(batch["path"] if "path" in batch else batch["bytes"])
    paths = [str(p) for p in batch["path"]] if "path" in batch else [None] * n
    pixels = np.zeros((n, spec["channels"], spec["height"], spec["width"]), dtype=np.uint8)
    errors = []
    for i in range(n):
        if "bytes" in batch:
            array, error = decode(bytes(batch["bytes"][i]), meta, max_pixels)
            if error and paths[i] is not None and error.startswith("<bytes>"):
                error = paths[i] + error[len("<bytes>"):]  # name the file, as the local engine does
        else:
            array, error = decode(paths[i], meta, max_pixels)
        if array is not None:
            pixels[i] = array
        errors.append(error or "")
    return {"path": np.array(paths, dtype=object), "pixels": pixels, "error": np.array(errors, dtype=object)}


class _Classify:
    """Ray Data actor: one onnxruntime session, loaded (and checked against the manifest) once per actor."""

    def __init__(self, model: str, top_k: int, verify: bool, threads: int, coverage: float | str | None = None):
        self.classifier = OnnxClassifier(model, verify=verify, intra_op_threads=threads, spinning=False)
        self.k = self.classifier.check_top_k(top_k)
        self.level = self.classifier.sets_level(coverage)
        self.schema = _output_schema()

    def __call__(self, batch: dict):
        import pyarrow as pa

        paths = list(batch["path"])
        decoded = [(None, str(error)) if error else (array, None)
                   for array, error in zip(batch["pixels"], batch["error"])]
        records = classify(self.classifier, paths, decoded, self.k, self.level or "off")
        for record in records:
            top = record["predictions"][0] if record["predictions"] else {}
            record.update({key: top.get(key) for key in ("label", "index", "probability", "group")})
        return pa.Table.from_pylist(records, schema=self.schema)


def predict_dataset(dataset, model: str | os.PathLike, *, top_k: int = 3, batch_size: int = 64,
                    actors: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                    verify: bool | None = None, coverage: float | str | None = None):
    """`dataset` (a ray.data.Dataset with a "path" column of image files, or a "bytes" column of image file
    contents, as ray.data.read_binary_files(..., include_paths=True) gives) classified by the exported model at
    `model` (a model folder or .onnx file readable at that path on every node): a Dataset of rows
    {"path", "predictions" (the top_k records of `tailwise predict`), "set", "unsure" (the prediction set at
    `coverage`: None the model's default, "off" none, or another coverage it calibrated), "error" (None, or why
    the image could not be read: such a row has no predictions), "label", "index", "probability", "group" (the
    top-1, None on an error)}. Lazy, like any Dataset; order follows Ray Data's DataContext (execution_options.preserve_order)."""
    ray = require_ray()
    names = set(dataset.columns() or ())
    if not names & {"path", "bytes"}:
        raise UserError(f"predict_dataset: the dataset needs a 'path' or a 'bytes' column, has {sorted(names)}")
    verify = verify_enabled(verify)  # decided here: a cluster's workers do not see this process's environment
    classifier = OnnxClassifier(model, verify=verify)  # fail here, on the driver, for a bad model or top_k
    k, level = answer_options(classifier, top_k, coverage, ("top_k", "coverage"))
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    actors = default_actors() if actors is None else actors
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if cpus < 2:
        raise UserError(f"the Ray engine needs a cluster of at least 2 CPUs (one model actor, one decoding), "
                        f"this one has {cpus}")
    if not 1 <= actors < cpus:
        raise UserError(f"actors must be from 1 to {cpus - 1}: each holds one of the cluster's {cpus} CPUs and "
                        f"decoding needs at least one more, got {actors}")
    keep = [c for c in ("path", "bytes") if c in names]
    decoded = dataset.select_columns(keep).map_batches(
        _decode_batch, fn_kwargs={"meta": classifier.meta, "max_pixels": max_pixels}, batch_size=batch_size,
        batch_format="numpy", num_cpus=1)
    # A dead actor restarts and its batches are retried (Ray Data's defaults for actor pools: max_restarts and
    # max_task_retries -1; tests/test_ray_engine.py kills one mid-run). The actors' memory request (the model and
    # a few batches) also keeps the two stages apart: Ray fuses stages whose resource requests match, and
    # decoding would then run inside the actors and scale with the model instead of with the CPUs.
    return decoded.map_batches(
        _Classify, fn_constructor_kwargs={"model": str(classifier.path), "top_k": k, "verify": verify,
                                          "threads": 1, "coverage": level["coverage"] if level else "off"},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
        memory=ACTOR_MEMORY + os.path.getsize(classifier.path))


def predict_records(classifier: OnnxClassifier, paths: list[str], *, top_k: int = 3, batch_size: int = 64,
                    max_pixels: int | None = DEFAULT_MAX_PIXELS, verify: bool | None = None,
                    address: str | None = None, actors: int | None = None,
                    coverage: float | str | None = None) -> Iterator[dict]:
    """The local engine's records for `paths` (predict.predict_files), computed on the Ray cluster at `address`:
    in input order, each path exactly once (checked: a record out of step or a missing one is an error, never
    a silently wrong file)."""
    ray = connect(address)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    actors = default_actors() if actors is None else actors
    print(f"tailwise predict: Ray engine, {int(ray.cluster_resources().get('CPU', 0))} CPUs, {actors} model "
          f"actor(s), batch {batch_size}", file=sys.stderr)
    blocks = max(1, min(len(paths) // batch_size, 20 * int(ray.cluster_resources().get("CPU", 1))))
    dataset = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
    result = predict_dataset(dataset, classifier.path, top_k=top_k, batch_size=batch_size, actors=actors,
                             max_pixels=max_pixels, verify=verify, coverage=coverage)
    expected = iter(paths)
    for table in result.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in table.select(["path", "predictions", "set", "unsure", "error"]).to_pylist():
            want = next(expected, None)
            if row["path"] != want:
                raise RuntimeError(f"Ray engine: got a record for {row['path']!r} where {want!r} was due "
                                   "(not exactly once, in order)")
            yield row
    missing = next(expected, None)
    if missing is not None:
        raise RuntimeError(f"Ray engine: no record for {missing!r} (and any after it)")


def write_parquet(records: Iterable[dict], stream: BinaryIO, k: int, rows_per_group: int = 10_000
                  ) -> Iterator[dict]:
    """Records as Parquet (the Ray engine's output schema: path, predictions, set, unsure, error and the top-1
    columns),
    written in row groups of `rows_per_group` as they come."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _output_schema()
    pending: list[dict] = []
    with pq.ParquetWriter(stream, schema) as writer:
        for record in records:
            top = record["predictions"][0] if record["predictions"] else {}
            pending.append({**record, **{key: top.get(key) for key in ("label", "index", "probability", "group")}})
            if len(pending) >= rows_per_group:
                writer.write_table(pa.Table.from_pylist(pending, schema=schema))
                pending = []
            yield record
        if pending:
            writer.write_table(pa.Table.from_pylist(pending, schema=schema))
