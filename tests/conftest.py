"""Shared fixtures: small real datasets written to tmp_path."""

import io
import json
import pickle
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest


def load_accuracy_runner():
    """experiments/accuracy.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("accuracy_runner", Path(__file__).resolve().parents[1]
                                                  / "experiments" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (bound to port 0, then released), for a server or a
    torchrun rendezvous started by a test, so tests never collide on a fixed port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_cifar_archive(directory, dataset="cifar10", num_classes=10, per_class=60, test_per_class=10, seed=0):
    """Write a small CIFAR python-pickle archive (real format: the standard member names, pickled dicts with
    'data' uint8 N x 3072 and label lists) into ``directory``. Each class is a texture (learnable_colour_patterns),
    so a tiny run can learn it; training images are shuffled across classes like the real batches. Returns
    (archive_path, train_images uint8 N x 3 x 32 x 32, train_labels int64)."""
    rng = np.random.default_rng(seed)
    folder, archive, label_key, names_key, meta_file = {
        "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz", "labels", "label_names", "batches.meta"),
        "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", "fine_labels", "fine_label_names", "meta"),
    }[dataset]
    train_labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    test_labels = rng.permutation(np.repeat(np.arange(num_classes), test_per_class))
    train_images = learnable_colour_patterns(train_labels, rng)
    test_images = learnable_colour_patterns(test_labels, rng)

    def batch(images, labels):
        entry = {"batch_label": "synthetic", "data": images.reshape(len(images), 3072),
                 label_key: [int(x) for x in labels], "filenames": [f"{i}.png" for i in range(len(labels))]}
        if dataset == "cifar100":
            entry["coarse_labels"] = [int(x) // 5 for x in labels]
        return pickle.dumps(entry, protocol=2)

    members = {meta_file: pickle.dumps({names_key: [f"class_{c}" for c in range(num_classes)]}, protocol=2)}
    if dataset == "cifar10":
        for i, chunk in enumerate(np.array_split(np.arange(len(train_labels)), 5), 1):
            members[f"data_batch_{i}"] = batch(train_images[chunk], train_labels[chunk])
        members["test_batch"] = batch(test_images, test_labels)
    else:
        members["train"] = batch(train_images, train_labels)
        members["test"] = batch(test_images, test_labels)
    path = directory / archive
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path, train_images, train_labels.astype(np.int64)


@pytest.fixture
def cifar_archive(tmp_path):
    """Factory: ``cifar_archive(dataset="cifar10", num_classes=10, per_class=60, ...)`` -> (path, images, labels)."""
    def make(**kwargs):
        directory = tmp_path / kwargs.get("dataset", "cifar10")
        directory.mkdir(exist_ok=True)
        return write_cifar_archive(directory, **kwargs)
    return make


# ------------------------------------------------------------------------------------------ exported model

def brightness_images(n, seed, jitter=0):
    """n uint8 [1, 28, 28] images of the 5 classes of export_tiny_model (class c: noise 0..49 + 40 c), labels
    0..4 in turn; `jitter` J > 0 adds one brightness offset per image, uniform in -J..J, so that neighbouring
    classes overlap and a classifier is unsure of some images. Returns (images, labels int64)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 5
    noise = torch.randint(0, 50, (n, 1, 28, 28), generator=generator)
    images = noise + labels.view(-1, 1, 1, 1) * 40
    if jitter:
        images = images + torch.randint(-jitter, jitter + 1, (n, 1, 1, 1), generator=generator)
    return images.clamp(0, 255).to(torch.uint8).numpy(), labels.numpy()


class ArrayImages:
    """Held-out images as an LTData source (`.load(indices)`, `.labels`), for export.calibrate."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def load(self, indices):
        return self.images[indices]

    def __len__(self):
        return len(self.labels)


def export_tiny_model(out_dir, seed=0, sets=True):
    """Train a tiny uint8 [N, 1, 28, 28] classifier on 5 classes told apart by brightness (ant darkest ... eel
    brightest; training counts 600..10, so many/medium/few groups) and export it with
    export.onnx_export.export_classifier into ``out_dir`` (model.onnx, weights.safetensors, card.json); `sets`:
    with prediction sets at 90 % and 80 % (export.calibrate.add_prediction_sets), calibrated on 1000 held-out
    images with a brightness jitter (brightness_images), on which the model is often unsure."""
    import torch
    from torch import nn

    from tailwise.export.onnx_export import export_classifier
    from tailwise.serving.artifact import build_metadata

    def data(n, data_seed):
        images, labels = brightness_images(n, data_seed)
        return torch.from_numpy(images), torch.from_numpy(labels)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.features((x.float() / 255 - 0.3) / 0.35))

    torch.manual_seed(seed)
    model = Tiny()
    images, labels = data(200, seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    meta = build_metadata(class_names=["ant", "bee", "cat", "dog", "eel"], channels=1, height=28, width=28,
                          resize_policy="resize", train_counts=[600, 300, 150, 40, 10],
                          groups=["many", "medium", "few", "few", "few"],
                          group_thresholds={"many_above": 500, "few_below": 200},
                          dataset={"name": "toy", "index_sha256": None}, metrics={"top1": 0.9})
    export_classifier(model.eval(), meta, out_dir, images[:16], data(32, seed + 2)[0])
    if sets:
        from types import SimpleNamespace

        from tailwise.export.calibrate import add_prediction_sets

        held_out = ArrayImages(*brightness_images(1000, seed + 3, jitter=30))
        add_prediction_sets(out_dir, SimpleNamespace(val_idx=np.arange(1000), train_source=held_out,
                                                     test_source=None), (0.9, 0.8))
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A real exported model folder, .../models/tiny (see export_tiny_model), made once per session."""
    return export_tiny_model(tmp_path_factory.mktemp("exported") / "models" / "tiny")


def write_recipe(tmp_path, archive, **sections) -> Path:
    """A tiny recipe: ResNet-32 on a 10-class CIFAR-format archive at IF 10, a few steps per epoch."""
    body = {
        "data": {"dataset": "cifar10", "root": str(archive), "imbalance_factor": 10, "val_per_class": 5},
        "model": {"arch": "resnet32", "proj_hidden": 64, "proj_dim": 32},
        "stage1": {"epochs": 2, "batch_size": 32, "warmup_epochs": 1, "amp": False},
        "stage2": {"epochs": 2, "batch_size": 16, "warmup_epochs": 0, "redraw_every": 1, "ratio": 2},
    }
    for name, values in sections.items():
        body[name].update(values)
    lines = ['name = "tiny"', 'device = "cpu"']
    for name, values in body.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = tmp_path / "tiny.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory):
    """One tiny run for the whole session: write_recipe's recipe (BNS then IP-DPP) on a CIFAR-format archive
    (60 images per class before the IF-10 cut, 10 test images per class), stage 1 and stage 2 trained by
    separate `tailwise train --stage N --epochs 1` commands (the recipe says 2 and 2), then exported by
    export.model_folder.export_run (what `tailwise export` calls) to models/tiny. Returns (recipe, run, model). Read-only: a test that changes the run or
    the model works on a copy (shutil.copytree)."""
    from tailwise.cli import main
    from tailwise.export.model_folder import export_run

    tmp = tmp_path_factory.mktemp("tiny-run")
    archive, _, _ = write_cifar_archive(tmp, per_class=60, test_per_class=10)
    recipe = write_recipe(tmp, archive)
    run = tmp / "run"
    assert main(["train", "--config", str(recipe), "--out", str(run), "--stage", "1", "--epochs", "1",
                 "--no-progress"]) == 0
    assert main(["train", "--config", str(recipe), "--out", str(run), "--stage", "2", "--epochs", "1",
                 "--no-progress"]) == 0
    model = tmp / "models" / "tiny"
    report = export_run(run, model, parity_images=20)   # the typed function `tailwise export` calls, no argv
    assert report["parity"]["n_images"] == 20 and report["files"][0] == str(model / "model.onnx")
    return recipe, run, model


# ------------------------------------------------------------------------------------------ Fashion-MNIST files

def _write_idx(path, array, magic):
    import gzip
    import struct

    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes(), compresslevel=1))


def learnable_patterns(labels, rng, size=28):
    """size x size uint8 images whose class (0..9) is a texture that survives crops, flips and colour jitter:
    stripes, checkerboards (fine and coarse), a disc, a ring, a cross, and a blank image, plus noise."""
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    r = np.hypot(yy - c, xx - c)
    patterns = np.stack([(yy // 2) % 2, (yy // 5) % 2, (xx // 2) % 2, (xx // 5) % 2,
                         (yy // 2 + xx // 2) % 2, (yy // 5 + xx // 5) % 2, r < 8, np.abs(r - 9) < 2,
                         (np.abs(yy - c) < 3) | (np.abs(xx - c) < 3), np.zeros_like(yy)]).astype(np.float32)
    images = patterns[labels] * 180 + rng.integers(0, 60, (len(labels), size, size))
    return images.astype(np.uint8)


# Colours for more than 10 classes (CIFAR-100): class c is texture c % 10 in colour c // 10 (0: grey).
_TINTS = np.array([(1, 1, 1), (1, .4, .4), (.4, 1, .4), (.4, .4, 1), (1, 1, .4), (1, .4, 1), (.4, 1, 1),
                   (1, .7, .4), (.7, .4, 1), (.4, 1, .7)], dtype=np.float32)


def learnable_colour_patterns(labels, rng, size=32):
    """uint8 N x 3 x size x size images for CIFAR-format fixtures: the grey texture of learnable_patterns for
    classes 0..9 (independent noise per channel), tinted by class // 10 beyond (up to 100 classes)."""
    labels = np.asarray(labels)
    channels = np.stack([learnable_patterns(labels % 10, rng, size) for _ in range(3)], axis=1)
    tint = _TINTS[labels // 10][:, :, None, None]
    return (channels * tint).astype(np.uint8)


def write_fmnist_files(root, per_class=60, test_per_class=10, seed=0):
    """The four Fashion-MNIST .gz IDX files (real format) of a small, learnable 10-class set (see
    learnable_patterns), shuffled across classes like the real files. Returns ``root``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", per_class), ("t10k", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), n))
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", learnable_patterns(labels, rng), 2051)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)
    return root
