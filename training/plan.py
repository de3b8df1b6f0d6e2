"""`tailwise train --data DIR`: the default recipe sized for a user's own folder of images.

Every size the recipe states for Fashion-MNIST-LT (image size, batch sizes, epochs, warm-up, group bands) is
derived from the folder and a budget, and each derived value is printed, with where it came from and the
`--set` that overrides it, before any training:

* image size: ``training.data.image_size_for`` the images' median shorter side; channels: 3 (every image is
  decoded to RGB unless ``--set data.channels=1`` asks for grayscale);
* many/medium/few bands: ``training.data.folder_group_thresholds``;
* batch size (each stage): the power of two nearest N / 8 (N = the stage's images per epoch), at least 16 and
  at most the recipe's; the learning rate is the recipe's at its batch size times sqrt(batch / recipe batch);
* budget: ``--budget PASSES`` passes over the training images, by default clamp(50,000 / N, 20, 200), or
  ``--minutes M`` turned into passes with the images/s measured on a few real training steps here;
* stage split: stage 1 gets 3/4 of the passes in whole epochs (at least 1), stage 2 what is left, in epochs of
  its IP-DPP subset (at least 1); warm-up: 5 % of each stage's epochs, at least 1.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tailwise import OptionError

MIN_PASSES, MAX_PASSES, DEFAULT_IMAGE_PASSES = 20, 200, 50_000
STAGE1_SHARE, WARMUP_SHARE, MIN_BATCH = 0.75, 0.05, 16


@dataclass
class Derived:
    """One derived config value: the field, its value, and where it came from."""
    field: str
    value: object
    why: str


def default_passes(num_train: int) -> int:
    """Passes over the training images when no budget is given: enough image passes for a small set to learn
    (50,000 / N), between 20 and 200."""
    return int(min(MAX_PASSES, max(MIN_PASSES, math.ceil(DEFAULT_IMAGE_PASSES / max(1, num_train)))))


def batch_for(num_images: int, recipe_batch: int) -> int:
    """The power of two nearest num_images / 8, at least MIN_BATCH and at most the recipe's batch size."""
    nearest = 2 ** round(math.log2(max(1.0, num_images / 8)))
    return int(min(recipe_batch, max(MIN_BATCH, nearest)))


def derive(cfg: dict, data, passes: float, passes_why: str, given: dict | None = None) -> list[Derived]:
    """The derived fields of `cfg` (the recipe pointed at a folder, before the user's --set) for `data` and a
    budget in passes; `given` holds the fields the user set, which the others then follow (e.g. the lr follows
    a given batch size)."""
    given = given or {}
    from tailwise.training.data import folder_group_thresholds, group_thresholds
    from tailwise.training.ipdpp import class_targets

    s1, s2 = cfg["stage1"], cfg["stage2"]
    n = len(data.train_idx)
    pool = n if s2["sampler"] == "none" else int(sum(class_targets(data.counts, s2["ratio"])))
    b1 = given.get("stage1.batch_size", batch_for(n, s1["batch_size"]))
    b2 = given.get("stage2.batch_size", batch_for(pool, s2["batch_size"]))
    views = 2 if s1["method"] == "bns" else 1
    e1 = max(1, int(STAGE1_SHARE * passes / views))
    e2 = max(1, round((passes - views * e1) * n / pool))
    many, few = folder_group_thresholds(data.counts)
    stats = data.file_stats
    return [
        Derived("data.image_size", int(data.image_size[0]),
                f"median shorter side of the images is {stats.get('median_shorter_side', '?')} px"),
        Derived("data.many_threshold", int(many), "many = more than this many training images"
                + ("; the literature's band" if max(data.counts) > group_thresholds(len(data.counts))[0]
                   else "; small set: the log range of class counts cut in thirds")),
        Derived("data.few_threshold", int(few), "few = fewer than this many training images"),
        Derived("stage1.batch_size", b1, f"{n} training images / 8, power of two in [{MIN_BATCH}, "
                                         f"{s1['batch_size']}]"),
        Derived("stage1.lr", _lr_for(s1, b1), _lr_why(s1, b1)),
        Derived("stage1.lr_scale_batch", 0, "the lr above is already for this batch"),
        Derived("stage1.epochs", e1, f"{passes_why}: 3/4 in whole stage-1 epochs"),
        Derived("stage1.warmup_epochs", max(1, round(WARMUP_SHARE * e1)), "5 % of stage 1, at least 1"),
        Derived("stage2.batch_size", b2, f"IP-DPP subset of {pool} images / 8, power of two in [{MIN_BATCH}, "
                                         f"{s2['batch_size']}]"),
        Derived("stage2.lr", _lr_for(s2, b2), _lr_why(s2, b2)),
        Derived("stage2.lr_scale_batch", 0, "the lr above is already for this batch"),
        Derived("stage2.epochs", e2, f"the rest of the {passes:g} passes, in epochs of the {pool}-image subset"),
        Derived("stage2.warmup_epochs", max(1, round(WARMUP_SHARE * e2)), "5 % of stage 2, at least 1"),
    ]


def _lr_for(scfg: dict, batch: int) -> float:
    """The recipe's lr at its own batch size, scaled by the square root of batch / recipe batch (AdamW)."""
    from tailwise.training.engine import base_lr

    return float(f"{base_lr(scfg) * math.sqrt(batch / scfg['batch_size']):.3g}")


def _lr_why(scfg: dict, batch: int) -> str:
    from tailwise.training.engine import base_lr

    return f"the recipe's {base_lr(scfg):g} at batch {scfg['batch_size']}, x sqrt({batch} / {scfg['batch_size']})"


def measure_images_per_second(cfg: dict, data, device, batch_size: int, steps: int = 4, warmup: int = 2) -> float:
    """Training images/s of stage 1 on this machine: the median of `steps` timed steps (after `warmup` untimed
    ones) of the recipe's network and augmentation on real images of the folder, decoding included."""
    import torch
    import torch.nn.functional as F

    from tailwise.training.augment import BatchAugment
    from tailwise.training.engine import make_optimizer, to_device
    from tailwise.training.networks import Classifier

    s1 = cfg["stage1"]
    model = to_device(Classifier(cfg["model"]["arch"], data.channels, data.num_classes, data.mean, data.std), device)
    optimizer = make_optimizer(model, dict(s1, batch_size=batch_size))
    aug = BatchAugment(data.channels, tuple(data.image_size), strength=s1["aug_strength"], kind=s1["aug"])
    rng = np.random.default_rng(0)
    generator = torch.Generator(device=device).manual_seed(0)
    views = 2 if s1["method"] == "bns" else 1
    batch = min(batch_size, len(data.train_idx))
    seconds = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        idx = rng.choice(data.train_idx, batch, replace=False)
        x = data.train_source.load(idx).to(device)
        y = torch.as_tensor(data.train_source.labels[idx], device=device)
        out = model(torch.cat([aug(x, generator) for _ in range(views)]))
        loss = F.cross_entropy(out, y.repeat(views))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            seconds.append(time.perf_counter() - t0)
    return batch / float(np.median(seconds))


def estimate_minutes(fields: dict, data, images_per_second: float, views: int) -> float:
    """Training time: the image passes of both stages plus a validation pass per epoch (inference counted as a
    third of a training step per image)."""
    from tailwise.training.ipdpp import class_targets

    n, n_val = len(data.train_idx), len(data.val_idx)
    pool = int(sum(class_targets(data.counts, fields["stage2.ratio"])))
    e1, e2 = fields["stage1.epochs"], fields["stage2.epochs"]
    images = e1 * (views * n + n_val / 3) + e2 * (pool + n_val / 3 + n / 3 / fields["stage2.redraw_every"])
    return images / images_per_second / 60


def check_budget(budget: float | None, minutes: float | None) -> None:
    """Refuse both, or a budget that is not positive (before any data is read)."""
    if budget is not None and minutes is not None:
        raise OptionError("give {budget} or {minutes}, not both", "budget", "minutes")
    if minutes is not None and not minutes > 0:
        raise OptionError(f"{{minutes}} must be positive, got {minutes:g}", "minutes")
    if budget is not None and not budget > 0:
        raise OptionError(f"{{budget}} must be positive, got {budget:g}", "budget")


def plan_for_folder(folder: str | os.PathLike, *, test: str | os.PathLike | None = None, budget: float | None = None,
                    minutes: float | None = None, recipe: str | None = None,
                    overrides: Mapping[str, Any] | None = None) -> tuple[dict, object, list[str]]:
    """(config, data, lines to print) for the default recipe (or `recipe`) trained on `folder` (one subfolder of
    images per class; `test`: a test folder laid out the same way): every size derived (see the module
    docstring) for a budget of `budget` passes or `minutes` on this machine (default: default_passes), then
    `overrides` ({"section.key": value}, as `--set`) on top."""
    from tailwise.training import engine
    from tailwise.training.config import DEFAULT_RECIPE, load_config
    from tailwise.training.train import data_from_config

    check_budget(budget, minutes)
    overrides = dict(overrides or {})
    recipe = recipe or DEFAULT_RECIPE
    data_set = {"data.dataset": "folder", "data.root": os.path.abspath(folder),
                "data.test_split": os.path.abspath(test) if test else ""}
    recipe_cfg = load_config(recipe, data_set)
    cfg = load_config(recipe, {**data_set, **overrides})   # the user's data.* settings shape the data itself
    data = data_from_config(cfg)
    given = {f: cfg[f.split(".")[0]][f.split(".")[1]] for f in overrides if f.count(".") == 1}
    device = engine.resolve_device(cfg["device"])
    views = 2 if cfg["stage1"]["method"] == "bns" else 1
    n = len(data.train_idx)
    probe_batch = batch_for(n, cfg["stage1"]["batch_size"])
    images_per_second = measure_images_per_second(cfg, data, device, probe_batch)
    if minutes is not None:
        # passes the minutes buy, less the validation passes (estimate_minutes is linear in the passes)
        per_pass = estimate_minutes(_fields_for(recipe_cfg, data, 4.0), data, images_per_second, views) / 4
        passes = max(views + 1.0, minutes / per_pass)
        passes_why = f"{minutes:g} minutes at {images_per_second:.0f} images/s = {passes:.1f} passes"
    elif budget is not None:
        passes, passes_why = float(budget), f"a budget of {budget:g} passes"
    else:
        passes = float(default_passes(n))
        passes_why = f"default budget for {n} images: {passes:g} passes (50,000 / N in [20, 200])"
    derived = [d for d in derive(recipe_cfg, data, passes, passes_why, given) if d.field not in overrides]
    cfg = load_config(recipe, {**data_set, **{d.field: d.value for d in derived}, **overrides})
    if cfg["data"]["image_size"] != data.image_size[0]:
        data = data_from_config(cfg)
    fields = {f"{sec}.{k}": v for sec in ("stage1", "stage2") for k, v in cfg[sec].items()}
    estimate = estimate_minutes(fields, data, images_per_second, views)

    stats = data.file_stats
    modes = ", ".join(f"{m} {c}" for m, c in sorted(stats.get("modes", {}).items(), key=lambda kv: -kv[1]))
    lines = [f"{folder}: recipe {cfg['name']}, {data.num_classes} classes, "
             f"{n} training / {len(data.val_idx)} validation / "
             f"{0 if data.test_source is None else len(data.test_source)} test images",
             f"images: {modes}; decoded to {'grayscale (1 channel)' if data.channels == 1 else 'RGB (3 channels)'} "
             f"at {data.image_size[0]} x {data.image_size[0]}",
             *data.skipped_report(),
             "plan (each line: value, where it came from, how to override):"]
    width = max(len(d.field) for d in derived) if derived else 0
    for d in derived:
        lines.append(f"  {d.field:<{width}} = {d.value!s:<6} {d.why}   [--set {d.field}=...]")
    for field in sorted(overrides):
        lines.append(f"  {field} as given")
    lines.append(f"estimated time: {estimate:.1f} minutes on {device} ({images_per_second:.0f} training images/s "
                 f"measured on {probe_batch}-image steps here; a budget in passes or minutes changes it)")
    return cfg, data, lines


def _fields_for(cfg: dict, data, passes: float) -> dict:
    fields = {f"{sec}.{k}": v for sec in ("stage1", "stage2") for k, v in cfg[sec].items()}
    fields.update({d.field: d.value for d in derive(cfg, data, passes, "")})
    return fields


def estimate_for_config(cfg: dict, stages: tuple[int, ...] = (1, 2)) -> tuple[object, list[str]]:
    """(data, lines to print) for a recipe run (`tailwise train --config`): the same time estimate a folder run
    prints, from the images/s measured on a few real training steps here, for the stages to be trained."""
    from tailwise.training import engine
    from tailwise.training.train import data_from_config

    data = data_from_config(cfg)
    device = engine.resolve_device(cfg["device"])
    views = 2 if cfg["stage1"]["method"] == "bns" else 1
    batch = min(cfg["stage1"]["batch_size"], len(data.train_idx))
    images_per_second = measure_images_per_second(cfg, data, device, batch)
    fields = {f"{sec}.{k}": v for sec in ("stage1", "stage2") for k, v in cfg[sec].items()}
    if 1 not in stages:
        fields["stage1.epochs"] = 0
    if 2 not in stages or not cfg["stage2"]["enabled"]:
        fields["stage2.epochs"] = 0
    estimate = estimate_minutes(fields, data, images_per_second, views)
    return data, [f"estimated time: {estimate:.1f} minutes on {device} ({images_per_second:.0f} training images/s "
                  f"measured on {batch}-image steps here; stage 1 {fields['stage1.epochs']} epochs, stage 2 "
                  f"{fields['stage2.epochs']}; an estimate, not a limit)"]
