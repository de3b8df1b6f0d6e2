"""Export a classifier to ONNX with its tailwise metadata, behind a torch-vs-onnxruntime parity gate.

`export_classifier` writes into `out_dir`:

    model.onnx              pixels uint8[N, C, H, W] (dynamic N) -> logits float32[N, num_classes], with the
                            "tailwise" metadata (tailwise/format.py); normalisation is inside the graph
    weights.safetensors     the torch weights (the checkpoint file copied byte for byte when given)
    card.json               the metadata, the export report and the training card
    model.fp16.onnx, model.int8.onnx (+ .json)   optional variants and their accuracy change on validation
    manifest.json           size and sha256 of each file above (tailwise/format.py), checked before loading
(the names are tailwise.format's)

Everything is first written to a temp folder inside `out_dir` and moved into place only after the parity gate
passes, model.onnx last: a failed export leaves out_dir as it was (in particular, no new model.onnx).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from safetensors.torch import save_file

from tailwise._core import sha256_file
from tailwise.export.model_folder import DEFAULT_OPSET
from tailwise.format import (CARD_FILE, INPUT_NAME, MANIFEST_FILE, MODEL_FILE, OUTPUT_NAME, WEIGHTS_FILE,
                             VARIANTS, validate_metadata, variant_model, variant_report, write_manifest,
                             write_metadata)

PARITY_ATOL = 1e-4  # max |logit difference| allowed between onnxruntime and torch
DYNAMO_MIN_OPSET = 18  # the dynamo exporter implements opset >= 18; it cannot down-convert every graph
_CPU = ["CPUExecutionProvider"]  # the gate and the variant scores run on CPU: deterministic, like torch on CPU


class ExportParityError(RuntimeError):
    """The exported graph does not reproduce the torch model (logits beyond tolerance, or a different top-1)."""


class VariantUnavailable(RuntimeError):
    """A requested variant cannot be made here (missing optional package, unsupported graph)."""


def export_classifier(model: torch.nn.Module, meta: dict, out_dir: str | os.PathLike, sample_images: torch.Tensor,
                      parity_images: torch.Tensor, opset: int = DEFAULT_OPSET, variants=(), *, parity_labels=None,
                      weights_file: str | os.PathLike | None = None, card: dict | None = None,
                      parity_atol: float = PARITY_ATOL) -> dict:
    """Export `model` (uint8 NCHW pixels 0..255 -> logits, normalisation inside, eval mode) to `out_dir`.

    meta: from tailwise.format.build_metadata; its weights_sha256 is set to the shipped weights.safetensors.
    sample_images: uint8 [N, C, H, W], the trace example (first 2) and the int8 calibration set.
    parity_images: uint8 [N, C, H, W] validation images; onnxruntime (CPU) must match torch on them within
      `parity_atol` (max abs logit difference) with identical top-1, else ExportParityError. The first image
      runs as a batch of 1 and the rest in batches of 64, which also checks the dynamic batch axis.
    opset: the dynamo exporter is tried first (at max(opset, 18)); if it fails, the TorchScript exporter
      (at `opset`); the report records which ran, why the first failed, and the opset actually written.
    variants: any of "fp16" (needs onnxconverter-common) and "int8" (onnxruntime static QDQ quantization
      calibrated on sample_images); each is scored against the fp32 graph on parity_images (top-1 agreement,
      and accuracy change when `parity_labels` is given). A variant that cannot be made is reported as
      {"skipped": reason}.
    weights_file: a safetensors checkpoint to ship as weights.safetensors (else model.state_dict() is saved).
    card: the training card, stored in card.json.
    The export runs on CPU (a model elsewhere is copied there). Returns the export report (also in card.json).
    """
    variants = tuple(variants)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {VARIANTS}")
    if any(module.training for module in model.modules()):
        raise ValueError("model is in training mode: call model.eval() before exporting "
                         "(dropout and batch-norm statistics would differ from the exported graph)")
    spec = meta["input"]
    shape = (spec["channels"], spec["height"], spec["width"])
    for name, images in (("sample_images", sample_images), ("parity_images", parity_images)):
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != shape or not len(images):
            raise ValueError(f"{name} must be uint8 [N>0, {', '.join(map(str, shape))}] (the metadata's input), "
                             f"got {images.dtype} {list(images.shape)}")
    labels = None
    if parity_labels is not None:
        labels = np.asarray(parity_labels, dtype=np.int64).reshape(-1)
        if len(labels) != len(parity_images):
            raise ValueError(f"{len(labels)} parity_labels for {len(parity_images)} parity_images")
    if any(t.device.type != "cpu" for t in [*model.parameters(), *model.buffers()]):
        model = copy.deepcopy(model).cpu()
    sample_images, parity_images = sample_images.cpu(), parity_images.cpu()

    proto, exporter, fallback_reason = _export_graph(model, sample_images, opset)
    _check_graph(proto)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out_dir) as tmp:
        tmp = Path(tmp)
        if weights_file is not None:
            shutil.copyfile(weights_file, tmp / WEIGHTS_FILE)
        else:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                      str(tmp / WEIGHTS_FILE))
            os.chmod(tmp / WEIGHTS_FILE, 0o644)  # safetensors creates it owner-only
        meta = validate_metadata(dict(meta, weights_sha256=sha256_file(tmp / WEIGHTS_FILE)))
        write_metadata(proto, meta)
        onnx.save(proto, str(tmp / MODEL_FILE))

        torch_logits = _torch_logits(model, parity_images)
        fp32_logits = _ort_logits(tmp / MODEL_FILE, parity_images)
        report = {
            "exporter": exporter,
            "exporter_fallback_reason": fallback_reason,
            "opset_requested": opset,
            "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            "parity": _parity_gate(torch_logits, fp32_logits, parity_atol),  # raises ExportParityError
            "weights_sha256": meta["weights_sha256"],
            "variants": {},
        }
        if labels is not None:
            report["parity"]["accuracy"] = float((fp32_logits.argmax(1) == labels).mean())
        for variant in variants:
            report["variants"][variant] = _make_variant(variant, tmp, meta, sample_images, parity_images,
                                                        fp32_logits, labels)
        training_card = {k: v for k, v in (card or {}).items() if k not in ("_dir", "resume")} or None
        (tmp / CARD_FILE).write_text(json.dumps({"metadata": meta, "export": report, "training": training_card},
                                                  indent=2, sort_keys=True) + "\n")

        made = [name(v) for v, result in report["variants"].items() if "skipped" not in result
                for name in (variant_model, variant_report)]
        for stale in {name(v) for v in VARIANTS for name in (variant_model, variant_report)} - set(made):
            (out_dir / stale).unlink(missing_ok=True)
        write_manifest(tmp, [WEIGHTS_FILE, CARD_FILE, *made, MODEL_FILE])
        # the model file is the commit point; until the manifest follows it, serving refuses the mismatch
        for name in [WEIGHTS_FILE, CARD_FILE, *made, MODEL_FILE, MANIFEST_FILE]:
            os.replace(tmp / name, out_dir / name)
    report["files"] = [str(out_dir / name) for name in [MODEL_FILE, WEIGHTS_FILE, CARD_FILE, *made, MANIFEST_FILE]]
    return report


def _export_graph(model: torch.nn.Module, sample_images: torch.Tensor, opset: int):
    """(ModelProto, exporter name, why dynamo failed or None)."""
    # torch.export specialises a batch of 1, so trace with 2 images.
    example = sample_images[:2] if len(sample_images) >= 2 else sample_images.repeat(2, 1, 1, 1)
    try:
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=max(opset, DYNAMO_MIN_OPSET), input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        return program.model_proto, "dynamo", None
    except Exception as exc:  # any failure of the new exporter sends us to the old one
        reason = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(exc).__name__}: {exc}")[:1000]  # no terminal colours
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based exporter": our fallback
        path = os.path.join(tmp, MODEL_FILE)
        torch.onnx.export(model, (example,), path, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        return onnx.load(path), "torchscript", reason


def _check_graph(proto: onnx.ModelProto) -> None:
    onnx.checker.check_model(proto)
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    outputs = list(proto.graph.output)
    ok = (len(inputs) == 1 and inputs[0].name == INPUT_NAME
          and inputs[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
          and not inputs[0].type.tensor_type.shape.dim[0].HasField("dim_value")
          and len(outputs) == 1 and outputs[0].name == OUTPUT_NAME
          and outputs[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT)
    if not ok:
        raise RuntimeError(f"exported graph must map {INPUT_NAME} uint8[batch, C, H, W] to {OUTPUT_NAME} float32; "
                           f"got inputs {[i.name for i in inputs]}, outputs {[o.name for o in outputs]}")


def _chunks(n: int, size: int = 64) -> list[slice]:
    return [slice(0, 1)] + [slice(i, min(i + size, n)) for i in range(1, n, size)]


def _torch_logits(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([model(images[s]) for s in _chunks(len(images))]).float().numpy()


def _ort_logits(path: Path, images: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=_CPU)
    array = images.numpy()
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: array[s]})[0]
                           for s in _chunks(len(array))]).astype(np.float32)


def _parity_gate(expected: np.ndarray, got: np.ndarray, atol: float) -> dict:
    diff = float(np.abs(expected - got).max()) if np.isfinite(got).all() and np.isfinite(expected).all() else np.inf
    agree = int((expected.argmax(1) == got.argmax(1)).sum())
    n = len(expected)
    if not diff <= atol or agree != n:
        raise ExportParityError(f"onnxruntime does not reproduce the torch model on {n} validation images: "
                                f"max |logit difference| {diff:.3g} (tolerance {atol:g}), same top-1 on {agree}/{n}")
    return {"n_images": n, "max_abs_logit_diff": diff, "atol": atol, "top1_agreement": 1.0}


def _make_variant(variant: str, tmp: Path, meta: dict, calibration: torch.Tensor, images: torch.Tensor,
                  fp32_logits: np.ndarray, labels: np.ndarray | None) -> dict:
    path = tmp / variant_model(variant)
    try:
        if variant == "fp16":
            proto, method = _to_fp16(onnx.load(str(tmp / MODEL_FILE)))
        else:
            proto, method = _to_int8(tmp / MODEL_FILE, tmp, calibration)
    except VariantUnavailable as exc:
        return {"skipped": str(exc)}
    except Exception as exc:  # a converter that cannot handle this graph: report it, keep the fp32 export
        return {"skipped": f"{variant} conversion failed ({type(exc).__name__}: {exc})"}
    write_metadata(proto, meta)
    onnx.save(proto, str(path))
    logits = _ort_logits(path, images)
    result = {"file": path.name, "method": method, "bytes": path.stat().st_size, "n_images": len(images),
              "top1_agreement": float((logits.argmax(1) == fp32_logits.argmax(1)).mean()),
              "max_abs_logit_diff": float(np.abs(logits - fp32_logits).max())}
    if labels is not None:
        accuracy = float((logits.argmax(1) == labels).mean())
        accuracy_fp32 = float((fp32_logits.argmax(1) == labels).mean())
        result.update(accuracy=accuracy, accuracy_fp32=accuracy_fp32, accuracy_change=accuracy - accuracy_fp32)
    (tmp / variant_report(variant)).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def _to_fp16(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise VariantUnavailable("fp16 needs onnxconverter-common (pip install onnxconverter-common); "
                                 "onnx itself has no float16 converter") from None
    # Keep Cast nodes in fp32: the converter re-types the uint8 -> float input Cast's output without changing its
    # `to` attribute, which onnxruntime rejects; it inserts its own float -> float16 Cast after it instead.
    converted = float16.convert_float_to_float16(
        proto, keep_io_types=True, op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + ["Cast"])
    return converted, "onnxconverter-common float16 (weights and activations fp16; input uint8, output float32)"


def _to_int8(fp32_path: Path, tmp: Path, calibration: torch.Tensor) -> tuple[onnx.ModelProto, str]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            array = calibration.numpy()
            self.batches = iter([{INPUT_NAME: array[i:i + 32]} for i in range(0, len(array), 32)])

        def get_next(self):
            return next(self.batches, None)

    source = tmp / "int8-pre.onnx"
    try:
        quant_pre_process(str(fp32_path), str(source))  # shape inference + graph optimisation before quantizing
    except Exception:  # the pre-pass is an optimisation; quantize the graph as it is
        source = fp32_path
    quantize_static(str(source), str(tmp / "int8-raw.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(str(tmp / "int8-raw.onnx")), (
        f"onnxruntime static quantization, QDQ, per-channel int8 weights, uint8 activations, MinMax calibration "
        f"on {len(calibration)} images")

