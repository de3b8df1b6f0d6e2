"""training.metrics against numbers worked out by hand."""

import json
import math

import numpy as np
import pytest

from tailwise import UserError
from tailwise.training.metrics import evaluate_logits, format_report, save_report

# 3 classes, 6 test samples. Predictions (argmax): 0, 0, 1, 1, 2, 0.
LOGITS = np.array([
    [2.0, 0.0, 0.0],  # label 0 -> pred 0, correct
    [1.0, 0.0, 0.0],  # label 0 -> pred 0, correct
    [0.0, 1.0, 0.0],  # label 0 -> pred 1, wrong
    [0.0, 3.0, 0.0],  # label 1 -> pred 1, correct
    [0.0, 0.0, 1.0],  # label 2 -> pred 2, correct
    [1.0, 0.0, 0.0],  # label 2 -> pred 0, wrong
])
LABELS = np.array([0, 0, 0, 1, 2, 2])
COUNTS = [1000, 300, 50]
GROUPS = ["many", "medium", "few"]
NAMES = ["cat", "dog", "axolotl"]


def test_accuracies_confusion_and_nll_match_hand_computation():
    r = evaluate_logits(LOGITS, LABELS, COUNTS, GROUPS)
    assert r["num_samples"] == 6
    assert r["top1"] == pytest.approx(4 / 6)
    assert r["per_class"] == pytest.approx([2 / 3, 1 / 1, 1 / 2])
    assert r["per_class_support"] == [3, 1, 2]
    assert r["many"] == pytest.approx(2 / 3)
    assert r["medium"] == pytest.approx(1.0)
    assert r["few"] == pytest.approx(0.5)
    assert r["mean_per_class"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)  # 13/18
    assert r["confusion"] == [[2, 1, 0],
                              [0, 1, 0],
                              [1, 0, 1]]
    # -log softmax(x)[y] = log(sum_j exp x_j) - x_y
    e = math.e
    per_sample = [
        math.log(e**2 + 2) - 2,
        math.log(e + 2) - 1,
        math.log(e + 2) - 0,
        math.log(e**3 + 2) - 3,
        math.log(e + 2) - 1,
        math.log(e + 2) - 0,
    ]
    assert r["nll"] == pytest.approx(sum(per_sample) / 6, rel=1e-12)
    assert r["train_counts"] == COUNTS and r["groups"] == GROUPS


# Logits = log(probabilities), so softmax gives the probabilities back and confidences are round numbers.
ECE_PROBS = np.array([
    [0.90, 0.05, 0.05],  # label 0: confidence 0.90, correct
    [0.70, 0.20, 0.10],  # label 1: confidence 0.70, wrong
    [0.30, 0.40, 0.30],  # label 1: confidence 0.40, correct
    [0.20, 0.45, 0.35],  # label 2: confidence 0.45, wrong
])
ECE_LABELS = np.array([0, 1, 1, 2])


@pytest.mark.parametrize("num_bins, expected", [
    # bins (0, .5], (.5, 1]: {0.40 ok, 0.45 wrong} -> |0.5 - 0.425| * 2/4; {0.90 ok, 0.70 wrong} -> |0.5 - 0.8| * 2/4
    (2, 0.075 * 0.5 + 0.3 * 0.5),  # 0.1875
    # bins of width .25: (.25, .5] as above; (.5, .75]: {0.70 wrong} -> 0.7 * 1/4; (.75, 1]: {0.90 ok} -> 0.1 * 1/4
    (4, 0.075 * 0.5 + 0.7 * 0.25 + 0.1 * 0.25),  # 0.2375
    # one bin: |accuracy 0.5 - mean confidence 0.6125|
    (1, 0.1125),
])
def test_ece_matches_hand_computation(num_bins, expected):
    r = evaluate_logits(np.log(ECE_PROBS), ECE_LABELS, [100, 100, 100], ["many"] * 3, num_bins=num_bins)
    assert r["ece"] == pytest.approx(expected, abs=1e-9)


def test_ece_zero_when_confidence_equals_accuracy():
    # two samples at confidence 0.5 (one right, one wrong) and two at confidence 1.0 (both right)
    logits = np.array([[0.0, 0.0], [0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
    r = evaluate_logits(logits, np.array([0, 1, 0, 1]), [10, 10], ["few", "few"], num_bins=10)
    assert r["ece"] == pytest.approx(0.0, abs=1e-12)


def test_class_without_test_samples():
    labels = np.array([0, 0, 0, 2, 2, 2])  # class 1 ("medium") absent; one sample is still predicted as 1
    r = evaluate_logits(LOGITS, labels, COUNTS, GROUPS)
    assert r["per_class"][1] is None
    assert r["per_class_support"] == [3, 0, 3]
    assert r["medium"] is None
    assert r["per_class"][0] == pytest.approx(2 / 3) and r["per_class"][2] == pytest.approx(1 / 3)
    assert r["mean_per_class"] == pytest.approx((2 / 3 + 1 / 3) / 2)  # over present classes only
    assert r["top1"] == pytest.approx(3 / 6)
    assert r["confusion"][1] == [0, 0, 0]
    assert r["confusion"][2] == [1, 1, 1]
    text = format_report(r, NAMES)
    assert "n/a" in text
    json.dumps(r, allow_nan=False)


def test_extreme_logits_are_finite():
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [0.0, 0.0, 1e4]], dtype=np.float32)
    r = evaluate_logits(logits, np.array([0, 0, 2]), COUNTS, GROUPS)
    assert r["top1"] == pytest.approx(2 / 3)
    assert r["nll"] == pytest.approx(2e4 / 3, rel=1e-9)  # 0 + 2e4 + 0
    assert r["ece"] == pytest.approx(1 / 3)  # one bin at confidence 1.0 with accuracy 2/3
    json.dumps(r, allow_nan=False)  # raises on NaN or infinity


@pytest.mark.parametrize("logits, labels, counts, groups, match", [
    (np.zeros(3), np.array([0, 1, 2]), COUNTS, GROUPS, "N x C"),
    (np.zeros((2, 3)), np.array([0, 1, 2]), COUNTS, GROUPS, "labels must have shape"),
    (np.zeros((2, 3)), np.array([0, 3]), COUNTS, GROUPS, r"labels must lie in \[0, 3\)"),
    (np.zeros((2, 3)), np.array([-1, 0]), COUNTS, GROUPS, "labels must lie"),
    (np.zeros((2, 3)), np.array([0.0, 1.0]), COUNTS, GROUPS, "labels must be integers"),
    (np.zeros((2, 3)), np.array([0, 1]), [1, 2], GROUPS, "counts has 2 entries"),
    (np.zeros((2, 3)), np.array([0, 1]), COUNTS, ["many", "few"], "groups has 2 entries"),
    (np.zeros((2, 3)), np.array([0, 1]), COUNTS, ["many", "tail", "few"], "tail"),
    (np.array([[0.0, np.nan, 0.0], [0.0, 0.0, 0.0]]), np.array([0, 1]), COUNTS, GROUPS, "NaN"),
])
def test_bad_inputs_raise_clear_errors(logits, labels, counts, groups, match):
    with pytest.raises(ValueError, match=match):
        evaluate_logits(logits, labels, counts, groups)


def test_save_report_writes_png_and_json_that_loads_back_equal(tmp_path):
    r = evaluate_logits(LOGITS, np.array([0, 0, 0, 2, 2, 2]), COUNTS, GROUPS)  # includes a None class
    out = tmp_path / "eval" / "run1"
    json_path, png_path = save_report(r, out, NAMES, title="toy")
    assert (json_path, png_path) == (out / "report.json", out / "per_class.png")
    assert json.loads(json_path.read_text()) == r
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png_path.stat().st_size > 5000
    assert sorted(p.name for p in out.iterdir()) == ["per_class.png", "report.json"]  # no temp files left
    save_report(r, out, NAMES)  # overwriting its own report works
    mine = tmp_path / "mine"                     # a folder with the user's own report.json: left alone
    mine.mkdir()
    (mine / "report.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="report.json exists and is not a report tailwise wrote"):
        save_report(r, mine, NAMES)
    assert (mine / "report.json").read_text() == "[1, 2]" and not (mine / "per_class.png").exists()
    with pytest.raises(ValueError, match="class_names has 2 entries"):
        save_report(r, out, NAMES[:2])


def test_format_report_mentions_groups_and_classes():
    r = evaluate_logits(LOGITS, LABELS, COUNTS, GROUPS)
    text = format_report(r, NAMES)
    for word in ("many", "medium", "few", "top-1", "ECE", "NLL", *NAMES):
        assert word in text
    assert "66.67" in text  # top-1 and the many group, in percent
    assert "50.00" in text  # few group
    axolotl_row = next(line for line in text.splitlines() if line.startswith("axolotl"))
    assert axolotl_row.split() == ["axolotl", "few", "50", "2", "50.00"]
