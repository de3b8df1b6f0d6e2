"""The shipped model: files match their sha256, the card's test numbers reproduce on the real Fashion-MNIST
test set, ONNX agrees with torch, and the sample images are classified as the card says."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "fmnist-lt-tailwise"
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def readme_table(heading: str) -> list[list[str]]:
    """Rows (cells without backticks) of the first table under `heading` in the model card."""
    section = (MODEL / "README.md").read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]
    return [[c.strip().strip("`") for c in r.strip("|").split("|")] for r in rows]


def test_files_match_their_sha256():
    from tailwise.training.checkpoint import sha256_file

    rows = readme_table("## Files")
    listed = {name: digest for name, digest in rows}
    assert {"model.onnx", "weights.safetensors", "card.json"} <= set(listed)
    for name, digest in listed.items():
        assert sha256_file(MODEL / name) == digest, name
    card = json.loads((MODEL / "card.json").read_text())["training"]
    assert card["weights_sha256"] == listed["weights.safetensors"]


@pytest.fixture(scope="module")
def test_set():
    if not FMNIST.exists():
        pytest.skip("real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from tailwise.training.data import rebuild_lt_data

    card = json.loads((MODEL / "card.json").read_text())["training"]
    data = rebuild_lt_data(card["data"]["build_args"])
    assert data.index_sha256 == card["data"]["index_sha256"]
    return card, data


def _pct(x):
    return round(100 * x, 2)


@pytest.mark.slow
def test_card_numbers_reproduce_on_the_real_test_set(test_set):
    from safetensors.torch import load_file

    from tailwise.training.checkpoint import build_classifier
    from tailwise.training.metrics import evaluate_logits

    card, data = test_set
    model = build_classifier(card)
    model.load_state_dict(load_file(str(MODEL / "weights.safetensors")))
    model.eval()
    images = data.test_source.images
    with torch.no_grad():
        logits = torch.cat([model(images[i:i + 1000]) for i in range(0, len(images), 1000)]).numpy()
    labels = data.test_source.labels
    report = evaluate_logits(logits, labels, data.counts, data.groups)
    for key in ("top1", "many", "medium", "few", "mean_per_class"):
        assert _pct(report[key]) == _pct(card["test"][key]), key
    assert [_pct(a) for a in report["per_class"]] == [_pct(a) for a in card["test"]["per_class"]]
    # the card's printed table says the same
    printed = readme_table("## Test metrics")[0]
    assert printed[1:5] == [f"{100 * card['test'][k]:.2f}" for k in ("top1", "many", "medium", "few")]

    # the ONNX file (what `predict` and the service run) agrees with torch
    from tailwise.serving.artifact import OnnxClassifier

    onnx = OnnxClassifier(MODEL / "model.onnx")
    onnx_logits = np.concatenate([onnx.predict_arrays(images[i:i + 1000].numpy()) for i in range(0, len(images), 1000)])
    assert np.abs(onnx_logits - logits).max() < 1e-3
    assert (onnx_logits.argmax(1) == logits.argmax(1)).mean() >= 0.9995


def test_samples_are_classified_as_the_card_says(tmp_path):
    from tailwise.cli import main

    rows = readme_table("## Sample images")
    assert len(rows) >= 10
    out = tmp_path / "pred.jsonl"
    assert main(["predict", "--model", str(MODEL), str(MODEL / "samples"), "--output", str(out), "--top-k", "1"]) == 0
    predicted = {Path(r["path"]).name: r["predictions"][0]["label"] for r in map(json.loads, out.read_text().splitlines())}
    sets = {Path(r["path"]).name: r["set"] for r in map(json.loads, out.read_text().splitlines())}
    for file, _true, label, _prob, _group, shown in rows:
        assert predicted[Path(file).name] == label, file
        assert shown == "{" + ", ".join(sets[Path(file).name]) + "}", file   # the set the card shows


def test_default_model_is_the_shipped_one(monkeypatch):
    from tailwise.serving.artifact import default_model_path

    monkeypatch.delenv("TAILWISE_MODEL", raising=False)
    assert Path(default_model_path()).resolve() == (MODEL / "model.onnx").resolve()


@pytest.mark.slow
def test_evaluate_the_shipped_model_folder(test_set, capsys):
    """`tailwise evaluate models/fmnist-lt-tailwise` (README): onnxruntime on the data its card names, the plain
    and the served numbers of the card, labelled, in percent; nothing is written into the model folder."""
    from tailwise.cli import main

    card, _ = test_set
    before = sorted(p.name for p in MODEL.iterdir())
    capsys.readouterr()
    assert main(["evaluate", str(MODEL)]) == 0
    out = capsys.readouterr().out
    overall = next(line for line in out.splitlines() if line.startswith("overall"))
    assert overall.split()[-4:] == [f"{100 * card['test']['top1']:.2f}", "%",
                                    f"{100 * card['test']['logit_adjusted']['top1']:.2f}", "%"]
    assert f"served (logit-adjusted, tau {card['logit_adjustment']['tau']:g})" in out
    assert sorted(p.name for p in MODEL.iterdir()) == before


@pytest.mark.slow
def test_the_cards_prediction_sets_are_what_evaluate_measures(test_set, capsys):
    """The shipped model's prediction sets (calibrated on its validation split by `tailwise calibrate`): the
    coverage and set sizes its card shows are those `tailwise evaluate` measures on the 10,000 test images, and
    the sets were calibrated on validation, where each class gets exactly the share its threshold rank gives."""
    from tailwise.training.launch import evaluate

    card = json.loads((MODEL / "card.json").read_text())
    sets = card["metadata"]["prediction_sets"]
    assert sets["split"] == "validation" and sets["num_images"] == card["training"]["data"]["num_val"]
    assert [lv["conditional"] for lv in sets["levels"]] == ["class"] * len(sets["levels"])   # 100 a class
    report = evaluate(MODEL, progress=False).report["prediction_sets"]
    assert report == card["export"]["prediction_sets"]["test"]
    rows = {r[0]: r for r in readme_table("## Prediction sets")}
    for key, r in report.items():
        printed = rows[f"{100 * r['coverage_target']:g} %"]
        assert printed[1:5] == [f"{100 * r['coverage']:.2f}"] + [f"{100 * r['per_group'][g]:.2f}"
                                                                    for g in ("many", "medium", "few")]
        assert printed[5] == f"{r['mean_size']:.2f}"
    _, data = test_set
    from tailwise.export.calibrate import served_probabilities
    from tailwise.conformal import set_report

    val = np.asarray(data.val_idx)
    probs = served_probabilities(MODEL / "model.onnx", data.train_source, val)
    on_val = set_report(probs, data.train_source.labels[val], sets["levels"][0], card["metadata"]["groups"])
    n = 100   # per class: the 95th smallest score is the threshold (P(Binomial(100, 0.9) >= 95) = 0.058 <= 0.1),
    assert on_val["per_class"] == [0.95] * 10 and sets["class_counts"] == [n] * 10     # so 95 of 100 are covered
    assert sets["confidence"] == 0.9
