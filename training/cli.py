"""Subcommands owned by training/: ``data``, ``train``, ``evaluate``, ``probe``.

Registering imports no torch; each handler imports what it needs.
"""

from __future__ import annotations

import json

from tailwise.training.dataspec import DataSpec


def register(subparsers) -> None:
    """Add the training subcommands to the ``tailwise`` parser."""
    data = subparsers.add_parser(
        "data", help="build a long-tailed dataset and show its counts, groups and validation split",
        description="Build a long-tailed dataset (LDAM-DRW protocol for fmnist/cifar) and show its per-class "
                    "training/validation counts, many/medium/few groups and the sha256 of the selected indices.")
    DataSpec.add_arguments(data)
    data.add_argument("--json", action="store_true", help="print the dataset card as one JSON object")
    data.add_argument("--out", metavar="DIR", help="also write DIR/data.json (the card) and DIR/class_counts.png "
                                                   "(the class-count histogram with the many/medium/few bands); "
                                                   "files of those names replaced only if tailwise wrote them")
    data.set_defaults(handler=run_data)

    train = subparsers.add_parser(
        "train", help="train a recipe: stage 1 (an encoder: by default a supervised one with the logit-adjusted "
                      "loss; BNS or a baseline in other recipes), then stage 2 (IP-DPP)",
        description="Train a named recipe (training/recipes/*.toml) or a TOML file. Every config field can be "
                    "overridden with --set section.key=value. Under torchrun, each process trains its share "
                    "(DistributedDataParallel; nccl on CUDA, gloo on CPU).")
    train.add_argument("--config", help="recipe name or path to a TOML file (default: tailwise, the recipe that "
                                        "won on validation; see the README)")
    train.add_argument("--stage", type=int, choices=(1, 2), help="train only this stage (default: both)")
    train.add_argument("--epochs", type=int, help="epochs of the selected stage(s)")
    train.add_argument("--out", help="run folder (default runs/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the config's (auto)")
    train.add_argument("--seed", type=int, help="default: the config's (0)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set stage2.sampler=random (repeatable)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    own = train.add_argument_group(
        "your own folder", "--data DIR: the default recipe sized for the folder; every derived value is printed, "
                           "with the --set that overrides it and the estimated time, before training")
    own.add_argument("--data", metavar="DIR", help="a folder with one subfolder of images per class")
    own.add_argument("--test", metavar="DIR", help="a test folder laid out the same way (scored at the end)")
    own.add_argument("--budget", type=float, metavar="PASSES",
                     help="passes over the training images (default: 50,000 / N, between 20 and 200)")
    own.add_argument("--minutes", type=float, metavar="M", help="budget in minutes on this machine instead: "
                                                                "turned into passes by the images/s measured on a "
                                                                "few steps (an estimate, not a time limit)")
    train.set_defaults(handler=run_train)

    evaluate = subparsers.add_parser(
        "evaluate", help="score a run or an exported model on the test set (or a model on your labelled folder): "
                         "plain and served (logit-adjusted) numbers",
        description="Score a run's final classifier (torch) or an exported model folder (its ONNX model, with "
                    "onnxruntime, on the data its model card names) on the test set, or an exported model on a "
                    "labelled folder of yours (--data DIR). Prints plain-logit and served numbers side by side: "
                    "served is what `tailwise predict` and the service return.")
    evaluate.add_argument("run", help="run folder, checkpoint card, or exported model folder (models/NAME)")
    evaluate.add_argument("--data", metavar="DIR",
                          help="score an exported model on this labelled folder instead (one subfolder of images "
                               "per class, as for training): the same report, with the model's own groups")
    evaluate.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="for a run (torch)")
    evaluate.add_argument("--out", help="report folder for report.json and per_class.png, files of those names "
                                        "replaced only if tailwise wrote them (default <run>/eval; an exported "
                                        "model: none unless given)")
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON")
    evaluate.set_defaults(handler=run_evaluate)

    probe = subparsers.add_parser(
        "probe", help="linear probe of a run's stage-1 encoder (or of a randomly initialised one)")
    probe.add_argument("run", nargs="?", help="run folder (its stage-1 checkpoint)")
    probe.add_argument("--random-init", metavar="CONFIG", help="probe a randomly initialised encoder of this recipe")
    probe.add_argument("--per-class", type=int, default=100, help="balanced probe training images per class")
    probe.add_argument("--on", choices=("test", "val"), default="test",
                       help="score the probe on the test set (default) or on the validation split")
    probe.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--json", action="store_true")
    probe.set_defaults(handler=run_probe)


def run_data(args) -> int:
    from tailwise.training.data import describe_imbalance, describe_validation
    from tailwise.training.launch import describe_data
    from tailwise.training.metrics import count_bars

    data, written = describe_data(DataSpec.from_args(args), out=args.out)
    card = data.card()
    card["val_size"] = card["num_val"]
    many, few = data.group_thresholds()
    if args.json:
        print(json.dumps(card, indent=2))
        return 0
    build = card["build_args"]
    for line in data.skipped_report():
        print(line)
    print(f"{card['name']}  root={build['root']}  {describe_imbalance(card)}")
    print(f"image {card['channels']}x{card['image_size'][0]}x{card['image_size'][1]}  "
          f"train {card['num_train']}  val {card['num_val']}  test {card['num_test']}")
    print(f"validation: {describe_validation(card)}")
    print(f"index_sha256 {card['index_sha256']}")
    if data.file_stats:
        modes = ", ".join(f"{m} {n}" for m, n in sorted(data.file_stats["modes"].items(), key=lambda kv: -kv[1]))
        print(f"files: {modes} (Pillow modes; all decoded to {'grayscale' if card['channels'] == 1 else 'RGB'}); "
              f"median shorter side "
              f"{data.file_stats['median_shorter_side']} px; {data.file_stats['ignored_files']} non-image files ignored")
    width = max(5, *(len(n) for n in card["class_names"]))
    print(f"\n{'class':>5}  {'name':<{width}}  {'train':>7}  {'val':>5}  group")
    for c, (name, n, v, g) in enumerate(zip(card["class_names"], card["counts"], card["val_counts"],
                                             card["groups"])):
        print(f"{c:>5}  {name:<{width}}  {n:>7}  {v:>5}  {g}")
    for group in ("many", "medium", "few"):
        members = [n for n, g in zip(card["counts"], card["groups"]) if g == group]
        print(f"{group}: {len(members)} classes, {sum(members)} training images")
    print(f"\ntraining images per class (many: more than {many}, few: fewer than {few}; "
          f"--many-threshold / --few-threshold set them):")
    print("\n".join(count_bars(card["counts"], card["groups"], card["class_names"])))
    for path in written:
        print(f"wrote {path}")
    return 0


def run_train(args) -> int:
    from tailwise.training.config import parse_overrides
    from tailwise.training.launch import train

    run_dir = train(args.config, args.out, data=args.data, test=args.test, budget=args.budget, minutes=args.minutes,
                    stage=args.stage, epochs=args.epochs, device=args.device, seed=args.seed, resume=args.resume,
                    progress=not args.no_progress, overrides=parse_overrides(args.overrides))
    print(f"run folder: {run_dir}")
    return 0


def run_evaluate(args) -> int:
    from tailwise.format import PER_CLASS_PLOT, REPORT_FILE
    from tailwise.training.launch import evaluate
    from tailwise.training.metrics import format_evaluation

    result = evaluate(args.run, device=args.device, out=args.out, data=args.data)
    print(json.dumps(result.report, indent=2) if args.json else format_evaluation(result.report, result.class_names))
    if result.out is not None and not args.json:
        print(f"\nper-class accuracy against training count: {result.out / PER_CLASS_PLOT} "
              f"(report: {result.out / REPORT_FILE})")
    return 0


def run_probe(args) -> int:
    from tailwise.training.probe import probe_encoder

    report = probe_encoder(args.run, random_init=args.random_init, per_class=args.per_class, on=args.on,
                           device=args.device, seed=args.seed)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    where = "validation split" if args.on == "val" else "test set"
    print(f"linear probe of the {'randomly initialised' if args.random_init else 'stage-1'} encoder, {where}:")
    for label, key in (("overall (top-1)", "top1"), ("mean per class", "mean_per_class"), ("many", "many"),
                       ("medium", "medium"), ("few", "few")):
        value = report[key]
        print(f"  {label:<16} " + ("n/a" if value is None else f"{100 * value:6.2f} %"))
    return 0
