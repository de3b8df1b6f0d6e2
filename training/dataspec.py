"""DataSpec: every option that says which data a run trains on, written once.

The one frozen dataclass is the recipe config's ``[data]`` table (``training.config.DEFAULTS`` and its rules
come from it), the data options of ``tailwise data`` (generated from its fields), what
``training.data.build_lt_data`` builds, and the ``build_args`` a checkpoint card records to rebuild the data.
So every data option can be set both ways: ``--set data.many_threshold=300`` and ``--many-threshold 300``.

"Not given" is "" (text) or 0 (a size or band) in a spec and in TOML, which has no null; a card writes it as
null, as cards always have. Imports neither numpy nor torch: the CLI registers its options from here.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields

from tailwise import UserError

DATASETS = ("fmnist", "cifar10", "cifar100", "splits", "folder")
PROFILES = ("exp", "step", "none")
AUTO_WHEN_ZERO = ("image_size", "channels", "many_threshold", "few_threshold")   # 0: the data decides


def _option(default, help: str, choices: tuple | None = None, minimum: float | None = None):
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum})


@dataclass(frozen=True)
class DataSpec:
    """Which data: the LT benchmark subset (fmnist, cifar10, cifar100) or the user's files (splits, folder)."""

    dataset: str = _option("fmnist", "fmnist | cifar10 | cifar100 (LDAM-DRW's LT subset); splits (an image root "
                                     "and split files); folder (one subfolder per class)", choices=DATASETS)
    root: str = _option("", "data location (fmnist default: /usr/share/datasets/fashion-mnist; cifar: the python "
                            "archive or its extracted folder; splits: image root; folder: one subfolder per class)")
    imbalance_factor: float = _option(100.0, "n_max / n_min of the LT subset", minimum=1)
    profile: str = _option("exp", "class counts of the LT subset: exp, step, or none (the whole training set)",
                           choices=PROFILES)
    val_per_class: int = _option(100, "validation images per class", minimum=0)
    val_seed: int = _option(0, "seed of the validation draw", minimum=0)
    train_split: str = _option("", "splits: 'relative/path label' file of the training images")
    val_split: str = _option("", "splits: validation split file (default: held out from train)")
    test_split: str = _option("", "splits: test split file; folder: a test folder with class subfolders")
    image_size: int = _option(0, "splits/folder: square side images are decoded to (default: splits 224, folder "
                                 "from the images' median shorter side)", minimum=0)
    channels: int = _option(0, "splits/folder: 3 (RGB, the default) or 1 (grayscale) channels images are decoded "
                               "to; 0: the dataset's own (fmnist 1, cifar 3, file data 3)", choices=(0, 1, 3))
    holdout_kept: bool = _option(True, "LT benchmarks: hold the validation images of a class the LT subset keeps "
                                       "whole (the head) out of its training images; --no-holdout-kept keeps the "
                                       "literature's LDAM subset exactly (then the head has no validation images)")
    many_threshold: int = _option(0, "many: count > this (0, the default: 100 with 100+ classes, else 500; a small "
                                     "folder: see training.data.folder_group_thresholds)", minimum=0)
    few_threshold: int = _option(0, "few: count < this (0, the default: 20 with 100+ classes, else 200)", minimum=0)

    def __post_init__(self):
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            kind = type(f.default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, value := float(value))
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise UserError(f"{self.where(f.name)} must be {kind.__name__}, got {value!r}")
            if meta["choices"] and value not in meta["choices"]:
                raise UserError(f"{self.where(f.name)} must be one of {', '.join(map(str, meta['choices']))}, "
                                f"got {value!r}")
            if meta["minimum"] is not None and value < meta["minimum"]:
                raise UserError(f"{self.where(f.name)} must be >= {meta['minimum']:g}, got {value!r}")

    @staticmethod
    def where(name: str) -> str:
        """How the user names a field: both spellings."""
        return f"data.{name} (--{name.replace('_', '-')})"

    # ------------------------------------------------------------------ config ([data] table) and card forms
    @classmethod
    def create(cls, **values) -> DataSpec:
        """A spec from keyword values where None means "not given" (the field's default)."""
        return cls(**{k: v for k, v in values.items() if v is not None})

    @classmethod
    def from_config(cls, table: dict) -> DataSpec:
        return cls(**table)

    def config(self) -> dict:
        """The recipe config's [data] table."""
        return dataclasses.asdict(self)

    @classmethod
    def from_card(cls, build_args: dict) -> DataSpec:
        """The spec a card's build_args record. Cards written before holdout_kept existed had no such hold-out,
        so a missing key means False; before channels existed file data was always RGB."""
        older = {"holdout_kept": False, "channels": 3 if build_args.get("dataset") in ("splits", "folder") else 0}
        return cls.create(**{**older, **build_args})

    def card(self) -> dict:
        """build_args for a checkpoint card: "not given" as null."""
        return {f.name: self.given(f.name) for f in fields(self)}

    def given(self, name: str):
        """The field's value, or None where it is "not given" ("" or an automatic 0)."""
        value = getattr(self, name)
        return None if value == "" or (name in AUTO_WHEN_ZERO and value == 0) else value

    def replace(self, **changes) -> DataSpec:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ command line
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One option per field (--imbalance-factor for imbalance_factor; a flag pair for a bool), default:
        not given (the spec's default)."""
        group = parser.add_argument_group("data")
        for f in fields(cls):
            flag, meta = "--" + f.name.replace("_", "-"), f.metadata
            silent = f.name == "dataset" or f.default == "" or f.name in AUTO_WHEN_ZERO
            default = "" if silent else f" (default {f.default:g})" if type(f.default) is float else f" (default {f.default})"
            if isinstance(f.default, bool):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                   help=f"{meta['help']} (default: {'on' if f.default else 'off'})")
                continue
            group.add_argument(flag, type=type(f.default), choices=meta["choices"], default=None,
                               required=f.name == "dataset",
                               metavar=None if meta["choices"] else {str: "PATH", int: "N", float: "X"}[type(f.default)],
                               help=meta["help"] + default)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DataSpec:
        """The spec of the options add_arguments registered (those not given keep their defaults)."""
        return cls.create(**{f.name: getattr(args, f.name, None) for f in fields(cls)})


def config_rules() -> dict:
    """The [data] fields' allowed values for training.config.RULES: choices, or the minimum."""
    rules = {}
    for f in fields(DataSpec):
        if f.metadata["choices"]:
            rules[f"data.{f.name}"] = f.metadata["choices"]
        elif f.metadata["minimum"] is not None:
            rules[f"data.{f.name}"] = f.metadata["minimum"]
    return rules
