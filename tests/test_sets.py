"""Prediction sets end to end (issue 26): calibrated on held-out images, they cover the true class as often as
asked on new ones, with real models; export and `tailwise calibrate` put them in the model folder (metadata,
card, manifest, model card) without losing a file; predict, the Python API and `tailwise evaluate` answer with
them. The service's answers: tests/test_service.py."""

import csv
import io
import json
import shutil

import numpy as np
import pytest

from conftest import brightness_images
from tailwise import conformal
from tailwise import format as fmt


def test_sets_cover_the_true_class_as_often_as_asked(tiny_model_dir):
    """The tiny model (really trained, brightness classes) on images with a brightness jitter that makes
    neighbouring classes overlap (top-1 about 73 %): calibrated on 1500 images, its sets hold the true class of
    5000 new ones at least 90 % (80 %) of the time, every class too, at a mean size above 1. With 300 images a
    class, the confidence-0.9 rank is the 278th (92.4 %) for 90 % and the 250th (83.1 %) for 80 %: the expected
    coverage, k / (n + 1), bounds it from above."""
    from tailwise.serving.artifact import OnnxClassifier

    model = OnnxClassifier(tiny_model_dir)
    pixels, labels = brightness_images(1500, seed=11, jitter=30)
    record, skipped = conformal.calibrate(model.probabilities(model.predict_arrays(pixels)), labels,
                                          model.meta["groups"], coverages=(0.9, 0.8))
    assert not skipped and [lv["conditional"] for lv in record["levels"]] == ["class", "class"]
    test_pixels, test_labels = brightness_images(5000, seed=12, jitter=30)
    logits = model.predict_arrays(test_pixels)
    top1 = np.mean([a["predictions"][0]["index"] == y for a, y in zip(model.answers(logits, 1, record["levels"][0]),
                                                                       test_labels)])
    assert 0.6 < top1 < 0.85   # a model that is often wrong: the sets have work to do
    sizes = {}
    assert record["confidence"] == conformal.CONFIDENCE == 0.9
    for chosen, low, high in ((record["levels"][0], 0.89, 0.945), (record["levels"][1], 0.79, 0.85)):
        answers = model.answers(logits, 1, chosen)
        covered = np.array([model.class_names[y] in a["set"] for a, y in zip(answers, test_labels)])
        assert low <= covered.mean() <= high, (chosen["coverage"], covered.mean())
        per_class = [covered[test_labels == c].mean() for c in range(5)]
        assert min(per_class) >= chosen["coverage"] - 0.06, per_class
        assert all(a["unsure"] == (len(a["set"]) != 1) for a in answers)
        sizes[chosen["coverage"]] = np.mean([len(a["set"]) for a in answers])
        # the report `tailwise evaluate` prints says the same
        report = conformal.set_report(model.probabilities(logits), test_labels, chosen, model.meta["groups"])
        assert report["coverage"] == pytest.approx(covered.mean()) and report["mean_size"] == sizes[chosen["coverage"]]
    assert 1 < sizes[0.8] < sizes[0.9] < 2.5


@pytest.fixture(scope="module")
def calibrated(exported_run, tmp_path_factory):
    """A copy of the session's exported tiny run (export calibrated it at 0.9), holding a file of the user's,
    recalibrated by `tailwise calibrate --coverage 0.8,0.9 --coverage 0.95`."""
    from tailwise.cli import main

    _, _, model = exported_run
    folder = tmp_path_factory.mktemp("calibrate") / "models" / "tiny"
    shutil.copytree(model, folder)
    (folder / "notes.txt").write_text("mine")
    assert main(["calibrate", str(folder), "--coverage", "0.8,0.9", "--coverage", "0.95"]) == 0
    return exported_run, folder


def test_export_calibrates_on_validation_by_default(exported_run):
    from tailwise.serving.artifact import read_metadata

    _, _, model = exported_run
    meta = read_metadata(model)
    sets = meta["prediction_sets"]
    assert meta["format_version"] == fmt.FORMAT_VERSION == 3
    assert sets["split"] == "validation" and sets["default"] == 0.9 and sets["score"] == "lac"
    card = json.loads((model / fmt.CARD_FILE).read_text())
    assert sets["num_images"] == card["training"]["data"]["num_val"] == sum(sets["class_counts"])
    assert card["export"]["prediction_sets"]["test"]["0.9"]["num_images"] == card["training"]["data"]["num_test"]
    assert "## Prediction sets" in (model / fmt.README_FILE).read_text()


def test_calibrate_rewrites_the_folder_and_keeps_every_file(calibrated):
    from tailwise.serving.artifact import read_metadata
    from tailwise.serving.integrity import check_folder

    (_, _, original), folder = calibrated
    assert (folder / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny"]   # nothing left beside it
    assert check_folder(folder) == []                                      # the manifest covers the new files
    meta = read_metadata(folder)
    sets = meta["prediction_sets"]
    assert [lv["coverage"] for lv in sets["levels"]] == [0.8, 0.9, 0.95] and sets["default"] == 0.8
    assert json.loads((folder / fmt.CARD_FILE).read_text())["metadata"] == meta
    # the network is untouched: the same weights, the same logits as the original
    before, after = read_metadata(original), meta
    assert {k: v for k, v in before.items() if k not in ("prediction_sets", "created_at")} == \
        {k: v for k, v in after.items() if k not in ("prediction_sets", "created_at")}
    readme = (folder / fmt.README_FILE).read_text()
    assert "| 80 % |" in readme and "| 95 % |" in readme and "--coverage 0.8,0.9,0.95" in readme


def test_calibrate_refuses_other_data_or_a_changed_model_in_one_line(calibrated, tmp_path, capsys):
    from tailwise.cli import main

    _, folder = calibrated
    copy = tmp_path / "models" / "tiny"
    shutil.copytree(folder, copy)
    card = json.loads((copy / fmt.CARD_FILE).read_text())
    card["training"]["data"]["build_args"]["imbalance_factor"] = 5   # other data than the model's
    (copy / fmt.CARD_FILE).write_text(json.dumps(card))
    fmt.write_manifest(copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    result = _run_cli(["calibrate", str(copy)])
    assert result.returncode == 2 and "trained on other data" in result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("tailwise calibrate: reading")]
    assert len(errors) == 1 and "trained on other data" in errors[0]
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before
    (copy / fmt.MODEL_FILE).write_bytes((copy / fmt.MODEL_FILE).read_bytes() + b"x")
    capsys.readouterr()
    assert main(["calibrate", str(copy)]) == 2
    assert "model.onnx: does not match manifest.json (changed since export)" in capsys.readouterr().err
    (tmp_path / "link").symlink_to(folder)   # swapping a link in would leave its target as it was: refused
    assert main(["calibrate", str(tmp_path / "link")]) == 2
    assert "a symbolic link; calibrate the folder it points to" in capsys.readouterr().err


def _run_cli(argv):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "tailwise", *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_predict_api_and_evaluate_answer_with_sets(calibrated, tmp_path, capsys):
    import tailwise
    from tailwise.cli import main

    (_, run, _), folder = calibrated
    image = next((folder / fmt.SAMPLES_DIR).glob("*.png"), None) or _an_image(tmp_path, folder)
    model = tailwise.load(folder)
    assert model.coverages == [0.8, 0.9, 0.95]
    answer = model.predict(image, top_k=2)
    assert set(answer) == {"predictions", "set", "unsure"} and len(answer["predictions"]) == 2
    assert answer["unsure"] == (len(answer["set"]) != 1)
    wide = model.predict([image, image], coverage=0.95)
    assert len(wide) == 2 and set(answer["set"]) <= set(wide[0]["set"])   # a higher coverage, a larger set
    assert model.predict(image, coverage="off")["set"] is None
    with pytest.raises(ValueError, match="0.85 is not calibrated for this model; it has 0.8, 0.9, 0.95"):
        model.predict(image, coverage=0.85)

    out = tmp_path / "p.jsonl"
    assert main(["predict", "--model", str(folder), str(image), "--output", str(out), "--coverage", "0.95"]) == 0
    record = json.loads(out.read_text())
    assert record["set"] == wide[0]["set"] and record["unsure"] == wide[0]["unsure"]
    assert main(["predict", "--model", str(folder), str(image), "--output", str(out), "--format", "csv"]) == 0
    (row,) = csv.DictReader(io.StringIO(out.read_text()))
    assert row["set"] == "|".join(answer["set"]) and row["unsure"] == str(answer["unsure"]).lower()
    capsys.readouterr()
    assert main(["predict", "--model", str(folder), str(image), "--coverage", "0.5"]) == 2
    assert "error: --coverage: coverage 0.5 is not calibrated for this model" in capsys.readouterr().err

    assert main(["evaluate", str(folder)]) == 0
    printed = capsys.readouterr().out
    report = tailwise.evaluate(folder, progress=False)["prediction_sets"]
    assert list(report) == ["0.8", "0.9", "0.95"]
    assert "prediction sets (conformal, calibrated on validation)" in printed
    assert f"{100 * report['0.8']['coverage']:6.2f} %" in printed and "coverage per class at 80 %" in printed
    card = json.loads((folder / fmt.CARD_FILE).read_text())
    assert card["export"]["prediction_sets"]["test"] == report   # the card's numbers are evaluate's


def _an_image(tmp_path, folder):
    from PIL import Image

    path = tmp_path / "x.png"
    meta = json.loads((folder / fmt.CARD_FILE).read_text())["metadata"]["input"]
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (meta["height"], meta["width"], 3), np.uint8)).save(path)
    return path


def without_sets(model_dir, folder):
    """A copy of the model folder `model_dir` in `folder`, its prediction sets taken out (as export(coverage=None)
    writes it, or an older tailwise did)."""
    import onnx

    shutil.copytree(model_dir, folder)
    proto = onnx.load(str(folder / fmt.MODEL_FILE))
    meta = fmt.metadata_from_props({p.key: p.value for p in proto.metadata_props}, folder)
    fmt.write_metadata(proto, dict(meta, prediction_sets=None))
    onnx.save(proto, str(folder / fmt.MODEL_FILE))
    fmt.write_manifest(folder)
    return folder


def test_a_model_without_sets_answers_with_null(tiny_model_dir, tmp_path):
    """A model exported without sets (export(coverage=None), or before format 3) answers with set and unsure
    null, and says why when a coverage is asked of it."""
    import tailwise
    from tailwise.cli import main

    tiny_model_dir = without_sets(tiny_model_dir, tmp_path / "plain")
    model = tailwise.load(tiny_model_dir)
    assert model.metadata["prediction_sets"] is None and model.coverages == []
    pixels, _ = brightness_images(2, seed=3)
    assert [a["set"] for a in model.predict(pixels)] == [None, None]
    with pytest.raises(ValueError, match="has no prediction sets"):
        model.predict(pixels, coverage=0.9)
    from PIL import Image

    Image.fromarray(pixels[0, 0]).save(tmp_path / "a.png")
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--model", str(tiny_model_dir), str(tmp_path / "a.png"), "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["set"] is None and record["unsure"] is None and record["predictions"]
