"""A user's own, messy folder of images (issue 16): every case a real folder holds, and the sizes derived from it."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tailwise import UserError
from tailwise.cli import main as tailwise_main
from tailwise.training.config import load_config
from tailwise.training.data import build_lt_data, folder_group_thresholds, image_size_for
from tailwise.training.plan import batch_for, default_passes


def save(path, image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def solid(mode, colour, size=(20, 16)):
    return Image.new(mode, size, colour)


def build(root, **kwargs):
    return build_lt_data("folder", root=str(root), val_per_class=0, **kwargs)


def pixels(data, path):
    row = data.train_source.paths.index(str(path))
    return data.train_source.load([row])[0]


def test_mixed_modes_all_decode_to_rgb(tmp_path):
    root = tmp_path / "mixed"
    files = {
        "gray.png": solid("L", 128), "rgb.png": solid("RGB", (200, 10, 10)),
        "rgba.png": solid("RGBA", (0, 0, 255, 0)),  # fully transparent: white, as the service composites it
        "cmyk.jpg": solid("CMYK", (0, 255, 255, 0)), "palette.gif": solid("RGB", (0, 200, 0)).convert("P"),
    }
    for name, image in files.items():
        save(root / "a" / name, image)
    save(root / "a" / "deep16.png", Image.fromarray(np.full((16, 20), 257 * 100, dtype=np.uint16)))
    data = build(root, image_size=8)
    assert data.file_stats["modes"] == {"L": 1, "RGB": 1, "RGBA": 1, "CMYK": 1, "P": 1, "I;16": 1}
    assert data.skipped == []
    assert pixels(data, root / "a" / "gray.png").unique().tolist() == [128]
    assert pixels(data, root / "a" / "rgba.png").unique().tolist() == [255]
    assert pixels(data, root / "a" / "deep16.png").unique().tolist() == [100]
    red = pixels(data, root / "a" / "cmyk.jpg")[:, 4, 4].tolist()   # CMYK (0, 255, 255, 0) is red
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert data.train_source.load(np.arange(6)).shape == (6, 3, 8, 8)


def test_grayscale_decoding_on_request(tmp_path):
    """data.channels=1: 1-channel images (L, 1-bit, 16-bit, grey with alpha, colour), decoded as the served
    model decodes them; the default is RGB; a card from before channels existed rebuilds RGB."""
    from tailwise._core import load_image
    from tailwise.training.data import rebuild_lt_data
    from tailwise.training.train import data_from_config

    root = tmp_path / "gray"
    save(root / "a" / "l.png", solid("L", 128))
    save(root / "a" / "one-bit.png", solid("1", 1))
    save(root / "b" / "deep16.png", Image.fromarray(np.full((16, 20), 257 * 100, dtype=np.uint16)))
    save(root / "b" / "la.png", solid("LA", (60, 255)))
    save(root / "b" / "colour.png", solid("RGB", (200, 10, 10)))
    assert build(root, image_size=8).channels == 3                # the default: RGB, also for grey images
    data = data_from_config(load_config(None, ["data.dataset='folder'", f"data.root='{root}'", "data.val_per_class=0",
                                               "data.image_size=8", "data.channels=1"]))
    assert data.channels == 1 and data.card()["channels"] == 1 and len(data.mean) == len(data.std) == 1
    assert data.train_source.load(np.arange(5)).shape == (5, 1, 8, 8)
    meta = {"input": {"channels": 1, "height": 8, "width": 8, "resize_policy": "shorter-center-crop"}}
    for path in data.train_source.paths:                 # what training sees is what the service will decode
        assert np.array_equal(pixels(data, path).numpy(), load_image(path, meta))
    assert pixels(data, root / "b" / "deep16.png").unique().tolist() == [100]
    assert rebuild_lt_data(data.build_args).channels == 1
    old_card = {k: v for k, v in data.build_args.items() if k != "channels"}
    assert rebuild_lt_data(old_card).channels == 3                 # trained before the option: RGB
    with pytest.raises(UserError, match=r"data.channels \(--channels\): fmnist images have 1 channel"):
        build_lt_data("fmnist", channels=3)
    with pytest.raises(UserError, match="data.channels must be one of 0, 1, 3"):
        load_config(None, ["data.channels=2"])


def test_a_checkpoint_of_other_channels_or_size_is_refused_in_one_line(tmp_path):
    from tailwise.training.train import _check_same_data

    root = tmp_path / "check"
    for i in range(3):
        save(root / "a" / f"{i}.png", solid("L", 9, (8, 8)))
    data = build(root, image_size=8)                  # 3 x 8 x 8, RGB by default
    card = {"_dir": "runs/x", "data": {"index_sha256": data.index_sha256, "channels": 3, "image_size": [8, 8]}}
    _check_same_data(card, data)
    for channels, size in ((1, [8, 8]), (3, [16, 16])):
        card["data"].update(channels=channels, image_size=size)
        with pytest.raises(UserError, match=r"runs/x: checkpoint was trained on .* images, these are 3 x 8 x 8"):
            _check_same_data(card, data)


@pytest.mark.slow
def test_a_grayscale_model_trains_exports_and_serves(tmp_path):
    """data.channels=1 end to end: train on a folder, export (parity-checked), predict from PNG and RGB files."""
    import tailwise

    root = tmp_path / "gray"
    rng = np.random.default_rng(0)
    for c, level in (("dark", 40), ("light", 210)):
        for i in range(10):
            save(root / c / f"{i}.png", Image.fromarray(rng.integers(level - 30, level + 30, (12, 12), dtype=np.uint8)))
    run, model = tmp_path / "run", tmp_path / "model"
    assert tailwise_main(["train", "--data", str(root), "--budget", "4", "--set", "data.channels=1",
                          "--set", "device='cpu'", "--out", str(run), "--no-progress"]) == 0
    assert tailwise_main(["export", str(run), "--out", str(model)]) == 0
    classifier = tailwise.load(model)
    assert classifier.metadata["input"]["channels"] == 1
    colour = save(tmp_path / "colour.png", solid("RGB", (230, 230, 230), (12, 12)))   # decoded to L, as trained
    answers = classifier.predict([root / "dark" / "0.png", colour], top_k=2)
    predictions = [a["predictions"] for a in answers]
    assert [len(p) for p in predictions] == [2, 2] and {p[0]["label"] for p in predictions} <= {"dark", "light"}


def test_unreadable_files_are_listed_and_skipped(tmp_path, capsys):
    root = tmp_path / "bad"
    for i in range(3):
        save(root / "cat" / f"{i}.png", solid("RGB", (i, 0, 0)))
    (root / "cat" / "garbage.png").write_bytes(b"not a png at all")
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "cat" / "notes.txt").write_text("not an image, not counted as one")
    save(root / "dog" / "0.png", solid("RGB", (0, 255, 0)))
    data = build(root, image_size=8)
    assert data.counts == [3, 1] and data.card()["num_skipped"] == 2
    assert sorted(os.path.basename(p) for p, _ in data.skipped) == ["empty.jpg", "garbage.png"]
    assert data.file_stats["ignored_files"] == 1
    assert tailwise_main(["data", "--dataset", "folder", "--root", str(root), "--image-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 unreadable image file(s):" in out
    assert f"{root / 'cat' / 'garbage.png'}: not an image" in out and f"{root / 'cat' / 'empty.jpg'}: empty" in out


def test_a_file_that_fails_to_decode_while_training_is_replaced_by_its_class(tmp_path, capsys):
    root = tmp_path / "trunc"
    save(root / "cat" / "0.png", solid("RGB", (255, 0, 0)))
    whole = save(root / "cat" / "1.png", Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3),
                                                                                           dtype=np.uint8)))
    save(root / "dog" / "0.png", solid("RGB", (0, 255, 0)))
    data = build(root, image_size=8)
    assert data.skipped == [] and data.counts == [2, 1]
    whole.write_bytes(whole.read_bytes()[:200])  # after the scan: the header reads, the pixels do not
    batch = data.train_source.load([1, 2, 1])
    assert batch[0].tolist() == batch[2].tolist() == data.train_source.load([0])[0].tolist()
    err = capsys.readouterr().err
    assert err.count("1.png") >= 1 and "another image of its class stands in" in err
    assert len(err.strip().splitlines()) == 1  # reported once
    (root / "cat" / "0.png").write_bytes(b"gone bad too")
    with pytest.raises(UserError, match="no image of the class"):
        data.train_source.load([0])


def test_non_ascii_names(tmp_path):
    root = tmp_path / "données"
    save(root / "chat_été" / "photo_ü.png", solid("RGB", (255, 0, 0)))
    save(root / "猫" / "写真.jpg", solid("RGB", (0, 0, 255)))
    data = build(root, image_size=8)
    assert data.class_names == ["chat_été", "猫"]
    assert json.loads(json.dumps(data.card(), ensure_ascii=False))["class_names"] == ["chat_été", "猫"]
    assert data.train_source.load([0, 1]).shape == (2, 3, 8, 8)


def test_nested_folders_count_for_their_class(tmp_path):
    root = tmp_path / "nested"
    save(root / "cat" / "a.png", solid("RGB", (255, 0, 0)))
    save(root / "cat" / "2024" / "june" / "b.png", solid("RGB", (255, 0, 0)))
    save(root / "dog" / "x" / "c.png", solid("RGB", (0, 255, 0)))
    data = build(root, image_size=8)
    assert data.class_names == ["cat", "dog"] and data.counts == [2, 1]


def test_a_class_with_one_image(tmp_path):
    root = tmp_path / "one"
    for i in range(10):
        save(root / "many" / f"{i}.png", solid("RGB", (255, 0, 0)))
    save(root / "single" / "0.png", solid("RGB", (0, 255, 0)))
    data = build_lt_data("folder", root=str(root), image_size=8)  # default validation hold-out
    assert data.counts == [8, 1] and data.val_counts == [2, 0]   # the lone image trains, none held out
    assert data.groups == ["many", "few"]


def test_symlinks_followed_loops_ended_broken_listed(tmp_path):
    root, elsewhere = tmp_path / "links", tmp_path / "elsewhere"
    save(root / "cat" / "0.png", solid("RGB", (255, 0, 0)))
    save(elsewhere / "bird" / "0.png", solid("RGB", (0, 0, 255)))
    save(elsewhere / "bird" / "1.png", solid("RGB", (0, 0, 250)))
    os.symlink(elsewhere / "bird", root / "bird")                       # a class folder that is a link
    os.symlink(root / "cat" / "0.png", root / "cat" / "same.png")       # a file that is a link
    os.symlink(root / "cat", root / "cat" / "loop")                     # a loop
    os.symlink(tmp_path / "nowhere.png", root / "cat" / "broken.png")   # a broken link
    data = build(root, image_size=8)
    assert data.class_names == ["bird", "cat"] and data.counts == [2, 2]
    assert [os.path.basename(p) for p, _ in data.skipped] == ["broken.png"]
    assert "broken symlink" in data.skipped[0][1]


def test_hidden_files_and_folders_are_ignored(tmp_path):
    root = tmp_path / "hidden"
    save(root / "cat" / "0.png", solid("RGB", (255, 0, 0)))
    save(root / "cat" / ".1.png", solid("RGB", (255, 0, 0)))            # e.g. macOS ._ files
    save(root / "cat" / ".thumbnails" / "2.png", solid("RGB", (255, 0, 0)))
    save(root / ".git" / "objects" / "3.png", solid("RGB", (255, 0, 0)))
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "cat" / "Thumbs.db").write_bytes(b"\xd0\xcf")
    data = build(root, image_size=8)
    assert data.class_names == ["cat"] and data.counts == [1] and data.skipped == []


def test_image_size_and_groups_are_derived_from_the_folder(tmp_path):
    assert [image_size_for(s) for s in (20, 28, 31, 32, 100, 375, 5000)] == [20, 28, 28, 32, 96, 224, 224]
    root = tmp_path / "sizes"
    for i, size in enumerate([(28, 40), (30, 28), (28, 28)]):
        save(root / "a" / f"{i}.png", solid("L", 9, size))
    data = build(root)
    assert data.image_size == (28, 28) and data.build_args["image_size"] == 28
    # small set: log thirds of the counts; a large head keeps the literature's bands; balanced: all many
    assert folder_group_thresholds([48, 37, 28, 22, 17, 13, 10, 8, 6, 5]) == (22, 11)
    assert folder_group_thresholds([6000, 60]) == (500, 200)
    assert folder_group_thresholds([7, 7, 7]) == (6, 0)
    assert folder_group_thresholds([48, 5], many_threshold=40, few_threshold=6) == (40, 6)


def test_group_thresholds_in_the_config(tmp_path):
    cfg = load_config("tailwise", ["data.many_threshold=30", "data.few_threshold=7"])
    assert (cfg["data"]["many_threshold"], cfg["data"]["few_threshold"]) == (30, 7)
    assert load_config("tailwise")["data"]["many_threshold"] == 0     # 0: auto
    with pytest.raises(UserError, match="data.few_threshold must be >= 0"):
        load_config("tailwise", ["data.few_threshold=-1"])
    root = tmp_path / "bands"
    for c, n in (("a", 40), ("b", 10), ("c", 3)):
        for i in range(n):
            save(root / c / f"{i}.png", solid("RGB", (i, 0, 0), (8, 8)))
    from tailwise.training.train import data_from_config

    cfg = load_config("tailwise", ["data.dataset='folder'", f"data.root='{root}'", "data.val_per_class=0",
                                   "data.many_threshold=30", "data.few_threshold=7"])
    data = data_from_config(cfg)
    assert data.groups == ["many", "medium", "few"]
    assert data.build_args["many_threshold"] == 30 and data.build_args["few_threshold"] == 7


def test_sizes_derived_for_small_and_large_sets():
    assert [batch_for(n, 512) for n in (50, 194, 1000, 20000, 115000)] == [16, 32, 128, 512, 512]
    assert batch_for(194, 16) == 16
    assert [default_passes(n) for n in (194, 1000, 5000, 115000)] == [200, 50, 20, 20]


def test_train_data_refuses_budget_without_data(capsys):
    assert tailwise_main(["train", "--budget", "3"]) == 2
    assert "--data DIR" in capsys.readouterr().err


def test_file_batches_are_decoded_ahead_in_order(tmp_path):
    from tailwise.training import engine

    root = tmp_path / "stream"
    for i in range(12):
        save(root / f"c{i % 3}" / f"{i}.png", solid("RGB", (20 * i, 0, 0), (8, 8)))
    data = build(root, image_size=8)
    batches = [np.array([0, 5]), np.array([11, 3, 7]), np.array([2])]
    waited = [0.0]
    ahead = list(engine.DeviceImages(data.train_source, torch.device("cpu")).batches(batches, waited))
    inline = list(engine.DeviceImages(data.train_source, torch.device("cpu"), prefetch=False).batches(batches))
    direct = [data.train_source.load(b) for b in batches]
    assert [x.tolist() for x in ahead] == [x.tolist() for x in inline] == [x.tolist() for x in direct]
    assert waited[0] >= 0.0


@pytest.mark.slow
def test_plan_prints_every_derived_value_and_respects_set_and_minutes(tmp_path):
    from tailwise.training.plan import plan_for_folder

    root = tmp_path / "plan"
    rng = np.random.default_rng(0)
    for c, n in (("a", 30), ("b", 12), ("c", 4)):
        for i in range(n):
            save(root / c / f"{i}.png", Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)))

    overrides = {"stage2.batch_size": 16, "device": "cpu"}
    cfg, data, lines = plan_for_folder(root, budget=8, overrides=overrides)   # the typed function, no argv
    text = "\n".join(lines)
    assert cfg["data"]["dataset"] == "folder" and cfg["data"]["image_size"] == 12 == data.image_size[0]
    assert cfg["stage1"]["epochs"] == 6 and cfg["stage2"]["batch_size"] == 16    # 3/4 of 8 passes; --set wins
    assert cfg["stage1"]["batch_size"] == 16 and cfg["stage1"]["lr_scale_batch"] == 0
    for field in ("data.image_size", "data.many_threshold", "stage1.batch_size", "stage1.lr", "stage1.epochs",
                  "stage1.warmup_epochs", "stage2.epochs"):
        assert f"  {field} " in text and f"[--set {field}=...]" in text, field
    assert "stage2.batch_size as given" in text and "estimated time:" in text
    assert (cfg["data"]["many_threshold"], cfg["data"]["few_threshold"]) == folder_group_thresholds(data.counts)

    by_minutes, _, lines = plan_for_folder(root, minutes=0.5, overrides={"device": "cpu"})
    assert any("0.5 minutes at" in line for line in lines)
    assert by_minutes["stage1"]["epochs"] >= 1 and by_minutes["stage2"]["epochs"] >= 1
    with pytest.raises(UserError, match="^give budget= or minutes=, not both$"):
        plan_for_folder(root, minutes=1, budget=3)
    with pytest.raises(UserError, match="^budget= must be positive, got 0"):
        plan_for_folder(root, budget=0)


@pytest.mark.slow
def test_resume_keeps_the_plan_the_run_started_with(tmp_path, capsys):
    """`--data DIR --resume` trains on with the plan recorded in the run, not a new one (another --budget, or a
    --minutes that measures another speed, would size the stages differently)."""
    from tailwise.training import checkpoint

    root = tmp_path / "plan"
    rng = np.random.default_rng(0)
    for c, n in (("a", 12), ("b", 6)):
        for i in range(n):
            save(root / c / f"{i}.png", Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)))
    run = tmp_path / "run"
    common = ["train", "--data", str(root), "--set", "device='cpu'", "--out", str(run), "--no-progress"]
    assert tailwise_main(common + ["--budget", "4", "--stage", "1"]) == 0
    planned = checkpoint.load_card(run, stage=1)["config"]["stage2"]["epochs"]
    capsys.readouterr()
    assert tailwise_main(common + ["--budget", "40", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "with the plan recorded in stage1.json (a budget in passes or minutes applies to a new run only)" in out
    assert "plan (each line" not in out
    assert checkpoint.load_card(run, stage=2)["epoch"] == planned


def test_data_out_replaces_its_own_card_and_never_a_users_file(tmp_path, capsys):
    """`tailwise data --out DIR` writes DIR/data.json and DIR/class_counts.png; run again it replaces them, but a
    file of the user's under either name stops it with one line and is left as it was."""
    root = tmp_path / "images"
    for c, n in (("a", 6), ("b", 2)):
        for i in range(n):
            save(root / c / f"{i}.png", solid("L", 40 * i, (28, 28)))
    out, data = tmp_path / "report", ["data", "--dataset", "folder", "--root", str(root), "--val-per-class", "0"]
    for _ in range(2):
        assert tailwise_main([*data, "--out", str(out)]) == 0
    assert json.loads((out / "data.json").read_text())["counts"] == [6, 2]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.json").write_text('{"my": "notes"}')
    (mine / "class_counts.png").write_bytes(b"my plot")
    capsys.readouterr()
    assert tailwise_main([*data, "--out", str(mine)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.json exists and is not a data card tailwise wrote" in err, err
    (mine / "data.json").unlink()   # the plot alone, without tailwise's card beside it: left alone too
    assert tailwise_main([*data, "--out", str(mine)]) == 2
    assert "class_counts.png exists without a data card" in capsys.readouterr().err
    assert (mine / "class_counts.png").read_bytes() == b"my plot" and not (mine / "data.json").exists()
