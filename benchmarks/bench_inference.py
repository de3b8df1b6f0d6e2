"""Inference throughput, onnxruntime vs torch eager, on the same model at batch sizes 1, 64 and 256.

    python benchmarks/bench_inference.py                        # ResNet-32, 1x28x28, 10 classes, exported here
    python benchmarks/bench_inference.py --model models/NAME    # an exported model; torch is rebuilt from its
                                                                # card.json + weights.safetensors
Both sides get the same uint8 pixels (normalisation is inside both graphs) and the same number of CPU threads.
Prints a markdown table of images/second and the onnxruntime / torch ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from tailwise.serving.artifact import OnnxClassifier, build_metadata  # noqa: E402


def resnet32(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """training.networks' ResNet-32 classifier."""
    from tailwise.training.networks import Classifier

    return Classifier("resnet32", in_channels, num_classes, [0.286] * in_channels, [0.353] * in_channels)


def torch_from_export(model_dir: Path) -> nn.Module:
    """The torch model of an export folder: training.checkpoint.build_classifier(card) + weights.safetensors."""
    from tailwise.training.checkpoint import build_classifier

    card = json.loads((model_dir / "card.json").read_text())["training"]
    model = build_classifier(card)
    model.load_state_dict(load_file(model_dir / "weights.safetensors"))
    return model.eval()


def throughput(run, batch: np.ndarray, min_seconds: float) -> float:
    """Images per second of `run(batch)`, after warm-up, timed over at least `min_seconds` and 3 calls."""
    for _ in range(3):
        run(batch)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < min_seconds:
        run(batch)
        calls += 1
    return calls * len(batch) / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="an exported model folder (default: export ResNet-32 here)")
    parser.add_argument("--batch-sizes", default="1,64,256")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="timing per measurement")
    parser.add_argument("--device", default="cpu", help="torch device (onnxruntime picks CUDA when it has it)")
    parser.add_argument("--threads", type=int, help="CPU threads for both (default: torch's default for both)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir, name = args.model, str(args.model)
            model = torch_from_export(model_dir)
        else:
            from tailwise.export.onnx_export import export_classifier

            model, model_dir, name = resnet32().eval(), Path(tmp), "ResNet-32 (random weights), 1x28x28, 10 classes"
            meta = build_metadata(class_names=[str(c) for c in range(10)], channels=1, height=28, width=28,
                                  resize_policy="resize", train_counts=[100] * 10, groups=["medium"] * 10,
                                  group_thresholds={"many_above": 500, "few_below": 200},
                                  dataset={"name": "random", "index_sha256": None})
            images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
            export_classifier(model, meta, model_dir, images, images)
        classifier = OnnxClassifier(model_dir, intra_op_threads=torch.get_num_threads())
        model = model.to(args.device)

        def run_torch(batch):
            with torch.inference_mode():
                model(torch.from_numpy(batch).to(args.device))
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()

        rows = []
        for size in (int(s) for s in args.batch_sizes.split(",")):
            batch = np.random.default_rng(0).integers(0, 256, (size, *classifier.input_shape), dtype=np.uint8)
            ort_ips = throughput(classifier.predict_arrays, batch, args.min_seconds)
            torch_ips = throughput(run_torch, batch, args.min_seconds)
            rows.append(f"| {size} | {ort_ips:,.0f} | {torch_ips:,.0f} | {ort_ips / torch_ips:.2f} |")

    print(f"model: {name}")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__} on {args.device} "
          f"({torch.get_num_threads()} threads, onnxruntime too), "
          f"onnxruntime providers {', '.join(classifier.providers)}\n")
    print("| batch | onnxruntime img/s | torch eager img/s | onnxruntime / torch |")
    print("|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
