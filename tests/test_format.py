"""tailwise/format.py, the one format of run and model folders: the logit adjustment, the metadata (its round trip
through a real ONNX file, format 1 read as format 2), the manifest, the resize policy a card records (and the
rule for cards without one), and option errors worded for their caller."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from tailwise import OptionError, UserError
from tailwise import format as fmt
from tailwise.cli import cli_message

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "fmnist-lt-tailwise"   # format 3; a format-1 model is its metadata as format 1 wrote it


def test_adjust_logits_is_logits_minus_tau_log_prior_in_float32():
    counts = [600, 300, 150, 40, 10]
    prior = fmt.log_prior(counts)
    np.testing.assert_allclose(prior, np.log(np.array(counts) / 1100), rtol=1e-12)
    assert np.exp(prior).sum() == pytest.approx(1.0)
    logits = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    adjusted = fmt.adjust_logits(logits, 0.75, prior)
    assert adjusted.dtype == np.float32
    np.testing.assert_array_equal(adjusted, logits - np.float32(0.75) * np.asarray(prior, dtype=np.float32))
    assert np.argmax(adjusted[:, [0, 4]].mean(0)) == 1    # the tail class gains against the head
    meta = {"logit_adjustment": {"tau": 0.75, "log_prior": prior, "prior": fmt.PRIOR_TRAIN}}
    np.testing.assert_array_equal(fmt.served_logits(logits, meta), adjusted)
    np.testing.assert_array_equal(fmt.served_logits(logits, {"logit_adjustment": None}), logits)


def test_serving_and_training_call_the_one_adjustment():
    """serving's OnnxClassifier and training's scoring give exactly format.adjust_logits (the shipped model)."""
    from tailwise.serving.artifact import OnnxClassifier

    model = OnnxClassifier(SHIPPED)
    la = model.meta["logit_adjustment"]
    logits = np.random.default_rng(1).normal(size=(3, model.meta["num_classes"])).astype(np.float32)
    np.testing.assert_array_equal(model.adjusted_logits(logits), fmt.adjust_logits(logits, la["tau"], la["log_prior"]))


def _meta(**overrides):
    fields = dict(class_names=["a", "b", "c"], channels=3, height=8, width=8, resize_policy="shorter-center-crop",
                  train_counts=[50, 10, 2], groups=["many", "medium", "few"],
                  group_thresholds={"many_above": 20, "few_below": 5}, dataset={"name": "folder", "index_sha256": None},
                  logit_adjustment={"tau": 1.0, "log_prior": fmt.log_prior([50, 10, 2]), "prior": fmt.PRIOR_TRAIN})
    return fmt.build_metadata(**{**fields, **overrides})


def test_metadata_round_trip_through_an_onnx_file(tmp_path):
    from tailwise.serving.artifact import read_metadata

    meta = _meta()
    assert meta["format_version"] == fmt.FORMAT_VERSION == 3 and meta["logit_adjustment"]["prior"] == "train"
    assert meta["prediction_sets"] is None
    proto = onnx.load(str(SHIPPED / fmt.MODEL_FILE))
    fmt.write_metadata(proto, meta)
    fmt.write_metadata(proto, meta)          # replaces, never duplicates
    assert [p.key for p in proto.metadata_props].count(fmt.METADATA_KEY) == 1
    onnx.save(proto, str(tmp_path / fmt.MODEL_FILE))
    fmt.write_manifest(tmp_path)
    assert read_metadata(tmp_path) == meta
    assert fmt.metadata_from_props({p.key: p.value for p in proto.metadata_props}, "x") == meta
    with pytest.raises(ValueError, match="logit_adjustment"):   # the prior must be named
        _meta(logit_adjustment={"tau": 1.0, "log_prior": [0.0, 0.0, 0.0]})


def _format_1(meta: dict) -> dict:
    """`meta` as format 1 wrote it: no prior named, no prediction sets."""
    old = {k: v for k, v in meta.items() if k != "prediction_sets"}
    la = meta["logit_adjustment"]
    return dict(old, format_version=1, logit_adjustment=la and {"tau": la["tau"], "log_prior": la["log_prior"]})


def test_format_1_is_read_as_format_3_with_its_prior_named_and_no_sets():
    """A format-1 model adjusted only stage-2 classifiers, by their subset's counts: that is its prior; a format-1
    or 2 model has no prediction sets. (The shipped model's metadata, written as format 1 wrote it.)"""
    from tailwise.serving.artifact import read_metadata

    shipped = read_metadata(SHIPPED)       # the shipped folder loads, its manifest valid
    assert shipped["logit_adjustment"]["prior"] == fmt.PRIOR_STAGE2_SUBSET and shipped["prediction_sets"]
    old = _format_1(shipped)
    assert set(old["logit_adjustment"]) == {"tau", "log_prior"}
    meta = fmt.parse_metadata(json.dumps(old), "shipped")
    assert meta["format_version"] == 3 and meta["logit_adjustment"]["prior"] == fmt.PRIOR_STAGE2_SUBSET
    assert meta["logit_adjustment"]["log_prior"] == old["logit_adjustment"]["log_prior"]
    assert meta == dict(shipped, prediction_sets=None)
    plain = fmt.parse_metadata(json.dumps(dict(old, logit_adjustment=None)), "x")
    assert plain["logit_adjustment"] is None
    two = dict(shipped, format_version=2)
    del two["prediction_sets"]
    assert fmt.parse_metadata(json.dumps(two), "x") == dict(shipped, prediction_sets=None)


def test_prediction_sets_are_checked_against_the_schema():
    from tailwise import conformal

    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]] * 4)
    record, _ = conformal.calibrate(probs, np.array([0, 1, 2] * 4), ["many", "medium", "few"], (0.75, 0.5))
    assert _meta(prediction_sets=record)["prediction_sets"] == record
    bad = [dict(record, score="aps"), dict(record, default=0.6), dict(record, class_counts=[4, 4]),
           dict(record, levels=[dict(record["levels"][0], thresholds=[0.1, float("nan"), 0.2])]),
           dict(record, levels=[dict(record["levels"][0], coverage=1.0)]), {"levels": []}]
    for record in bad:
        with pytest.raises(ValueError, match="prediction_sets"):
            _meta(prediction_sets=record)


def test_manifest_round_trip(tmp_path):
    from tailwise.serving.integrity import check_folder, read_manifest

    assert fmt.parse_manifest((SHIPPED / fmt.MANIFEST_FILE).read_text(), "shipped")["format_version"] == 1
    assert check_folder(SHIPPED) == []
    for name in (fmt.MODEL_FILE, fmt.variant_model("int8"), fmt.variant_report("int8"), fmt.CARD_FILE, "notes.txt"):
        (tmp_path / name).write_text(name)
    path = fmt.write_manifest(tmp_path)
    assert path.name == fmt.MANIFEST_FILE
    assert sorted(read_manifest(tmp_path)["files"]) == sorted(
        [fmt.MODEL_FILE, fmt.variant_model("int8"), fmt.variant_report("int8"), fmt.CARD_FILE])   # not notes.txt
    (tmp_path / fmt.MANIFEST_FILE).write_text('{"files": []}')
    with pytest.raises(UserError, match="not a tailwise manifest"):
        read_manifest(tmp_path)


def test_resize_policy_recorded_by_training_and_the_rule_for_older_cards(tmp_path):
    from tailwise.export.model_folder import metadata_from_card
    from tailwise.training.data import build_lt_data

    rng = np.random.default_rng(0)
    for c, n in (("a", 6), ("b", 3)):
        (tmp_path / c).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    card = build_lt_data("folder", root=str(tmp_path), val_per_class=0).card()
    assert card["resize_policy"] == "shorter-center-crop" == fmt.resize_policy_of(card)   # how training decoded it
    # recorded wins over the data set's name; older cards (no field) get the rule export used to guess by
    assert fmt.resize_policy_of({"resize_policy": "resize", "name": "folder"}) == "resize"
    assert fmt.resize_policy_of({"name": "fmnist", "build_args": {"dataset": "fmnist"}}) == "resize"
    assert fmt.resize_policy_of({"name": "cifar100"}) == "resize"
    assert fmt.resize_policy_of({"name": "folder", "build_args": {"dataset": "splits"}}) == "shorter-center-crop"
    with pytest.raises(UserError, match="resize_policy 'stretch'"):
        fmt.resize_policy_of({"resize_policy": "stretch"})
    # a new card: its recorded policy and its named prior go into the model's metadata
    classifier_card = {"stage": 1, "weights_sha256": None, "data": card,
                       "logit_adjustment": {"tau": 0.5, "log_prior": fmt.log_prior(card["counts"]),
                                            "prior": fmt.PRIOR_TRAIN}}
    meta = metadata_from_card(classifier_card)
    assert meta["input"]["resize_policy"] == "shorter-center-crop" and meta["logit_adjustment"]["prior"] == "train"


def test_option_errors_name_the_option_as_their_caller_spells_it():
    error = OptionError("{stage} needs {budget=3} and {resume=True}; {other} stays", "stage", "budget", "resume")
    assert str(error) == "stage= needs budget=3 and resume=True; {other} stays"
    assert cli_message(error) == "--stage needs --budget 3 and --resume; {other} stays"
    assert cli_message(OptionError("{parity_images} and {overrides}", "parity_images", "overrides")) == \
        "--parity-images and --set"
    assert isinstance(error, UserError)
    from tailwise.training.engine import resolve_device

    with pytest.raises(OptionError, match=r"^device=tpu: expected auto, cpu or cuda$") as error:
        resolve_device("tpu")
    assert cli_message(error.value) == "--device tpu: expected auto, cpu or cuda"
