"""tailwise/conformal.py against a case computed by hand: the finite-sample quantile, the class / group / marginal
fallback, the sets and their report; and the coverage choice every answer goes through."""

import numpy as np
import pytest

from tailwise import conformal

# Calibration images: (true class, its probability). The other classes share the rest evenly (calibration reads
# only the true class's probability). Scores 1 - p:
#   class 0 (many): 0.1 ... 0.9 (9 images)   class 1 (few): 0.4, 0.7   class 2 (few): 0.5, 0.65, 0.05
TRUE = [(0, p) for p in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)] + [(1, 0.6), (1, 0.3)] + \
       [(2, 0.5), (2, 0.35), (2, 0.95)]
GROUPS = ["many", "few", "few"]


def calibration():
    labels = np.array([c for c, _ in TRUE])
    probs = np.full((len(TRUE), 3), 0.0)
    for i, (c, p) in enumerate(TRUE):
        probs[i] = (1 - p) / 2
        probs[i, c] = p
    return probs, labels


def test_min_images_is_where_the_quantile_exists():
    # the classic rank: n >= ceil((n + 1)(1 - alpha)) first holds at n = 1/alpha - 1
    assert [conformal.min_images(c, None) for c in (0.5, 0.8, 0.9, 0.95, 0.99)] == [1, 4, 9, 19, 99]
    assert conformal.conformal_quantile([0.3, 0.1, 0.2], 0.5, None) == 0.2    # ceil(4 * 0.5) = 2nd smallest
    assert conformal.conformal_quantile(np.arange(8) / 10, 0.9, None) is None  # 8 < 9 images
    # at confidence 0.9 (the default): coverage ** n <= 0.1, n >= log 0.1 / log 0.9 = 21.9 for 90 %
    assert [conformal.min_images(c) for c in (0.5, 0.8, 0.9, 0.95)] == [4, 11, 22, 45]


def test_training_conditional_rank_by_hand():
    """The smallest k with P(Binomial(n, 0.9) >= k) <= 0.1: with 22 images, 0.9 ** 22 = 0.098 <= 0.1, so the
    largest score (k = 22; k = 21 would leave 0.098 + 22 * 0.9 ** 21 * 0.1 = 0.339); with 21, 0.9 ** 21 = 0.109:
    none; with 100, P(X >= 95) = 0.058 and P(X >= 94) = 0.117: the 95th (the classic rank is the 91st)."""
    scores = np.arange(1, 101) / 100
    assert conformal.conformal_quantile(scores[:22], 0.9) == 0.22
    assert conformal.conformal_quantile(scores[:21], 0.9) is None
    assert conformal.conformal_quantile(scores, 0.9) == 0.95
    assert conformal.conformal_quantile(scores, 0.9, None) == 0.91


def test_calibrate_by_hand():
    probs, labels = calibration()
    record, skipped = conformal.calibrate(probs, labels, GROUPS, coverages=(0.8, 0.5, 0.9, 0.95), confidence=None)
    assert record["score"] == "lac" and record["split"] == "validation" and record["num_images"] == 14
    assert record["confidence"] is None                                  # the classic rank, computable by hand
    assert record["class_counts"] == [9, 2, 3] and record["default"] == 0.8
    by = {lv["coverage"]: lv for lv in record["levels"]}
    assert list(by) == [0.8, 0.5, 0.9]
    # 0.8 needs 4 images a class; class 1 has 2 -> per group: many = class 0, the 8th (ceil(10 * 0.8)) of its 9
    # scores = 0.8; few = classes 1 and 2, the 5th (ceil(6 * 0.8)) of 0.05 0.4 0.5 0.65 0.7 = 0.7
    assert by[0.8]["conditional"] == "group"
    assert by[0.8]["thresholds"] == pytest.approx([0.8, 0.7, 0.7])
    # 0.5 needs 1: per class, the ceil((n + 1) / 2)-th: 5th of 9 = 0.5, 2nd of 2 = 0.7, 2nd of 3 = 0.5
    assert by[0.5]["conditional"] == "class"
    assert by[0.5]["thresholds"] == pytest.approx([0.5, 0.7, 0.5])
    # 0.9 needs 9: the few group has 5, so one threshold, the 14th (ceil(15 * 0.9)) of all 14 = 0.9
    assert by[0.9]["conditional"] == "marginal" and by[0.9]["thresholds"] == pytest.approx([0.9] * 3)
    # 0.95 needs 19 of the 14
    assert skipped == ["coverage 0.95: 14 calibration images, at least 19 are needed"]
    assert conformal.calibrate(probs, labels, GROUPS, coverages=(0.99,))[0] is None


def test_sets_and_their_report_by_hand():
    probs, labels = calibration()
    record, _ = conformal.calibrate(probs, labels, GROUPS, coverages=(0.5,), confidence=None)
    chosen = conformal.level(record)
    new = np.array([[0.6, 0.35, 0.05],    # scores 0.4 0.65 0.95 vs 0.5 0.7 0.5 -> {0, 1}
                    [0.2, 0.1, 0.7],      # 0.8 0.9 0.3 -> {2}
                    [0.45, 0.25, 0.3]])   # 0.55 0.75 0.7 -> {} (nothing probable enough)
    sets = conformal.prediction_sets(new, chosen)
    assert sets.tolist() == [[True, True, False], [False, False, True], [False, False, False]]
    report = conformal.set_report(new, [0, 1, 0], chosen, GROUPS)
    assert report["coverage"] == pytest.approx(1 / 3) and report["mean_size"] == 1.0
    assert report["unsure"] == pytest.approx(2 / 3) and report["empty"] == pytest.approx(1 / 3)
    assert report["per_class"] == [0.5, 0.0, None]
    assert report["per_group"] == {"many": 0.5, "medium": None, "few": 0.0}
    assert report["mean_size_per_group"] == {"many": 1.0, "medium": None, "few": 1.0}
    assert report["coverage_target"] == 0.5 and report["conditional"] == "class"


def test_choosing_a_coverage():
    probs, labels = calibration()
    record, _ = conformal.calibrate(probs, labels, GROUPS, coverages=(0.8, 0.5))
    assert conformal.level(record)["coverage"] == 0.8                 # the default: the first calibrated
    assert conformal.level(record, 0.5)["coverage"] == 0.5
    assert conformal.level(record, "0.5")["coverage"] == 0.5          # as an environment setting spells it
    assert conformal.level(record, "off") is None
    assert conformal.level(None) is None                               # a model without sets: no sets
    with pytest.raises(ValueError, match=r"0.7 is not calibrated for this model; it has 0.8, 0.5"):
        conformal.level(record, 0.7)
    with pytest.raises(ValueError, match="has no prediction sets"):
        conformal.level(None, 0.9)
    for bad in (1.5, 0, "ninety", True):
        with pytest.raises(ValueError, match="coverage"):
            conformal.level(record, bad)
