"""Run configuration: named recipes (TOML files in training/recipes/) merged over defaults, plus overrides.

A config is a plain nested dict. Every field has a default here, so a recipe only states what differs, and
`--set section.key=value` (TOML value syntax) overrides any field from the command line. Unknown keys are
errors, so a typo never silently trains the wrong thing, and every value is checked against RULES (type from
the default, range or choices) before any data loads.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shlex
import tomllib
from pathlib import Path
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tailwise import UserError
from tailwise.training.dataspec import DataSpec, config_rules as dataspec_rules

RECIPES_DIR = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = "tailwise"    # what `tailwise train` trains when no --config is named (chosen on validation)

DEFAULTS: dict = {
    "name": "run",
    "seed": 0,
    "device": "auto",          # auto | cpu | cuda
    "data": DataSpec().config(),   # training.dataspec: the fields, their help and allowed values
    "model": {"arch": "resnet32", "proj_hidden": 2048, "proj_dim": 128},
    # Stage 1: representation. method "bns" (contrastive, this paper) or "supervised" (a classifier trained
    # with `loss`: the baselines and the CE-encoder ablation). With method "bns", sup_loss (ce | la | bsce |
    # ldam-drw, cb, las, or "none") adds a linear classifier on the encoder trained jointly, weighted by
    # sup_weight. Losses: cb = class-balanced CE (effective-number weights), las = label-aware smoothing.
    "stage1": {
        "method": "bns", "loss_form": "released", "tau": 0.5, "m": 2, "loss": "ce", "ldam_drw_start": 0.8,
        "epochs": 200, "batch_size": 512, "lr": 1e-3, "lr_scale_batch": 256, "weight_decay": 0.05,
        "betas": [0.9, 0.95], "warmup_epochs": 10, "aug": "simclr", "aug_strength": 1.0, "amp": True,
        "class_balanced": False, "sup_loss": "none", "sup_weight": 1.0,
        "mixup": 0.0,          # supervised: mixup with lam ~ Beta(mixup, mixup) (MiSLAS stage 1); 0: off
        "decay_all": False,    # weight decay on biases and norm weights too (Weight Balancing), not only kernels
        "probe_every": 0,      # BNS: linear probe of the encoder on validation every this many epochs (0: never)
    },
    # Stage 2: the boundary-corrected classifier re-trained on the IP-DPP subset. `logit_adjust`: choose the tau of
    # post-hoc logit adjustment on validation for the run's final classifier (either stage; 0 is a choice).
    "stage2": {
        "enabled": True, "sampler": "kdpp", "ratio": 10.0, "redraw_every": 10, "freeze_encoder": False,
        "reinit_classifier": True, "loss": "ce", "epochs": 100, "batch_size": 64, "lr": 2.5e-4,
        "lr_scale_batch": 0, "weight_decay": 0.05, "betas": [0.9, 0.95], "warmup_epochs": 5, "aug": "light",
        "aug_strength": 1.0, "amp": True, "class_balanced": False, "logit_adjust": True,
        "decay_all": False,    # as stage1.decay_all (a frozen encoder's classifier decays its bias either way)
        # Weight Balancing: after every step, project each class's classifier weights onto the ball whose radius
        # is min + max_norm * (max - min) of the norms stage 2 starts from (0: off).
        "max_norm": 0.0,
        # MiSLAS: a frozen encoder keeps re-estimating its BatchNorm statistics on the stage-2 batches
        # (shift_bn); loss "las" smooths the labels by class, smooth_head for the head class .. smooth_tail.
        "shift_bn": False, "smooth_head": 0.3, "smooth_tail": 0.0,
    },
}


@dataclass(frozen=True)
class Range:
    """Allowed numbers: low <= x <= high (strict where low_open / high_open); None is unbounded."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False


LOSSES = ("ce", "la", "bsce", "ldam-drw", "cb", "las")
AUGS = ("simclr", "light", "none")
AT_LEAST_0, AT_LEAST_1, ABOVE_0, FRACTION = Range(0), Range(1), Range(0, low_open=True), Range(0, 1)

# The allowed values of a field: a tuple of choices or a Range. The type always comes from the default
# (int, float (an int is accepted), bool, str, list of numbers); a field without a rule is type-checked only.
RULES: dict[str, tuple | Range] = {
    "seed": AT_LEAST_0,
    "device": ("auto", "cpu", "cuda"),
    "model.arch": ("resnet32", "resnet18", "resnet34", "resnet50", "resnext50"),
    "model.proj_hidden": AT_LEAST_1,
    "model.proj_dim": AT_LEAST_1,
    "stage1.method": ("bns", "supervised"),
    "stage1.loss_form": ("released", "paper"),
    "stage1.tau": ABOVE_0,
    "stage1.m": AT_LEAST_1,
    "stage1.loss": LOSSES,
    "stage1.sup_loss": ("none", *LOSSES),
    "stage1.sup_weight": AT_LEAST_0,
    "stage1.probe_every": AT_LEAST_0,         # 0: never
    "stage1.ldam_drw_start": FRACTION,
    "stage1.aug": AUGS,
    "stage2.sampler": ("kdpp", "paper-alg1", "random", "none"),
    "stage2.ratio": ABOVE_0,
    "stage2.redraw_every": AT_LEAST_1,
    "stage2.loss": LOSSES,
    "stage2.aug": AUGS,
    "stage1.mixup": AT_LEAST_0,
    "stage2.max_norm": FRACTION,
    "stage2.smooth_head": FRACTION,
    "stage2.smooth_tail": FRACTION,
}
RULES.update({field: rule if isinstance(rule, tuple) else Range(rule) for field, rule in dataspec_rules().items()})
for _stage in ("stage1", "stage2"):   # the optimisation fields both stages share
    RULES.update({f"{_stage}.epochs": AT_LEAST_1, f"{_stage}.batch_size": AT_LEAST_1, f"{_stage}.lr": AT_LEAST_0,
                  f"{_stage}.lr_scale_batch": AT_LEAST_0, f"{_stage}.weight_decay": AT_LEAST_0,
                  f"{_stage}.betas": Range(0, 1, high_open=True), f"{_stage}.warmup_epochs": AT_LEAST_0,
                  f"{_stage}.aug_strength": AT_LEAST_0})


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def _merge(base: dict, update: dict, where: str = "", check=None) -> dict:
    """Write `update`'s fields into `base` (same nesting); unknown fields and non-tables where a table belongs
    are errors. `check(field, current, new)` may vet or convert each value on the way in."""
    for key, value in update.items():
        if key not in base:
            raise UserError(f"unknown config field '{where}{key}' (known: {', '.join(base)})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise UserError(f"config field {where}{key} must be a table")
            _merge(base[key], value, f"{where}{key}.", check)
        else:
            base[key] = check(f"{where}{key}", base[key], value) if check else value
    return base


def _check_number(field: str, value, rule) -> None:
    if isinstance(rule, Range):
        low_ok = rule.low is None or (value > rule.low if rule.low_open else value >= rule.low)
        high_ok = rule.high is None or (value < rule.high if rule.high_open else value <= rule.high)
        if not (low_ok and high_ok):
            bounds = [f"{'>' if rule.low_open else '>='} {rule.low:g}"] if rule.low is not None else []
            bounds += [f"{'<' if rule.high_open else '<='} {rule.high:g}"] if rule.high is not None else []
            raise UserError(f"config field {field} must be {' and '.join(bounds)}, got {value!r}")


def _check_value(field: str, default, value):
    """`value` checked against the default's type and RULES[field]; returns it (an int made float if need be)."""
    rule = RULES.get(field)

    def wrong(kind):
        raise UserError(f"config field {field} must be {kind}, got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            wrong("true or false")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            wrong("an integer")
        _check_number(field, value, rule)
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            wrong("a number")
        value = float(value)
        if not math.isfinite(value):
            wrong("a finite number")
        _check_number(field, value, rule)
    elif isinstance(default, str):
        if not isinstance(value, str):
            wrong("a string")
    elif isinstance(default, list):
        if (not isinstance(value, list) or len(value) != len(default)
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
            wrong(f"a list of {len(default)} numbers")
        value = [float(v) for v in value]
        for v in value:
            _check_number(field, v, rule)
    if isinstance(rule, tuple) and value not in rule:
        raise UserError(f"config field {field} must be one of {', '.join(map(str, rule))}, got {value!r}")
    return value


def validate_config(cfg: dict) -> dict:
    """Check every field of `cfg` (types, ranges, choices) against DEFAULTS and RULES; UserError naming the
    first bad field. Returns cfg (ints given for float fields become floats)."""
    def missing(defaults: dict, node: dict, where: str) -> None:
        for key, default in defaults.items():
            if key not in node:
                raise UserError(f"config misses field '{where}{key}'")
            if isinstance(default, dict) and isinstance(node[key], dict):
                missing(default, node[key], f"{where}{key}.")

    checked = _merge(copy.deepcopy(DEFAULTS), cfg, check=_check_value)
    missing(DEFAULTS, cfg, "")
    for section, value in checked.items():          # in place, as callers rely on (ints become floats)
        if isinstance(value, dict):
            cfg[section].update(value)
        else:
            cfg[section] = value
    return cfg


def load_config(recipe: str | None = None, overrides: Mapping[str, Any] | Iterable[str] = ()) -> dict:
    """Defaults, then the recipe (a name from training/recipes/ or a path to a TOML file), then overrides;
    validated (validate_config) before it is returned."""
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
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None
        cfg["name"] = cfg["name"] if cfg["name"] != "run" else path.stem
    return apply_overrides(cfg, overrides)


def recorded_config(config: dict) -> dict:
    """A config as a checkpoint card recorded it, with the fields added since then at their defaults."""
    return _merge(copy.deepcopy(DEFAULTS), config)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`--set` strings, `section.key=value` (TOML value syntax; a bare word is a string), as
    {"section.key": value}; a later one of the same field wins."""
    parsed = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"override {item!r} must look like section.key=value")
        try:
            parsed[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            parsed[key.strip()] = raw  # a bare string such as cifar10
    return parsed


def apply_overrides(cfg: dict, overrides: Mapping[str, Any] | Iterable[str] = ()) -> dict:
    """`cfg` with each override written in, validated (validate_config). `overrides`: {"section.key": value}, or
    `--set` strings (parse_overrides)."""
    cfg = copy.deepcopy(cfg)
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    for key, value in overrides.items():
        node: dict = {}
        parts = key.strip().split(".")
        update = node
        for part in parts[:-1]:
            update = update.setdefault(part, {})
        update[parts[-1]] = value
        _merge(cfg, node)
    return validate_config(cfg)


def reproduce_command(cfg: dict, out: str, stage: int | None = None) -> str:
    """`tailwise train` that trains `cfg` again into `out`: its recipe plus a --set for every field that differs
    from it (a config whose name is no recipe here: every field that differs from the defaults).

    With `stage`, the command trains that stage only (`--stage N`) and names no field of the other stage."""
    try:
        base, head = load_config(cfg["name"]), [f"--config {cfg['name']}"]
    except UserError:  # no recipe of that name: spell out everything against the default recipe (no --config)
        base, head = load_config(DEFAULT_RECIPE), [f"--set {_shell('name=' + json.dumps(cfg['name']))}"]
    skip = {f"stage{3 - stage}"} if stage else set()
    changed = []
    for section, values in cfg.items():
        if section in skip:
            continue
        if isinstance(values, dict):
            changed += [(f"{section}.{k}", v) for k, v in values.items() if base[section].get(k) != v]
        elif section != "name" and base.get(section) != values:
            changed.append((section, values))
    flags = [f"--set {_shell(f'{key}={json.dumps(value)}')}" for key, value in changed]
    return " ".join(["tailwise train", *head, *([f"--stage {stage}"] if stage else []), *flags,
                     f"--out {_shell(str(out))}"])


def _shell(arg: str) -> str:
    return arg if re.fullmatch(r'[\w.,/:+=@"\[\]-]+', arg) else shlex.quote(arg)
