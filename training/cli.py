"""Subcommands owned by training/: ``data`` (train, evaluate and probe join later).

Registering imports no torch; each handler imports what it needs.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    """Add the training subcommands to the ``tailwise`` parser."""
    data = subparsers.add_parser(
        "data", help="build a long-tailed dataset and show its counts, groups and validation split",
        description="Build a long-tailed dataset (LDAM-DRW protocol for fmnist/cifar) and show its per-class "
                    "training/validation counts, many/medium/few groups and the sha256 of the selected indices.")
    add_data_arguments(data)
    data.add_argument("--json", action="store_true", help="print the dataset card as one JSON object")
    data.set_defaults(handler=run_data)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``build_lt_data`` (shared by every subcommand that builds data)."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", required=True, choices=("fmnist", "cifar10", "cifar100", "splits", "folder"))
    group.add_argument("--root", help="data location (fmnist default: /usr/share/datasets/fashion-mnist; "
                                      "cifar: the python archive or its extracted folder; splits: image root; "
                                      "folder: one subfolder per class)")
    group.add_argument("--imbalance-factor", type=float, default=100.0, help="n_max / n_min (default 100)")
    group.add_argument("--profile", choices=("exp", "step", "none"), default="exp", help="default exp")
    group.add_argument("--val-per-class", type=int, default=100, help="validation images per class (default 100)")
    group.add_argument("--val-seed", type=int, default=0, help="seed of the validation draw (default 0)")
    group.add_argument("--many-threshold", type=int, help="many: count > this (default 100 with 100+ classes, else 500)")
    group.add_argument("--few-threshold", type=int, help="few: count < this (default 20 with 100+ classes, else 200)")
    group.add_argument("--train-split", help="splits: 'relative/path label' file of the training images")
    group.add_argument("--val-split", help="splits: validation split file (default: held out from train)")
    group.add_argument("--test-split", help="splits: test split file; folder: a test folder with class subfolders")
    group.add_argument("--image-size", type=int, help="splits/folder: square side images are decoded to (default 224)")


def data_from_args(args):
    """``build_lt_data`` called with the options of ``add_data_arguments``."""
    from training.data import build_lt_data

    return build_lt_data(
        args.dataset, root=args.root, imbalance_factor=args.imbalance_factor, profile=args.profile,
        val_per_class=args.val_per_class, val_seed=args.val_seed, many_threshold=args.many_threshold,
        few_threshold=args.few_threshold, train_split=args.train_split, val_split=args.val_split,
        test_split=args.test_split, image_size=args.image_size)


def run_data(args) -> int:
    data = data_from_args(args)
    card = data.card()
    card["val_size"] = card["num_val"]
    if args.json:
        print(json.dumps(card, indent=2))
        return 0
    build = card["build_args"]
    print(f"{card['name']}  root={build['root']}  profile={build['profile']}  "
          f"imbalance_factor={build['imbalance_factor']:g}")
    print(f"image {card['channels']}x{card['image_size'][0]}x{card['image_size'][1]}  "
          f"train {card['num_train']}  val {card['num_val']}  test {card['num_test']}")
    print(f"index_sha256 {card['index_sha256']}")
    width = max(5, *(len(n) for n in card["class_names"]))
    print(f"\n{'class':>5}  {'name':<{width}}  {'train':>7}  {'val':>5}  group")
    for c, (name, n, v, g) in enumerate(zip(card["class_names"], card["counts"], card["val_counts"],
                                             card["groups"])):
        print(f"{c:>5}  {name:<{width}}  {n:>7}  {v:>5}  {g}")
    for group in ("many", "medium", "few"):
        members = [n for n, g in zip(card["counts"], card["groups"]) if g == group]
        print(f"{group}: {len(members)} classes, {sum(members)} training images")
    return 0
