"""Shared fixtures: small real datasets written to tmp_path."""

import io
import pickle
import tarfile

import numpy as np
import pytest


def write_cifar_archive(directory, dataset="cifar10", num_classes=10, per_class=60, test_per_class=10, seed=0):
    """Write a small CIFAR python-pickle archive (real format: the standard member names, pickled dicts with
    'data' uint8 N x 3072 and label lists) into ``directory``. Training images are shuffled across classes
    like the real batches. Returns (archive_path, train_images uint8 N x 3 x 32 x 32, train_labels int64)."""
    rng = np.random.default_rng(seed)
    folder, archive, label_key, names_key, meta_file = {
        "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz", "labels", "label_names", "batches.meta"),
        "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", "fine_labels", "fine_label_names", "meta"),
    }[dataset]
    train_labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    test_labels = rng.permutation(np.repeat(np.arange(num_classes), test_per_class))
    train_images = rng.integers(0, 256, (len(train_labels), 3, 32, 32), dtype=np.uint8)
    test_images = rng.integers(0, 256, (len(test_labels), 3, 32, 32), dtype=np.uint8)

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
