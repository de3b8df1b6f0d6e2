"""The model card: README.md beside an exported model, written from its checkpoint card and files.

Everything in it comes from the checkpoint card (config, data, training record, test report) and from the files
in the folder (their sha256), so the card never disagrees with what ships.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tailwise import format as fmt
from tailwise._core import atomic_write_text, sha256_file


def reproduce_command(cfg: dict, run_name: str, stage: int | None = None) -> str:
    """`tailwise train` for this config into runs/<run_name> (training.config.reproduce_command)."""
    from tailwise.training.config import reproduce_command as command

    return command(cfg, f"runs/{run_name}", stage)


def trained_stages(card: dict, run_name: str) -> tuple[str, list[str]]:
    """(what each stage trained, the commands that train exactly that into runs/<run_name>), from the card's
    per-stage records (`trained`: epochs run, command) where training wrote them, else from its config."""
    cfg, records = card["config"], card.get("trained") or {}
    s1, s2 = cfg["stage1"], cfg["stage2"]
    epochs1 = records.get("1", {}).get("epochs", card["epoch"] if card["stage"] == 1 else s1["epochs"])
    stage1_card = Path(card.get("_dir", "")) / fmt.stage_card(1)
    first = json.loads(stage1_card.read_text()) if card["stage"] == 2 and "_dir" in card and stage1_card.exists() \
        else None   # the stage-1 card a stage-2 card was trained on
    if "1" not in records and first:
        epochs1 = first["epoch"]   # a card from before per-stage records
    recipe = (f"stage 1: {s1['method']}" + (f" ({s1['loss_form']} form, tau {s1['tau']})" if s1["method"] == "bns"
                                             else f" ({s1['loss']})")
              + f", {epochs1} epochs, batch {s1['batch_size']}")
    if card["stage"] == 2:
        epochs2 = records.get("2", {}).get("epochs", card["epoch"])
        recipe += (f"; stage 2: sampler {s2['sampler']} (ratio {s2['ratio']:g}, redrawn every {s2['redraw_every']} "
                   f"epochs), {epochs2} epochs, batch {s2['batch_size']}, "
                   f"{'frozen encoder' if s2['freeze_encoder'] else 'full fine-tuning'}")
    commands = []
    for stage in ("1", "2"):
        command = records.get(stage, {}).get("command")
        if command:
            command = command.rsplit(" --out ", 1)[0] + f" --out runs/{run_name}"
            if command not in commands:
                commands.append(command)
    if not commands:  # a card from before per-stage records: its config, both stages in one command
        commands = [reproduce_command(cfg, run_name)]
    if len(commands) == 2 and " --stage " not in commands[1] and first and same_stage1(first["config"], cfg):
        commands = commands[1:]   # a stage 1 shared with another run, under its name: the one command trains both
    return recipe, commands


def same_stage1(trained: dict, cfg: dict) -> bool:
    """Whether the config stage 1 was trained with (`trained`, its card's) is the one `cfg` trains: equal in
    everything stage 1 depends on (all but stage 2 and the run's name, a label)."""
    return set(trained) == set(cfg) and all(trained[k] == v for k, v in cfg.items() if k not in ("stage2", "name"))


def served_what(card: dict) -> str:
    """What the model serves, in words: plain, or logit-adjusted by tau and the prior it names."""
    from tailwise.export.model_folder import served_adjustment

    la = served_adjustment(card)
    if la is None:
        return "plain"
    prior = ("the class counts of stage 2's IP-DPP subset" if la["prior"] == fmt.PRIOR_STAGE2_SUBSET
             else "the training set's class counts")
    return f"logit-adjusted (logits - {la['tau']:g} x log prior, the prior being {prior})"


def coverage_option(report: dict | None) -> str:
    """The export option that calibrates what `report` (export.calibrate's) calibrated ("" for the default)."""
    from tailwise.conformal import DEFAULT_COVERAGE

    if report is None:
        return " --coverage off"
    return "" if report["coverages"] == [DEFAULT_COVERAGE] else \
        " --coverage " + ",".join(f"{c:g}" for c in report["coverages"])


def _metadata(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / fmt.CARD_FILE).read_text())["metadata"]
    except (OSError, ValueError, KeyError):
        return None


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _sample_stem(class_name: str) -> str:
    return class_name.lower().replace("/", "-").replace(" ", "-")


def write_samples(out_dir: Path, data, per_class: int) -> list[dict]:
    """Save the first `per_class` test images of each class as PNG in out_dir/samples/ and classify them with the
    exported model, exactly as `tailwise predict` would; returns sample_rows."""
    import numpy as np
    from PIL import Image

    if data.test_source is None:
        return []
    folder = out_dir / fmt.SAMPLES_DIR
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    labels = data.test_source.labels
    picks = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(data.class_names))])
    for i, image in zip(picks, data.test_source.load(picks).numpy()):
        path = folder / f"{_sample_stem(data.class_names[labels[i]])}-{i}.png"
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(path)
    return sample_rows(out_dir)


def sample_rows(out_dir: Path) -> list[dict]:
    """The folder's samples/ images (named CLASS-INDEX.png by write_samples), in class order, each classified by
    the folder's model exactly as `tailwise predict` classifies it: [{file, true, predicted, probability, group,
    set (None without prediction sets)}]."""
    from tailwise._core import load_image
    from tailwise.serving.artifact import OnnxClassifier

    folder = out_dir / fmt.SAMPLES_DIR
    if not folder.is_dir():
        return []
    classifier = OnnxClassifier(out_dir / fmt.MODEL_FILE, verify=False)
    stems = {_sample_stem(name): c for c, name in enumerate(classifier.class_names)}
    found = []
    for path in folder.glob("*.png"):
        stem, _, index = path.stem.rpartition("-")
        if stem in stems and index.isdigit():
            found.append((stems[stem], int(index), path))
    rows = []
    for c, _, path in sorted(found):
        answer = classifier.answers(classifier.predict_arrays(load_image(path, classifier.meta)[None]), 1)[0]
        top = answer["predictions"][0]
        rows.append({"file": f"{fmt.SAMPLES_DIR}/{path.name}", "true": classifier.class_names[c],
                     "predicted": top["label"], "probability": top["probability"], "group": top["group"],
                     "set": answer["set"]})
    return rows


def rewrite_model_card(out_dir: Path, name: str | None = None) -> Path:
    """Write out_dir/README.md again from the folder's own card.json (its training card and export report) and
    files, its samples classified again: after the folder's model files changed (tailwise calibrate)."""
    out_dir = Path(out_dir)
    card = json.loads((out_dir / fmt.CARD_FILE).read_text())
    return write_model_card(out_dir, card["training"], card["export"], sample_rows(out_dir) or None, name=name)


def sets_lines(report: dict | None, data: dict, metadata: dict | None, name: str) -> list[str]:
    """The model card's section on the prediction sets: how they were calibrated and how they do on the test set
    (export.calibrate's report), per level, then per class for the default one."""
    if not report:
        return ["## Prediction sets", "", "None: this model was exported without them (answers carry `set` and "
                f"`unsure` as null); `tailwise calibrate models/{name}` adds them.", ""]
    lines = ["## Prediction sets", ""]
    if not report["levels"]:
        return lines + [f"None: {'; '.join(report['skipped'])}.", ""]
    sets = (metadata or {}).get("prediction_sets") or {}
    default = sets.get("default", report["levels"][0]["coverage"])
    conditional = {"class": "class-conditional (one threshold per class, from that class's validation images)",
                   "group": "group-conditional (one threshold per many/medium/few group: some class has too few "
                            "validation images for a threshold of its own)",
                   "marginal": "marginal (one threshold for all classes: some group has too few validation images)"}
    lines += [
        f"Every answer carries a conformal prediction set (`set`: the labels it cannot rule out) and `unsure` (the "
        f"set is not exactly one label), at {100 * default:g} % coverage unless another calibrated coverage is "
        f"chosen. Calibrated on the {report['num_images']} images of the validation split (never the test set) "
        f"with the served probabilities: class c is in the set when its probability is at least 1 - t_c "
        f"({report['score'].upper()} score; "
        + (f"each threshold reaches its coverage with confidence {sets['confidence']:g} over the draw of the "
           f"calibration images" if sets.get("confidence") else "finite-sample conformal quantile") + "), "
        + ("; ".join(f"{100 * lv['coverage']:g} %: {conditional[lv['conditional']]}" for lv in report["levels"])
           if len({lv["conditional"] for lv in report["levels"]}) > 1
           else conditional[report["levels"][0]["conditional"]]) + ".", ""]
    test = report.get("test")
    if not test:
        return lines + ["No test set to report their coverage on.", ""]
    first = next(iter(test.values()))
    lines += [f"On the balanced test set ({first['num_images']} images), by the group of the true class "
              f"(`tailwise evaluate models/{name}` prints the same):", "",
              "| target coverage | coverage % | many | medium | few | mean set size | many | medium | few | "
              "unsure % |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in test.items():
        size = r["mean_size_per_group"]
        lines.append(f"| {100 * r['coverage_target']:g} % | {_pct(r['coverage'])} | "
                     + " | ".join(_pct(r["per_group"][g]) for g in ("many", "medium", "few"))
                     + f" | {r['mean_size']:.2f} | "
                     + " | ".join("n/a" if size[g] is None else f"{size[g]:.2f}" for g in ("many", "medium", "few"))
                     + f" | {_pct(r['unsure'])} |")
    chosen = test.get(f"{default:g}", first)
    thresholds = next(lv["thresholds"] for lv in sets["levels"] if lv["coverage"] == chosen["coverage_target"]) \
        if sets else None
    lines += ["", f"Per class at {100 * chosen['coverage_target']:g} %:", "",
              "| class | group | validation images | in the set when its probability is at least | test coverage % |",
              "|---|---|---:|---:|---:|"]
    for c, cname in enumerate(data["class_names"]):
        floor = "n/a" if thresholds is None else f"{max(0.0, 1 - thresholds[c]):.3f}"
        lines.append(f"| {cname} | {data['groups'][c]} | {sets.get('class_counts', ['?'] * (c + 1))[c]} | "
                     f"{floor} | {_pct(chosen['per_class'][c])} |")
    return lines + [""]


def write_model_card(out_dir: Path, card: dict, onnx_report: dict, samples: list[dict] | None = None,
                     name: str | None = None) -> Path:
    """Write out_dir/README.md (and copy the run's per-class plot beside it); returns the README path.
    `name`: the model's name (default out_dir's), used in the card's commands."""
    from tailwise.training.data import describe_imbalance, describe_validation

    out_dir = Path(out_dir)
    if card.get("_dir"):   # a run folder (not when the card is rewritten from a model folder's card.json)
        plot = Path(card["_dir"]) / fmt.EVAL_DIR / fmt.PER_CLASS_PLOT
        if plot.exists():
            shutil.copy(plot, out_dir / fmt.PER_CLASS_PLOT)
    cfg, data, test = card["config"], card["data"], card.get("test") or {}
    build = data["build_args"]
    adjusted = test.get("logit_adjusted")
    training = card.get("training") or {}
    name = name or out_dir.name
    recipe, commands = trained_stages(card, name)
    lines = [
        f"# {name}",
        "",
        f"A {cfg['model']['arch']} classifier for {data['name']} ({len(data['class_names'])} classes, "
        f"{data['channels']}x{data['image_size'][0]}x{data['image_size'][1]} input), trained by tailwise "
        f"{card['tailwise_version']} on the long-tailed training set ({describe_imbalance(data)}) with recipe "
        f"`{cfg['name']}`: {recipe}.",
        "",
        "## Reproduce",
        "",
        "```bash",
        *commands,
        f"tailwise export runs/{name} --out models/{name}/" + coverage_option(onnx_report.get("prediction_sets")),
        "```",
        "",
        f"Training: {training.get('hardware', 'not recorded')}, torch {training.get('torch', '?')}; "
        + (", ".join(f"{k} {v / 60:.1f} min" for k, v in training.get("seconds", {}).items()) or "time not recorded")
        + (f" ({training['total_seconds'] / 60:.1f} min in all)." if training.get("total_seconds") else "."),
        "",
        "## Test metrics",
        "",
        f"Final-epoch model (epoch {card['epoch']} of stage {card['stage']}), scored once on the balanced test "
        f"set ({test.get('num_samples', 'all')} images). Groups by training count: many / medium / few.",
        "",
        "| | overall | many | medium | few | mean per class |",
        "|---|---:|---:|---:|---:|---:|",
        f"| plain logits | {_pct(test.get('top1'))} | {_pct(test.get('many'))} | {_pct(test.get('medium'))} | "
        f"{_pct(test.get('few'))} | {_pct(test.get('mean_per_class'))} |",
    ]
    if adjusted:
        lines.append(f"| logit-adjusted (tau {adjusted['tau']:g}, chosen on validation) | {_pct(adjusted['top1'])} | "
                     f"{_pct(adjusted['many'])} | {_pct(adjusted['medium'])} | {_pct(adjusted['few'])} | "
                     f"{_pct(adjusted['mean_per_class'])} |")
    lines += [
        "",
        f"The ONNX model and the service return {served_what(card)} predictions "
        f"(the adjustment travels in the model's metadata). NLL {test.get('nll', float('nan')):.4f}, "
        f"ECE {test.get('ece', float('nan')):.4f} (plain logits).",
        "",
    ]
    adjusted_per_class = (adjusted or {}).get("per_class")
    if adjusted_per_class:
        lines += ["| class | group | training images | test accuracy % | logit-adjusted % |", "|---|---|---:|---:|---:|"]
    else:
        lines += ["| class | group | training images | test accuracy % |", "|---|---|---:|---:|"]
    for c, cname in enumerate(data["class_names"]):
        acc = test.get("per_class", [None] * len(data["class_names"]))[c]
        extra = f" {_pct(adjusted_per_class[c])} |" if adjusted_per_class else ""
        lines.append(f"| {cname} | {data['groups'][c]} | {data['counts'][c]} | {_pct(acc)} |{extra}")
    if (out_dir / fmt.PER_CLASS_PLOT).exists():
        lines += ["", f"![per-class test accuracy against training count]({fmt.PER_CLASS_PLOT})"]
    lines += [""] + sets_lines(onnx_report.get("prediction_sets"), data, _metadata(out_dir), name)[:-1]
    if samples:
        lines += ["", "## Sample images", "",
                  f"Test-set images shipped in `{fmt.SAMPLES_DIR}/`, with what this model answers for them "
                  f"(`tailwise predict --model models/{name} models/{name}/samples`, or over HTTP: "
                  f"`curl -F image=@models/{name}/{samples[0]['file']} http://127.0.0.1:3000/classify`).", "",
                  "| file | true class | predicted | probability | group | set |", "|---|---|---|---:|---|---|"]
        lines += [f"| `{r['file']}` | {r['true']} | {r['predicted']} | {r['probability']:.3f} | {r['group']} | "
                  + ("n/a" if r.get("set") is None else "{" + ", ".join(r["set"]) + "}") + " |"
                  for r in samples]
    parity = onnx_report.get("parity", {})
    lines += [
        "",
        "## Data",
        "",
        f"`{build.get('dataset')}`, {describe_imbalance(data)}: "
        f"{data['num_train']} training images (per class {', '.join(map(str, data['counts']))}), "
        f"{data['num_val']} validation images ({describe_validation(data)}), "
        f"sha256 of the selected training indices `{data['index_sha256']}`.",
        "",
        "## Files",
        "",
        f"`{fmt.MODEL_FILE}` takes `pixels`, uint8 [N, {data['channels']}, {data['image_size'][0]}, "
        f"{data['image_size'][1]}] in 0..255 (normalisation is inside the graph) and returns `logits` float32 "
        f"[N, {len(data['class_names'])}]; exported with the {onnx_report.get('exporter', '?')} exporter at opset "
        f"{onnx_report.get('opset', '?')}, parity with torch checked on {parity.get('n_images', '?')} validation "
        f"images (max |logit diff| {parity.get('max_abs_logit_diff', float('nan')):.2g}).",
        "",
        "| file | sha256 |",
        "|---|---|",
    ]
    for path in sorted(out_dir.rglob("*")):
        if path.is_file() and path.name != fmt.README_FILE and not path.name.startswith("."):
            lines.append(f"| `{path.relative_to(out_dir)}` | `{sha256_file(path)}` |")
    readme = out_dir / fmt.README_FILE
    atomic_write_text(readme, "\n".join(lines) + "\n")
    return readme
