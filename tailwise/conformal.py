"""Conformal prediction sets: the math, numpy only (no torch, no onnx), shared by export (calibration), serving
(the sets of each answer) and `tailwise evaluate` (their coverage on the test set).

Score: LAC ("least ambiguous set-valued classifier", Sadinle, Lei & Wasserman 2019), s(x, y) = 1 - p_y(x), where
p is the softmax of the served (logit-adjusted) logits. A class c is in the set of x when p_c(x) >= 1 - q_c, q_c
the threshold calibrated for c. LAC gives the smallest sets on average of the standard scores, needs no
randomisation, and its per-class threshold reads plainly ("Shirt is in the set when its probability is at least
0.12"); APS would give larger sets for the same coverage. A set can be empty (no class is probable enough at this
coverage: often an image unlike the training data); an empty set counts as not covering the true class.

Calibration on held-out labelled images (the run's validation split, never the test set), for coverage 1 - alpha,
with confidence 1 - delta (CONFIDENCE, 0.9): q = the k-th smallest of the n calibration scores, k the smallest rank
with P(Binomial(n, 1 - alpha) >= k) <= delta. The coverage a threshold at rank k gives a new image exchangeable with
the calibration images is itself random (it depends on which images were drawn for calibration: Beta(k, n + 1 - k));
this k makes it at least 1 - alpha with probability at least 1 - delta (the "training-conditional" guarantee, Vovk
2012), which is what a user of one calibrated model needs. The classic rank ceil((n + 1)(1 - alpha)) gives 1 - alpha
only on average over calibration draws: with 100 images of a class, one calibration's coverage of that class
spreads by about +-3 points around 90.9 % (and the shipped model's test coverage at 90 % fell to 83 % for three
classes with it; docs/GUIDE.md). Class-conditional ("Mondrian", `conditional` "class"): one q per class from that
class's images, so each class, rare ones included, gets the coverage; it needs n_y >= log(delta) / log(1 - alpha)
images of every class (min_images: 22 for 90 %). Where some class has fewer, every class of a many/medium/few
group shares its group's q ("group"); where some group has too few, one q for all ("marginal"); where even all the
images are too few, that coverage is not calibrated.

The record (`calibrate`) is what the model's metadata carries under "prediction_sets" (tailwise/format.py
validates its shape):

    {"score": "lac", "split": "validation", "num_images": int, "class_counts": [int] * C,
     "confidence": float (1 - delta; null: the classic rank),
     "default": float (one of the coverages),
     "levels": [{"coverage": float, "conditional": "class" | "group" | "marginal", "thresholds": [float] * C}]}
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tailwise._core import GROUP_NAMES

SCORE = "lac"
CONDITIONALS = ("class", "group", "marginal")
DEFAULT_COVERAGE = 0.9
CONFIDENCE = 0.9   # 1 - delta: the probability, over the calibration draw, that a level's coverage is reached
OFF = "off"   # the coverage choice that turns sets off


def softmax(logits) -> np.ndarray:
    """Row-wise softmax in float64 (the probabilities every answer reports and every set is built from)."""
    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def scores(probs: np.ndarray) -> np.ndarray:
    """The LAC nonconformity score of every class: 1 - probability, [N, C]."""
    return 1.0 - np.asarray(probs, dtype=np.float64)


def min_images(coverage: float, confidence: float | None = CONFIDENCE) -> int:
    """The fewest calibration images for which the rank exists: n with coverage ** n <= 1 - confidence (a threshold
    at the largest score still falls short with probability coverage ** n): 22 for 90 % at confidence 0.9; with
    confidence None (the classic rank), n >= 1/alpha - 1: 9 for 90 %."""
    n = 1
    if confidence is not None:
        n = max(1, math.floor(math.log(1 - confidence) / math.log(coverage)) - 1)
    while _rank(n, coverage, confidence) > n:
        n += 1
    return n


def _rank(n: int, coverage: float, confidence: float | None = CONFIDENCE) -> int:
    """The smallest k with P(Binomial(n, coverage) >= k) <= 1 - confidence (n + 1 when there is none); with
    confidence None the classic ceil((n + 1) * coverage)."""
    if confidence is None:
        return math.ceil(round((n + 1) * coverage, 9))   # robust to 0.9 * 10 = 9.000000000000002
    delta, tail, k = 1 - confidence, 0.0, n + 1
    log_p, log_q = math.log(coverage), math.log1p(-coverage)
    for j in range(n, -1, -1):        # the upper tail, summed from the top until it passes delta
        tail += math.exp(math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * log_p
                         + (n - j) * log_q)
        if tail > delta * (1 + 1e-12):
            break
        k = j
    return k


def conformal_quantile(values: np.ndarray, coverage: float, confidence: float | None = CONFIDENCE) -> float | None:
    """The k-th smallest of `values` (n of them, k = _rank(n, coverage, confidence)), or None when n is too small."""
    values = np.sort(np.asarray(values, dtype=np.float64))
    k = _rank(len(values), coverage, confidence)
    return float(values[k - 1]) if 1 <= k <= len(values) else None


def check_coverage(coverage) -> float:
    """`coverage` as a float strictly between 0 and 1, else ValueError."""
    if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not 0 < coverage < 1:
        raise ValueError(f"coverage must be a number between 0 and 1 (0.9 for 90 %), got {coverage!r}")
    return float(coverage)


def calibrate(probs, labels, groups: Sequence[str], coverages: Sequence[float] = (DEFAULT_COVERAGE,),
              split: str = "validation", confidence: float | None = CONFIDENCE) -> tuple[dict | None, list[str]]:
    """(the record of the module docstring, or None when no coverage could be calibrated; the reasons for the
    coverages left out). `probs` [N, C] softmax of the served logits of the calibration images, `labels` [N] their
    classes, `groups` the many/medium/few group of each class. The first coverage given is the default one.
    `confidence` None: the classic rank (coverage on average over calibration draws)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = probs.shape[1]
    if len(groups) != num_classes or len(labels) != len(probs):
        raise ValueError(f"calibrate: {len(probs)} rows of {num_classes} probabilities, {len(labels)} labels, "
                         f"{len(groups)} groups")
    coverages = list(dict.fromkeys(check_coverage(c) for c in coverages))
    true_scores = 1.0 - probs[np.arange(len(labels)), labels]
    class_counts = np.bincount(labels, minlength=num_classes)
    group_of = np.asarray(groups)
    levels, skipped = [], []
    for coverage in coverages:
        need = min_images(coverage, confidence)
        if class_counts.min() >= need:
            conditional = "class"
            thresholds = [conformal_quantile(true_scores[labels == c], coverage, confidence)
                          for c in range(num_classes)]
        elif all(class_counts[group_of == g].sum() >= need for g in set(groups)):
            conditional = "group"
            by_group = {g: conformal_quantile(true_scores[group_of[labels] == g], coverage, confidence)
                        for g in set(groups)}
            thresholds = [by_group[g] for g in groups]
        elif len(labels) >= need:
            conditional = "marginal"
            thresholds = [conformal_quantile(true_scores, coverage, confidence)] * num_classes
        else:
            skipped.append(f"coverage {coverage:g}: {len(labels)} calibration images, at least {need} are needed")
            continue
        levels.append({"coverage": coverage, "conditional": conditional, "thresholds": thresholds})
    if not levels:
        return None, skipped
    record = {"score": SCORE, "split": split, "num_images": int(len(labels)), "confidence": confidence,
              "class_counts": [int(n) for n in class_counts], "default": levels[0]["coverage"], "levels": levels}
    return record, skipped


def level(record: dict | None, coverage: float | str | None = None) -> dict | None:
    """The calibrated level of `record` to serve: `coverage` None: the record's default (None when the model has no
    sets); OFF ("off"): None; a number (or its text, "0.9"): the level calibrated for it, else ValueError naming the
    calibrated ones."""
    if coverage is None:
        return None if record is None else level(record, record["default"])
    if coverage == OFF:
        return None
    if isinstance(coverage, str):
        try:
            coverage = float(coverage)
        except ValueError:
            raise ValueError(f"coverage must be a calibrated coverage (0.9 for 90 %) or {OFF!r}, got "
                             f"{coverage!r}") from None
    coverage = check_coverage(coverage)
    if record is None:
        raise ValueError(f"coverage {coverage:g}: this model has no prediction sets (calibrate it with "
                         "`tailwise calibrate MODEL_DIR`)")
    for found in record["levels"]:
        if abs(found["coverage"] - coverage) < 1e-9:
            return found
    raise ValueError(f"coverage {coverage:g} is not calibrated for this model; it has "
                     f"{', '.join(f'{x:g}' for x in coverages(record))} (or {OFF!r})")


def coverages(record: dict | None) -> list[float]:
    """The coverages a record calibrated, in its order."""
    return [] if record is None else [found["coverage"] for found in record["levels"]]


def prediction_sets(probs, chosen: dict) -> np.ndarray:
    """bool [N, C]: class c is in image i's set when its score 1 - p_ic is at most the level's threshold q_c."""
    return scores(probs) <= np.asarray(chosen["thresholds"], dtype=np.float64)


def set_report(probs, labels, chosen: dict, groups: Sequence[str]) -> dict:
    """How the sets of `chosen` do on labelled images (fractions): coverage overall, per class and per group of the
    true class, the mean set size overall and per group, and the share of answers that are unsure (a set of other
    than one label) and empty. None where a class or group has no image."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    sets = prediction_sets(probs, chosen)
    covered = sets[np.arange(len(labels)), labels]
    size = sets.sum(axis=1)
    group_of = np.asarray(groups)[labels]

    def mean(values, where):
        return float(values[where].mean()) if where.any() else None

    return {
        "coverage_target": chosen["coverage"], "conditional": chosen["conditional"], "num_images": int(len(labels)),
        "coverage": mean(covered, np.ones(len(labels), bool)),
        "mean_size": mean(size, np.ones(len(labels), bool)),
        "unsure": mean(size != 1, np.ones(len(labels), bool)),
        "empty": mean(size == 0, np.ones(len(labels), bool)),
        "per_class": [mean(covered, labels == c) for c in range(probs.shape[1])],
        "per_group": {g: mean(covered, group_of == g) for g in GROUP_NAMES},
        "mean_size_per_group": {g: mean(size, group_of == g) for g in GROUP_NAMES},
    }
