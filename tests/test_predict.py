"""Serving: metadata round trip, image preprocessing, OnnxClassifier, `tailwise predict`, and no torch."""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from tailwise.serving.artifact import (ImageError, OnnxClassifier, build_metadata, default_model_path, load_image,
                              read_metadata, write_metadata)
from tailwise.serving.integrity import MANIFEST_NAME, check_folder, write_manifest
from tailwise.serving.predict import expand_inputs, parse_shard, select_shard
from tailwise import UserError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "fmnist-lt-tailwise"
CLASSES = ["ant", "bee", "cat"]


def meta_for(channels=1, height=1, width=3, resize_policy="resize", **overrides):
    fields = dict(class_names=CLASSES, channels=channels, height=height, width=width, resize_policy=resize_policy,
                  train_counts=[800, 150, 50], groups=["many", "medium", "few"],
                  group_thresholds={"many_above": 500, "few_below": 200},
                  dataset={"name": "toy", "index_sha256": None}, weights_sha256="0" * 64, metrics={})
    return build_metadata(**{**fields, **overrides})


def write_identity_model(path, meta):
    """A torch-free ONNX classifier whose logits are the pixels: uint8 [N, 1, 1, 3] -> float [N, 3]."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["pixels"], ["float_pixels"], to=TensorProto.FLOAT),
         helper.make_node("Flatten", ["float_pixels"], ["logits"], axis=1)],
        "identity", [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", 1, 1, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if meta is not None:
        write_metadata(model, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    write_manifest(path.parent, [p.name for p in path.parent.glob("*.onnx")])  # as `tailwise export` does
    return path


def png_bytes(image, fmt="PNG", **save_args):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def tailwise(*args, cwd=REPO, **env):
    return subprocess.run([sys.executable, "-m", "tailwise", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO), **env}, timeout=120)


# ------------------------------------------------------------------------------------------ torch-free

def test_serving_does_not_import_torch():
    code = ("import sys, tailwise.serving.artifact, tailwise.serving.predict, tailwise.serving.cli; "
            "bad = [m for m in ('torch', 'tailwise.training', 'tailwise.export', 'training', 'export', 'serving') "
            "if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_tailwise_parser_does_not_import_torch_or_onnxruntime():
    code = ("import sys; from tailwise.cli import build_parser; build_parser(); "
            "bad = [m for m in ('torch', 'onnxruntime') if m in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------ metadata

def test_metadata_round_trips_through_the_onnx_file(tmp_path):
    meta = meta_for(logit_adjustment={"tau": 1.0, "log_prior": [-0.2, -1.9, -3.0], "prior": "train"},
                    metrics={"top1": 0.7})
    path = write_identity_model(tmp_path / "m" / "model.onnx", meta)
    assert read_metadata(path) == meta
    assert read_metadata(path.parent) == meta  # a model folder works too
    assert OnnxClassifier(path).meta == meta
    assert json.loads(json.dumps(meta)) == meta


@pytest.mark.parametrize("override, field", [
    ({"groups": ["many", "few"]}, "groups"),
    ({"groups": ["many", "medium", "tail"]}, "groups"),
    ({"train_counts": [1, 2]}, "train_counts"),
    ({"resize_policy": "stretch"}, "input"),
    ({"channels": 4}, "input"),
    ({"logit_adjustment": {"tau": 1.0, "log_prior": [0.0]}}, "logit_adjustment"),
    ({"group_thresholds": {"many": 100}}, "group_thresholds"),
    ({"weights_sha256": "abc"}, "weights_sha256"),
])
def test_build_metadata_rejects_bad_fields(override, field):
    with pytest.raises(ValueError, match=field):
        meta_for(**override)


def test_read_metadata_names_the_path_of_a_bad_model(tmp_path):
    with pytest.raises(UserError, match="missing.onnx: no such model file"):
        read_metadata(tmp_path / "missing.onnx")
    (tmp_path / "text.onnx").write_text("this is not a protobuf, just words")
    with pytest.raises(UserError, match="text.onnx: not an ONNX model"):
        read_metadata(tmp_path / "text.onnx", verify=False)
    with pytest.raises(UserError, match="text.onnx: no manifest.json"):
        read_metadata(tmp_path / "text.onnx")
    bare = write_identity_model(tmp_path / "bare.onnx", None)
    with pytest.raises(UserError, match="bare.onnx: no 'tailwise' metadata"):
        read_metadata(bare)
    with pytest.raises(UserError, match="bare.onnx: no 'tailwise' metadata"):
        OnnxClassifier(bare)


def test_default_model_is_the_env_model_else_the_shipped_one_never_the_newest(tmp_path, monkeypatch):
    """One rule (issue 25): $TAILWISE_MODEL, else the shipped model; a newer export under ./models is not chosen."""
    monkeypatch.delenv("TAILWISE_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    mine = write_identity_model(tmp_path / "models" / "mine" / "model.onnx", meta_for())
    assert default_model_path().resolve() == (SHIPPED / "model.onnx").resolve()   # not ./models/mine, newer
    monkeypatch.setenv("TAILWISE_MODEL", str(mine.parent))
    assert default_model_path() == mine
    monkeypatch.setenv("TAILWISE_MODEL", str(mine))
    assert default_model_path() == mine
    monkeypatch.setenv("TAILWISE_MODEL", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="TAILWISE_MODEL"):
        default_model_path()
    monkeypatch.setenv("TAILWISE_MODEL", str(tmp_path))                 # a folder without model.onnx
    with pytest.raises(UserError, match="TAILWISE_MODEL: .*no such model file"):
        default_model_path()


# ------------------------------------------------------------------------------------------ images

RGB = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30], [200, 100, 50], [255, 255, 255]],
                [[0, 0, 0], [128, 128, 128], [1, 2, 3], [250, 240, 230], [60, 70, 80], [90, 45, 15]],
                [[33, 66, 99], [99, 66, 33], [7, 7, 7], [0, 128, 255], [255, 128, 0], [12, 34, 56]],
                [[100, 0, 100], [0, 100, 0], [50, 50, 50], [77, 88, 99], [5, 250, 5], [240, 10, 120]]],
               dtype=np.uint8)  # 4 x 6 x 3
GRAY = np.arange(24, dtype=np.uint8).reshape(4, 6) * 11
TRANSPARENT = np.zeros((4, 6), dtype=bool)
TRANSPARENT[:, :2] = True  # the left two columns are fully transparent


def luma(rgb):
    """ITU-R 601-2 luma in Pillow's fixed-point arithmetic."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def on_white(rgb):
    out = rgb.copy()
    out[TRANSPARENT] = 255
    return out


def palette_image(transparent_index=None):
    colors = np.array([[0, 0, 0], [255, 0, 0], [10, 200, 30], [90, 90, 250]], dtype=np.uint8)
    index = (np.arange(24).reshape(4, 6) % 4).astype(np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(colors.flatten().tolist())
    save = {"transparency": transparent_index} if transparent_index is not None else {}
    expected = colors[index]
    if transparent_index is not None:
        expected[index == transparent_index] = 255
    return png_bytes(image, **save), expected


def rgba_png():
    alpha = np.where(TRANSPARENT, 0, 255).astype(np.uint8)
    return png_bytes(Image.fromarray(np.dstack([RGB, alpha]), "RGBA"))


def la_png():
    alpha = np.where(TRANSPARENT, 0, 255).astype(np.uint8)
    return png_bytes(Image.fromarray(np.dstack([GRAY, alpha]), "LA"))


def sixteen_bit_png():
    image = Image.fromarray(GRAY.astype(np.uint16) * 257)
    assert image.mode == "I;16"
    return png_bytes(image)


def thirty_two_bit_tiff():
    image = Image.fromarray(GRAY.astype(np.int32) * 257)
    assert image.mode == "I"
    return png_bytes(image, "TIFF")


CASES = {  # name: (bytes, expected H x W x 3 RGB view of the image)
    "RGB": lambda: (png_bytes(Image.fromarray(RGB)), RGB),
    "L": lambda: (png_bytes(Image.fromarray(GRAY)), np.dstack([GRAY] * 3)),
    "RGBA": lambda: (rgba_png(), on_white(RGB)),
    "LA": lambda: (la_png(), np.dstack([on_white(np.dstack([GRAY] * 3))[..., 0]] * 3)),
    "P": lambda: palette_image(),
    "P-transparent": lambda: palette_image(transparent_index=2),
    "I;16": lambda: (sixteen_bit_png(), np.dstack([GRAY] * 3)),
    "I": lambda: (thirty_two_bit_tiff(), np.dstack([GRAY] * 3)),
    "1": lambda: (png_bytes(Image.fromarray(GRAY > 100)), np.dstack([np.where(GRAY > 100, 255, 0)] * 3)),
    "CMYK": lambda: (png_bytes(Image.fromarray(np.dstack([np.zeros((4, 6), np.uint8)] * 3 + [GRAY]), "CMYK"),
                               "TIFF"), np.dstack([255 - GRAY] * 3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("channels", [1, 3])
def test_image_modes_convert_to_the_expected_pixels(case, channels):
    data, expected_rgb = CASES[case]()
    array = load_image(data, meta_for(channels=channels, height=4, width=6))
    expected = luma(expected_rgb)[None] if channels == 1 else expected_rgb.transpose(2, 0, 1)
    assert array.dtype == np.uint8 and array.shape == (channels, 4, 6)
    np.testing.assert_array_equal(array, expected)


def test_sixteen_bit_values_are_rounded_to_eight_bits():
    data = png_bytes(Image.fromarray(np.array([[0, 128, 129, 1000, 65535]], dtype=np.uint16)))
    np.testing.assert_array_equal(load_image(data, meta_for(height=1, width=5))[0, 0], [0, 0, 1, 4, 255])


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((8, 16), dtype=np.uint8)
    stored[:, 8:] = 255  # stored: left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise, so the black half goes to the top
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).convert("RGB").save(path, quality=100, exif=exif)
    array = load_image(path, meta_for(channels=1, height=16, width=8)).astype(int)
    assert array.shape == (1, 16, 8)
    assert array[0, :7].mean() < 10 and array[0, 9:].mean() > 245


def test_resize_policies():
    stripes = np.repeat(np.repeat(np.array([[0, 100, 200]], dtype=np.uint8), 4, axis=1), 6, axis=0)  # 6 x 12
    data = png_bytes(Image.fromarray(stripes))
    # shorter side already 6: no resampling, a centre crop of columns 3..8
    cropped = load_image(data, meta_for(height=6, width=6, resize_policy="shorter-center-crop"))
    np.testing.assert_array_equal(cropped[0], np.tile([0, 100, 100, 100, 100, 200], (6, 1)))
    squashed = load_image(data, meta_for(height=6, width=6, resize_policy="resize"))
    assert squashed[0, :, 0].max() == 0 and squashed[0, :, -1].min() == 200  # every stripe kept
    halved = load_image(png_bytes(Image.fromarray(np.repeat(np.repeat(stripes, 2, 0), 2, 1))),
                        meta_for(height=6, width=6, resize_policy="shorter-center-crop"))
    # halved to 12 x 6 (the shorter side), then the same crop: interior columns exact, edges blend the neighbours
    np.testing.assert_array_equal(halved[0, :, 2:4], np.full((6, 2), 100))
    assert (halved[0, :, 0] < 100).all() and (halved[0, :, 5] > 100).all()
    big = load_image(png_bytes(Image.fromarray(np.full((5, 7, 3), 77, np.uint8))), meta_for(channels=3, height=28,
                                                                                             width=28))
    np.testing.assert_array_equal(big, np.full((3, 28, 28), 77))


def truncated_png():
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    return data[: len(data) // 2]


@pytest.mark.parametrize("source, kwargs, message", [
    (b"", {}, "empty file"),
    (b"name,label\nfoo.png,3\n", {}, "not an image in a supported format"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\n", {}, "not an image in a supported format"),
    (truncated_png(), {}, "corrupt or truncated"),
    (png_bytes(Image.fromarray(np.zeros((20, 20), np.uint8))), {"max_pixels": 399}, "more than max_pixels=399"),
    (png_bytes(Image.fromarray(np.zeros((3, 4), np.float32)), "TIFF"), {}, "unsupported image mode 'F'"),
])
def test_unreadable_inputs_raise_image_error(source, kwargs, message):
    with pytest.raises(ImageError, match=message):
        load_image(source, meta_for(height=4, width=4), **kwargs)


def test_image_error_names_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png: empty file"):
        load_image(tmp_path / "empty.png", meta_for())
    with pytest.raises(ImageError, match="gone.png: cannot read file"):
        load_image(tmp_path / "gone.png", meta_for())
    assert issubclass(ImageError, ValueError)


# ------------------------------------------------------------------------------------------ OnnxClassifier

def test_top_k_applies_the_logit_adjustment(tmp_path):
    log_prior = np.log([0.80, 0.15, 0.05])
    plain = OnnxClassifier(write_identity_model(tmp_path / "a.onnx", meta_for()))
    adjusted = OnnxClassifier(write_identity_model(
        tmp_path / "b.onnx", meta_for(logit_adjustment={"tau": 1.0, "log_prior": log_prior.tolist(),
                                                        "prior": "stage2-subset"})))
    pixels = np.array([10, 12, 11], dtype=np.uint8).reshape(1, 1, 1, 3)
    logits = adjusted.predict_arrays(pixels)
    np.testing.assert_array_equal(logits, [[10, 12, 11]])  # the graph gives raw logits

    top = plain.top_k(plain.predict_arrays(pixels), k=2)[0]
    assert [(p["label"], p["index"], p["group"]) for p in top] == [("bee", 1, "medium"), ("cat", 2, "few")]

    expected = np.array([10, 12, 11]) - log_prior  # adjusted = logits - tau * log_prior
    expected = np.exp(expected - expected.max()) / np.exp(expected - expected.max()).sum()
    top = adjusted.top_k(logits, k=3)[0]
    assert [p["index"] for p in top] == [2, 1, 0]
    np.testing.assert_allclose([p["probability"] for p in top], expected[[2, 1, 0]], rtol=1e-6)


def test_predict_arrays_checks_its_input(tmp_path):
    classifier = OnnxClassifier(write_identity_model(tmp_path / "m.onnx", meta_for()), intra_op_threads=1)
    assert classifier.predict_arrays(np.zeros((0, 1, 1, 3), np.uint8)).shape == (0, 3)
    with pytest.raises(ValueError, match=r"expected uint8 \[N, 1, 1, 3\]"):
        classifier.predict_arrays(np.zeros((2, 1, 1, 3), np.float32))
    with pytest.raises(ValueError, match="expected uint8"):
        classifier.predict_arrays(np.zeros((2, 3, 1, 1), np.uint8))


# ------------------------------------------------------------------------------------------ inputs and shards

def test_expand_inputs_handles_files_folders_globs_and_list_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ["a/1.png", "a/sub/2.JPG", "a/.hidden.png", "a/.cache/3.png", "a/notes.txt", "b/4.png", "b/5.bmp",
                 "c.png"]:
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_bytes(b"x")
    Path("list.txt").write_text("# images\nc.png\n\nb/5.bmp\n")
    assert expand_inputs(["a"]) == ["a/1.png", "a/sub/2.JPG"]  # recursive, images only, hidden skipped
    assert expand_inputs(["b/*.png", "@list.txt", "a/notes.txt", "./c.png"]) == [
        "a/notes.txt", "b/4.png", "b/5.bmp", "c.png"]  # named files are kept whatever their extension
    assert expand_inputs(["missing.png", "z*/*.png"]) == ["missing.png", "z*/*.png"]  # reported later
    with pytest.raises(UserError, match="nolist.txt"):
        expand_inputs(["@nolist.txt"])


def test_shards_are_disjoint_and_cover_every_file():
    paths = sorted(f"img{i:03d}.png" for i in range(23))
    for count in (1, 2, 3, 7, 30):
        shards = [select_shard(paths, i, count) for i in range(count)]
        assert sorted(p for shard in shards for p in shard) == paths
        assert sum(len(s) for s in shards) == len(paths)
    assert select_shard(paths, 1, 3)[:3] == ["img001.png", "img004.png", "img007.png"]
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) == (0, 1)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)


# ------------------------------------------------------------------------------------------ tailwise predict

@pytest.fixture
def identity_model(tmp_path):
    return write_identity_model(tmp_path / "models" / "identity" / "model.onnx", meta_for()).parent


def write_pixels(path, values):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.array([values], dtype=np.uint8)).save(path)


def test_predict_reports_bad_files_and_goes_on(tmp_path, identity_model):
    images = tmp_path / "images"
    write_pixels(images / "good1.png", [1, 9, 5])
    write_pixels(images / "deep" / "good2.png", [7, 2, 3])
    (images / "empty.png").write_bytes(b"")
    (images / "notes.png").write_text("not an image at all")
    (images / "truncated.png").write_bytes(truncated_png())
    out = tmp_path / "out.jsonl"
    result = tailwise("predict", "--model", identity_model, images, tmp_path / "missing.png", "--output", out)
    assert result.returncode == 1, result.stderr
    records = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"good1.png", "good2.png", "empty.png", "notes.png", "truncated.png", "missing.png"}
    assert [p["label"] for p in records["good1.png"]["predictions"]] == ["bee", "cat", "ant"]
    assert records["good2.png"]["predictions"][0]["label"] == "ant" and records["good2.png"]["error"] is None
    for name, reason in [("empty.png", "empty file"), ("notes.png", "not an image"),
                         ("truncated.png", "corrupt or truncated"), ("missing.png", "cannot read file")]:
        assert records[name]["predictions"] == [] and reason in records[name]["error"]
        assert f"skipped {records[name]['path']}: {reason}" in result.stderr
    assert "providers: CPUExecutionProvider" in result.stderr
    assert "2 predicted, 4 failed" in result.stderr


def test_predict_writes_csv(tmp_path, identity_model):
    write_pixels(tmp_path / "x.png", [3, 2, 1])
    (tmp_path / "y.png").write_bytes(b"")
    result = tailwise("predict", "--model", identity_model / "model.onnx", "--format", "csv", "--top-k", "2",
                      tmp_path / "x.png", tmp_path / "y.png")
    assert result.returncode == 1
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == ["path", "label_1", "probability_1", "group_1", "label_2", "probability_2", "group_2",
                             "set", "unsure", "error"]
    assert rows[0]["set"] == rows[0]["unsure"] == ""   # a model without prediction sets
    assert (rows[0]["label_1"], rows[0]["group_1"], rows[0]["label_2"], rows[0]["error"]) == ("ant", "many", "bee", "")
    assert float(rows[0]["probability_1"]) == pytest.approx(np.exp(3) / np.exp([3, 2, 1]).sum())
    assert rows[1]["label_1"] == "" and "empty file" in rows[1]["error"]


def test_predict_shards_split_the_job(tmp_path, identity_model):
    for i in range(7):
        write_pixels(tmp_path / "in" / f"{i}.png", [i, 3, 3])
    seen = []
    for index in range(3):
        result = tailwise("predict", "--model", identity_model, tmp_path / "in", "--shard", f"{index}/3",
                          "--batch-size", "2")
        assert result.returncode == 0, result.stderr
        seen.append([json.loads(line)["path"] for line in result.stdout.splitlines()])
    everything = sorted(str(tmp_path / "in" / f"{i}.png") for i in range(7))
    assert seen == [everything[i::3] for i in range(3)]
    assert tailwise("predict", "--model", identity_model, tmp_path / "in", "--shard", "3/3").returncode == 2


def test_predict_errors_name_the_option(tmp_path, identity_model):
    write_pixels(tmp_path / "x.png", [1, 2, 3])
    result = tailwise("predict", "--model", tmp_path / "nope", tmp_path / "x.png")
    assert result.returncode == 2 and "nope: no such model file" in result.stderr
    result = tailwise("predict", "--model", identity_model, "--top-k", "0", tmp_path / "x.png")
    assert result.returncode == 2 and "--top-k" in result.stderr


def test_predict_matches_torch_on_png_files(tmp_path):
    """The exported model, fed PNG files through `tailwise predict`, gives the torch model's top-1."""
    import torch
    from tailwise.export.onnx_export import export_classifier

    class Normalize(torch.nn.Module):
        def forward(self, x):
            return (x.float() / 255 - 0.3) / 0.35

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        Normalize(), torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    images = torch.randint(0, 256, (24, 1, 28, 28), dtype=torch.uint8)
    labels = (images.float().mean(dim=(1, 2, 3)) > 127.5).long() + (images[:, 0, 0, 0] > 200).long()
    for _ in range(10):  # a few steps, so the weights are not at init
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    model.eval()
    out = tmp_path / "models" / "tiny"
    export_classifier(model, meta_for(height=28, width=28), out, images, images)

    (tmp_path / "pngs").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy()).save(tmp_path / "pngs" / f"{i:02d}.png")
    result = tailwise("predict", "--model", out, tmp_path / "pngs", "--batch-size", "5", "--top-k", "1")
    assert result.returncode == 0, result.stderr
    predicted = [json.loads(line)["predictions"][0]["index"] for line in result.stdout.splitlines()]
    with torch.inference_mode():
        assert predicted == model(images).argmax(1).tolist()


# ------------------------------------------------------------------------------------------ one top_k rule, CSV, errors

def test_top_k_must_be_within_the_classes(tmp_path, identity_model):
    classifier = OnnxClassifier(identity_model)
    for bad in (0, 4, 1000):
        with pytest.raises(ValueError, match=f"top_k must be an integer from 1 to 3 .*got {bad}"):
            classifier.top_k(np.zeros((1, 3), np.float32), bad)
    write_pixels(tmp_path / "x.png", [1, 2, 3])
    for bad in ("4", "1000", "0"):
        result = tailwise("predict", "--model", identity_model, "--top-k", bad, tmp_path / "x.png")
        assert result.returncode == 2 and f"--top-k: top_k must be an integer from 1 to 3" in result.stderr, bad
    assert tailwise("predict", "--model", identity_model, "--top-k", "3", tmp_path / "x.png").returncode == 0


def test_csv_has_unix_line_ends(tmp_path, identity_model):
    write_pixels(tmp_path / "x.png", [3, 2, 1])
    result = subprocess.run([sys.executable, "-m", "tailwise", "predict", "--model", str(identity_model), "--format",
                             "csv", str(tmp_path / "x.png")], cwd=REPO, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert b"\r" not in result.stdout and result.stdout.count(b"\n") == 2


def test_predict_prints_the_test_accuracy_in_percent(tmp_path):
    (tmp_path / "m").mkdir()
    write_identity_model(tmp_path / "m" / "model.onnx", meta_for(metrics={"top1": 0.2617}))
    write_pixels(tmp_path / "x.png", [3, 2, 1])
    result = tailwise("predict", "--model", tmp_path / "m", tmp_path / "x.png")
    assert result.returncode == 0 and "test top-1 26.17 %" in result.stderr, result.stderr


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    """A model whose graph does not take the input its metadata promises fails inside onnxruntime."""
    write_identity_model(tmp_path / "m" / "model.onnx", meta_for(height=2, width=3))
    write_pixels(tmp_path / "x.png", [1, 2, 3])
    result = tailwise("predict", "--model", tmp_path / "m", tmp_path / "x.png")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert line.startswith("tailwise predict: error: ") and "--debug" in line
    result = tailwise("--debug", "predict", "--model", tmp_path / "m", tmp_path / "x.png")
    assert result.returncode == 1 and "Traceback" in result.stderr


# ------------------------------------------------------------------------------------------ integrity

def flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def shipped_copy(tmp_path):
    folder = tmp_path / "models" / "shipped"
    folder.mkdir(parents=True)
    for name in json.loads((SHIPPED / MANIFEST_NAME).read_text())["files"]:
        (folder / name).write_bytes((SHIPPED / name).read_bytes())
    (folder / MANIFEST_NAME).write_bytes((SHIPPED / MANIFEST_NAME).read_bytes())
    return folder


def test_shipped_manifest_matches_the_files_and_the_model_card():
    manifest = json.loads((SHIPPED / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {"model.onnx", "model.int8.onnx", "model.int8.json", "weights.safetensors",
                                      "card.json"}
    assert check_folder(SHIPPED) == []
    card = (SHIPPED / "README.md").read_text()
    for name, entry in manifest["files"].items():
        assert f"| `{name}` | `{entry['sha256']}` |" in card, name


@pytest.mark.parametrize("name", ["model.onnx", "model.int8.onnx", "model.int8.json", "weights.safetensors",
                                  "card.json"])
def test_a_flipped_byte_in_any_model_file_is_found(shipped_copy, name):
    expected = json.loads((shipped_copy / MANIFEST_NAME).read_text())["files"][name]["sha256"]
    flip_byte(shipped_copy / name)
    (problem,) = check_folder(shipped_copy)
    assert f"{shipped_copy / name}: sha256 " in problem and expected in problem
    result = tailwise("manifest", "--check", shipped_copy)
    assert result.returncode == 1 and name in result.stderr


@pytest.mark.parametrize("name", ["model.onnx", "model.int8.onnx"])
def test_predict_and_the_classifier_refuse_a_tampered_model(shipped_copy, name, tmp_path):
    """64 bytes flipped inside the weights (the issue's case): refused, naming the file and both hashes."""
    path = shipped_copy / name
    expected = json.loads((shipped_copy / MANIFEST_NAME).read_text())["files"][name]["sha256"]
    for i in range(64):
        flip_byte(path, len(path.read_bytes()) // 2 + i)
    actual = __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    with pytest.raises(UserError) as caught:
        OnnxClassifier(path)
    assert str(path) in str(caught.value) and expected in str(caught.value) and actual in str(caught.value)
    with pytest.raises(UserError, match=actual):
        read_metadata(path)
    sample = SHIPPED / "samples" / "bag-18.png"
    result = tailwise("predict", "--model", path, sample)
    assert result.returncode == 2 and expected in result.stderr and actual in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one line, no traceback
    # the explicit opt-outs load it anyway
    assert tailwise("predict", "--model", path, "--no-verify", sample).returncode == 0
    assert tailwise("predict", "--model", path, sample, TAILWISE_VERIFY="0").returncode == 0
    # re-signing an edit made on purpose
    assert tailwise("manifest", shipped_copy).returncode == 0
    assert tailwise("predict", "--model", path, sample).returncode == 0


def test_a_folder_without_a_manifest_or_an_unlisted_file_is_refused(shipped_copy):
    sample = SHIPPED / "samples" / "bag-18.png"
    (shipped_copy / "model.extra.onnx").write_bytes((shipped_copy / "model.onnx").read_bytes())
    result = tailwise("predict", "--model", shipped_copy / "model.extra.onnx", sample)
    assert result.returncode == 2 and "not listed in" in result.stderr
    (shipped_copy / MANIFEST_NAME).unlink()
    result = tailwise("predict", "--model", shipped_copy, sample)
    assert result.returncode == 2 and f"no {MANIFEST_NAME}" in result.stderr
    assert f"tailwise manifest {shipped_copy}" in result.stderr and "--no-verify" in result.stderr
    (shipped_copy / MANIFEST_NAME).write_text("{not json")
    result = tailwise("predict", "--model", shipped_copy, sample)
    assert result.returncode == 2 and "unreadable manifest" in result.stderr
    assert tailwise("predict", "--model", shipped_copy, "--no-verify", sample).returncode == 0


def test_export_writes_the_manifest(tiny_model_dir):
    manifest = json.loads((tiny_model_dir / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {"model.onnx", "weights.safetensors", "card.json"}
    assert check_folder(tiny_model_dir) == []
