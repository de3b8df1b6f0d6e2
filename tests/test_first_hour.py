"""Issue 25, the first hour of a new user: flags checked before any data is read, in one line naming the
user's own flag (item 7)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tailwise_in_process(args, cwd):
    """Run `tailwise ARGS` in a fresh interpreter: (exit code, stdout, stderr, whether torch was imported)."""
    code = ("import sys, json; from tailwise.cli import main; rc = main(sys.argv[1:]); "
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["rc"], proc.stdout.strip().splitlines()[:-1], proc.stderr.strip().splitlines(), result["torch"]


@pytest.fixture
def folder(tmp_path):
    from PIL import Image

    for c, n in (("a", 8), ("b", 2)):
        (tmp_path / "f" / c).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (12, 12), 10 * i).save(tmp_path / "f" / c / f"{i}.png")
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["--data", "f", "--minutes", "-1"], "--minutes must be positive, got -1"),
    (["--data", "f", "--budget", "0"], "--budget must be positive, got 0"),
    (["--data", "f", "--budget", "3", "--minutes", "2"], "give --budget or --minutes, not both"),
    (["--data", "nope"], "--data nope is not there"),
    (["--data", "f/a/0.png"], "--data f/a/0.png is not a folder"),
    (["--data", "f", "--test", "nope"], "--test nope is not there"),
    (["--data", "f", "--out", "run"], "run/stage1.json exists: pass --resume"),
    (["--data", "f", "--out", "f/a/0.png"], "--out f/a/0.png exists and is not a folder"),
])
def test_train_flags_are_checked_before_any_data_is_read(folder, args, message):
    (folder / "run").mkdir()
    (folder / "run" / "stage1.json").write_text("{}")
    rc, out, err, torch_imported = tailwise_in_process(["train", *args], folder)
    assert rc == 2 and out == [] and len(err) == 1 and message in err[0], err
    assert not torch_imported     # nothing was scanned, decoded or probed
    assert "--root" not in err[0] and "data.root" not in err[0]


def test_an_unknown_option_is_one_line_with_the_likely_flag(folder):
    rc, _, err, _ = tailwise_in_process(["predict", "x.png", "-o", "f.csv"], folder)
    assert rc == 2 and len(err) == 1 and "-o: did you mean --output?" in err[0] and "tailwise predict" in err[0]
    rc, _, err, _ = tailwise_in_process(["train", "--minuts", "3"], folder)
    assert rc == 2 and len(err) == 1 and "did you mean --minutes" in err[0]


def _folder_of(root, counts, seed=0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_a_folder_is_described_by_its_real_imbalance_and_validation(tmp_path):
    """Item 8: an 8:1 folder is not 'imbalance factor 1, none profile' nor validated 'from images the LT subset
    did not keep'."""
    from tailwise.training.data import build_lt_data, describe_imbalance, describe_validation

    data = build_lt_data("folder", root=str(_folder_of(tmp_path / "f", {"a": 80, "b": 30, "c": 10})))
    card = dict(data.card())
    assert data.counts == [64, 24, 8]
    assert describe_imbalance(card) == "imbalance factor 8 as found (largest class 64 images, smallest 8)"
    assert "held out of the training images" in describe_validation(card) and "LT subset" not in \
        describe_validation(card)
    rc, out, _, _ = tailwise_in_process(["data", "--dataset", "folder", "--root", "f"], tmp_path)
    assert rc == 0 and "imbalance factor 8 as found" in out[0] and "profile" not in out[0]
    assert any(line.startswith("validation: up to 100 per class") for line in out)
    fmnist_like = {"build_args": {"dataset": "fmnist", "profile": "exp", "imbalance_factor": 10.0,
                                  "val_per_class": 100, "holdout_kept": True}, "counts": [60, 6], "num_val": 5}
    assert describe_imbalance(fmnist_like) == "imbalance factor 10, exp profile"
    assert "LT subset did not keep" in describe_validation(fmnist_like)


def test_one_truncated_png_moves_no_count_and_no_band(tmp_path):
    """Item 8: a file whose header reads but whose pixels do not is left out when the folder is scanned, so the
    counts, the group bands and the groups are those of the folder without it."""
    from tailwise.training.data import build_lt_data

    counts = {"a": 48, "b": 37, "c": 28, "d": 22, "e": 17, "f": 13, "g": 10, "h": 8, "i": 6, "j": 5}
    clean = build_lt_data("folder", root=str(_folder_of(tmp_path / "clean", counts)), val_per_class=0)
    broken_root = _folder_of(tmp_path / "broken", counts)
    extra = broken_root / "j" / "extra.png"
    extra.write_bytes((broken_root / "j" / "0.png").read_bytes()[:120])   # header whole, pixels cut
    broken = build_lt_data("folder", root=str(broken_root), val_per_class=0)
    assert [p for p, _ in broken.skipped] == [str(extra)]
    assert broken.counts == clean.counts and broken.bands == clean.bands and broken.groups == clean.groups


SHIPPED = os.path.join(ROOT, "models", "fmnist-lt-tailwise")


def test_evaluate_scores_a_model_on_a_labelled_folder_as_predict_serves_it(tmp_path):
    """Item 9 (and 6): `tailwise evaluate MODEL --data DIR` gives the test-set report on a folder of the model's
    classes, with its own groups, plain and served; the served top-1 is what `predict` answers for those files.
    It says what it does on stderr while it works."""
    import shutil
    from pathlib import Path

    from tailwise.serving.artifact import OnnxClassifier
    from tailwise.serving.predict import predict_files

    model = OnnxClassifier(SHIPPED)
    by_key = {n.lower().replace("/", "-"): n for n in model.class_names}
    samples = sorted(Path(SHIPPED, "samples").glob("*.png"))
    truth = {}
    for path in samples:   # samples/<class slug>-<i>.png -> labelled/<class slug>/<i>.png
        slug = path.stem.rsplit("-", 1)[0]
        name = next(n for k, n in by_key.items() if k.replace(" ", "-") == slug)
        (tmp_path / "labelled" / slug).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / "labelled" / slug / path.name)
        truth[path.name] = name
    (tmp_path / "labelled" / slug / "broken.png").write_bytes(b"not an image")
    rc, out, err, _ = tailwise_in_process(["evaluate", SHIPPED, "--data", "labelled", "--json"], tmp_path)
    assert rc == 0, err
    report = json.loads("\n".join(out))
    served = predict_files(model, [str(p) for p in samples])
    right = sum(r["predictions"][0]["label"] == truth[p.name] for p, r in zip(samples, served))
    assert report["num_samples"] == len(samples) and report["skipped"] == 1
    assert report["logit_adjusted"]["top1"] == right / len(samples)
    assert report["groups"] == model.meta["groups"] and report["train_counts"] == model.meta["train_counts"]
    assert set(report) >= {"top1", "mean_per_class", "many", "medium", "few", "per_class"}
    assert any("decoding" in line for line in err) and any("scoring" in line for line in err)
    rc, out, _, _ = tailwise_in_process(["evaluate", SHIPPED, "--data", "labelled"], tmp_path)
    assert rc == 0 and out[0].startswith("labelled, 10 images (1 files that do not decode left out)")
    assert any(line.startswith("few (") for line in out) and any(line.startswith("Ankle boot") for line in out)
    (tmp_path / "labelled" / "cat").mkdir()
    rc, _, err, _ = tailwise_in_process(["evaluate", SHIPPED, "--data", "labelled"], tmp_path)
    assert rc == 2 and "subfolders cat are not classes of the model" in err[-1]
    rc, _, err, torch_imported = tailwise_in_process(["evaluate", SHIPPED, "--data", "nope"], tmp_path)
    assert rc == 2 and err == ["tailwise evaluate: error: --data nope is not a folder (one subfolder of images "
                               "per class)"]


def test_probe_says_what_it_is_doing(tmp_path):
    """Item 6: `tailwise probe` prints each step on stderr (reading the data, encoding, fitting)."""
    from conftest import write_cifar_archive, write_recipe

    archive, _, _ = write_cifar_archive(tmp_path, per_class=20, test_per_class=2)
    recipe = write_recipe(tmp_path, archive)
    rc, out, err, _ = tailwise_in_process(["probe", "--random-init", str(recipe), "--per-class", "3",
                                           "--device", "cpu"], tmp_path)
    assert rc == 0, err
    assert [line.split(" ")[2] for line in err if line.startswith("tailwise probe: ")] == \
        ["reading", "encoding", "fitting"]
    assert out[0].startswith("linear probe of the randomly initialised encoder")


@pytest.mark.slow
def test_a_recipe_run_prints_its_time_estimate_and_what_a_short_run_shows(tmp_path):
    """Item 3: `train --config` prints the estimate `--data` runs print (images/s measured here), and a run cut
    short with --epochs says it shows the steps working, not the recipe's accuracy."""
    from conftest import write_cifar_archive, write_recipe

    archive, _, _ = write_cifar_archive(tmp_path, per_class=20, test_per_class=2)
    recipe = write_recipe(tmp_path, archive)
    rc, out, err, _ = tailwise_in_process(["train", "--config", str(recipe), "--stage", "1", "--epochs", "1",
                                           "--out", "run", "--no-progress"], tmp_path)
    assert rc == 0, err
    estimate = [line for line in out if line.startswith("estimated time: ")]
    assert len(estimate) == 1 and "training images/s measured" in estimate[0] and "stage 1 1 epochs, stage 2 0" \
        in estimate[0] and "not a limit" in estimate[0]
    assert any(line.startswith("a short run (1 epoch(s) of stage 1; the recipe trains 2)") for line in out)
