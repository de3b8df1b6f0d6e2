"""Stage-1 (BNS) training throughput next to a plain cross-entropy step, same network and batch, one run.

    python benchmarks/bench_stage1.py                      # CPU, and CUDA too when a GPU is present
    python benchmarks/bench_stage1.py --arch resnet32 --batch 256 --channels 1 --size 28 --steps 10
    python benchmarks/bench_stage1.py --devices cuda --batch 512 4096 --json bench_stage1.json

A BNS step: two SimCLR views of each image (augmented on the device, batched), ContrastiveModel forward on
2B views, released-form BNS loss, backward, AdamW step. A CE step: one light view, Classifier forward, CE,
backward, AdamW step. Images/second counts source images (B per step) for both, so the ratio is the real
cost of stage 1 per image seen. Prints a markdown table (and writes the rows as JSON with --json).

On CUDA (bf16 autocast, channels-last, cuDNN autotuning: the device set up by training's own
engine.resolve_device) each row also gives the CE step's achieved TFLOP/s,
counted with torch.utils.flop_counter.FlopCounterMode (convolutions and matmuls, forward and backward), as a
fraction of the card's dense bf16 peak from PEAK_BF16_TFLOPS (matched on the device name). `--compile` times
torch.compile'd networks instead (the warm-up steps then include compilation).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F

from tailwise.training.augment import BatchAugment
from tailwise.training.engine import resolve_device, to_device
from tailwise.training.losses import bns_loss_released
from tailwise.training.networks import Classifier, ContrastiveModel, param_groups


# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) from the vendors' data sheets, matched in this order.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                    ("L4", 121.0), ("A10G", 70.0), ("RTX 4090", 165.0))


def peak_bf16_tflops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(device: torch.device, arch: str, batch: int, channels: int, size: int, steps: int, warmup: int,
          compile: bool = False) -> dict:
    mean, std = (0.5,) * channels, (0.25,) * channels
    x = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    gen = torch.Generator(device=device).manual_seed(0)
    strong = BatchAugment(channels, (size, size), kind="simclr")
    light = BatchAugment(channels, (size, size), kind="light")
    contrastive = to_device(ContrastiveModel(arch, channels, mean, std), device)   # as training does
    classifier = to_device(Classifier(arch, channels, 10, mean, std), device)
    opt_c = torch.optim.AdamW(param_groups(contrastive, 0.05), lr=1e-4)
    opt_s = torch.optim.AdamW(param_groups(classifier, 0.05), lr=1e-4)
    net_c, net_s = (torch.compile(contrastive), torch.compile(classifier)) if compile else (contrastive, classifier)

    def bns_step():
        views = torch.cat([strong(x, gen), strong(x, gen)])
        with amp:
            z = net_c(views)
        loss = bns_loss_released(F.normalize(z.float(), dim=1), torch.cat([y, y]))
        opt_c.zero_grad(set_to_none=True)
        loss.backward()
        opt_c.step()

    def ce_step():
        with amp:
            logits = net_s(light(x, gen))
        loss = F.cross_entropy(logits.float(), y)
        opt_s.zero_grad(set_to_none=True)
        loss.backward()
        opt_s.step()

    results = {}
    for name, step in (("ce", ce_step), ("bns", bns_step)):
        for _ in range(warmup):
            step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        seconds = time.perf_counter() - t0
        results[name] = batch * steps / seconds
        results[f"{name}_step_seconds"] = seconds / steps
    if device.type == "cuda":   # FLOPs of one CE step (eager: the counter sees the aten ops)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            with amp:
                logits = classifier(light(x, gen))
            F.cross_entropy(logits.float(), y).backward()
        results["ce_flops_per_step"] = counter.get_total_flops()
    return results


def bench_devices(spec: str) -> list[torch.device]:
    """`auto` = cpu plus cuda if present, else a comma list; each set up as training sets it up (on CUDA,
    engine.resolve_device turns cuDNN autotuning on, so the images/s match what training gets)."""
    names = (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])) if spec == "auto" else spec.split(",")
    return [resolve_device(name) for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet32")
    parser.add_argument("--batch", type=int, nargs="+", default=[256], help="one row per batch size")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--devices", default="auto", help="comma list of cpu,cuda; auto = cpu plus cuda if present")
    parser.add_argument("--compile", action="store_true", help="time torch.compile'd networks")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    devices = bench_devices(args.devices)
    print(f"{args.arch}, {args.channels}x{args.size}x{args.size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads" + (", torch.compile" if args.compile else ""))
    print("| device | batch | CE images/s | BNS stage-1 images/s | BNS / CE | CE TFLOP/s | CE fraction of bf16 peak |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for device in devices:
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        for batch in args.batch:
            r = bench(device, args.arch, batch, args.channels, args.size, args.steps, args.warmup, args.compile)
            row = {"device": label, "device_type": device.type, "batch": batch, "arch": args.arch,
                   "image": [args.channels, args.size, args.size], "steps": args.steps, "compile": args.compile,
                   "torch": torch.__version__, "cudnn_benchmark": torch.backends.cudnn.benchmark,
                   "ce_images_per_s": round(r["ce"], 1),
                   "bns_images_per_s": round(r["bns"], 1), "bns_over_ce": round(r["bns"] / r["ce"], 3)}
            flops, peak = r.get("ce_flops_per_step"), peak_bf16_tflops(label)
            if flops:
                row["ce_flops_per_step"] = flops
                row["ce_tflops"] = round(flops / r["ce_step_seconds"] / 1e12, 2)
                row["peak_bf16_tflops"] = peak
                row["ce_fraction_of_peak"] = round(row["ce_tflops"] / peak, 4) if peak else None
            rows.append(row)
            tflops = f"{row['ce_tflops']:.1f}" if "ce_tflops" in row else "-"
            frac = f"{100 * row['ce_fraction_of_peak']:.1f} %" if row.get("ce_fraction_of_peak") else "-"
            print(f"| {label} | {batch} | {r['ce']:.0f} | {r['bns']:.0f} | {r['bns'] / r['ce']:.2f} | {tflops} | {frac} |",
                  flush=True)
            if args.json:   # after every row, so a cut-off run keeps what it measured
                from tailwise._core import atomic_write_text

                atomic_write_text(args.json, json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
