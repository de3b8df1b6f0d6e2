"""The machinery both stages share: device and DDP set-up, batches, optimiser and schedule, epoch loop,
progress bar, JSONL metrics, checkpoint/resume.

One plain loop (`fit`) drives every stage and baseline; a stage supplies `step_fn(images, labels) -> loss`
and optional `on_epoch_start` / `on_epoch_end` hooks. In-memory datasets are moved to the training device once
and indexed there, so a GPU never waits on per-image CPU work; file-backed ones decode the next batch on a
background thread while the current one trains, holding at most two batches of decoded images.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from tailwise import OptionError, UserError
from tailwise.format import stage_metrics_log
from tailwise.training import checkpoint


# ----------------------------------------------------------------------------- device and processes
def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when available; under torchrun each process takes its LOCAL_RANK's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise OptionError("{device=cuda}: no CUDA device is available (use {device=cpu} or auto)", "device")
        torch.backends.cudnn.benchmark = True   # fixed batch shapes: let cuDNN pick the fastest convolutions
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if name != "cpu":
        raise OptionError(f"{{device={name}}}: expected auto, cpu or cuda", "device")
    return torch.device("cpu")


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run plainly)."""
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun process group if WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def to_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a network to the training device in channels-last layout (faster convolutions on CPU and GPU)."""
    return model.to(device=device, memory_format=torch.channels_last)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


@dataclass(frozen=True)
class Streams:
    """A run's random streams, by name. Each is a pure function of the run's seed and of where it is drawn
    (epoch, rank), so a resumed run draws exactly what an unbroken one would. The entropy of each is kept as
    first released, so runs trained before the streams had names reproduce exactly; one overlap comes with it:
    redraw(e) and augment(1, e, rank=2) start from the same entropy (a numpy PCG64 and a torch seed drawn from
    it, used for unrelated things)."""

    seed: int

    def init(self, rank: int) -> int:
        """Seed of torch's and numpy's global generators (weight initialisation) on process `rank`."""
        return self.seed + rank

    def order(self, epoch: int) -> np.random.Generator:
        """The order of an epoch's training items (every rank draws the same order, then takes its share)."""
        return np.random.default_rng([self.seed, epoch])

    def augment(self, stage: int, epoch: int, rank: int) -> int:
        """Seed of the augmentation generator of stage 1 or 2 in `epoch` on process `rank`."""
        return int(np.random.SeedSequence([self.seed + stage - 1, epoch, rank]).generate_state(1)[0])

    def redraw(self, epoch: int) -> np.random.Generator:
        """The IP-DPP subset drawn at the start of stage-2 `epoch` (the same on every rank)."""
        return np.random.default_rng([self.seed, epoch, 2])


# ----------------------------------------------------------------------------- batches
class DeviceImages:
    """Images of a data source, fetched by index on the training device (in-memory sources live there;
    file-backed ones are decoded on demand, the next batch ahead of time unless `prefetch` is False)."""

    def __init__(self, source, device: torch.device, prefetch: bool = True):
        self.source, self.device, self.prefetch = source, device, prefetch
        images = getattr(source, "images", None)
        self.images = images.to(device) if images is not None else None

    def __call__(self, indices: np.ndarray) -> torch.Tensor:
        if self.images is not None:
            return self.images[torch.as_tensor(indices, device=self.device)]
        return self.source.load(indices).to(self.device, non_blocking=True)

    def batches(self, batches: list[np.ndarray], waited: list[float] | None = None):
        """The images of each batch in turn. A file-backed source decodes the next batch on a background thread
        while the caller trains on this one; the seconds spent waiting for a batch are added to `waited[0]`."""
        if self.images is not None or not self.prefetch:
            for idx in batches:
                t0 = time.perf_counter()
                images = self(idx)
                if waited is not None and self.images is None:
                    waited[0] += time.perf_counter() - t0
                yield images
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tailwise-prefetch") as prefetch:
            pending = prefetch.submit(self.source.load, batches[0]) if batches else None
            for k in range(len(batches)):
                t0 = time.perf_counter()
                images = pending.result()
                if waited is not None:
                    waited[0] += time.perf_counter() - t0
                if k + 1 < len(batches):
                    pending = prefetch.submit(self.source.load, batches[k + 1])
                yield images.to(self.device, non_blocking=True)


def epoch_order(indices: np.ndarray, labels: np.ndarray, seed: int, epoch: int, class_balanced: bool = False,
                num_samples: int | None = None) -> np.ndarray:
    """The order of training items for one epoch, reproducible from (seed, epoch) (Streams.order).

    Uniform: a permutation of `indices`. Class-balanced: each draw picks a class uniformly, then an item of it.
    """
    rng = Streams(seed).order(epoch)
    if not class_balanced:
        return indices[rng.permutation(len(indices))]
    num_samples = num_samples or len(indices)
    item_labels = labels[indices]
    classes = np.unique(item_labels)
    by_class = [indices[item_labels == c] for c in classes]
    sizes = np.array([len(members) for members in by_class])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    picks = rng.integers(len(classes), size=num_samples)
    return np.concatenate(by_class)[starts[picks] + rng.integers(sizes[picks])].astype(np.int64)


def rank_batches(order: np.ndarray, batch_size: int, d: Dist) -> list[np.ndarray]:
    """Split one epoch's order into this rank's batches (global batch = batch_size, split over ranks; the last
    incomplete batch is dropped)."""
    per_rank = batch_size // d.world
    if per_rank < 1:
        raise UserError(f"batch size {batch_size} is smaller than the number of processes ({d.world})")
    n_batches = max(len(order) // batch_size, 1)
    batches = []
    for b in range(n_batches):
        chunk = order[b * batch_size:(b + 1) * batch_size]
        mine = chunk[d.rank * per_rank:(d.rank + 1) * per_rank]
        if len(mine):
            batches.append(mine)
    return batches


# ----------------------------------------------------------------------------- optimisation
def make_optimizer(model: torch.nn.Module, scfg: dict, params=None) -> torch.optim.AdamW:
    """AdamW, no weight decay on biases and norm weights unless `decay_all`; lr scaled by batch/lr_scale_batch when
    that is set."""
    from tailwise.training.networks import param_groups

    groups = params if params is not None else param_groups(model, scfg["weight_decay"], scfg.get("decay_all", False))
    return torch.optim.AdamW(groups, lr=base_lr(scfg), betas=tuple(scfg["betas"]))


def base_lr(scfg: dict) -> float:
    scale = scfg["batch_size"] / scfg["lr_scale_batch"] if scfg.get("lr_scale_batch") else 1.0
    return scfg["lr"] * scale


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Per-iteration schedule: linear warm-up from 0 to `peak`, then cosine to zero."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------- the loop
CHECK_EVERY = 25   # steps between loss checks on a GPU


@dataclass
class Stage:
    """What `fit` needs to know about one stage."""
    number: int
    cfg: dict                      # this stage's section of the config
    model: torch.nn.Module         # the (possibly DDP-wrapped) module being trained
    optimizer: torch.optim.Optimizer
    step_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]   # (images uint8, labels, epoch) -> loss
    train_indices: Callable[[int], np.ndarray]   # epoch -> indices of this epoch's training pool
    labels: np.ndarray             # labels of the whole training source
    images: DeviceImages
    card: Callable[[int, dict], dict]            # (epoch, last metrics) -> card fields to save
    on_epoch_start: Callable[[int], dict] | None = None   # returns extra metrics to log (e.g. a redraw)
    on_epoch_end: Callable[[int], dict] | None = None     # returns metrics (e.g. validation)
    extra_state: Callable[[], dict] | None = None          # tensors saved for resume
    steps_per_epoch: int | None = None   # fixed number of steps (balanced or redrawn pools); default len/batch


def fit(stage: Stage, run_dir: Path, seed: int, d: Dist, start_epoch: int = 0, progress: bool = True) -> dict:
    """Train `stage` from `start_epoch` to its configured epochs, checkpointing after every epoch."""
    scfg = stage.cfg
    epochs, batch = scfg["epochs"], scfg["batch_size"]
    steps_per_epoch = stage.steps_per_epoch or max(1, len(stage.train_indices(0)) // batch)
    total = epochs * steps_per_epoch
    warmup = min(scfg["warmup_epochs"], epochs / 2) * steps_per_epoch   # a short run still reaches its peak lr
    peak = base_lr(scfg)
    metrics_path = run_dir / stage_metrics_log(stage.number)
    # Checking the loss reads it on the host, which on a GPU waits for every queued step: there, check the
    # running sum every CHECK_EVERY steps (a non-finite loss still stops the epoch before its checkpoint).
    check_every = 1 if stage.images.device.type == "cpu" else CHECK_EVERY
    if d.main:
        _truncate_metrics(metrics_path, start_epoch)
    last: dict = {}
    for epoch in range(start_epoch, epochs):
        extra = stage.on_epoch_start(epoch) if stage.on_epoch_start else {}
        pool = stage.train_indices(epoch)
        order = epoch_order(pool, stage.labels, seed, epoch, scfg.get("class_balanced", False),
                            num_samples=steps_per_epoch * batch)
        batches = rank_batches(order, batch, d)[:steps_per_epoch]
        stage.model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, torch.zeros((), device=stage.images.device)
        bar = tqdm(batches, desc=f"stage {stage.number} epoch {epoch + 1}/{epochs}", disable=not (progress and d.main),
                   leave=False, dynamic_ncols=True)
        waited = [0.0]
        loaded = stage.images.batches(batches, waited)
        for i, idx in enumerate(bar):
            step = epoch * steps_per_epoch + i
            for group in stage.optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, peak)
            x = next(loaded)
            y = torch.as_tensor(stage.labels[idx], device=x.device)
            loss = stage.step_fn(x, y, epoch)
            loss_sum += loss.detach()
            if ((i + 1) % check_every == 0 or i + 1 == len(batches)) and not torch.isfinite(loss_sum):
                raise FloatingPointError(f"stage {stage.number} epoch {epoch + 1} step {i}: loss is not finite "
                                         f"({loss.item()}{'' if check_every == 1 else ', or at an earlier step'})")
            stage.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            stage.optimizer.step()
            seen += len(idx) * d.world
            if i % 10 == 0 and bar.disable is False:
                bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        loaded.close()
        seconds = time.perf_counter() - t0
        last = {"epoch": epoch + 1, "loss": (loss_sum / max(1, len(batches))).item(), "images": seen, "steps": len(batches),
                "seconds": round(seconds, 3), "images_per_second": round(seen / seconds, 1),
                "lr_end": stage.optimizer.param_groups[0]["lr"], **extra}
        if stage.images.images is None:   # file data: the share of the epoch spent waiting for decoded images
            last["data_wait_fraction"] = round(waited[0] / seconds, 4)
        if stage.on_epoch_end:
            last.update(stage.on_epoch_end(epoch))
        if d.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            checkpoint.save_checkpoint(run_dir, stage.number, stage.model,
                                       dict(stage.card(epoch + 1, last), epoch=epoch + 1, epochs=epochs),
                                       optimizer=stage.optimizer,
                                       extra_tensors=stage.extra_state() if stage.extra_state else None)
            print(f"stage {stage.number} epoch {epoch + 1}/{epochs}: "
                  + ", ".join(f"{k}={_short(v, k)}" for k, v in last.items() if k != "epoch"), flush=True)
        if d.world > 1:
            dist.barrier()
    return last


def _short(value, key: str = ""):
    if key.startswith("val_"):   # accuracies: percent, as a person reads them
        return "n/a" if value is None else f"{100 * value:.2f}%"
    return f"{value:.4g}" if isinstance(value, float) else value


def _truncate_metrics(path: Path, completed_epochs: int) -> None:
    """Keep only lines of epochs a checkpoint holds (a kill between the log and the checkpoint repeats one)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["epoch"] <= completed_epochs]
    checkpoint.atomic_write_text(path, "".join(line + "\n" for line in keep))
