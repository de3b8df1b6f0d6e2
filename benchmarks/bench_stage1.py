"""Stage-1 (BNS) training throughput next to a plain cross-entropy step, same network and batch, one run.

    python benchmarks/bench_stage1.py                      # CPU, and CUDA too when a GPU is present
    python benchmarks/bench_stage1.py --arch resnet32 --batch 256 --channels 1 --size 28 --steps 10

A BNS step: two SimCLR views of each image (augmented on the device, batched), ContrastiveModel forward on
2B views, released-form BNS loss, backward, AdamW step. A CE step: one light view, Classifier forward, CE,
backward, AdamW step. Images/second counts source images (B per step) for both, so the ratio is the real
cost of stage 1 per image seen. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

from training.augment import BatchAugment
from training.engine import to_device
from training.losses import bns_loss_released
from training.networks import Classifier, ContrastiveModel, param_groups


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(device: torch.device, arch: str, batch: int, channels: int, size: int, steps: int, warmup: int) -> dict:
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

    def bns_step():
        views = torch.cat([strong(x, gen), strong(x, gen)])
        with amp:
            z = contrastive(views)
        loss = bns_loss_released(F.normalize(z.float(), dim=1), torch.cat([y, y]))
        opt_c.zero_grad(set_to_none=True)
        loss.backward()
        opt_c.step()

    def ce_step():
        with amp:
            logits = classifier(light(x, gen))
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
        results[name] = batch * steps / (time.perf_counter() - t0)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet32")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--devices", default="auto", help="comma list of cpu,cuda; auto = cpu plus cuda if present")
    args = parser.parse_args()
    devices = (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])) if args.devices == "auto" \
        else args.devices.split(",")
    print(f"{args.arch}, batch {args.batch}, {args.channels}x{args.size}x{args.size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print("| device | CE images/s | BNS stage-1 images/s | BNS / CE |")
    print("|---|---:|---:|---:|")
    for name in devices:
        device = torch.device(name)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        r = bench(device, args.arch, args.batch, args.channels, args.size, args.steps, args.warmup)
        print(f"| {label} | {r['ce']:.0f} | {r['bns']:.0f} | {r['bns'] / r['ce']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
