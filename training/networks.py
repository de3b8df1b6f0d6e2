"""Backbones, the classifier and contrastive wrappers, and optimizer parameter groups.

Every wrapper starts with a `Normalize` layer, so callers feed raw `uint8` pixels (N x C x H x W, 0..255) or
floats in 0..1. `Classifier` and `ContrastiveModel` share the attribute names `normalize` and `encoder`, so a
stage-1 state_dict's `encoder.*` keys load straight into a stage-2 classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from tailwise import UserError


# --- CIFAR ResNet-32 (He et al. 2016, Sec. 4.2; the LDAM-DRW backbone) -------------------------------------------


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels (parameter-free)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        half = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra_channels - half))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        needs_shortcut = stride != 1 or in_planes != planes
        self.shortcut = PadShortcut(planes - in_planes) if needs_shortcut else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet32(nn.Module):
    """3 stages of 5 BasicBlocks (16/32/64 channels), option-A shortcuts; outputs a 64-d feature vector."""

    def __init__(self, in_channels: int, blocks_per_stage: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# --- torchvision ResNets ----------------------------------------------------------------------------------------


def _torchvision_resnet(name: str, in_channels: int, cifar_stem: bool) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision ResNet without its fc; CIFAR stem = 3x3 conv stride 1, no max-pool."""
    net = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feat_dim


ARCHS: dict[str, Callable[[int], tuple[nn.Module, int]]] = {
    "resnet32": lambda c: (ResNet32(c), 64),
    "resnet18": lambda c: _torchvision_resnet("resnet18", c, cifar_stem=True),
    "resnet34": lambda c: _torchvision_resnet("resnet34", c, cifar_stem=True),
    "resnet50": lambda c: _torchvision_resnet("resnet50", c, cifar_stem=False),
    "resnext50": lambda c: _torchvision_resnet("resnext50_32x4d", c, cifar_stem=False),
}


def build_encoder(arch: str, in_channels: int) -> tuple[nn.Module, int]:
    """Build the backbone `arch` (a key of ARCHS) for `in_channels`-channel images; returns (encoder, feat_dim).

    The encoder maps float images [N, C, H, W] to features [N, feat_dim].
    """
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    if in_channels < 1:
        raise UserError(f"in_channels must be >= 1, got {in_channels}")
    return ARCHS[arch](in_channels)


# --- wrappers -----------------------------------------------------------------------------------------------------


class Normalize(nn.Module):
    """(x - mean) / std per channel; uint8 input (0..255) is divided by 255 first, float input must be 0..1."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise UserError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise UserError(f"std must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        return (x - self.mean) / self.std


class CosineLinear(nn.Module):
    """Cosine-similarity head: normalised features times normalised class weights, in [-1, 1] (scale in the loss)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()


class Classifier(nn.Module):
    """normalize -> encoder -> fc. `head` is "linear" or "cosine" (for LDAM: logits are cosines, the loss scales)."""

    def __init__(
        self,
        arch: str,
        in_channels: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        head: str = "linear",
    ):
        super().__init__()
        if len(mean) != in_channels:
            raise UserError(f"mean/std have {len(mean)} channels but in_channels is {in_channels}")
        self.normalize = Normalize(mean, std)
        self.encoder, feat_dim = build_encoder(arch, in_channels)
        if head == "linear":
            self.fc = nn.Linear(feat_dim, num_classes)
        elif head == "cosine":
            self.fc = CosineLinear(feat_dim, num_classes)
        else:
            raise UserError(f"unknown head {head!r}; choose 'linear' or 'cosine'")

    def features(self, x: Tensor) -> Tensor:
        return self.encoder(self.normalize(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class ContrastiveModel(nn.Module):
    """normalize -> encoder -> projector (feat -> proj_hidden -> ReLU -> proj_dim); returns L2-normalised embeddings.

    With `num_classes` it also has a linear classifier `fc` on the encoder features (BNS trained jointly with a
    supervised loss) and returns (embeddings, logits)."""

    def __init__(
        self,
        arch: str,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        proj_hidden: int = 2048,
        proj_dim: int = 128,
        num_classes: int = 0,
    ):
        super().__init__()
        if len(mean) != in_channels:
            raise UserError(f"mean/std have {len(mean)} channels but in_channels is {in_channels}")
        self.normalize = Normalize(mean, std)
        self.encoder, feat_dim = build_encoder(arch, in_channels)
        self.projector = nn.Sequential(
            nn.Linear(feat_dim, proj_hidden), nn.ReLU(inplace=True), nn.Linear(proj_hidden, proj_dim)
        )
        self.fc = nn.Linear(feat_dim, num_classes) if num_classes else None

    def features(self, x: Tensor) -> Tensor:
        return self.encoder(self.normalize(x))

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        h = self.features(x)
        z = F.normalize(self.projector(h), dim=1)
        return z if self.fc is None else (z, self.fc(h))


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Optimizer groups: weight decay on weight matrices and conv kernels only, none on biases, norm weights
    and any other 1-D (or 0-D) parameter; with `decay_all`, on every parameter (Weight Balancing's released
    code). Frozen parameters are left out; empty groups are dropped."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 or decay_all else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
