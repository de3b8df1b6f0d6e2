"""training.data: LT counts, the LDAM-DRW selection, validation split, groups, every source, errors, CLI."""

import gzip
import hashlib
import json
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tailwise import UserError
from tailwise.cli import main as tailwise_main
from tailwise.training.data import build_lt_data, groups_from_counts, ldam_select, lt_counts

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not (FMNIST_ROOT / "train-images-idx3-ubyte.gz").exists(),
                                  reason="Fashion-MNIST not installed at /usr/share/datasets/fashion-mnist "
                                         "(apt-get install dataset-fashion-mnist)")

CIFAR10_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
FMNIST_IF100 = [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]


def ldam_reference(labels, counts):
    """The LDAM-DRW IMBALANCECIFAR10.gen_imbalanced_data selection, restated."""
    np.random.seed(0)
    selected = []
    for the_class, the_img_num in zip(np.unique(labels), counts):
        idx = np.where(labels == the_class)[0]
        np.random.shuffle(idx)
        selected.extend(idx[:the_img_num].tolist())
    return np.array(selected)


def sha256_int64(indices):
    return hashlib.sha256(np.asarray(indices).astype("<i8").tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ counts

@pytest.mark.parametrize("imbalance_factor", [10, 50, 100])
@pytest.mark.parametrize("n_max, num_classes", [(5000, 10), (500, 100), (6000, 10)])
def test_lt_counts_follow_ldam_formula(n_max, num_classes, imbalance_factor):
    img_max = n_max * num_classes / num_classes  # LDAM: len(self.data) / cls_num, a float
    imb_factor = 1 / imbalance_factor
    expected = [int(img_max * (imb_factor ** (i / (num_classes - 1.0)))) for i in range(num_classes)]
    assert lt_counts(n_max, num_classes, imbalance_factor) == expected
    assert lt_counts(n_max, num_classes, imbalance_factor, "step") == \
        [n_max] * (num_classes // 2) + [int(n_max * imb_factor)] * (num_classes // 2)


def test_lt_counts_published_values():
    assert lt_counts(5000, 10, 100) == CIFAR10_IF100
    assert sum(CIFAR10_IF100) == 12406
    assert lt_counts(6000, 10, 100) == FMNIST_IF100
    assert sum(lt_counts(500, 100, 100)) == 10847
    assert sum(lt_counts(5000, 10, 50)) == 13996 and sum(lt_counts(5000, 10, 10)) == 20431
    assert sum(lt_counts(500, 100, 50)) == 12608 and sum(lt_counts(500, 100, 10)) == 19573
    assert lt_counts(100, 5, 10, "step") == [100, 100, 10, 10, 10]  # odd C: the last class is kept
    assert lt_counts(100, 3, 7, "none") == [100, 100, 100]
    assert lt_counts(1000, 10, 1) == [1000] * 10
    with pytest.raises(UserError, match="imbalance-factor"):
        lt_counts(100, 10, 0.5)
    with pytest.raises(UserError, match="profile"):
        lt_counts(100, 10, 10, "linear")


def test_groups_from_counts_thresholds():
    assert groups_from_counts(CIFAR10_IF100) == ["many"] * 5 + ["medium"] * 2 + ["few"] * 3
    assert groups_from_counts([501, 500, 200, 199]) == ["many", "medium", "medium", "few"]
    hundred = [101, 100, 20, 19] + [50] * 96
    assert groups_from_counts(hundred)[:5] == ["many", "medium", "medium", "few", "medium"]
    assert groups_from_counts([501, 500, 200, 199], many_threshold=300, few_threshold=250) == \
        ["many", "many", "few", "few"]


def test_ldam_select_restores_global_rng():
    labels = np.repeat(np.arange(4), 30)
    np.random.seed(123)
    state = np.random.get_state()
    selected = ldam_select(labels, [30, 20, 10, 5])
    after = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(state[1:2], after[1:2])) and state[2] == after[2]
    assert selected.dtype == np.int64 and len(selected) == 65
    assert np.array_equal(selected, ldam_reference(labels, [30, 20, 10, 5]))


# ------------------------------------------------------------------------------------------------ CIFAR

def test_cifar_archive_selection_matches_ldam_rule(cifar_archive):
    path, images, labels = cifar_archive(num_classes=10, per_class=60)
    # read the labels back independently, batch by batch, as torchvision's CIFAR10 does
    read_labels = []
    with tarfile.open(path) as tar:
        for i in range(1, 6):
            entry = pickle.load(tar.extractfile(f"cifar-10-batches-py/data_batch_{i}"), encoding="latin1")
            read_labels += entry["labels"]
    read_labels = np.array(read_labels)
    assert np.array_equal(read_labels, labels)
    counts = [int(60 * 0.1 ** (i / 9)) for i in range(10)]

    data = build_lt_data("cifar10", root=str(path), imbalance_factor=10, val_per_class=5, holdout_kept=False)

    expected = ldam_reference(read_labels, counts)
    assert np.array_equal(data.train_idx, expected)
    assert data.index_sha256 == sha256_int64(expected)
    assert data.counts == counts and data.class_names == [f"class_{c}" for c in range(10)]
    assert data.channels == 3 and data.image_size == (32, 32)
    batch = data.train_source.load(data.train_idx[:7])
    assert batch.dtype == torch.uint8 and batch.shape == (7, 3, 32, 32)
    assert np.array_equal(batch.numpy(), images[expected[:7]])
    assert len(data.test_source) == 100 and data.test_source.load([0]).shape == (1, 3, 32, 32)


def test_cifar_validation_disjoint_and_balanced(cifar_archive):
    path, _, labels = cifar_archive(num_classes=10, per_class=60)
    data = build_lt_data("cifar10", root=str(path), imbalance_factor=10, val_per_class=5, val_seed=3)
    assert not set(data.train_idx.tolist()) & set(data.val_idx.tolist())
    assert data.val_idx.max() < len(data.train_source)  # rows of the training set, never the test set
    # the head class keeps all 60 images, so its 5 validation images are held out of those; the others use leftovers
    assert data.val_counts == [5] * 10 and data.counts[0] == 55
    assert np.bincount(labels[data.val_idx], minlength=10).tolist() == data.val_counts
    assert data.card()["num_val"] == 50 and data.card()["build_args"]["holdout_kept"] is True
    literature = build_lt_data("cifar10", root=str(path), imbalance_factor=10, val_per_class=5, val_seed=3,
                               holdout_kept=False)
    assert literature.val_counts == [0] + [5] * 9 and literature.counts[0] == 60
    # only the head's 5 moved: every other class trains on exactly the literature's images, in the same order
    moved = np.setdiff1d(literature.train_idx, data.train_idx)
    assert len(moved) == 5 and set(labels[moved]) == {0} and set(moved) <= set(data.val_idx)
    assert np.array_equal(literature.train_idx[~np.isin(literature.train_idx, moved)], data.train_idx)
    assert data.index_sha256 != literature.index_sha256
    other_seed = build_lt_data("cifar10", root=str(path), imbalance_factor=10, val_per_class=5, val_seed=4)
    tail = labels[data.train_idx] != 0       # the val seed also picks the head's held-out images, nothing else
    assert np.array_equal(other_seed.train_idx[labels[other_seed.train_idx] != 0], data.train_idx[tail])
    assert not np.array_equal(other_seed.val_idx, data.val_idx)


def test_cifar_extracted_folder_equals_archive(cifar_archive, tmp_path):
    path, _, _ = cifar_archive(num_classes=10, per_class=30)
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    from_tar = build_lt_data("cifar10", root=str(path), imbalance_factor=5, val_per_class=3)
    for root in (tmp_path / "extracted", tmp_path / "extracted" / "cifar-10-batches-py", path.parent):
        from_folder = build_lt_data("cifar10", root=str(root), imbalance_factor=5, val_per_class=3)
        assert from_folder.index_sha256 == from_tar.index_sha256
        assert torch.equal(from_folder.train_source.images, from_tar.train_source.images)
        assert np.array_equal(from_folder.val_idx, from_tar.val_idx)


def test_cifar100_fine_labels_and_step_profile(cifar_archive):
    path, _, labels = cifar_archive(dataset="cifar100", num_classes=100, per_class=8, test_per_class=2)
    data = build_lt_data("cifar100", root=str(path.parent), imbalance_factor=4, profile="step", val_per_class=2,
                         holdout_kept=False)
    assert len(data.class_names) == 100 and len(data.test_source) == 200
    assert data.counts == [8] * 50 + [2] * 50
    assert np.array_equal(data.train_idx, ldam_reference(labels, data.counts))
    assert data.val_counts == [0] * 50 + [2] * 50
    # the head half is kept whole: at most 20 % of a class (1 of 8) is held out for its validation
    held = build_lt_data("cifar100", root=str(path.parent), imbalance_factor=4, profile="step", val_per_class=2)
    assert held.val_counts == [1] * 50 + [2] * 50 and held.counts == [7] * 50 + [2] * 50
    assert data.groups == ["few"] * 100  # 100+ classes: few < 20
    assert data.mean == (0.5071, 0.4865, 0.4409)


def test_card_is_json_and_rebuilds(cifar_archive):
    path, _, _ = cifar_archive(num_classes=10, per_class=40)
    data = build_lt_data("cifar10", root=str(path), imbalance_factor=20, val_per_class=4, val_seed=7)
    card = json.loads(json.dumps(data.card()))
    assert card["num_train"] == sum(card["counts"]) == len(data.train_idx)
    assert card["num_test"] == 100 and card["image_size"] == [32, 32]
    rebuilt = build_lt_data(**card["build_args"])
    assert rebuilt.card() == data.card()
    assert np.array_equal(rebuilt.val_idx, data.val_idx)


def test_cifar_corrupt_archive_names_path(cifar_archive, tmp_path):
    path, _, _ = cifar_archive(num_classes=10, per_class=10)
    blob = path.read_bytes()
    truncated = tmp_path / "truncated" / "cifar-10-python.tar.gz"
    truncated.parent.mkdir()
    truncated.write_bytes(blob[: len(blob) // 2])
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"this is not a tar archive" * 100)
    for bad in (truncated, garbage):
        with pytest.raises(UserError, match="corrupt or truncated") as exc:
            build_lt_data("cifar10", root=str(bad))
        assert str(bad) in str(exc.value)
    with pytest.raises(UserError, match="no cifar10 data") as exc:
        build_lt_data("cifar10", root=str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(exc.value)


def test_cifar_missing_member_and_bad_pickle(cifar_archive, tmp_path):
    path, _, _ = cifar_archive(num_classes=10, per_class=10)
    folder = tmp_path / "extracted"
    with tarfile.open(path) as tar:
        tar.extractall(folder, filter="data")
    batches = folder / "cifar-10-batches-py"
    (batches / "data_batch_3").unlink()
    with pytest.raises(UserError, match="data_batch_3"):
        build_lt_data("cifar10", root=str(folder))

    # a pickle that would run code must be refused, not executed
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (batches / "data_batch_3").write_bytes(pickle.dumps({"data": Exploit(), "labels": []}))
    with pytest.raises(UserError, match="refusing") as exc:
        build_lt_data("cifar10", root=str(folder))
    assert str(batches / "data_batch_3") in str(exc.value) and not marker.exists()

    (batches / "data_batch_3").write_bytes(pickle.dumps({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}))
    with pytest.raises(UserError, match="3072") as exc:
        build_lt_data("cifar10", root=str(folder))
    assert str(batches / "data_batch_3") in str(exc.value)


def py2_pickle(obj):
    """Protocol-2 bytes as Python 2's cPickle wrote the real CIFAR files (str as BINSTRING, numpy.core names)."""
    def enc(x):
        if isinstance(x, (str, bytes)):
            raw = x.encode("latin1") if isinstance(x, str) else x
            return b"T" + struct.pack("<i", len(raw)) + raw
        if isinstance(x, int):
            return b"J" + struct.pack("<i", x)
        if isinstance(x, list):
            return b"](" + b"".join(enc(v) for v in x) + b"e"
        if isinstance(x, dict):
            return b"}(" + b"".join(enc(k) + enc(v) for k, v in x.items()) + b"u"
        assert x.dtype == np.uint8 and x.ndim == 2
        dtype = b"cnumpy\ndtype\n" + enc("u1") + b"K\x00K\x01\x87R(K\x03" + enc("|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + enc("b") + b"\x87R(K\x01"
                + enc(x.shape[0]) + enc(x.shape[1]) + b"\x86" + dtype + b"\x89" + enc(x.tobytes()) + b"tb")
    return b"\x80\x02" + enc(obj) + b"."


def test_cifar_python2_pickles(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(py2_pickle({"num_cases_per_batch": 12, "label_names": names}))
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch_labels = rng.permutation(np.repeat(np.arange(10), 2)).tolist()
        data = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
        (folder / name).write_bytes(py2_pickle({"batch_label": name, "labels": batch_labels, "data": data}))
        if name != "test_batch":
            images.append(data)
            labels += batch_labels
    data = build_lt_data("cifar10", root=str(tmp_path), imbalance_factor=2, val_per_class=1, holdout_kept=False)
    assert data.class_names == names and len(data.test_source) == 20
    assert np.array_equal(data.train_source.labels, labels)
    assert np.array_equal(data.train_source.images.numpy(), np.concatenate(images).reshape(-1, 3, 32, 32))
    assert np.array_equal(data.train_idx, ldam_reference(np.array(labels), lt_counts(10, 10, 2)))


# ------------------------------------------------------------------------------------------------ Fashion-MNIST

def write_idx(path, array, magic, compress=True):
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_fmnist(root, per_class=20, test_per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", per_class), ("t10k", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), n))
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (len(labels), 28, 28)), 2051)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)
    return root


def test_fmnist_generated_files_load(tmp_path):
    root = write_fmnist(tmp_path / "fm", per_class=20)
    data = build_lt_data("fmnist", root=str(root), imbalance_factor=10, val_per_class=4)
    assert data.counts == [16] + lt_counts(20, 10, 10)[1:]     # the head's 4 validation images held out of 20
    assert data.train_source.images.shape == (200, 1, 28, 28) and len(data.test_source) == 30
    assert data.val_counts == [4] * 10 and data.channels == 1


@pytest.mark.parametrize("damage", ["truncated gzip", "not gzip", "bad magic", "short data"])
def test_fmnist_damaged_file_names_path(tmp_path, damage):
    root = write_fmnist(tmp_path / "fm")
    target = root / "train-images-idx3-ubyte.gz"
    if damage == "truncated gzip":
        blob = target.read_bytes()
        target.write_bytes(blob[: len(blob) // 2])
    elif damage == "not gzip":
        target.write_bytes(b"\x00" * 1000)
    elif damage == "bad magic":
        write_idx(target, np.zeros((200, 28, 28)), 2049)
    else:
        raw = gzip.decompress(target.read_bytes())
        target.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(UserError) as exc:
        build_lt_data("fmnist", root=str(root))
    assert str(target) in str(exc.value)


def test_fmnist_missing_file_names_path(tmp_path):
    root = write_fmnist(tmp_path / "fm")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="missing data file") as exc:
        build_lt_data("fmnist", root=str(root))
    assert str(root / "t10k-labels-idx1-ubyte.gz") in str(exc.value)


@needs_fmnist
def test_real_fashion_mnist_lt():
    data = build_lt_data("fmnist", imbalance_factor=100)
    train, test = data.train_source, data.test_source
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28) and len(data.class_names) == 10
    with gzip.open(FMNIST_ROOT / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read()[8:], dtype=np.uint8).astype(np.int64)
    assert np.array_equal(train.labels, labels)
    # every class has 100 validation images; the head's are held out of the 6000 the LDAM subset keeps
    assert data.counts == [5900] + FMNIST_IF100[1:] and data.val_counts == [100] * 10
    assert data.index_sha256 == "4cd8349a533bc20b51e6c7307e4fe0d9570d79301587fcd6c2555215328e47be"
    expected = ldam_reference(labels, FMNIST_IF100)
    assert np.array_equal(data.train_idx, expected[np.isin(expected, data.train_idx)])
    assert data.groups == ["many"] * 5 + ["medium"] * 2 + ["few"] * 3
    literature = build_lt_data("fmnist", imbalance_factor=100, holdout_kept=False)
    assert np.array_equal(literature.train_idx, expected) and literature.index_sha256 == sha256_int64(expected)
    assert literature.counts == FMNIST_IF100 and literature.val_counts == [0] + [100] * 9
    assert literature.index_sha256.startswith("ed7a7312")
    assert not set(data.val_idx.tolist()) & set(data.train_idx.tolist())
    train.images[0, 0, 0, 0] = 7  # a writable copy, not the read-only file buffer


# ------------------------------------------------------------------------------------------------ file data

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def write_png(path, colour, size=(24, 18)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_split_files(tmp_path):
    root = tmp_path / "imagenet_lt"
    lines = {"train": [], "val": [], "test": []}
    for label, (wnid, n_train) in enumerate([("n01", 6), ("n02", 3), ("n03", 2)]):
        for split, n in (("train", n_train), ("val", 1), ("test", 2)):
            for i in range(n):
                relative = f"{split}/{wnid}/{wnid}_{i}.png"
                write_png(root / relative, COLOURS[label])
                lines[split].append(f"{relative} {label}")
    for split, split_lines in lines.items():
        (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(split_lines) + "\n")

    data = build_lt_data("splits", root=str(root), train_split="ImageNet_LT_train.txt",
                         val_split=str(root / "ImageNet_LT_val.txt"), test_split="ImageNet_LT_test.txt",
                         image_size=16)
    assert data.class_names == ["n01", "n02", "n03"]
    assert data.counts == [6, 3, 2] and data.val_counts == [1, 1, 1] and len(data.test_source) == 6
    assert data.channels == 3 and data.image_size == (16, 16) and data.mean == (0.485, 0.456, 0.406)
    val = data.train_source.load(data.val_idx)
    assert val.shape == (3, 3, 16, 16) and val.dtype == torch.uint8
    for row, colour in enumerate(COLOURS[:3]):
        assert val[row, :, 8, 8].tolist() == list(colour)
    assert not set(data.train_idx.tolist()) & set(data.val_idx.tolist())
    assert build_lt_data(**data.card()["build_args"]).card() == data.card()

    # without a val split: at most 20% of a class is held out (6 -> 1, 3 -> 0, 2 -> 0)
    held_out = build_lt_data("splits", root=str(root), train_split="ImageNet_LT_train.txt", image_size=16)
    assert held_out.counts == [5, 3, 2] and held_out.val_counts == [1, 0, 0] and held_out.test_source is None

    (root / "train/n02/n02_1.png").unlink()
    with pytest.raises(UserError, match="do not exist") as exc:
        build_lt_data("splits", root=str(root), train_split="ImageNet_LT_train.txt")
    assert str(root / "train/n02/n02_1.png") in str(exc.value)
    (root / "bad.txt").write_text("train/n01/n01_0.png zero\n")
    with pytest.raises(UserError, match="bad.txt:1"):
        build_lt_data("splits", root=str(root), train_split="bad.txt")


def test_class_folder(tmp_path):
    root = tmp_path / "mine"
    for name, n, colour in (("cat", 10, COLOURS[0]), ("dog", 4, COLOURS[1])):
        for i in range(n):
            write_png(root / name / f"{i}.png", colour)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    data = build_lt_data("folder", root=str(root), val_per_class=100, image_size=8)
    assert data.class_names == ["cat", "dog"]
    assert data.counts == [8, 4] and data.val_counts == [2, 0]  # never more than 20% of a class
    assert data.test_source is None and data.card()["num_test"] == 0
    assert data.train_source.load(data.train_idx).shape == (12, 3, 8, 8)
    assert sorted(data.train_idx.tolist() + data.val_idx.tolist()) == list(range(14))

    test_root = tmp_path / "mine_test"
    write_png(test_root / "dog" / "0.png", COLOURS[1])
    with_test = build_lt_data("folder", root=str(root), test_split=str(test_root), image_size=8)
    assert with_test.test_source.labels.tolist() == [1]
    write_png(test_root / "cow" / "0.png", COLOURS[2])
    with pytest.raises(UserError, match="cow"):
        build_lt_data("folder", root=str(root), test_split=str(test_root))


def test_file_images_are_exif_rotated_resized_and_centre_cropped(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation: rotate 180
    root = tmp_path / "rot"
    (root / "a").mkdir(parents=True)
    image.save(root / "a" / "0.jpg", exif=exif, quality=95)
    Image.new("L", (30, 90), 128).save(root / "a" / "1.png")  # grayscale, portrait
    data = build_lt_data("folder", root=str(root), image_size=10)
    out = data.train_source.load([0, 1])
    assert out.shape == (2, 3, 10, 10)
    # 40x20 -> 20x10 -> centre 10x10 = original columns 10..30: red then blue, swapped by the 180 rotation
    left, right = out[0, :, 5, 1].tolist(), out[0, :, 5, 8].tolist()
    assert left[2] > 200 and left[0] < 60 and right[0] > 200 and right[2] < 60
    assert out[1].tolist() == torch.full((3, 10, 10), 128, dtype=torch.uint8).tolist()
    (root / "a" / "1.png").write_bytes(b"broken")   # broken after the scan: the class's other image stands in
    assert data.train_source.load([1]).tolist() == data.train_source.load([0]).tolist()


# ------------------------------------------------------------------------------------------------ CLI

@needs_fmnist
def test_cli_data_json_reports_fmnist_if100(capsys):
    assert tailwise_main(["data", "--dataset", "fmnist", "--imbalance-factor", "100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == [5900] + FMNIST_IF100[1:]
    assert report["groups"] == ["many"] * 5 + ["medium"] * 2 + ["few"] * 3
    assert report["val_size"] == 1000 and report["val_counts"] == [100] * 10
    assert len(report["index_sha256"]) == 64 and report["num_test"] == 10000


def test_cli_data_table_and_error(tmp_path, capsys):
    root = write_fmnist(tmp_path / "fm")
    assert tailwise_main(["data", "--dataset", "fmnist", "--root", str(root), "--imbalance-factor", "10",
                          "--val-per-class", "2"]) == 0
    table = capsys.readouterr().out
    assert "Ankle boot" in table and "index_sha256" in table and "few:" in table
    (root / "train-labels-idx1-ubyte.gz").write_bytes(b"junk")
    assert tailwise_main(["data", "--dataset", "fmnist", "--root", str(root)]) == 2
    assert str(root / "train-labels-idx1-ubyte.gz") in capsys.readouterr().err
