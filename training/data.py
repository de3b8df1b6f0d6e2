"""Long-tailed training data: benchmark LT subsets (LDAM-DRW protocol), validation split, many/medium/few groups.

Sources:

* ``fmnist``: Fashion-MNIST from gzipped IDX files (default ``/usr/share/datasets/fashion-mnist``, Debian
  package ``dataset-fashion-mnist``).
* ``cifar10`` / ``cifar100``: the standard python-pickle archive (``cifar-10-python.tar.gz``,
  ``cifar-100-python.tar.gz``) or its extracted folder. Only the standard batch/meta files inside it are ever
  unpickled, and through an unpickler that refuses every class except the numpy array machinery, so a
  tampered file cannot run code.
* ``splits``: an image root plus ImageNet-LT / iNaturalist-2018 split files (``relative/path label`` per line).
* ``folder``: a user's own folder with one subfolder per class, used as it is (no subsampling).

fmnist/cifar images live in memory as one ``uint8`` tensor ``N x C x H x W``; file data is decoded with
Pillow on demand. Every index below is a row of ``LTData.train_source`` (train and validation) or of
``LTData.test_source``.

Validation never touches the test set. For the LT benchmarks it is drawn, balanced, from the training images
the LT subset did not keep. A class the LDAM subset keeps whole (the head class; under the step profile the
whole first half) has no such images, so its validation images are held out of its LT training images
instead (``holdout_kept=True``, the default: Fashion-MNIST-LT IF 100 trains on 5900 head images, not 6000).
This is a deviation from the literature's subset, made so that every choice is checked on every class; it
changes the index sha256, and ``holdout_kept=False`` restores the LDAM subset exactly. Without LT subsampling
(``profile="none"``, ``splits`` without a val split, ``folder``) up to ``val_per_class`` images per class,
never more than 20% of a class, are held out of training.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import math
import os
import pickle
import struct
import sys
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


from tailwise import UserError
from tailwise._core import IMAGE_EXTENSIONS, ImageError, load_image
from tailwise.training.dataspec import DATASETS, PROFILES, DataSpec  # noqa: F401 (DATASETS re-exported)

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
MAX_LISTED_SKIPPED = 20     # unreadable files named one by one (the rest are counted)
MAX_HOLDOUT_FRACTION = 0.2  # without LT subsampling, validation takes at most this share of a class

FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Per-channel mean/std of the full training sets, 0..1 scale.
MEAN_STD = {
    "fmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # used for all file-backed RGB data
    "imagenet-gray": ((0.449,), (0.226,)),                          # their mean, for grayscale file data
}


# ---------------------------------------------------------------------------------------------- sources

class ArraySource:
    """Images held in memory: ``images`` uint8 tensor ``N x C x H x W``, ``labels`` int64 numpy array."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray):
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"need uint8 N x C x H x W images and N labels, got {tuple(images.shape)} "
                             f"{images.dtype} and {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices) -> torch.Tensor:
        """uint8 ``[n, C, H, W]`` for the given row indices."""
        return self.images[torch.as_tensor(np.asarray(indices, dtype=np.int64))]


class FileSource:
    """Images decoded from files on demand: EXIF orientation applied, RGB (or grayscale with ``channels=1``),
    shorter side resized to ``image_size`` (bilinear, antialiased) and centre-cropped to ``image_size x
    image_size``."""

    def __init__(self, paths: list[str], labels: np.ndarray, image_size: int, channels: int = 3):
        self.channels = channels
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_size = (image_size, image_size)
        self.unreadable: dict[int, str] = {}   # row -> why it failed to decode (found while training)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices) -> torch.Tensor:
        """uint8 ``[n, channels, S, S]`` for the given row indices, decoded on a thread pool (Pillow releases the GIL).

        A file that fails to decode (truncated after its header, changed since the scan) is reported once on
        stderr and left out from then on: the next readable image of its class stands in for it."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = torch.empty((len(indices), self.channels, *self.image_size), dtype=torch.uint8)

        def fill(row):
            out[row] = torch.from_numpy(self._decode_or_stand_in(int(indices[row]))).permute(2, 0, 1)

        list(_decode_pool().map(fill, range(len(indices))))
        return out

    def _decode_or_stand_in(self, index: int) -> np.ndarray:
        candidates = [index]
        if index in self.unreadable:
            candidates = []
        else:
            try:
                return decode_image(self.paths[index], self.image_size[0], self.channels)
            except UserError as exc:
                self._report_unreadable(index, exc)
        same_class = np.flatnonzero(self.labels == self.labels[index])
        for candidate in np.roll(same_class, -int(np.searchsorted(same_class, index))):
            if int(candidate) in self.unreadable or int(candidate) in candidates:
                continue
            try:
                return decode_image(self.paths[candidate], self.image_size[0], self.channels)
            except UserError as exc:
                self._report_unreadable(int(candidate), exc)
        raise UserError(f"no image of the class of {self.paths[index]} can be decoded "
                        f"(e.g. {self.unreadable.get(index, self.paths[index])})")

    def _report_unreadable(self, index: int, exc: UserError) -> None:
        if index not in self.unreadable:
            self.unreadable[index] = str(exc)
            print(f"tailwise: {exc}; another image of its class stands in for it", file=sys.stderr, flush=True)


@functools.cache
def _decode_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1), thread_name_prefix="tailwise-decode")


FILE_RESIZE_POLICY = "shorter-center-crop"   # how file data is decoded (tailwise._core.RESIZE_POLICIES)
IMAGE_SIZES = (28, 32, 48, 64, 96, 128, 160, 192, 224)   # what a folder's images are decoded to, by default


def image_size_for(median_shorter_side: int) -> int:
    """The square side a folder's images are decoded to when none is given: the largest of IMAGE_SIZES not
    above the images' median shorter side (so images are not blown up; 224 at most), or that side itself
    when it is below 28."""
    fitting = [s for s in IMAGE_SIZES if s <= median_shorter_side]
    return fitting[-1] if fitting else max(1, int(median_shorter_side))


def decode_image(path: str, size: int, channels: int = 3) -> np.ndarray:
    """One image file as a ``size x size x channels`` uint8 array, decoded exactly as the served model decodes
    it (tailwise._core.load_image, policy "shorter-center-crop": EXIF, RGB or L, shorter-side resize, centre
    crop)."""
    spec = {"input": {"channels": channels, "height": size, "width": size, "resize_policy": FILE_RESIZE_POLICY}}
    try:
        return np.require(load_image(path, spec, max_pixels=None).transpose(1, 2, 0), requirements="W")
    except ImageError as exc:
        raise UserError(f"cannot decode image {path}: {exc}") from None


# ---------------------------------------------------------------------------------------------- LT protocol

def lt_counts(n_max: int, num_classes: int, imbalance_factor: float, profile: str = "exp") -> list[int]:
    """Training images kept per class, exactly as LDAM-DRW's ``get_img_num_per_cls``.

    exp: ``int(n_max * (1/IF) ** (c / (C - 1.0)))``; step: the first ``C // 2`` classes keep ``n_max``, the rest
    ``int(n_max * (1/IF))`` (LDAM's code drops the last class when C is odd; we give it the tail count);
    none: ``n_max`` for every class.
    """
    if profile not in PROFILES:
        raise UserError(f"{DataSpec.where('profile')} must be one of {', '.join(PROFILES)}, got {profile!r}")
    if not imbalance_factor >= 1:
        raise UserError(f"{DataSpec.where('imbalance_factor')} must be >= 1, got {imbalance_factor}")
    imb = 1.0 / imbalance_factor  # LDAM's imb_factor
    if profile == "none" or num_classes == 1:
        return [int(n_max)] * num_classes
    if profile == "step":
        head = num_classes // 2
        return [int(n_max)] * head + [int(n_max * imb)] * (num_classes - head)
    return [int(n_max * (imb ** (c / (num_classes - 1.0)))) for c in range(num_classes)]


def ldam_select(labels: np.ndarray, counts: list[int], seed: int = 0) -> np.ndarray:
    """Indices of the LT subset by the LDAM-DRW rule, in selection order (int64).

    ``np.random.seed(seed)`` on numpy's legacy global generator, then for each class c in label order:
    ``idx = np.where(labels == c)[0]; np.random.shuffle(idx); keep idx[:counts[c]]``. The global generator's
    previous state is restored afterwards.
    """
    labels = np.asarray(labels)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        selected = []
        for c, n in enumerate(counts):
            idx = np.where(labels == c)[0]
            np.random.shuffle(idx)
            selected.append(idx[:n])
    finally:
        np.random.set_state(state)
    return np.concatenate(selected).astype(np.int64) if selected else np.zeros(0, np.int64)


def index_sha256(indices: np.ndarray) -> str:
    """sha256 hex digest of the indices as a little-endian int64 array, in their order."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()


def group_thresholds(num_classes: int, many_threshold=None, few_threshold=None) -> tuple[int, int]:
    """(many, few): many means count > many, few means count < few. Defaults: with 100+ classes 100 and 20
    (OLTR); otherwise 500 and 200 (the paper's CIFAR-10 code)."""
    large = num_classes >= 100
    many = (100 if large else 500) if many_threshold is None else many_threshold
    few = (20 if large else 200) if few_threshold is None else few_threshold
    return many, few


def folder_group_thresholds(counts, many_threshold=None, few_threshold=None) -> tuple[int, int]:
    """(many, few) for a user's own folder, where not given: group_thresholds' literature bands when its
    largest class is above the many threshold; otherwise (a small set, where those bands would make no class
    'many') the log range of the class counts cut into thirds: many = count > n_min * (n_max/n_min)^(2/3),
    few = count < n_min * (n_max/n_min)^(1/3). A balanced set is all 'many'."""
    many, few = group_thresholds(len(counts))
    if not (many_threshold is None or few_threshold is None) or not len(counts) or max(counts) > many:
        return group_thresholds(len(counts), many_threshold, few_threshold)
    low, high = max(1, min(counts)), max(counts)
    if high <= low:
        auto_many, auto_few = high - 1, 0
    else:
        auto_many = int(math.floor(low * (high / low) ** (2 / 3)))
        auto_few = min(auto_many, int(math.ceil(low * (high / low) ** (1 / 3))))
    return (auto_many if many_threshold is None else many_threshold,
            auto_few if few_threshold is None else few_threshold)


def groups_from_counts(counts, many_threshold=None, few_threshold=None) -> list[str]:
    """'many' (count > many), 'few' (count < few) or 'medium' for each class; thresholds: group_thresholds."""
    many, few = group_thresholds(len(counts), many_threshold, few_threshold)
    if few > many:
        raise UserError(f"{DataSpec.where('few_threshold')} = {few} must not exceed "
                        f"{DataSpec.where('many_threshold')} = {many}")
    return ["many" if n > many else "few" if n < few else "medium" for n in counts]


def leftover_val(labels: np.ndarray, train_idx: np.ndarray, num_classes: int, val_per_class: int,
                 seed: int) -> np.ndarray:
    """Up to ``val_per_class`` images per class drawn from those not in ``train_idx`` (sorted within a class)."""
    rng = np.random.default_rng(seed)
    unused = np.ones(len(labels), dtype=bool)
    unused[train_idx] = False
    picked = []
    for c in range(num_classes):
        pool = np.flatnonzero(unused & (labels == c))
        picked.append(np.sort(rng.permutation(pool)[:val_per_class]))
    return np.concatenate(picked).astype(np.int64)


def holdout_kept_classes(labels: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray, num_classes: int,
                         val_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx) where every class short of ``val_per_class`` validation images (because the LT subset
    kept all of its images) gets the shortfall held out of its LT training images, at most 20% of them, drawn
    with ``seed``. Other classes, and the order of ``train_idx``, are untouched."""
    rng = np.random.default_rng([seed, 1])
    val_counts = np.bincount(labels[val_idx], minlength=num_classes)
    moved = []
    for c in range(num_classes):
        kept = train_idx[labels[train_idx] == c]
        take = min(val_per_class - int(val_counts[c]), int(MAX_HOLDOUT_FRACTION * len(kept)))
        if take > 0:
            moved.append(np.sort(rng.permutation(kept)[:take]))
    if not moved:
        return train_idx, val_idx
    moved = np.concatenate(moved)
    return (train_idx[~np.isin(train_idx, moved)].astype(np.int64),
            np.sort(np.concatenate([val_idx, moved])).astype(np.int64))


def holdout_split(labels: np.ndarray, num_classes: int, val_per_class: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): per class, ``min(val_per_class, int(0.2 * n_c))`` images held out at random."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        take = min(val_per_class, int(MAX_HOLDOUT_FRACTION * len(pool)))
        is_val[rng.permutation(pool)[:take]] = True
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)


# ---------------------------------------------------------------------------------------------- describing it

def describe_imbalance(card: dict) -> str:
    """How imbalanced a data card's training set is, in words: an LT benchmark subset by its profile and factor;
    a user's files (or a whole set, profile none) by the factor they really have, largest / smallest class."""
    build, counts = card["build_args"], card["counts"]
    if build.get("dataset") in ("fmnist", "cifar10", "cifar100") and build.get("profile") != "none":
        return f"imbalance factor {build['imbalance_factor']:g}, {build['profile']} profile"
    largest, smallest = max(counts), min(counts)
    factor = largest / smallest if smallest else float("inf")
    return f"imbalance factor {factor:.3g} as found (largest class {largest} images, smallest {smallest})"


def describe_validation(card: dict) -> str:
    """Where a data card's validation images come from, in words."""
    build = card["build_args"]
    if build.get("val_split"):
        return "the given validation split"
    if not card.get("num_val"):
        return "none (val_per_class 0)"
    per_class = build.get("val_per_class", "?")
    if build.get("dataset") in ("fmnist", "cifar10", "cifar100") and build.get("profile") != "none":
        return (f"up to {per_class} per class, drawn from training images the LT subset did not keep"
                + (" (and, for classes it kept whole, held out of them)" if build.get("holdout_kept") else ""))
    return (f"up to {per_class} per class (at most {MAX_HOLDOUT_FRACTION:.0%} of a class), held out of the "
            "training images")


# ---------------------------------------------------------------------------------------------- LTData

@dataclass
class LTData:
    """A long-tailed training set, its validation split and its balanced test set."""

    name: str
    class_names: list[str]
    channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_source: ArraySource | FileSource
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_source: ArraySource | FileSource | None  # None: a folder/splits dataset given no test set
    counts: list[int]
    val_counts: list[int]
    groups: list[str]
    index_sha256: str  # of train_idx, see index_sha256()
    spec: DataSpec                                  # resolved: build_lt_data(spec) rebuilds this
    bands: tuple[int, int]                          # (many, few) the groups were drawn with
    skipped: list = field(default_factory=list)     # (path, reason) of unreadable image files left out
    notes: list = field(default_factory=list)       # other things left out (empty class folders)
    file_stats: dict = field(default_factory=dict)  # folder data: median shorter side, Pillow modes, ignored files

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def card(self) -> dict:
        """JSON-safe summary (goes into checkpoint cards)."""
        return {
            "name": self.name,
            "class_names": list(self.class_names),
            "channels": int(self.channels),
            "image_size": [int(s) for s in self.image_size],
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "counts": [int(n) for n in self.counts],
            "val_counts": [int(n) for n in self.val_counts],
            "groups": list(self.groups),
            "group_thresholds": {"many_above": int(self.bands[0]), "few_below": int(self.bands[1])},
            "index_sha256": self.index_sha256,
            "resize_policy": self.resize_policy,
            "num_train": int(len(self.train_idx)),
            "num_val": int(len(self.val_idx)),
            "num_test": 0 if self.test_source is None else len(self.test_source),
            "build_args": self.build_args,
            "num_skipped": len(self.skipped),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped[:MAX_LISTED_SKIPPED]],
        }

    @property
    def build_args(self) -> dict:
        """The spec as a card records it (DataSpec.card)."""
        return self.spec.card()

    @property
    def resize_policy(self) -> str:
        """How an image is fitted to this data's input size, recorded in the card for export to write into the
        model: file data as training decodes it (FILE_RESIZE_POLICY); the in-memory sets hold their images at
        their native size, so another image is resized to it whole ("resize")."""
        return FILE_RESIZE_POLICY if isinstance(self.train_source, FileSource) else "resize"

    def group_thresholds(self) -> tuple[int, int]:
        """(many, few) this set's groups were drawn with: many = count > many, few = count < few."""
        return self.bands

    def skipped_report(self) -> list[str]:
        """Lines that tell the user which files were left out and why (empty when none were)."""
        lines = [f"skipped {len(self.skipped)} unreadable image file(s):"] if self.skipped else []
        lines += [f"  {path}: {reason}" for path, reason in self.skipped[:MAX_LISTED_SKIPPED]]
        if len(self.skipped) > MAX_LISTED_SKIPPED:
            lines.append(f"  ... and {len(self.skipped) - MAX_LISTED_SKIPPED} more")
        return lines + list(self.notes)


def build_lt_data(spec: DataSpec | str | None = None, **values) -> LTData:
    """Load a dataset and build its long-tailed training subset, validation split and groups.

    `spec` is a DataSpec; or give the DataSpec fields as keywords (None: not given), the dataset name first.

    fmnist/cifar10/cifar100: LT subset by ``lt_counts`` + ``ldam_select`` with ``n_max`` = the smallest class
    size (all classes are equal in these sets, so this is LDAM's ``len(data) / num_classes``); validation from
    the images it did not keep, and (``holdout_kept``) from the LT images of classes kept whole.
    ``profile="none"`` keeps the whole training set and holds validation out of it.
    splits/folder: used as they are; ``imbalance_factor`` and ``profile`` do not apply (recorded as 1 / "none").
    splits: ``root`` is the image root, ``train_split`` (required), ``val_split`` and ``test_split`` split files.
    folder: ``root`` holds one subfolder per class; ``test_split`` may name a second such folder as test set.
    ``image_size`` (file data only) is the square side images are decoded to; default: 224 for splits, for a
    folder ``image_size_for`` its images' median shorter side. A folder's unreadable files are left out and
    listed in ``LTData.skipped``; its many/medium/few bands default to ``folder_group_thresholds``.
    The LTData records the spec resolved (absolute paths, image size and channels, a folder's group bands):
    building it again gives the same data. The bands of every dataset are in its card's group_thresholds.
    """
    if not isinstance(spec, DataSpec):
        spec = DataSpec.create(**values) if spec is None else DataSpec.create(dataset=spec, **values)
    elif values:
        raise TypeError("build_lt_data: give a DataSpec or a dataset name with keywords, not both")
    if spec.dataset in ("fmnist", "cifar10", "cifar100"):
        if spec.image_size:
            raise UserError(f"{DataSpec.where('image_size')} applies to file datasets (splits, folder), "
                            f"not to {spec.dataset}")
        if spec.channels not in (0, 1 if spec.dataset == "fmnist" else 3):
            raise UserError(f"{DataSpec.where('channels')}: {spec.dataset} images have "
                            f"{1 if spec.dataset == 'fmnist' else 3} channel(s), got {spec.channels}")
        return _build_array_data(spec)
    if spec.dataset == "folder" and (spec.train_split or spec.val_split):
        raise UserError("--train-split/--val-split apply to --dataset splits; a folder dataset is its own train set")
    return _build_file_data(spec)


def rebuild_lt_data(build_args: dict, index_sha256: str | None = None, where: str | os.PathLike = "") -> LTData:
    """The data a card's ``build_args`` describe (DataSpec.from_card); with `index_sha256` (what the card or model
    records), checked to be that very data (check_same_data, naming `where`)."""
    data = build_lt_data(DataSpec.from_card(build_args))
    if index_sha256 is not None:
        check_same_data(data, index_sha256, where)
    return data


def check_same_data(data: LTData, index_sha256: str | None, where: str | os.PathLike) -> None:
    """The one check that `data` is the data a checkpoint or model was trained on: its LT index sha256 is the one
    recorded (`index_sha256`); UserError naming `where` and the data's root otherwise."""
    if data.index_sha256 != index_sha256:
        raise UserError(f"{where}: trained on other data than {data.name} at {data.spec.given('root') or 'its default root'} "
                        f"(index sha256 {str(index_sha256)[:12]}... recorded, {data.index_sha256[:12]}... here)")


def _build_array_data(spec: DataSpec) -> LTData:
    dataset, root, profile, imbalance_factor = spec.dataset, spec.given("root"), spec.profile, spec.imbalance_factor
    val_per_class, val_seed = spec.val_per_class, spec.val_seed
    if dataset == "fmnist":
        root = os.path.abspath(root or FMNIST_ROOT)
        train, test = load_fmnist(root)
        class_names = FMNIST_CLASSES
    else:
        if root is None:
            name = "cifar-10" if dataset == "cifar10" else "cifar-100"
            raise UserError(f"--root is required for {dataset}: the {name}-python.tar.gz archive, "
                            f"the folder holding it, or its extracted folder")
        root = os.path.abspath(root)
        train, test, class_names = load_cifar(root, dataset)
    num_classes = len(class_names)
    labels = train.labels
    class_sizes = np.bincount(labels, minlength=num_classes)
    if profile == "none":
        imbalance_factor = 1
        train_idx, val_idx = holdout_split(labels, num_classes, val_per_class, val_seed)
    else:
        train_idx = ldam_select(labels, lt_counts(int(class_sizes.min()), num_classes, imbalance_factor, profile))
        val_idx = leftover_val(labels, train_idx, num_classes, val_per_class, val_seed)
        if spec.holdout_kept:
            train_idx, val_idx = holdout_kept_classes(labels, train_idx, val_idx, num_classes, val_per_class, val_seed)
    counts = np.bincount(labels[train_idx], minlength=num_classes).tolist()
    bands = group_thresholds(num_classes, spec.given("many_threshold"), spec.given("few_threshold"))
    mean, std = MEAN_STD[dataset]
    return LTData(
        name=dataset, class_names=list(class_names), channels=train.channels, image_size=train.image_size,
        mean=mean, std=std, train_source=train, train_idx=train_idx, val_idx=val_idx, test_source=test,
        counts=counts, val_counts=np.bincount(labels[val_idx], minlength=num_classes).tolist(),
        groups=groups_from_counts(counts, *bands), index_sha256=index_sha256(train_idx), bands=bands,
        spec=spec.replace(root=root, imbalance_factor=float(imbalance_factor), channels=train.channels,
                          holdout_kept=spec.holdout_kept and profile != "none"))


def _build_file_data(spec: DataSpec) -> LTData:
    dataset, root, val_per_class, val_seed = spec.dataset, spec.given("root"), spec.val_per_class, spec.val_seed
    train_split, val_split, test_split = spec.given("train_split"), spec.given("val_split"), spec.given("test_split")
    many_threshold, few_threshold = spec.given("many_threshold"), spec.given("few_threshold")
    image_size = spec.given("image_size") or (224 if dataset == "splits" else None)
    if root is None:
        raise UserError(f"{DataSpec.where('root')} is required for dataset {dataset}")
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise UserError(f"{DataSpec.where('root')} {root} is not a directory")
    test_paths = test_labels = None
    skipped, notes, file_stats = [], [], {}
    if dataset == "folder":
        scan = scan_class_folder(root)
        class_names, train_paths, train_labels = scan.class_names, scan.paths, scan.labels
        skipped += scan.skipped
        shorter = np.sort(scan.sizes.min(axis=1))
        file_stats = {"median_shorter_side": int(shorter[len(shorter) // 2]), "modes": dict(scan.modes),
                      "ignored_files": scan.ignored}
        if image_size is None:
            image_size = image_size_for(file_stats["median_shorter_side"])
        if scan.empty_classes:
            notes.append(f"{len(scan.empty_classes)} class folder(s) without a readable image left out: "
                         + ", ".join(scan.empty_classes[:10]))
        val_paths, val_labels = [], None
        if test_split is not None:
            test_split = os.path.abspath(test_split)
            test_scan = scan_class_folder(test_split)
            test_names, test_paths, test_labels = test_scan.class_names, test_scan.paths, test_scan.labels
            skipped += test_scan.skipped
            unknown = sorted(set(test_names) - set(class_names))
            if unknown:
                raise UserError(f"test folder {test_split} has classes not in {root}: {', '.join(unknown)}")
            test_labels = np.array([class_names.index(test_names[t]) for t in test_labels], dtype=np.int64)
    else:
        if train_split is None:
            raise UserError(f"{DataSpec.where('train_split')} is required for dataset splits")
        train_split = _find_split(train_split, root)
        train_paths, train_labels = read_split(train_split, root)
        num_classes = int(train_labels.max()) + 1
        class_names = _class_names_from_paths(train_paths, train_labels, num_classes)
        val_paths, val_labels = [], None
        if val_split is not None:
            val_split = _find_split(val_split, root)
            val_paths, val_labels = read_split(val_split, root, num_classes)
        if test_split is not None:
            test_split = _find_split(test_split, root)
            test_paths, test_labels = read_split(test_split, root, num_classes)
    num_classes = len(class_names)

    # RGB unless asked for grayscale (data.channels=1): on the walkthrough's folder of grayscale Fashion-MNIST
    # PNGs, 3 identical channels trained better than 1 (README, "Your own data")
    channels = spec.channels or 3
    if val_labels is not None:  # a given val split: train keeps everything
        source = FileSource(train_paths + val_paths, np.concatenate([train_labels, val_labels]), image_size, channels)
        train_idx = np.arange(len(train_paths), dtype=np.int64)
        val_idx = np.arange(len(train_paths), len(source), dtype=np.int64)
    else:
        source = FileSource(train_paths, train_labels, image_size, channels)
        train_idx, val_idx = holdout_split(train_labels, num_classes, val_per_class, val_seed)
    test = None if test_paths is None else FileSource(test_paths, test_labels, image_size, channels)
    counts = np.bincount(source.labels[train_idx], minlength=num_classes).tolist()
    if dataset == "folder":  # record the bands used, so a rebuild, the export and the served model agree
        bands = folder_group_thresholds(counts, many_threshold, few_threshold)
        many_threshold, few_threshold = bands
    else:
        bands = group_thresholds(num_classes, many_threshold, few_threshold)
    mean, std = MEAN_STD["imagenet" if channels == 3 else "imagenet-gray"]
    return LTData(
        name=dataset, class_names=class_names, channels=channels, image_size=(image_size, image_size), mean=mean, std=std,
        train_source=source, train_idx=train_idx, val_idx=val_idx, test_source=test, counts=counts,
        val_counts=np.bincount(source.labels[val_idx], minlength=num_classes).tolist(),
        groups=groups_from_counts(counts, *bands), index_sha256=index_sha256(train_idx), bands=bands,
        spec=spec.replace(root=root, imbalance_factor=1.0, profile="none", many_threshold=many_threshold or 0,
                          few_threshold=few_threshold or 0, train_split=train_split or "", val_split=val_split or "",
                          test_split=test_split or "", image_size=image_size, channels=channels, holdout_kept=False),
        skipped=skipped, notes=notes, file_stats=file_stats)


# ---------------------------------------------------------------------------------------------- Fashion-MNIST

def read_idx(path: str, magic: int) -> np.ndarray:
    """A (gzipped) IDX file as a writable uint8 array; images ``N x rows x cols``, labels ``N``."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"missing data file {path}") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"corrupt or truncated data file {path}: {exc}") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or struct.unpack(">I", raw[:4])[0] != magic:
        raise UserError(f"{path} is not an IDX file (expected magic number {magic})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) != header + int(np.prod(shape)):
        raise UserError(f"{path} holds {len(raw) - header} bytes of data, expected {int(np.prod(shape))} "
                        f"for shape {shape} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def load_fmnist(root: str) -> tuple[ArraySource, ArraySource]:
    """(train, test) from ``root``: train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-... (or unzipped)."""
    if not os.path.isdir(root):
        raise UserError(f"Fashion-MNIST folder {root} does not exist (install dataset-fashion-mnist or pass --root)")
    sources = []
    for prefix in ("train", "t10k"):
        images = read_idx(_idx_path(root, f"{prefix}-images-idx3-ubyte"), 2051)
        labels_path = _idx_path(root, f"{prefix}-labels-idx1-ubyte")
        labels = read_idx(labels_path, 2049).astype(np.int64)
        if len(images) != len(labels):
            raise UserError(f"{labels_path} has {len(labels)} labels for {len(images)} images")
        if len(labels) and labels.max() >= len(FMNIST_CLASSES):
            raise UserError(f"{labels_path} has label {labels.max()}, Fashion-MNIST has 10 classes")
        sources.append(ArraySource(torch.from_numpy(images).unsqueeze(1), labels))
    train, test = sources
    if train.image_size != test.image_size:
        raise UserError(f"Fashion-MNIST files in {root} disagree: train images {train.image_size}, "
                        f"test images {test.image_size}")
    return train, test


def _idx_path(root: str, name: str) -> str:
    gz = os.path.join(root, name + ".gz")
    plain = os.path.join(root, name)
    return plain if os.path.exists(plain) and not os.path.exists(gz) else gz


# ---------------------------------------------------------------------------------------------- CIFAR

CIFAR_LAYOUT = {  # folder inside the archive, archive name, train files, test file, meta file, label keys
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz", [f"data_batch_{i}" for i in range(1, 6)],
                "test_batch", "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ["train"], "test", "meta",
                 "fine_labels", "fine_label_names"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists/strings/numbers and numpy arrays only; any other class is refused."""

    def find_class(self, module, name):
        allowed = {"_reconstruct": ("numpy.core.multiarray", "numpy._core.multiarray"),
                   "ndarray": ("numpy",), "dtype": ("numpy",),
                   "_frombuffer": ("numpy.core.numeric", "numpy._core.numeric"), "encode": ("_codecs",)}
        if module not in allowed.get(name, ()):
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if name == "encode":
            import codecs
            return codecs.encode
        if name in ("ndarray", "dtype"):
            return getattr(np, name)
        core = getattr(np, "_core", None) or np.core
        return getattr(core.multiarray if name == "_reconstruct" else core.numeric, name)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as exc:  # any failure inside a corrupt pickle
        raise UserError(f"corrupt CIFAR file {where}: {exc}") from None
    if not isinstance(obj, dict):
        raise UserError(f"corrupt CIFAR file {where}: expected a dict, got {type(obj).__name__}")
    return obj


def _cifar_location(root: str, dataset: str) -> tuple[str, bool]:
    """(path, is_archive): ``root`` itself if it is the archive or the extracted folder, else the extracted
    folder or the archive inside ``root``."""
    folder, archive, _, _, meta_file = CIFAR_LAYOUT[dataset][:5]
    if os.path.isfile(root):
        return root, True
    if os.path.isfile(os.path.join(root, meta_file)):
        return root, False
    if os.path.isdir(os.path.join(root, folder)):
        return os.path.join(root, folder), False
    if os.path.isfile(os.path.join(root, archive)):
        return os.path.join(root, archive), True
    raise UserError(f"no {dataset} data at {root}: expected {archive}, {folder}/ or the files of {folder}/")


def load_cifar(root: str, dataset: str) -> tuple[ArraySource, ArraySource, list[str]]:
    """(train, test, class_names) from a CIFAR python-pickle archive or its extracted folder."""
    folder, _, train_files, test_file, meta_file, label_key, names_key = CIFAR_LAYOUT[dataset]
    path, is_archive = _cifar_location(root, dataset)
    wanted = train_files + [test_file, meta_file]
    blobs = {}
    if is_archive:
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    parts = member.name.split("/")
                    if member.isfile() and len(parts) == 2 and parts[0] == folder and parts[1] in wanted:
                        blobs[parts[1]] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise UserError(f"corrupt or truncated CIFAR archive {path}: {exc}") from None
        missing = [f"{folder}/{name}" for name in wanted if name not in blobs]
        if missing:
            raise UserError(f"CIFAR archive {path} lacks {', '.join(missing)}")
    else:
        for name in wanted:
            try:
                blobs[name] = Path(path, name).read_bytes()
            except OSError as exc:
                raise UserError(f"cannot read CIFAR file {os.path.join(path, name)}: {exc.strerror}") from None

    def where(name):
        return f"{path}:{folder}/{name}" if is_archive else os.path.join(path, name)

    meta = _unpickle(blobs[meta_file], where(meta_file))
    class_names = meta.get(names_key)
    if not isinstance(class_names, list) or not class_names:
        raise UserError(f"corrupt CIFAR file {where(meta_file)}: no '{names_key}' list")

    def batch(names):
        images, labels = [], []
        for name in names:
            entry = _unpickle(blobs[name], where(name))
            data, batch_labels = entry.get("data"), entry.get(label_key)
            if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
                    or data.shape[1] != 3072 or not isinstance(batch_labels, list)
                    or len(batch_labels) != len(data)):
                raise UserError(f"corrupt CIFAR file {where(name)}: expected 'data' uint8 N x 3072 and "
                                f"N '{label_key}'")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.extend(batch_labels)
        labels = np.array(labels, dtype=np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise UserError(f"corrupt CIFAR data in {where(names[0])}: labels outside 0..{len(class_names) - 1}")
        return ArraySource(torch.from_numpy(np.concatenate(images)), labels)  # concatenate copies: writable

    return batch(train_files), batch([test_file]), [str(n) for n in class_names]


# ---------------------------------------------------------------------------------------------- file data

def _find_split(split: str, root: str) -> str:
    """A split file path as given (relative to the working directory), else relative to ``root``."""
    for path in (split, os.path.join(root, split)):
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise UserError(f"split file {split} not found (looked in the working directory and in {root})")


def read_split(split: str, root: str, num_classes: int | None = None) -> tuple[list[str], np.ndarray]:
    """Image paths (under ``root``) and labels from a ``relative/path label`` split file; every image must exist."""
    paths, labels = [], []
    with open(split, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise UserError(f"{split}:{line_no}: expected 'relative/path label', got {line.strip()!r}")
            label = int(parts[1])
            if label < 0 or (num_classes is not None and label >= num_classes):
                bound = "" if num_classes is None else f" (the train split has {num_classes} classes)"
                raise UserError(f"{split}:{line_no}: label {label} out of range{bound}")
            paths.append(os.path.join(root, parts[0].strip()))
            labels.append(label)
    if not paths:
        raise UserError(f"split file {split} lists no images")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{len(missing)} image(s) listed in {split} do not exist, e.g. {', '.join(missing[:3])}")
    return paths, np.array(labels, dtype=np.int64)


def _class_names_from_paths(paths: list[str], labels: np.ndarray, num_classes: int) -> list[str]:
    """Each class's parent folder name where that is one folder per class (ImageNet-LT wnids, iNat ids), else
    the label number."""
    parents = [set() for _ in range(num_classes)]
    for path, label in zip(paths, labels):
        parents[label].add(os.path.basename(os.path.dirname(path)))
    names = [p.pop() if len(p) == 1 else "" for p in parents]
    if "" in names or len(set(names)) != num_classes:
        return [str(c) for c in range(num_classes)]
    return names


@dataclass
class FolderScan:
    """A class folder as found on disk: the readable images, and what was left out and why."""

    class_names: list[str]
    paths: list[str]
    labels: np.ndarray
    sizes: np.ndarray                  # (width, height) of each readable image, from its header
    modes: dict                        # Pillow mode -> number of images (L, RGB, RGBA, CMYK, I;16 ...)
    skipped: list[tuple[str, str]]     # (path, reason) of image files that cannot be read
    ignored: int = 0                   # files without an image extension (notes, .DS_Store, Thumbs.db ...)
    empty_classes: list[str] = field(default_factory=list)   # class subfolders left without a readable image


def probe_image(path: str) -> tuple[int, int, str]:
    """(width, height, mode) of an image file whose pixels decode; UserError naming the file when it cannot be
    read. The pixels are decoded (a JPEG at 1/8 scale, which still reads all of its data), so a file truncated
    after its header is left out here, counted nowhere, rather than counted in its class and replaced when
    training decodes it: one such file moves no class count and no group band (issue 25)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            raise UserError(f"{path}: empty file")
        with Image.open(path) as image:
            size, mode = (image.width, image.height), image.mode
            if image.format == "JPEG":
                image.draft(image.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            try:
                image.load()
            except (OSError, SyntaxError, ValueError) as exc:
                raise UserError(f"{path}: pixels do not decode ({exc})") from None
            return size[0], size[1], mode
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: cannot read file (missing, or a broken symlink)") from None
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image Pillow can read") from None
    except Exception as exc:  # permissions, decompression bombs, malformed headers
        raise UserError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None


def _image_files(class_dir: str) -> tuple[list[str], int]:
    """(image files under class_dir, sorted; number of non-image files): nested folders and symlinks followed
    (each real folder once, so a symlink loop ends), hidden files and folders skipped."""
    files, ignored, seen = [], 0, set()
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.join(dirpath, name))
            else:
                ignored += 1
    return sorted(files), ignored


def scan_class_folder(root: str) -> FolderScan:
    """Scan a folder with one subfolder of images per class (sorted names): every image's header is read (on a
    thread pool), and files that cannot be read are listed in ``skipped`` rather than failing the scan."""
    if not os.path.isdir(root):
        raise UserError(f"image folder {root} does not exist")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise UserError(f"{root} has no class subfolders (expected one subfolder of images per class)")
    found, ignored = [], 0
    for name in names:
        files, n_ignored = _image_files(os.path.join(root, name))
        found.append(files)
        ignored += n_ignored

    def probe(path):
        try:
            return probe_image(path)
        except UserError as exc:
            return str(exc)

    flat = [p for files in found for p in files]
    probes = list(_decode_pool().map(probe, flat, chunksize=256)) if flat else []
    class_names, paths, labels, sizes, modes, skipped, empty = [], [], [], [], {}, [], []
    k = 0
    for name, files in zip(names, found):
        kept = 0
        for path in files:
            result = probes[k]
            k += 1
            if isinstance(result, str):
                skipped.append((path, result.split(": ", 1)[1] if result.startswith(path) else result))
                continue
            paths.append(path)
            labels.append(len(class_names))
            sizes.append(result[:2])
            modes[result[2]] = modes.get(result[2], 0) + 1
            kept += 1
        if kept:
            class_names.append(name)
        else:
            empty.append(name)
    if not class_names:
        raise UserError(f"{root}: no readable images in any class subfolder ({', '.join(IMAGE_EXTENSIONS)})")
    return FolderScan(class_names, paths, np.array(labels, dtype=np.int64),
                      np.array(sizes, dtype=np.int64).reshape(-1, 2), modes, skipped, ignored, empty)

