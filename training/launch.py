"""The typed functions behind `tailwise train`, `tailwise evaluate` and `tailwise data`: training/cli.py parses
its arguments and calls these, and the Python API (`tailwise.train`, `tailwise.evaluate`) calls them with the
same keywords.

`train` turns a recipe (or the default recipe sized for a folder, training/plan.py) plus overrides into a config
and runs it (training.train.run); `evaluate` scores a run (torch) or an exported model folder (onnxruntime).
Errors about an option are OptionErrors: `budget=` here, `--budget` on the command line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailwise import OptionError
from tailwise import format as fmt


def train(config: str | os.PathLike | None = None, out: str | os.PathLike | None = None, *,
          data: str | os.PathLike | None = None, test: str | os.PathLike | None = None,
          budget: float | None = None, minutes: float | None = None, stage: int | None = None,
          epochs: int | None = None, device: str | None = None, seed: int | None = None, resume: bool = False,
          progress: bool = True, overrides: Mapping[str, Any] | None = None) -> Path:
    """Train `config` (a recipe name from training/recipes/ or a TOML file; default: the default recipe) into the
    run folder `out` (default runs/<config name>) and return the folder.

    `data`: a folder of class subfolders instead of the recipe's data, the default recipe sized for it
    (`test`: its test folder; `budget` passes or `minutes` on this machine). `stage`: train only stage 1 or 2.
    `epochs`, `device`, `seed`: set those config fields (epochs: of the stages trained). `overrides`:
    {"section.key": value} for any other field (`--set`); `epochs`, `device` and `seed` win over them.
    `resume`: continue the run in `out` from its last checkpoint (a folder run: with the plan it recorded)."""
    from tailwise.training.config import DEFAULT_RECIPE, apply_overrides, load_config, recorded_config

    if stage not in (None, 1, 2):
        raise OptionError(f"{{stage}} must be 1 or 2 (or not given: both), got {stage!r}", "stage")
    stages = (stage,) if stage else (1, 2)
    overrides = dict(overrides or {})
    if epochs is not None:
        overrides.update({f"stage{s}.epochs": epochs for s in stages})
    overrides.update({k: v for k, v in (("device", device), ("seed", seed)) if v is not None})
    if data is None and (test is not None or budget is not None or minutes is not None):
        raise OptionError("{test}, {budget} and {minutes} go with {data=DIR}", "test", "budget", "minutes", "data")
    recipe = config or DEFAULT_RECIPE
    if data is not None:   # every check that reads no data, before the folder is scanned and the speed probed
        from tailwise.training.plan import check_budget

        check_budget(budget, minutes)
        for name, folder in (("data", data), ("test", test)):
            if folder is not None and not Path(folder).is_dir():
                raise OptionError(f"{{{name}}} {folder} is "
                                  + ("not a folder" if Path(folder).exists() else "not there")
                                  + " (a folder with one subfolder of images per class)", name)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise OptionError(f"{{out}} {out} exists and is not a folder", "out")
    if not resume:
        run_dir = _run_dir(out, load_config(recipe, overrides)) if out is None else Path(out)
        taken = [fmt.stage_card(s) for s in stages if (run_dir / fmt.stage_card(s)).exists()]
        if taken:
            raise OptionError(f"{run_dir / taken[0]} exists: pass {{resume=True}} to continue this run, "
                              "or choose another {out}", "resume", "out")
    cfg, planned_data = None, None
    if data is not None and resume:
        run_dir = _run_dir(out, load_config(recipe, overrides))
        card = _newest_card(run_dir)
        if card is not None:   # planning again could measure another speed and size the stages differently
            print(f"tailwise: resuming {run_dir} with the plan recorded in {fmt.stage_card(card['stage'])}"
                  + (" (a budget in passes or minutes applies to a new run only)" if budget or minutes else ""),
                  flush=True)
            cfg = apply_overrides(recorded_config(card["config"]), overrides)
    if cfg is None and data is not None:
        from tailwise.training.plan import plan_for_folder

        cfg, planned_data, lines = plan_for_folder(data, test=test, budget=budget, minutes=minutes, recipe=config,
                                                   overrides=overrides)
        print("\n".join(lines), flush=True)
    elif cfg is None:
        cfg = load_config(recipe, overrides)
        if not resume and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            from tailwise.training.plan import estimate_for_config
            from tailwise.training.train import check_start

            if not check_start(cfg, _run_dir(out, cfg), stages, resume):   # refuses a bad start before data loads
                planned_data, lines = estimate_for_config(cfg, stages)
                print("\n".join(lines + _expectation(recipe, cfg, epochs, stages)), flush=True)
    run_dir = _run_dir(out, cfg)
    if resume and _newest_card(run_dir) is None:
        raise OptionError(f"{run_dir}: nothing to resume (no {fmt.stage_card(1)} or {fmt.stage_card(2)} checkpoint "
                          "card there); drop {resume} to start a new run", "resume")
    from tailwise.training.train import run

    run(cfg, run_dir, stages=stages, resume=resume, progress=progress, data=planned_data)
    return run_dir


def _expectation(recipe: str, cfg: dict, epochs: int | None, stages: tuple[int, ...]) -> list[str]:
    """What to expect of a run shortened with `epochs` (the README's quick try): a line, or none."""
    from tailwise.training.config import load_config

    full = load_config(recipe)
    shorter = [s for s in stages if epochs is not None and epochs < full[f"stage{s}"]["epochs"]]
    if not shorter:
        return []
    return [f"a short run ({epochs} epoch(s) of stage {' and '.join(map(str, shorter))}; the recipe trains "
            + " + ".join(str(full[f"stage{s}"]["epochs"]) for s in shorter)
            + "): it shows every step working, not the recipe's accuracy, which needs its full epochs "
              "(the shipped model's card, models/fmnist-lt-tailwise/README.md, has those numbers)"]


def _run_dir(out: str | os.PathLike | None, cfg: dict) -> Path:
    """The run folder: `out`, or runs/<config name>."""
    return Path(out) if out is not None else Path("runs") / cfg["name"]


def _newest_card(run_dir: Path) -> dict | None:
    from tailwise.training.checkpoint import load_card

    if not any((run_dir / fmt.stage_card(s)).exists() for s in (1, 2)):
        return None
    return load_card(run_dir)


@dataclass
class Evaluation:
    """What `evaluate` returns: the test report, the class names, and the folder the report was written to."""
    report: dict
    class_names: list[str]
    out: Path | None


def evaluate(path: str | os.PathLike, *, device: str = "auto", out: str | os.PathLike | None = None,
             data: str | os.PathLike | None = None, progress: bool = True) -> Evaluation:
    """Score on its test set a run's final classifier (a run folder or checkpoint card; torch on `device`), or an
    exported model (a model folder or its .onnx file; onnxruntime, on the data its card.json names): plain
    logits and, when there is one, with the logit adjustment that is served. The report goes to `out` (default:
    the run's eval/ folder; for an exported model, nowhere unless given).

    `data`: score an exported model on this labelled folder instead (one subfolder of images per class, as for
    training; training.exported.evaluate_folder), with the model's own many/medium/few groups.
    `progress`: say on stderr what it is doing while it works."""
    import sys

    from tailwise import UserError
    from tailwise.training.exported import evaluate_exported, evaluate_folder, is_exported_model

    def say(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    if device not in ("auto", "cpu", "cuda"):
        raise OptionError(f"{{device}} must be auto, cpu or cuda, got {device!r}", "device")
    path, out = Path(path), Path(out) if out is not None else None
    if not path.exists():
        raise UserError(f"{path}: no such run or model folder")
    if out is not None:         # before the scoring: a user's file there stops it now, not after
        from tailwise.training.metrics import check_report_folder

        check_report_folder(out)
    if data is not None:
        if not Path(data).is_dir():
            raise OptionError(f"{{data}} {data} is not a folder (one subfolder of images per class)", "data")
        if not is_exported_model(path):
            raise OptionError(f"{{data}} scores an exported model (models/NAME); {path} is not one: export the "
                              "run first with `tailwise export`", "data")
        report, class_names = evaluate_folder(path, data, out_dir=out, say=say)
        return Evaluation(report, class_names, out)
    if is_exported_model(path):
        report, class_names = evaluate_exported(path, out_dir=out, say=say)
        return Evaluation(report, class_names, out)
    from tailwise.training import engine
    from tailwise.training.checkpoint import load_card
    from tailwise.training.data import rebuild_lt_data
    from tailwise.training.train import evaluate_run

    card = load_card(path)
    build = card["data"]["build_args"]
    say(f"tailwise evaluate: reading the data {path} was trained on ({build.get('dataset')} at "
        f"{build.get('root') or 'its default root'}) and checking it is that data ...")
    lt_data = rebuild_lt_data(build, card["data"]["index_sha256"], card["_dir"])
    resolved = engine.resolve_device(device)
    say(f"tailwise evaluate: scoring {0 if lt_data.test_source is None else len(lt_data.test_source)} test images "
        f"on {resolved} ...")
    report = evaluate_run(path, resolved, data=lt_data, out_dir=out)
    return Evaluation(report, card["data"]["class_names"], out or Path(card["_dir"]) / fmt.EVAL_DIR)


def describe_data(spec, out: str | os.PathLike | None = None):
    """`tailwise data`: (the LT data a training.dataspec.DataSpec describes, the files written): with `out`, its
    card as out/data.json and the class-count histogram with the many/medium/few bands as out/class_counts.png."""
    import json

    from tailwise._core import atomic_write_text
    from tailwise.training.data import build_lt_data
    from tailwise.training.metrics import DATA_CARD_KEYS, check_overwrite, plot_class_counts

    if out is not None:          # before the data is built: a user's file there stops it now
        check_overwrite(Path(out) / "data.json", Path(out) / "class_counts.png", DATA_CARD_KEYS, "a data card")
    data = build_lt_data(spec)
    if out is None:
        return data, []
    card = dict(data.card(), val_size=len(data.val_idx))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "data.json", json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    plot_class_counts(card["counts"], card["groups"], card["class_names"], data.group_thresholds(),
                      f"{card['name']}: {card['num_train']} training images, {len(card['counts'])} classes",
                      out / "class_counts.png")
    return data, [out / "data.json", out / "class_counts.png"]
