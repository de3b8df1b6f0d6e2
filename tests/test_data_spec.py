"""One data spec (training.dataspec.DataSpec): the config's [data] table, the CLI's data options, what the
builder builds and what a card records to rebuild it. Every field can be set both ways, with the same result."""

import dataclasses
import json

import pytest

from tailwise import UserError
from tailwise.cli import build_parser
from tailwise.training.config import DEFAULTS, load_config
from tailwise.training.data import build_lt_data, rebuild_lt_data
from tailwise.training.dataspec import DataSpec
from tailwise.training.train import data_from_config

# a non-default value for every field, as TOML (for --set) and as a command-line word
NON_DEFAULTS = {
    "dataset": ("'cifar10'", "cifar10"), "root": ("'/data/x'", "/data/x"), "imbalance_factor": ("10", "10"),
    "profile": ("'step'", "step"), "val_per_class": ("7", "7"), "val_seed": ("3", "3"),
    "train_split": ("'t.txt'", "t.txt"), "val_split": ("'v.txt'", "v.txt"), "test_split": ("'s.txt'", "s.txt"),
    "image_size": ("48", "48"), "channels": ("1", "1"), "holdout_kept": ("false", None), "many_threshold": ("300", "300"),
    "few_threshold": ("30", "30"),
}


def data_args(*words):
    return build_parser().parse_args(["data", *words])


def test_the_config_table_is_the_spec():
    assert DEFAULTS["data"] == DataSpec().config()
    assert set(NON_DEFAULTS) == {f.name for f in dataclasses.fields(DataSpec)}     # the test names every field


@pytest.mark.parametrize("name", sorted(NON_DEFAULTS))
def test_every_field_both_ways(name):
    toml, word = NON_DEFAULTS[name]
    from_config = DataSpec.from_config(load_config(None, [f"data.{name}={toml}"])["data"])
    flag = "--" + name.replace("_", "-")
    words = [flag if word is not None else "--no-" + name.replace("_", "-")] + ([word] if word is not None else [])
    if name != "dataset":
        words = ["--dataset", "fmnist", *words]
    from_cli = DataSpec.from_args(data_args(*words))
    assert from_config == from_cli
    assert getattr(from_cli, name) != getattr(DataSpec(), name)


def test_options_not_given_keep_the_defaults():
    assert DataSpec.from_args(data_args("--dataset", "fmnist")) == DataSpec()


def test_errors_name_both_spellings():
    with pytest.raises(UserError, match=r"data.profile \(--profile\) must be one of exp, step, none"):
        DataSpec(profile="linear")
    with pytest.raises(UserError, match=r"data.imbalance_factor \(--imbalance-factor\) must be >= 1"):
        DataSpec(imbalance_factor=0.5)
    with pytest.raises(UserError, match=r"data.val_per_class \(--val-per-class\) must be int"):
        DataSpec(val_per_class=2.5)
    with pytest.raises(UserError, match="config field data.many_threshold must be >= 0"):
        load_config(None, ["data.many_threshold=-1"])


def test_card_round_trip_and_old_cards(cifar_archive):
    path, _, _ = cifar_archive(num_classes=10, per_class=40)
    cfg = load_config(None, ["data.dataset='cifar10'", f"data.root='{path}'", "data.imbalance_factor=20",
                             "data.val_per_class=4", "data.many_threshold=30", "data.few_threshold=5"])
    data = data_from_config(cfg)
    card = json.loads(json.dumps(data.card()))
    assert card["build_args"]["image_size"] is None and card["build_args"]["many_threshold"] == 30
    assert card["group_thresholds"] == {"many_above": 30, "few_below": 5}
    rebuilt = rebuild_lt_data(card["build_args"])
    assert rebuilt.spec == data.spec and rebuilt.index_sha256 == data.index_sha256 and rebuilt.groups == data.groups
    # the same data from the command line
    cli = build_lt_data(DataSpec.from_args(data_args("--dataset", "cifar10", "--root", str(path),
                                                     "--imbalance-factor", "20", "--val-per-class", "4",
                                                     "--many-threshold", "30", "--few-threshold", "5")))
    assert cli.index_sha256 == data.index_sha256 and cli.groups == data.groups
    # a card from before holdout_kept and the bands were recorded: no hold-out, literature bands
    old = {k: v for k, v in card["build_args"].items() if k not in ("holdout_kept", "many_threshold", "few_threshold")}
    assert DataSpec.from_card(old).holdout_kept is False
    assert rebuild_lt_data(old).group_thresholds() == (500, 200)


def test_tailwise_data_and_set_agree_on_the_bands(cifar_archive, capsys):
    """The issue's example: `tailwise data --many-threshold 300` and `--set data.many_threshold=300`."""
    from tailwise.cli import main

    path, _, _ = cifar_archive(num_classes=10, per_class=40)
    assert main(["data", "--dataset", "cifar10", "--root", str(path), "--imbalance-factor", "10",
                 "--val-per-class", "4", "--many-threshold", "30", "--few-threshold", "5", "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    cfg = load_config(None, ["data.dataset='cifar10'", f"data.root='{path}'", "data.imbalance_factor=10",
                             "data.val_per_class=4", "data.many_threshold=30", "data.few_threshold=5"])
    data = data_from_config(cfg)
    assert card["groups"] == data.groups and card["group_thresholds"]["many_above"] == 30
    assert card["build_args"] == json.loads(json.dumps(data.card()["build_args"]))
