"""Config validation (issue 18, item 3): every field checked (type, range, choice) before any data loads, one-line
errors naming the field, and a failed start leaves no run folder behind."""

import subprocess
import sys
from pathlib import Path

import pytest

from tailwise import UserError
from tailwise.cli import main
from training.config import DEFAULTS, RULES, load_config, recipe_names, validate_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, message", [
    ("stage1.epochs=abc", "stage1.epochs must be an integer, got 'abc'"),
    ("stage1.epochs=1.5", "stage1.epochs must be an integer, got 1.5"),
    ("stage1.lr=fast", "stage1.lr must be a number, got 'fast'"),
    ("stage1.batch_size=-4", "stage1.batch_size must be >= 1, got -4"),
    ("stage2.sampler=randum", "stage2.sampler must be one of kdpp, paper-alg1, random, none, got 'randum'"),
    ("stage2.loss=focal", "stage2.loss must be one of"),
    ("stage1.lr=-0.1", "stage1.lr must be >= 0"),
    ("stage1.tau=0", "stage1.tau must be > 0"),
    ("stage1.lr=nan", "stage1.lr must be a finite number"),
    ("stage1.betas=[0.9]", "stage1.betas must be a list of 2 numbers"),
    ("stage1.betas=[0.9, 1.0]", "stage1.betas must be >= 0 and < 1"),
    ("stage2.amp=1", "stage2.amp must be true or false"),
    ("seed=-1", "seed must be >= 0"),
    ("device=tpu", "device must be one of auto, cpu, cuda"),
    ("data.imbalance_factor=0.5", "data.imbalance_factor must be >= 1"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(UserError, match=None) as error:
        load_config("fmnist-lt-r32", [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_good_values_pass_and_ints_become_floats():
    cfg = load_config("fmnist-lt-r32", ["stage1.lr=1", "stage2.ratio=5", "stage1.epochs=3"])
    assert cfg["stage1"]["lr"] == 1.0 and isinstance(cfg["stage1"]["lr"], float)
    assert cfg["stage1"]["epochs"] == 3 and isinstance(cfg["stage2"]["ratio"], float)
    for name in recipe_names():
        load_config(name)


def test_a_bad_recipe_file_names_file_and_field(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[stage2]\nsampler = \"randum\"\n")
    with pytest.raises(UserError, match="stage2.sampler must be one of"):
        load_config(str(recipe))
    recipe.write_text("[stage2]\nsamplr = \"kdpp\"\n")
    with pytest.raises(UserError, match=r"bad.toml: unknown config field 'stage2.samplr'"):
        load_config(str(recipe))


def test_validate_config_checks_a_dict_given_directly():
    cfg = load_config(None)
    cfg["stage2"]["redraw_every"] = 0
    with pytest.raises(UserError, match="stage2.redraw_every must be >= 1"):
        validate_config(cfg)
    del cfg["stage2"]["redraw_every"]
    with pytest.raises(UserError, match="stage2.redraw_every"):
        validate_config(cfg)


def test_rules_name_real_fields_and_match_the_code():
    from training import augment, data, ipdpp, networks

    for field in RULES:
        node = DEFAULTS
        for part in field.split("."):
            node = node[part]   # KeyError: a rule for a field that does not exist
    assert set(RULES["stage2.sampler"]) == set(ipdpp.SAMPLERS)
    assert set(RULES["stage1.aug"]) == set(RULES["stage2.aug"]) == set(augment.KINDS)
    assert set(RULES["model.arch"]) == set(networks.ARCHS)
    assert set(RULES["data.dataset"]) == set(data.DATASETS)
    assert set(RULES["data.profile"]) == set(data.PROFILES)


def test_bad_value_fails_before_data_loads_and_leaves_no_run_folder(tmp_path, capsys):
    """The data root does not exist: the error is the bad field, found before any data is read."""
    run = tmp_path / "run"
    code = main(["train", "--config", "fmnist-lt-r32", "--set", f"data.root={tmp_path / 'no-such-data'}",
                 "--set", "stage2.sampler=randum", "--out", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "stage2.sampler" in err
    assert not run.exists()


def test_one_line_error_from_a_real_process(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tailwise", "train", "--config", "fmnist-lt-r32", "--set",
                           "stage1.epochs=abc", "--out", str(tmp_path / "run")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == "tailwise train: error: config field stage1.epochs must be an integer, got 'abc'\n"
    assert not (tmp_path / "run").exists()
