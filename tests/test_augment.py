import pytest
import torch
import torchvision.transforms.v2.functional as TF

from tailwise import UserError
from tailwise.training.augment import (
    BatchAugment,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = [(1, 28), (3, 32)]


def images(b, c, size, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, size, size), generator=g, dtype=torch.uint8).to(device)


def no_colour(**kw):
    """Geometry only: no jitter, grayscale or blur."""
    return dict(jitter_p=0.0, gray_p=0.0, blur_p=0.0, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("kind", ["simclr", "light", "none"])
def test_output_shape_dtype_range_device(device, channels, size, kind):
    aug = BatchAugment(channels, (size, size), strength=2.0, kind=kind)
    x = images(16, channels, size, device=device)
    for inp in (x, x.float() / 255):
        out = aug(inp)
        assert out.shape == (16, channels, size, size)
        assert out.dtype == torch.float32 and out.device == x.device
        assert out.min() >= 0 and out.max() <= 1


def test_output_size_can_differ_from_input():
    out = BatchAugment(3, (24, 20))(images(4, 3, 32))
    assert out.shape == (4, 3, 24, 20)


@pytest.mark.parametrize("channels,size", SHAPES)
def test_deterministic_under_generator_and_views_differ(channels, size):
    aug = BatchAugment(channels, (size, size), strength=2.0)
    x = images(8, channels, size)
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(1)
    view1, view2 = aug(x, g), aug(x, g)
    assert not torch.allclose(view1, view2)
    assert ((view1 - view2).flatten(1).abs().amax(1) > 0.05).all()  # every image's two views differ


@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize(
    "options",
    [
        dict(),  # full pipeline
        no_colour(),  # crops and flips alone
        no_colour(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0) | dict(jitter_p=1.0),  # jitter alone
    ],
)
def test_each_image_gets_its_own_parameters(channels, size, options):
    x = images(1, channels, size).expand(32, -1, -1, -1)  # 32 copies of one image
    out = BatchAugment(channels, (size, size), strength=2.0, **options)(x, torch.Generator().manual_seed(0))
    flat = out.flatten(1)
    distance = torch.cdist(flat, flat)
    distance.fill_diagonal_(float("inf"))
    assert distance.min() > 1e-3  # no two copies were augmented alike


@pytest.mark.parametrize("channels,size", SHAPES)
def test_none_returns_input_over_255(channels, size):
    x = images(5, channels, size)
    out = BatchAugment(channels, (size, size), kind="none")(x)
    torch.testing.assert_close(out, x.float() / 255, rtol=0, atol=0)


def test_full_crop_is_identity_and_flip_mirrors():
    x = images(6, 3, 32)
    keep = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    same = BatchAugment(3, (32, 32), **no_colour(flip_p=0.0, **keep))(x)
    torch.testing.assert_close(same, x.float() / 255, rtol=0, atol=1e-5)
    mirrored = BatchAugment(3, (32, 32), **no_colour(flip_p=1.0, **keep))(x)
    torch.testing.assert_close(mirrored, x.float().flip(-1) / 255, rtol=0, atol=1e-5)


def _ramps(b, size):
    """Channel 0 rises left to right, channel 1 top to bottom, channel 2 constant; 8 levels per pixel."""
    ramp = torch.arange(size, dtype=torch.float32) * 8
    x = torch.zeros(b, 3, size, size)
    x[:, 0] = ramp.view(1, 1, size)
    x[:, 1] = ramp.view(1, size, 1)
    x[:, 2] = 128
    return x.to(torch.uint8)


def test_crop_covers_the_drawn_fraction():
    # area fraction 0.25 at aspect ratio 1: each output spans exactly half of the input's width and height
    x = _ramps(64, 32)
    aug = BatchAugment(3, (32, 32), **no_colour(crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0)))
    out = aug(x, torch.Generator().manual_seed(0))
    full = 8 * 31 / 255
    width_span = (out[:, 0].amax((1, 2)) - out[:, 0].amin((1, 2))) / full
    height_span = (out[:, 1].amax((1, 2)) - out[:, 1].amin((1, 2))) / full
    for span in (width_span, height_span):
        # a box touching the border loses at most half an input pixel to edge clamping (31 pixel steps)
        assert ((span > 0.5 - 0.5 / 31 - 1e-4) & (span < 0.5 + 1e-4)).all()
        assert ((span - 0.5).abs() < 1e-4).float().mean() > 0.8
    centres = out[:, 0].mean((1, 2))
    assert centres.std() > 0.05  # the box moves around the image


@pytest.mark.parametrize("kind,min_span", [("simclr", (0.08 * 3 / 4) ** 0.5), ("light", (0.35 * 3 / 4) ** 0.5)])
def test_default_crop_scales(kind, min_span):
    x = _ramps(512, 32)
    out = BatchAugment(3, (32, 32), kind=kind, **no_colour())(x, torch.Generator().manual_seed(0))
    span = (out[:, 0].amax((1, 2)) - out[:, 0].amin((1, 2))) / (8 * 31 / 255)
    assert span.min() >= min_span - 1e-4 and span.max() <= 1 + 1e-4
    assert span.min() < min_span + 0.1  # small crops do occur
    assert (span > 0.999).any()  # so do whole-width ones


def test_one_channel_default_crop_scale_is_0_2():
    assert BatchAugment(1, (28, 28)).crop_scale == (0.2, 1.0)
    assert BatchAugment(3, (32, 32)).crop_scale == (0.08, 1.0)


def test_grayscale_probability():
    x = images(2000, 3, 8)
    out = BatchAugment(3, (8, 8), jitter_p=0.0, blur_p=0.0)(x, torch.Generator().manual_seed(0))
    gray = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    assert 0.16 < gray.float().mean() < 0.24
    light = BatchAugment(3, (8, 8), kind="light")(x, torch.Generator().manual_seed(0))
    assert not ((light[:, 0] == light[:, 1]).flatten(1).all(1)).any()  # "light" has no grayscale


def test_jitter_probability():
    x = images(1, 3, 8).expand(2000, -1, -1, -1)
    opts = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, gray_p=0.0, blur_p=0.0)
    out = BatchAugment(3, (8, 8), **opts)(x, torch.Generator().manual_seed(0))
    untouched = (out - x.float() / 255).flatten(1).abs().amax(1) < 1e-5
    assert 0.16 < untouched.float().mean() < 0.24  # jitter applied with p = 0.8


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("strength", [1.0, 2.0])
def test_brightness_range(channels, strength):
    # a flat mid-gray image is changed by brightness alone: out = 0.5 * U(1 - 0.4 s, 1 + 0.4 s)
    x = torch.full((2000, channels, 4, 4), 0.5)
    aug = BatchAugment(channels, (4, 4), strength=strength, jitter_p=1.0, gray_p=0.0, blur_p=0.0)
    out = aug(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, out[:, :1, :1, :1].expand_as(out), rtol=0, atol=1e-6)  # still flat and gray
    level = out[:, 0, 0, 0]
    low, high = 0.5 * (1 - 0.4 * strength), 0.5 * (1 + 0.4 * strength)
    assert level.min() >= low - 1e-6 and level.max() <= high + 1e-6
    assert level.min() < low + 0.01 and level.max() > high - 0.01


def test_colour_ops_match_torchvision_per_image():
    x = images(4, 3, 16).float() / 255
    x[0, :, :4] = 0.5  # gray pixels (zero chroma)
    x[1, :, :4] = 0.0  # black pixels
    factors = [0.2, 1.0, 1.5, 1.8]
    for ours, theirs in ((adjust_contrast, TF.adjust_contrast), (adjust_saturation, TF.adjust_saturation)):
        expected = torch.stack([theirs(x[i], f) for i, f in enumerate(factors)])
        torch.testing.assert_close(ours(x, torch.tensor(factors)), expected, rtol=0, atol=2e-4)
    shifts = [-0.4, 0.0, 0.1, 0.5]
    expected = torch.stack([TF.adjust_hue(x[i], s) for i, s in enumerate(shifts)])
    torch.testing.assert_close(adjust_hue(x, torch.tensor(shifts)), expected, rtol=0, atol=1e-5)


def test_blur_matches_torchvision_per_image():
    x = images(3, 3, 16).float() / 255
    sigmas = [0.3, 1.0, 2.0]
    expected = torch.stack([TF.gaussian_blur(x[i], [5, 5], [s, s]) for i, s in enumerate(sigmas)])
    torch.testing.assert_close(gaussian_blur(x, torch.tensor(sigmas), 5), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(gaussian_blur(x, torch.zeros(3), 5), x)  # sigma 0: untouched


@pytest.mark.parametrize(
    "kwargs,option",
    [(dict(channels=3, kind="strong"), "strong"), (dict(channels=2), "channels"),
     (dict(channels=1, gray_p=0.2), "gray_p"), (dict(channels=3, strength=-1.0), "strength")],
)
def test_bad_options_raise_user_error(kwargs, option):
    with pytest.raises(UserError, match=option):
        BatchAugment(size=(32, 32), **kwargs)
