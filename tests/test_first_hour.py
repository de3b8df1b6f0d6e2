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
