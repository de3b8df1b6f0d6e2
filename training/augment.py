"""Batched, on-device image augmentation with independent random parameters per image.

`BatchAugment` applies a SimCLR-style pipeline to a whole batch at once on whatever device the batch lives on
(no per-image Python loops): random resized crop + horizontal flip as one affine grid per image
(`F.affine_grid` / `F.grid_sample`, bilinear), colour jitter, random grayscale, and Gaussian blur with a
per-image sigma (a grouped convolution). Call it twice on the same batch for BNS's two views.

Differences from torchvision's per-image transforms, all deliberate:
- the crop box is continuous (sub-pixel) and resampled bilinearly without antialiasing (crops are upsampled
  when the output size equals the input size, the usual case);
- colour jitter applies brightness, contrast, saturation, hue in that fixed order (torchvision permutes the
  order per call); hue is shifted exactly in HSV space, as torchvision does;
- blur uses a fixed odd kernel of ~10% of the image side (at least 3), sigma ~ U(0.1, 2.0), reflect padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tailwise import UserError

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


def to_float(x: Tensor) -> Tensor:
    """uint8 0..255 -> float32 0..1; floating input is returned as float32, unscaled."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def grayscale(x: Tensor) -> Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luma."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _per_image(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * _per_image(factor)).clamp(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with the mean of its grayscale (of itself, for 1 channel)."""
    gray = grayscale(x) if x.shape[1] == 3 else x
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    f = _per_image(factor)
    return (f * x + (1 - f) * mean).clamp(0.0, 1.0)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    f = _per_image(factor)
    return (f * x + (1 - f) * grayscale(x)).clamp(0.0, 1.0)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """[B, 3, H, W] RGB in 0..1 -> HSV with hue in 0..1."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    chroma = maxc - minc
    flat = chroma == 0
    safe_chroma = torch.where(flat, torch.ones_like(chroma), chroma)
    sat = chroma / torch.where(flat, torch.ones_like(maxc), maxc)  # flat pixels (incl. black) have chroma 0
    rc, gc, bc = (maxc - r) / safe_chroma, (maxc - g) / safe_chroma, (maxc - b) / safe_chroma
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(flat, torch.zeros_like(hue), hue)
    hue = torch.remainder(hue / 6.0, 1.0)
    return torch.stack([hue, sat, maxc], dim=1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of rgb_to_hsv: channel n in (R, G, B) = v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n' + 6h) mod 6,
    n' = 5, 3, 1."""
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    offsets = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(offsets + 6.0 * h, 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by `shift` (fraction of a full turn, per image) in HSV space."""
    hsv = rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], 1))


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with one sigma per image (grouped conv, reflect padding); sigma <= 0: no blur."""
    b, c, h, w = x.shape
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.clamp(min=1e-6).view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets / s) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    delta = (offsets == 0).to(x.dtype).expand_as(kernel)
    kernel = torch.where(sigma.view(-1, 1) > 0, kernel, delta)  # [B, K]
    kernel = kernel.repeat_interleave(c, dim=0)  # [B*C, K]
    out = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(b * c, 1, 1, kernel_size), groups=b * c)
    out = F.conv2d(out, kernel.view(b * c, 1, kernel_size, 1), groups=b * c)
    return out.view(b, c, h, w)


KINDS = ("simclr", "light", "none")


class BatchAugment:
    """Random two-view augmentation of a batch, on the batch's device, parameters drawn per image.

    kind:
      "simclr": random resized crop (scale 0.08..1 for 3 channels, 0.2..1 for 1 channel; ratio 3/4..4/3),
                horizontal flip p=0.5, colour jitter p=0.8 (brightness, contrast, saturation 0.4*strength,
                hue 0.1*strength), grayscale p=0.2, Gaussian blur p=0.5. Stage 1 (the paper uses strength 2).
      "light":  crop scale 0.35..1, flip, colour jitter p=0.8 at `strength`; no grayscale, no blur.
                Stage 2 (the released recipe uses strength 1).
      "none":   no augmentation: x as float in 0..1 (resized bilinearly only if `size` differs).
    One-channel images get only brightness and contrast jitter (no saturation, hue or grayscale).
    Keyword options override the kind's defaults (a probability of 0 turns a step off).
    """

    def __init__(
        self,
        channels: int,
        size: tuple[int, int],
        strength: float = 1.0,
        kind: str = "simclr",
        crop_scale: tuple[float, float] | None = None,
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter_p: float = 0.8,
        gray_p: float | None = None,
        blur_p: float | None = None,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ):
        if kind not in KINDS:
            raise UserError(f"unknown augmentation kind {kind!r}; choose one of {list(KINDS)}")
        if channels not in (1, 3):
            raise UserError(f"augmentation supports 1 or 3 channels, got channels={channels}")
        if strength < 0:
            raise UserError(f"augmentation strength must be >= 0, got {strength}")
        self.channels, self.size, self.kind, self.strength = channels, tuple(size), kind, strength
        if crop_scale is None:
            crop_scale = (0.35, 1.0) if kind == "light" else (0.08, 1.0) if channels == 3 else (0.2, 1.0)
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio
        self.flip_p, self.jitter_p = flip_p, jitter_p
        color = channels == 3
        self.gray_p = gray_p if gray_p is not None else 0.2 if kind == "simclr" and color else 0.0
        self.blur_p = blur_p if blur_p is not None else 0.5 if kind == "simclr" else 0.0
        if self.gray_p > 0 and not color:
            raise UserError("gray_p needs 3-channel images")
        self.blur_sigma = blur_sigma
        self.blur_kernel = max(3, int(0.1 * min(self.size)) // 2 * 2 + 1)

    def __repr__(self) -> str:
        return (f"BatchAugment(channels={self.channels}, size={self.size}, kind={self.kind!r}, "
                f"strength={self.strength}, crop_scale={self.crop_scale}, jitter_p={self.jitter_p}, "
                f"gray_p={self.gray_p}, blur_p={self.blur_p})")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x: uint8 (0..255) or float (0..1) [B, C, H, W] -> float32 [B, C, *size] in 0..1, same device.
        Random numbers come from `generator` (on any device) or torch's global RNG for x's device."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected [B, {self.channels}, H, W] images, got {list(x.shape)}")
        x = to_float(x)
        if self.kind == "none":
            if tuple(x.shape[-2:]) != self.size:
                x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
            return x.clamp(0.0, 1.0)
        b = x.shape[0]
        device = generator.device if generator is not None else x.device

        def uniform(low: float, high: float, *shape: int) -> Tensor:
            u = torch.rand(shape or (b,), generator=generator, device=device).to(x.device)
            return low + (high - low) * u

        def coin(p: float) -> Tensor:
            return uniform(0.0, 1.0) < p

        x = self._crop_and_flip(x, uniform, coin)
        if self.jitter_p > 0 and self.strength > 0:
            x = self._jitter(x, uniform, coin)
        if self.gray_p > 0:
            x = torch.where(_per_image(coin(self.gray_p)), grayscale(x).expand_as(x), x)
        if self.blur_p > 0:
            sigma = uniform(*self.blur_sigma)
            x = gaussian_blur(x, torch.where(coin(self.blur_p), sigma, torch.zeros_like(sigma)), self.blur_kernel)
        return x.clamp(0.0, 1.0)

    def _crop_and_flip(self, x: Tensor, uniform, coin) -> Tensor:
        """Random resized crop as torchvision draws it (10 tries of area fraction and log-uniform aspect ratio,
        whole image if none fits), then a horizontal flip, as one affine sampling grid per image."""
        b, _, h, w = x.shape
        tries = 10
        area = uniform(*self.crop_scale, b, tries)
        log_ratio = uniform(math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]), b, tries)
        ratio = torch.exp(log_ratio)
        crop_w = torch.sqrt(area * ratio * h / w)  # fraction of the width
        crop_h = torch.sqrt(area / ratio * w / h)  # fraction of the height
        fits = (crop_w <= 1) & (crop_h <= 1)
        first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((b,), -1, device=x.device))
        pick = first.clamp(min=0)[:, None]
        crop_w = torch.where(first >= 0, crop_w.gather(1, pick)[:, 0], torch.ones(b, device=x.device))
        crop_h = torch.where(first >= 0, crop_h.gather(1, pick)[:, 0], torch.ones(b, device=x.device))
        # centre of the box in normalised coordinates [-1, 1]
        cx = (1 - crop_w) * uniform(-1.0, 1.0)
        cy = (1 - crop_h) * uniform(-1.0, 1.0)
        flip = torch.where(coin(self.flip_p), -1.0, 1.0)
        theta = torch.zeros(b, 2, 3, device=x.device)
        theta[:, 0, 0] = crop_w * flip
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = crop_h
        theta[:, 1, 2] = cy
        grid = F.affine_grid(theta, [b, x.shape[1], *self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _jitter(self, x: Tensor, uniform, coin) -> Tensor:
        """Colour jitter with probability jitter_p per image (others get identity factors)."""
        s = self.strength
        apply = coin(self.jitter_p)

        def factor(amount: float) -> Tensor:
            f = uniform(max(0.0, 1 - amount), 1 + amount)
            return torch.where(apply, f, torch.ones_like(f))

        x = adjust_brightness(x, factor(0.4 * s))
        x = adjust_contrast(x, factor(0.4 * s))
        if self.channels == 3:
            x = adjust_saturation(x, factor(0.4 * s))
            hue_amount = min(0.1 * s, 0.5)
            shift = uniform(-hue_amount, hue_amount)
            x = torch.where(_per_image(apply), adjust_hue(x, shift), x)  # skip the HSV round trip's rounding
        return x
