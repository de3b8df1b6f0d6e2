"""CUDA: both stages in bf16 on a learnable fixture, resume after a kill, torchrun with nccl, the IP-DPP redraw
from CUDA probabilities, and the export of a CUDA-trained checkpoint with its onnxruntime parity check.

Run with `pytest -m cuda` (experiments/gpu_run.sh does, on a GPU machine); without CUDA every test skips.
Imports nothing of serving/ beyond serving.artifact (no bentoml), so it runs where only torch and onnx are.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import free_port, write_fmnist_files, write_recipe

pytestmark = [pytest.mark.cuda, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA device (run on a GPU machine: experiments/gpu_run.sh)")]

REPO = Path(__file__).resolve().parents[1]
CHANCE = 0.1   # 10 balanced test classes
TORCHRUN_TIMEOUT_S = 60   # per launch: CUDA start-up takes seconds; nccl that hangs must not eat the step's cap


def cuda_recipe(tmp_path, root, stage1=None, stage2=None):
    """BNS then IP-DPP with bf16 autocast, Fashion-MNIST-format fixture at IF 10; ratio 2 makes the head
    classes really subsampled (k = 2 x the tail count)."""
    return write_recipe(
        tmp_path, root,
        data={"dataset": "fmnist", "root": str(root), "imbalance_factor": 10, "val_per_class": 20},
        stage1={"amp": True, "epochs": 4, "batch_size": 128, "warmup_epochs": 1, **(stage1 or {})},
        stage2={"amp": True, "epochs": 15, "batch_size": 64, "ratio": 2, "redraw_every": 5, "lr": 1e-3,
                **(stage2 or {})})


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory):
    return write_fmnist_files(tmp_path_factory.mktemp("data") / "fashion-mnist", per_class=300, test_per_class=50)


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, fmnist_root):
    """One run of both stages on CUDA, shared by the tests that read it."""
    from tailwise.cli import main

    tmp = tmp_path_factory.mktemp("cuda-run")
    run = tmp / "run"
    assert main(["train", "--config", str(cuda_recipe(tmp, fmnist_root)), "--out", str(run), "--device", "cuda",
                 "--no-progress"]) == 0
    return run


def _cli(*args):
    return [sys.executable, "-m", "tailwise.cli", *args]


def test_autocast_is_bf16_and_weights_channels_last():
    from tailwise.training import engine, train
    from tailwise.training.networks import Classifier

    device = torch.device("cuda")
    model = engine.to_device(Classifier("resnet32", 1, 10, (0.5,), (0.25,)), device)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, device=device)
    with train.autocast(device, True):
        assert model(x).dtype == torch.bfloat16
    with train.autocast(device, False):
        assert model(x).dtype == torch.float32


def test_both_stages_learn_on_cuda_in_bf16(cuda_run):
    from tailwise.training import checkpoint

    card1, card2 = checkpoint.load_card(cuda_run, stage=1), checkpoint.load_card(cuda_run, stage=2)
    assert card1["kind"] == "contrastive" and card1["finished"] and card2["finished"]
    assert card2["config"]["device"] == "cuda" and card2["config"]["stage1"]["amp"] and card2["config"]["stage2"]["amp"]
    assert torch.cuda.get_device_name(0) in card2["training"]["hardware"]
    for stage in (1, 2):
        lines = [json.loads(x) for x in (cuda_run / f"stage{stage}_metrics.jsonl").read_text().splitlines()]
        assert all(np.isfinite(x["loss"]) and x["images_per_second"] > 0 for x in lines)
    test = card2["test"]
    assert test["top1"] > 3 * CHANCE, test              # a learnable fixture: well above chance
    assert test["logit_adjusted"]["top1"] > 3 * CHANCE


def test_ipdpp_redraw_from_cuda_probabilities(cuda_run):
    from tailwise.training import checkpoint, engine
    from tailwise.training.data import build_lt_data
    from tailwise.training.ipdpp import class_targets, select_subset
    from tailwise.training.train import predict_logits

    card2 = checkpoint.load_card(cuda_run, stage=2)
    redraws = [json.loads(x) for x in (cuda_run / "stage2_redraws.jsonl").read_text().splitlines()]
    targets = class_targets(card2["data"]["counts"], 2)
    assert [r["epoch"] for r in redraws] == [0, 5, 10]
    assert all(r["per_class"]["k"] == targets for r in redraws)
    assert targets[0] < card2["data"]["counts"][0]      # the head class really is subsampled
    assert card2["train_distribution"] == targets
    # the probabilities the redraw uses, computed on CUDA, agree with CPU, and the draw keeps k_c per class
    model, _ = checkpoint.load_classifier(cuda_run)
    data = build_lt_data(**card2["data"]["build_args"])
    labels = data.train_source.labels[data.train_idx]
    probs = {}
    for name in ("cuda", "cpu"):
        device = torch.device(name)
        logits = predict_logits(model.to(device), engine.DeviceImages(data.train_source, device), data.train_idx)
        assert logits.device.type == name
        probs[name] = torch.softmax(logits, 1).cpu().numpy()
    assert np.abs(probs["cuda"] - probs["cpu"]).max() < 2e-2       # TF32 convolutions on CUDA
    p_true = probs["cuda"][np.arange(len(labels)), labels].astype(np.float64)
    chosen, stats = select_subset(p_true, labels, "kdpp", 2, np.random.default_rng(0))
    assert np.bincount(labels[chosen], minlength=10).tolist() == targets
    again, _ = select_subset(p_true, labels, "kdpp", 2, np.random.default_rng(0))
    assert np.array_equal(chosen, again)


def test_export_cuda_trained_checkpoint_parity(cuda_run, tmp_path):
    from tailwise.cli import main

    out = tmp_path / "model"
    assert main(["export", str(cuda_run), "--out", str(out), "--parity-images", "128"]) == 0
    export = json.loads((out / "card.json").read_text())["export"]
    parity = export["parity"]
    assert parity["n_images"] == 128 and parity["max_abs_logit_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0
    assert parity["accuracy"] > 3 * CHANCE


def test_sigkill_then_resume_on_cuda(tmp_path, fmnist_root):
    """Kill a CUDA training process mid-run; --resume continues from its last checkpoint, still on CUDA."""
    from tailwise.training import checkpoint

    recipe = cuda_recipe(tmp_path, fmnist_root, stage1={"batch_size": 32})
    run = tmp_path / "run"
    cmd = _cli("train", "--config", str(recipe), "--out", str(run), "--stage", "1", "--epochs", "30",
               "--device", "cuda", "--no-progress")
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (run / "stage1.json").exists() and checkpoint.load_card(run)["epoch"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.load_card(run)["epoch"]
    assert 2 <= killed_at < 30
    done = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    card = checkpoint.load_card(run)
    assert card["epoch"] == 30 and card["finished"] and card["config"]["device"] == "cuda"
    epochs = [json.loads(x)["epoch"] for x in (run / "stage1_metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 31))


NCCL_SNIPPET = """
import datetime, torch, torch.distributed as dist
from tailwise.training import engine
from tailwise.training.networks import Classifier
device = engine.resolve_device("cuda")
torch.cuda.set_device(device)
dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=30))
t = torch.full((1,), 3.0, device=device)
dist.all_reduce(t)
model = engine.to_device(Classifier("resnet32", 1, 10, (0.5,), (0.25,)), device)
ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
x = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, device=device)
with torch.autocast("cuda", dtype=torch.bfloat16):
    loss = ddp(x).float().logsumexp(1).mean()
loss.backward()
dist.barrier()
print("nccl", dist.get_backend(), dist.get_world_size(), t.item(), bool(torch.isfinite(loss)))
dist.destroy_process_group()
"""


def test_torchrun_nccl_one_process(tmp_path, fmnist_root):
    """experiments/gpu_run.sh runs this test alone (step cuda-nccl, `-k nccl`), under a short cap."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    snippet = tmp_path / "nccl_check.py"
    snippet.write_text(NCCL_SNIPPET)
    # one machine, loopback only (the device machine reaches nothing else): nccl's sockets on lo, no InfiniBand
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               NCCL_SOCKET_IFNAME=os.environ.get("NCCL_SOCKET_IFNAME", "lo"),
               NCCL_IB_DISABLE=os.environ.get("NCCL_IB_DISABLE", "1"))
    done = subprocess.run(torchrun + [str(snippet)], cwd=REPO, capture_output=True, text=True,
                          timeout=TORCHRUN_TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "nccl nccl 1 3.0 True" in done.stdout
    # the training CLI under torchrun on CUDA (one process: the same loop, rank 0 of 1)
    run = tmp_path / "run"
    cmd = torchrun + ["-m", "tailwise.cli", "train", "--config", str(cuda_recipe(tmp_path, fmnist_root)),
                      "--out", str(run), "--epochs", "1", "--device", "cuda", "--no-progress"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "on cuda:0 (1 process(es))" in done.stdout
