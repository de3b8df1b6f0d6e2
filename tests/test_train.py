"""Both training stages end to end on a small real-format CIFAR archive: checkpoints, resume, evaluate, torchrun."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tailwise import UserError
from tailwise import format as fmt
from tailwise.cli import main
from tailwise.training import checkpoint
from tailwise.training.config import load_config
from tailwise.training.launch import train

from conftest import free_port, write_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(tmp_path, cifar_archive):
    archive, _, _ = cifar_archive(per_class=60, test_per_class=10)
    return write_recipe(tmp_path, archive)


def test_config_overrides_and_unknown_keys():
    cfg = load_config("fmnist-lt-r32", ["stage2.sampler=random", "stage1.epochs=3", "data.dataset=cifar10"])
    assert (cfg["stage2"]["sampler"], cfg["stage1"]["epochs"], cfg["data"]["dataset"]) == ("random", 3, "cifar10")
    with pytest.raises(UserError, match="stage1.epoch"):
        load_config("fmnist-lt-r32", ["stage1.epoch=3"])
    with pytest.raises(UserError, match="no recipe named"):
        load_config("no-such-recipe")


@pytest.mark.slow
def test_both_stages_then_evaluate(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(tiny), "--out", str(run), "--no-progress"]) == 0
    card1 = checkpoint.load_card(run, stage=1)
    card2 = checkpoint.load_card(run, stage=2)
    assert card1["kind"] == "contrastive" and card1["finished"] and card1["epoch"] == 2
    assert card2["kind"] == "classifier" and card2["finished"]
    # every epoch logged once, with images/second; every stage-2 epoch redrew (redraw_every = 1)
    lines = [json.loads(x) for x in (run / "stage1_metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2] and all(x["images_per_second"] > 0 for x in lines)
    redraws = [json.loads(x) for x in (run / "stage2_redraws.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in redraws] == [0, 1]
    targets = redraws[0]["per_class"]["k"]
    assert redraws[0]["per_class"]["n"][-1] == targets[-1]          # the tail class is kept whole
    assert card2["train_distribution"] == targets                    # each class got exactly its k
    # stage 2 started from the stage-1 encoder
    w1, w2 = checkpoint.load_weights(card1), checkpoint.load_weights(card2)
    assert w1.keys() >= {k for k in w2 if k.startswith("encoder.")}
    # logit adjustment chosen on validation and the test scored once, at the end
    assert "logit_adjustment" in card2 and "test" in card2
    report = json.loads((run / "eval" / "report.json").read_text())
    assert set(report) >= {"top1", "many", "medium", "few", "per_class", "confusion", "nll", "ece"}
    assert (run / "eval" / "per_class.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["evaluate", str(run), "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "many" in out and "few" in out
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["top1"] == report["top1"]
    assert main(["evaluate", str(run), "--out", str(tmp_path / "ev")]) == 0        # its own report: replaced
    (tmp_path / "ev" / "report.json").write_text('{"mine": 1}')                  # the user's: refused, kept
    capsys.readouterr()
    assert main(["evaluate", str(run), "--out", str(tmp_path / "ev")]) == 2
    assert "report.json exists and is not a report tailwise wrote" in capsys.readouterr().err
    assert json.loads((tmp_path / "ev" / "report.json").read_text()) == {"mine": 1}
    # a second train into the same folder without --resume refuses rather than overwriting
    before = (run / "stage2.json").read_bytes()
    assert main(["train", "--config", str(tiny), "--out", str(run), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "stage2.json").read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ldam-drw", "bsce"])
def test_supervised_baselines_train(tmp_path, cifar_archive, method):
    archive, _, _ = cifar_archive(per_class=40, test_per_class=5)
    recipe = write_recipe(tmp_path, archive, stage1={"method": "supervised", "loss": method, "epochs": 1},
                          stage2={"enabled": False})
    run = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--out", str(run), "--no-progress"]) == 0
    model, card = checkpoint.load_classifier(run)
    assert card["stage"] == 1 and card["head"] == ("cosine" if method == "ldam-drw" else "linear")
    assert "val_top1" in card["metrics"] and "test" in card


@pytest.mark.slow
def test_a_tiny_run_learns_the_cifar_fixture(tmp_path, cifar_archive):
    """The CIFAR fixture's classes are textures (conftest.learnable_colour_patterns), so a few epochs of a
    supervised ResNet-32 score far above chance (10 %) on validation and on the test set: 70 to 90 % over
    fixture and training seeds 0..4, and 10 to 13 % with the labels shuffled against the pixels. Training that
    learns nothing fails here."""
    archive, _, _ = cifar_archive(per_class=60, test_per_class=10)
    recipe = write_recipe(tmp_path, archive, stage1={"method": "supervised", "loss": "ce", "epochs": 4, "lr": 3e-3,
                                                     "lr_scale_batch": 0, "aug": "light"},
                          stage2={"enabled": False})
    run = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--out", str(run), "--no-progress"]) == 0
    card = checkpoint.load_card(run)
    assert card["stage"] == 1 and card["finished"]
    assert card["metrics"]["val_top1"] > 0.4, card["metrics"]
    assert card["test"]["top1"] > 0.4, card["test"]["top1"]


@pytest.mark.slow
def test_corrupt_weights_are_refused(exported_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported_run[1], run)     # the shared tiny run; its stage 1 trained for 1 epoch
    card = checkpoint.load_card(run, stage=1)
    weights = run / card["weights"]
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(UserError, match=weights.name):
        checkpoint.load_weights(card)


def _cli(*args):
    return [sys.executable, "-m", "tailwise.cli", *args]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(tiny, tmp_path):
    """Kill a training process mid-epoch; --resume continues from the last checkpoint and finishes cleanly."""
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = _cli("train", "--config", str(tiny), "--out", str(run), "--stage", "1", "--epochs", "6", "--no-progress")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "stage1.json").exists():
        time.sleep(0.2)
    assert (run / "stage1.json").exists(), proc.communicate()[0] if proc.poll() is not None else "no checkpoint"
    time.sleep(1.0)  # now inside a later epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.load_card(run)["epoch"]
    assert 1 <= killed_at < 6
    checkpoint.load_weights(checkpoint.load_card(run))  # whatever is visible is complete
    assert not list(run.glob("*.tmp"))
    done = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    card = checkpoint.load_card(run)
    assert card["epoch"] == 6 and card["finished"]
    assert len(checkpoint.load_weights(card)) > 0
    epochs = [json.loads(x)["epoch"] for x in (run / "stage1_metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5, 6]
    assert len(list(run.glob("stage1-e*.safetensors"))) == 2  # the last weights and their resume state only


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tiny, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "tailwise.cli", "train", "--config", str(tiny), "--out", str(run), "--epochs", "1", "--no-progress"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "(2 process(es))" in done.stdout
    card2 = checkpoint.load_card(run, stage=2)
    assert card2["finished"]
    line = json.loads((run / "stage1_metrics.jsonl").read_text().splitlines()[0])
    # both processes' images are counted: one epoch covers the LT set once (drop_last batches)
    assert line["images"] == (card2["data"]["num_train"] // 32) * 32


@pytest.mark.slow
def test_freeze_encoder_trains_only_the_classifier(tmp_path, cifar_archive):
    """cRT-style stage 2: frozen encoder (weights and BatchNorm statistics), class-balanced sampling."""
    archive, _, _ = cifar_archive(per_class=40, test_per_class=5)
    recipe = write_recipe(tmp_path, archive, stage1={"method": "supervised", "loss": "ce", "epochs": 1},
                          stage2={"sampler": "none", "freeze_encoder": True, "class_balanced": True, "epochs": 1})
    run = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--out", str(run), "--no-progress"]) == 0
    w1 = checkpoint.load_weights(checkpoint.load_card(run, stage=1))
    w2 = checkpoint.load_weights(checkpoint.load_card(run, stage=2))
    encoder_keys = [k for k in w1 if k.startswith("encoder.")]
    assert any("running_mean" in k for k in encoder_keys)
    assert all(torch.equal(w1[k], w2[k]) for k in encoder_keys)


def test_epoch_order_uniform_and_class_balanced():
    from tailwise.training.engine import epoch_order

    labels = np.array([0] * 90 + [1] * 9 + [2])
    indices = np.arange(100)
    uniform = epoch_order(indices, labels, seed=0, epoch=3)
    assert sorted(uniform) == list(indices) and np.array_equal(uniform, epoch_order(indices, labels, 0, 3))
    assert not np.array_equal(uniform, epoch_order(indices, labels, 0, 4))
    balanced = epoch_order(indices, labels, 0, 0, class_balanced=True, num_samples=30000)
    per_class = np.bincount(labels[balanced], minlength=3)
    assert np.all(np.abs(per_class - 10000) < 400) and set(balanced) == set(indices)


@pytest.mark.slow
def test_bns_joint_with_balanced_loss_then_la_stage2(tmp_path, cifar_archive):
    """stage1.sup_loss: BNS plus a classifier trained jointly; stage 2 keeps that classifier (no re-init) and
    trains it with the logit-adjusted loss, whose prior is the stage-2 subset's class counts."""
    archive, _, _ = cifar_archive(per_class=40, test_per_class=5)
    recipe = write_recipe(tmp_path, archive, stage1={"sup_loss": "la", "sup_weight": 0.5, "epochs": 1, "probe_every": 1},
                          stage2={"loss": "la", "reinit_classifier": False, "epochs": 1, "lr": 0.0})
    run = tmp_path / "run"
    assert train(recipe, run, progress=False) == run     # the typed function `tailwise train` calls, no argv
    card1, card2 = checkpoint.load_card(run, stage=1), checkpoint.load_card(run, stage=2)
    w1 = checkpoint.load_weights(card1)
    assert card1["kind"] == "contrastive" and card1["head"] == "linear" and "fc.weight" in w1
    assert "val_top1" in card1["metrics"]          # the joint classifier is scored on validation every epoch
    assert 0 <= card1["metrics"]["val_probe_top1"] <= 1    # and the encoder by a linear probe on validation
    assert card2["finished"] and "test" in card2 and "logit_adjustment" in card2
    # the chosen adjustment names its prior: the class counts of the stage-2 subset, whose log it holds
    la = card2["logit_adjustment"]
    assert la["prior"] == fmt.PRIOR_STAGE2_SUBSET and la["log_prior"] == fmt.log_prior(card2["train_distribution"])
    # stage 2 (at lr 0 here) started from the stage-1 classifier rather than a new one
    w2 = checkpoint.load_weights(card2)
    assert torch.equal(w2["fc.weight"], w1["fc.weight"]) and torch.equal(w2["fc.bias"], w1["fc.bias"])


@pytest.mark.slow
def test_train_without_config_uses_the_default_recipe(tmp_path, cifar_archive):
    """No --config: the `tailwise` recipe (LA-loss encoder, then IP-DPP with the LA loss, classifier kept)."""
    archive, _, _ = cifar_archive(per_class=40, test_per_class=5)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--epochs", "1", "--no-progress", "--device", "cpu",
                 "--set", "data.dataset='cifar10'", "--set", f"data.root='{archive}'", "--set", "data.imbalance_factor=10",
                 "--set", "data.val_per_class=5", "--set", "stage1.batch_size=32", "--set", "stage2.batch_size=16"]) == 0
    card = checkpoint.load_card(run)
    cfg = card["config"]
    assert cfg["name"] == "tailwise" and card["stage"] == 2 and card["finished"]
    assert (cfg["stage1"]["method"], cfg["stage1"]["loss"]) == ("supervised", "la")
    assert (cfg["stage2"]["sampler"], cfg["stage2"]["loss"], cfg["stage2"]["reinit_classifier"]) == ("kdpp", "la", False)
