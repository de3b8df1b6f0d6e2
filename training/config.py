"""Run configuration: named recipes (TOML files in training/recipes/) merged over defaults, plus overrides.

A config is a plain nested dict. Every field has a default here, so a recipe only states what differs, and
`--set section.key=value` (TOML value syntax) overrides any field from the command line. Unknown keys are
errors, so a typo never silently trains the wrong thing.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

from tailwise import UserError

RECIPES_DIR = Path(__file__).parent / "recipes"

DEFAULTS: dict = {
    "name": "run",
    "seed": 0,
    "device": "auto",          # auto | cpu | cuda
    "data": {
        "dataset": "fmnist", "root": "", "imbalance_factor": 100.0, "profile": "exp", "val_per_class": 100,
        "val_seed": 0, "train_split": "", "val_split": "", "test_split": "", "image_size": 0, "holdout_kept": True,
    },
    "model": {"arch": "resnet32", "proj_hidden": 2048, "proj_dim": 128},
    # Stage 1: representation. method "bns" (contrastive, this paper) or "supervised" (a classifier trained
    # with `loss`: the baselines and the CE-encoder ablation). With method "bns", sup_loss (ce | la | bsce |
    # ldam-drw, or "none") adds a linear classifier on the encoder trained jointly, weighted by sup_weight.
    "stage1": {
        "method": "bns", "loss_form": "released", "tau": 0.5, "m": 2, "loss": "ce", "ldam_drw_start": 0.8,
        "epochs": 200, "batch_size": 512, "lr": 1e-3, "lr_scale_batch": 256, "weight_decay": 0.05,
        "betas": [0.9, 0.95], "warmup_epochs": 10, "aug": "simclr", "aug_strength": 1.0, "amp": True,
        "class_balanced": False, "sup_loss": "none", "sup_weight": 1.0,
        "probe_every": 0,      # BNS: linear probe of the encoder on validation every this many epochs (0: never)
    },
    # Stage 2: the boundary-corrected classifier re-trained on the IP-DPP subset.
    "stage2": {
        "enabled": True, "sampler": "kdpp", "ratio": 10.0, "redraw_every": 10, "freeze_encoder": False,
        "reinit_classifier": True, "loss": "ce", "epochs": 100, "batch_size": 64, "lr": 2.5e-4,
        "lr_scale_batch": 0, "weight_decay": 0.05, "betas": [0.9, 0.95], "warmup_epochs": 5, "aug": "light",
        "aug_strength": 1.0, "amp": True, "class_balanced": False, "logit_adjust": True,
    },
}


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def _merge(base: dict, update: dict, where: str = "") -> dict:
    for key, value in update.items():
        if key not in base:
            raise UserError(f"unknown config field '{where}{key}' (known: {', '.join(base)})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise UserError(f"config field {where}{key} must be a table")
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = value
    return base


def load_config(recipe: str | None = None, overrides: list[str] = ()) -> dict:
    """Defaults, then the recipe (a name from training/recipes/ or a path to a TOML file), then overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    if recipe:
        path = Path(recipe)
        if not path.suffix:
            path = RECIPES_DIR / f"{recipe}.toml"
            if not path.exists():
                raise UserError(f"no recipe named {recipe!r} (available: {', '.join(recipe_names())})")
        try:
            _merge(cfg, tomllib.loads(path.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UserError(f"{path}: cannot read recipe ({exc})") from exc
        cfg["name"] = cfg["name"] if cfg["name"] != "run" else path.stem
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"override {item!r} must look like section.key=value")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string such as cifar10
        node: dict = {}
        parts = key.strip().split(".")
        update = node
        for part in parts[:-1]:
            update = update.setdefault(part, {})
        update[parts[-1]] = value
        _merge(cfg, node)
    return cfg
