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
                                                   "(the class-count histogram with the many/medium/few bands)")
    data.set_defaults(handler=run_data)

    train = subparsers.add_parser(
        "train", help="train a recipe: stage 1 (BNS or a supervised baseline), then stage 2 (IP-DPP)",
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
    own.add_argument("--minutes", type=float, metavar="M", help="budget in minutes on this machine instead "
                                                                "(images/s measured on a few steps)")
    train.set_defaults(handler=run_train)

    evaluate = subparsers.add_parser(
        "evaluate", help="score a run or an exported model on the test set: plain and served (logit-adjusted) numbers",
        description="Score a run's final classifier (torch) or an exported model folder (its model.onnx, with "
                    "onnxruntime, on the data its card.json names) on the test set. Prints plain-logit and served "
                    "numbers side by side: served is what `tailwise predict` and the service return.")
    evaluate.add_argument("run", help="run folder, checkpoint card, or exported model folder (models/NAME)")
    evaluate.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="for a run (torch)")
    evaluate.add_argument("--out", help="report folder (default <run>/eval; an exported model: none unless given)")
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


def data_from_args(args):
    """The data of the options DataSpec.add_arguments registered."""
    from tailwise.training.data import build_lt_data

    return build_lt_data(DataSpec.from_args(args))


def run_data(args) -> int:
    from pathlib import Path

    from tailwise.training.metrics import count_bars, plot_class_counts

    data = data_from_args(args)
    card = data.card()
    card["val_size"] = card["num_val"]
    many, few = data.group_thresholds()
    written = []
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "data.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        plot_class_counts(card["counts"], card["groups"], card["class_names"], (many, few),
                          f"{card['name']}: {card['num_train']} training images, {len(card['counts'])} classes",
                          out / "class_counts.png")
        written = [out / "data.json", out / "class_counts.png"]
    if args.json:
        print(json.dumps(card, indent=2))
        return 0
    build = card["build_args"]
    for line in data.skipped_report():
        print(line)
    print(f"{card['name']}  root={build['root']}  profile={build['profile']}  "
          f"imbalance_factor={build['imbalance_factor']:g}")
    print(f"image {card['channels']}x{card['image_size'][0]}x{card['image_size'][1]}  "
          f"train {card['num_train']}  val {card['num_val']}  test {card['num_test']}")
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
    run_dir = train_from_args(args)
    print(f"run folder: {run_dir}")
    return 0


def train_from_args(args):
    """Train what the `train` options ask for; returns the run folder (also what `tailwise.train` returns)."""
    from tailwise import UserError
    from tailwise.training.config import DEFAULT_RECIPE, load_config
    from tailwise.training.train import run

    overrides = list(args.overrides)
    stages = (args.stage,) if args.stage else (1, 2)
    if args.epochs is not None:
        overrides += [f"stage{s}.epochs={args.epochs}" for s in stages]
    if args.device:
        overrides.append(f"device='{args.device}'")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    data = None
    recorded = _recorded_plan(args, overrides) if args.data and args.resume else None
    if recorded:
        cfg = recorded
    elif args.data:
        from tailwise.training.plan import plan_for_folder

        cfg, data, lines = plan_for_folder(args, overrides)
        print("\n".join(lines), flush=True)
    elif args.test or args.budget is not None or args.minutes is not None:
        raise UserError("--test, --budget and --minutes go with --data DIR")
    else:
        cfg = load_config(args.config or DEFAULT_RECIPE, overrides)
    run_dir = _run_dir(args, cfg)
    if args.resume and not any((run_dir / f"stage{s}.json").exists() for s in (1, 2)):
        raise UserError(f"{run_dir}: nothing to resume (no stage1.json or stage2.json checkpoint card there); "
                        "drop --resume to start a new run")
    run(cfg, run_dir, stages=stages, resume=args.resume, progress=not args.no_progress, data=data)
    return run_dir


def _run_dir(args, cfg: dict):
    """The run folder of the `train` options: --out, or runs/<config name>."""
    from pathlib import Path

    return Path(args.out or Path("runs") / cfg["name"])


def _recorded_plan(args, overrides: list[str]) -> dict | None:
    """`--data DIR --resume`: the config the run's newest card records (the plan it was started with; planning
    again could measure another speed and size the stages differently), with this command's --set on top."""
    from tailwise.training.checkpoint import load_card
    from tailwise.training.config import DEFAULT_RECIPE, apply_overrides, load_config, recorded_config

    run_dir = _run_dir(args, load_config(args.config or DEFAULT_RECIPE, overrides))
    if not any((run_dir / f"stage{s}.json").exists() for s in (1, 2)):
        return None
    card = load_card(run_dir)
    print(f"tailwise: resuming {run_dir} with the plan recorded in stage{card['stage']}.json"
          + (" (--budget / --minutes apply to a new run only)" if args.budget or args.minutes else ""), flush=True)
    return apply_overrides(recorded_config(card["config"]), overrides)


def run_evaluate(args) -> int:
    from pathlib import Path

    from tailwise.training.exported import is_exported_model
    from tailwise.training.metrics import format_evaluation

    path, out = Path(args.run), Path(args.out) if args.out else None
    if is_exported_model(path):
        from tailwise.training.exported import evaluate_exported

        report, class_names = evaluate_exported(path, out_dir=out)
    else:
        from tailwise.training import engine
        from tailwise.training.checkpoint import load_card
        from tailwise.training.train import evaluate_run

        report = evaluate_run(path, engine.resolve_device(args.device), out_dir=out)
        card = load_card(path)
        class_names = card["data"]["class_names"]
        out = out or Path(card["_dir"]) / "eval"
    print(json.dumps(report, indent=2) if args.json else format_evaluation(report, class_names))
    if out is not None and not args.json:
        print(f"\nper-class accuracy against training count: {out / 'per_class.png'} (report: {out / 'report.json'})")
    return 0


def run_probe(args) -> int:
    from tailwise.training import engine
    from tailwise.training.checkpoint import load_card, load_weights
    from tailwise.training.config import load_config
    from tailwise.training.data import rebuild_lt_data
    from tailwise.training.probe import linear_probe, stage1_encoder
    from tailwise import UserError

    if bool(args.run) == bool(args.random_init):
        raise UserError("give a run folder or --random-init CONFIG (one of them)")
    if args.run:
        card = load_card(args.run, stage=1)
        cfg, data = card["config"], rebuild_lt_data(card["data"]["build_args"])
    else:
        cfg = load_config(args.random_init)
        from tailwise.training.train import data_from_config
        data = data_from_config(cfg)
    import torch

    torch.manual_seed(args.seed)
    model = stage1_encoder(cfg, data, load_weights(card) if args.run else None)
    report = linear_probe(model, data, engine.resolve_device(args.device), per_class=args.per_class, seed=args.seed,
                          on=args.on)
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
