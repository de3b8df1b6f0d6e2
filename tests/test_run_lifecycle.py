"""Issue 18 on a real tiny run (stages trained by separate commands, then exported): what cards record (item 2),
evaluate's plain and served numbers for a run and an exported model (item 5), --resume (item 6), export never
replacing a model folder without --force (item 1), one-line errors and no run folder after a failed start (item 3).
"""

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from tailwise import UserError
from tailwise.cli import main
from tailwise.training import checkpoint
from tailwise.training.config import load_config

from conftest import write_recipe


def _config_of(command: str) -> tuple[dict, tuple]:
    """The config a recorded `tailwise train ...` command trains, and its stages (parsed, not run)."""
    from tailwise.cli import build_parser

    args = build_parser().parse_args(shlex.split(command)[1:])
    from tailwise.training.config import DEFAULT_RECIPE

    return load_config(args.config or DEFAULT_RECIPE, args.overrides), (args.stage,) if args.stage else (1, 2)


# exported_run (conftest): one tiny run, stages 1 and 2 trained by separate commands (one epoch each; the
# recipe says 2 and 2), then exported; shared by the session, so a test that changes it works on a copy.


@pytest.mark.slow
def test_cards_record_what_each_stage_trained(exported_run):
    recipe, run, model = exported_run
    card1, card2 = checkpoint.load_card(run, stage=1), checkpoint.load_card(run, stage=2)
    assert card1["epoch"] == 1 and card2["epoch"] == 1
    # stage 2's card holds stage 1 as it was trained (1 epoch), not the recipe's 2 epochs
    assert card2["config"]["stage1"] == card1["config"]["stage1"] and card2["config"]["stage1"]["epochs"] == 1
    assert card2["trained"]["1"] == card1["trained"]["1"]
    assert {k: card2["trained"][k]["epochs"] for k in ("1", "2")} == {"1": 1, "2": 1}
    # each recorded command trains exactly that stage with exactly that config
    for stage, card in ((1, card1), (2, card2)):
        cfg, stages = _config_of(card2["trained"][str(stage)]["command"])
        assert stages == (stage,)
        assert cfg[f"stage{stage}"] == card["config"][f"stage{stage}"]
        assert {k: v for k, v in cfg.items() if not k.startswith("stage")} == \
               {k: v for k, v in card["config"].items() if not k.startswith("stage")}
    # the exported model card says so too and gives both commands
    readme = (model / "README.md").read_text()
    assert "stage 1: bns (released form, tau 0.5), 1 epochs" in readme and ", 2 epochs" not in readme
    reproduce = readme.split("## Reproduce", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert len(reproduce) == 3 and reproduce[2] == "tailwise export runs/tiny --out models/tiny/"
    assert all(line.startswith(f'tailwise train --set name="tiny" --stage {s} ') for s, line in zip((1, 2), reproduce))
    assert all(line.endswith("--out runs/tiny") for line in reproduce[:2])
    assert _config_of(reproduce[0])[0]["stage1"] == card1["config"]["stage1"]


@pytest.mark.slow
def test_evaluate_prints_plain_and_served_for_a_run_and_an_exported_model(exported_run, capsys, tmp_path):
    _, run, model = exported_run
    capsys.readouterr()
    assert main(["evaluate", str(run), "--out", str(tmp_path / "ev-run")]) == 0
    text_run = capsys.readouterr().out
    assert main(["evaluate", str(model), "--out", str(tmp_path / "ev-model")]) == 0
    text_model = capsys.readouterr().out
    card = checkpoint.load_card(run)
    tau = card["logit_adjustment"]["tau"]   # validation may choose 0: then the exported model serves plain logits
    for text, served in ((text_run, f"served (logit-adjusted, tau {tau:g})"),
                         (text_model, f"served (logit-adjusted, tau {tau:g})" if tau else "served (= plain: no")):
        header = next(line for line in text.splitlines() if "plain logits" in line)
        assert served in header
        overall = next(line for line in text.splitlines() if line.startswith("overall"))
        assert f"{100 * card['test']['top1']:.2f} %" in overall
        assert f"{100 * card['test']['logit_adjusted']['top1']:.2f} %" in overall
    # the exported model, scored with onnxruntime on the data its card names, gives the run's numbers
    from_model = json.loads((tmp_path / "ev-model" / "report.json").read_text())
    from_run = json.loads((tmp_path / "ev-run" / "report.json").read_text())
    assert from_model["per_class"] == pytest.approx(from_run["per_class"])
    served_top1 = from_model.get("logit_adjusted", from_model)["top1"]
    assert served_top1 == pytest.approx(from_run["logit_adjusted"]["top1"])
    # served = what predict returns: the service's own classifier on the same test images
    from tailwise.serving.artifact import OnnxClassifier
    from tailwise.training.data import build_lt_data

    data = build_lt_data(**card["data"]["build_args"])
    classifier = OnnxClassifier(model)
    images = data.test_source.load(np.arange(len(data.test_source))).numpy()
    top1 = [p[0]["index"] for p in classifier.top_k(classifier.predict_arrays(images), 1)]
    assert served_top1 == pytest.approx(float(np.mean(top1 == data.test_source.labels)))
    # tailwise.evaluate: the same typed function, called directly (no report written for a model without `out`)
    import tailwise

    assert tailwise.evaluate(model)["per_class"] == from_model["per_class"]


def test_evaluate_exported_model_without_training_card(tiny_model_dir, capsys):
    assert main(["evaluate", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "card.json" in err


@pytest.mark.slow
def test_resume_a_finished_run_does_nothing_and_says_so(exported_run, tmp_path, capsys):
    recipe, run, _ = exported_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "eval" / "report.json").unlink()
    before = (copy / "stage2.json").read_bytes()
    capsys.readouterr()
    assert main(["train", "--config", str(recipe), "--out", str(copy), "--stage", "2", "--epochs", "1", "--resume",
                 "--no-progress"]) == 0
    assert "already finished (stage 2: epoch 1/1)" in capsys.readouterr().out
    assert not (copy / "eval" / "report.json").exists()     # the test set was not scored again
    assert (copy / "stage2.json").read_bytes() == before


def test_resume_without_a_run_is_an_error(tmp_path, cifar_archive, capsys):
    archive, _, _ = cifar_archive(per_class=10, test_per_class=2)
    recipe = write_recipe(tmp_path, archive)      # the shared run's recipe, on a smaller archive: nothing trains
    for run in (tmp_path / "missing", tmp_path / "empty"):
        if run.name == "empty":
            run.mkdir()
        assert main(["train", "--config", str(recipe), "--out", str(run), "--resume", "--stage", "1", "--epochs", "1",
                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "nothing to resume" in err and str(run) in err
    assert not (tmp_path / "missing").exists()


def test_stage2_without_stage1_is_refused_before_data_loads(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--config", "fmnist-lt-r32", "--set", f"data.root={tmp_path / 'none'}", "--stage", "2",
                 "--out", str(run)])
    assert code == 2 and "train it first with --stage 1" in capsys.readouterr().err and not run.exists()


@pytest.mark.slow
def test_export_never_replaces_a_model_without_force(exported_run, tmp_path, capsys):
    _, run, model = exported_run
    shipped = tmp_path / "models" / "shipped"
    shutil.copytree(model, shipped)
    (shipped / "model.int8.onnx").write_bytes(b"the shipped int8 model")
    before = {p.name: p.read_bytes() for p in shipped.iterdir()}
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(shipped) + "/", "--parity-images", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err and str(shipped) in err
    assert {p.name: p.read_bytes() for p in shipped.iterdir()} == before
    # with --force the folder is replaced as a whole: nothing of the old one stays, nothing is left beside it
    assert main(["export", str(run), "--out", str(shipped), "--parity-images", "8", "--force"]) == 0
    assert not (shipped / "model.int8.onnx").exists() and (shipped / "model.onnx").exists()
    assert json.loads((shipped / "card.json").read_text())["export"]["parity"]["n_images"] == 8
    assert sorted(p.name for p in shipped.parent.iterdir()) == ["shipped"]
    assert "models/shipped" in (shipped / "README.md").read_text()


def test_a_failed_start_leaves_no_run_folder_and_one_line(tmp_path, capsys):
    """A start that fails in its first epoch (the loss diverges) leaves nothing behind; the error is one line."""
    from conftest import write_cifar_archive

    archive, _, _ = write_cifar_archive(tmp_path, per_class=30, test_per_class=2)
    recipe = write_recipe(tmp_path, archive)
    run = tmp_path / "run"
    code = main(["train", "--config", str(recipe), "--out", str(run), "--stage", "1", "--epochs", "1",
                 "--set", "stage1.lr=1e30", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("tailwise train: error: FloatingPointError: stage 1 epoch 1") and "--debug" in err
    assert not run.exists()
    with pytest.raises(FloatingPointError):   # --debug: the exception itself, with its traceback
        main(["--debug", "train", "--config", str(recipe), "--out", str(run), "--stage", "1", "--epochs", "1",
              "--set", "stage1.lr=1e30", "--no-progress"])
    with pytest.raises(UserError):
        main(["train", "--config", "no-such-recipe", "--debug"])


@pytest.mark.slow
def test_people_read_percent(exported_run, capsys):
    from tailwise.training.engine import _short

    _, run, _ = exported_run
    assert _short(0.0889, "val_top1") == "8.89%" and _short(None, "val_many") == "n/a"
    capsys.readouterr()
    assert main(["probe", str(run), "--per-class", "3"]) == 0
    out = capsys.readouterr().out
    # every number is a percentage ("100.00 %", "8.89 %"), none a fraction ("0.8889")
    assert "overall (top-1)" in out and out.count(" %") >= 2 and not re.findall(r"\d+\.\d+\b(?! %)", out)


@pytest.mark.slow
def test_a_run_that_fails_in_stage_2_keeps_stage_1_record(tmp_path, cifar_archive, monkeypatch, capsys):
    """Stage 1's card is finalised as soon as stage 1 has trained: a run that dies in stage 2 and is finished by
    `--stage 2 --resume` still records the command that trained stage 1 (both stages, as it was run)."""
    from tailwise.training import train

    archive, _, _ = cifar_archive(per_class=40, test_per_class=4)
    recipe, run = write_recipe(tmp_path, archive), tmp_path / "run"
    real_stage2 = train.train_stage2

    def dies(*args, **kwargs):
        raise RuntimeError("killed in stage 2")

    monkeypatch.setattr(train, "train_stage2", dies)
    assert main(["train", "--config", str(recipe), "--epochs", "1", "--out", str(run), "--no-progress"]) != 0
    assert "killed in stage 2" in capsys.readouterr().err
    record1 = checkpoint.load_card(run, stage=1)["trained"]["1"]
    assert _config_of(record1["command"])[1] == (1, 2)
    monkeypatch.setattr(train, "train_stage2", real_stage2)
    assert main(["train", "--config", str(recipe), "--epochs", "1", "--stage", "2", "--resume", "--out", str(run),
                 "--no-progress"]) == 0
    card2 = checkpoint.load_card(run, stage=2)
    assert card2["trained"]["1"] == record1 and _config_of(card2["trained"]["2"]["command"])[1] == (2,)
    assert "test" in card2 and "logit_adjustment" in card2 and "test" not in checkpoint.load_card(run, stage=1)
