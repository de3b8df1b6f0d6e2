"""ONNX export: the parity gate, dynamic batch, metadata, variants, the TorchScript fallback and `tailwise export`."""

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tailwise.export.cli import parse_variants
from tailwise.export.model_folder import metadata_from_card
from tailwise.export.onnx_export import ExportParityError, export_classifier
from tailwise.serving.artifact import OnnxClassifier, build_metadata, read_metadata
from tailwise import UserError

CLASSES = ["ant", "bee", "cat", "dog", "eel"]


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x.float() / 255 - self.mean) / self.std


class TinyNet(nn.Module):
    """uint8 [N, 1, 28, 28] -> 5 logits, normalisation inside (like training.networks.Classifier)."""

    def __init__(self, export_offset=0.0):
        super().__init__()
        self.normalize = Normalize([0.3], [0.35])
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, len(CLASSES))
        self.export_offset = export_offset

    def forward(self, x):
        logits = self.fc(self.features(self.normalize(x)))
        if self.export_offset and torch.onnx.is_in_onnx_export():  # the exported graph differs from eager torch
            logits = torch.cat([logits[:, :-1], logits[:, -1:] + self.export_offset], dim=1)
        return logits


def toy_data(n, seed):
    """Images whose class sets their brightness, so a few steps learn something."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    images = (torch.randint(0, 60, (n, 1, 28, 28), generator=g) + labels.view(-1, 1, 1, 1) * 45).to(torch.uint8)
    return images, labels


def trained_tiny_net(steps=30, **kwargs):
    torch.manual_seed(0)
    model = TinyNet(**kwargs)
    images, labels = toy_data(200, seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for step in range(steps):
        batch = slice((step * 40) % 200, (step * 40) % 200 + 40)
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def tiny_meta(**overrides):
    fields = dict(class_names=CLASSES, channels=1, height=28, width=28, resize_policy="resize",
                  train_counts=[600, 300, 150, 40, 10], groups=["many", "medium", "few", "few", "few"],
                  group_thresholds={"many_above": 500, "few_below": 200},
                  dataset={"name": "toy", "index_sha256": "ab" * 32}, metrics={"top1": 0.5})
    return build_metadata(**{**fields, **overrides})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = trained_tiny_net()
    out = tmp_path_factory.mktemp("export") / "models" / "toy"
    val_images, val_labels = toy_data(64, seed=2)
    samples, _ = toy_data(16, seed=3)
    report = export_classifier(model, tiny_meta(), out, samples, val_images, variants=("fp16", "int8"),
                               parity_labels=val_labels, card={"config": {"x": 1}, "_dir": "/private/path"})
    return model, out, report, val_images, val_labels


def test_export_writes_a_model_that_reproduces_torch(exported):
    model, out, report, val_images, val_labels = exported
    assert {p.name for p in out.iterdir()} == {"model.onnx", "weights.safetensors", "card.json", "model.fp16.onnx",
                                               "model.fp16.json", "model.int8.onnx", "model.int8.json", "manifest.json"}
    from tailwise.serving.integrity import check_folder, read_manifest

    assert set(read_manifest(out)["files"]) == {p.name for p in out.iterdir()} - {"manifest.json"}
    assert check_folder(out) == []
    assert report["exporter"] in ("dynamo", "torchscript")
    assert report["parity"]["n_images"] == 64 and report["parity"]["max_abs_logit_diff"] <= 1e-4
    # the model is trained (not at init): it beats chance on the validation images
    assert report["parity"]["accuracy"] > 0.5

    meta = read_metadata(out / "model.onnx")
    sha = hashlib.sha256((out / "weights.safetensors").read_bytes()).hexdigest()
    assert meta == {**tiny_meta(created_at=meta["created_at"]), "weights_sha256": sha}
    card = json.loads((out / "card.json").read_text())
    assert card["metadata"] == meta and card["export"]["parity"] == report["parity"]
    assert card["training"] == {"config": {"x": 1}}  # the local checkpoint folder is not shipped

    reloaded = TinyNet()
    reloaded.load_state_dict(load_file(out / "weights.safetensors"))
    with torch.inference_mode():
        torch.testing.assert_close(reloaded.eval()(val_images), model(val_images))


@pytest.mark.parametrize("batch", [1, 7])
def test_exported_model_takes_any_batch_size(exported, batch):
    model, out, _, val_images, _ = exported
    classifier = OnnxClassifier(out)
    assert classifier.providers[-1] == "CPUExecutionProvider"
    images = val_images[10:10 + batch]
    logits = classifier.predict_arrays(images.numpy())
    with torch.inference_mode():
        expected = model(images).numpy()
    assert logits.shape == (batch, len(CLASSES))
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_variants_report_their_accuracy_change(exported):
    _, out, report, val_images, val_labels = exported
    for name in ("fp16", "int8"):
        result = report["variants"][name]
        assert json.loads((out / f"model.{name}.json").read_text()) == result
        assert result["accuracy_change"] == pytest.approx(result["accuracy"] - result["accuracy_fp32"])
        assert result["accuracy_fp32"] == report["parity"]["accuracy"]
        classifier = OnnxClassifier(out / f"model.{name}.onnx")  # uint8 in, float32 out, same metadata
        logits = classifier.predict_arrays(val_images.numpy())
        assert result["accuracy"] == pytest.approx(float((logits.argmax(1) == val_labels.numpy()).mean()))
    assert report["variants"]["fp16"]["max_abs_logit_diff"] < 1e-2
    assert report["variants"]["int8"]["top1_agreement"] >= 0.9


@pytest.mark.parametrize("offset", [1e-3, 100.0])
def test_parity_gate_rejects_a_graph_that_differs_from_torch(exported, tmp_path, offset):
    """A small offset breaks the tolerance only, a large one the top-1 too; either way no new model.onnx."""
    previous = exported[1] / "model.onnx"
    out = tmp_path / "model"
    if offset > 1:  # a folder holding an earlier export keeps it untouched
        out.mkdir()
        (out / "model.onnx").write_bytes(previous.read_bytes())
    model = trained_tiny_net(steps=5, export_offset=offset)  # the traced graph adds `offset` to the last logit
    images, _ = toy_data(32, seed=2)
    with pytest.raises(ExportParityError, match=r"tolerance 0.0001\), same top-1 on \d+/32") as error:
        export_classifier(model, tiny_meta(), out, images, images)
    same_top1 = int(str(error.value).split("same top-1 on ")[1].split("/")[0])
    assert same_top1 == 32 if offset < 1 else same_top1 < 32
    if offset > 1:
        assert [p.name for p in out.iterdir()] == ["model.onnx"]
        assert (out / "model.onnx").read_bytes() == previous.read_bytes()
    else:
        assert list(out.iterdir()) == []  # no model.onnx, no temp files


def test_export_refuses_a_model_in_training_mode(tmp_path):
    model = trained_tiny_net(steps=1).train()
    images, _ = toy_data(8, seed=2)
    with pytest.raises(ValueError, match="training mode"):
        export_classifier(model, tiny_meta(), tmp_path / "m", images, images)
    assert not (tmp_path / "m").exists()


class BranchyNet(nn.Module):
    """A data-dependent Python branch: torch.export cannot trace it, the TorchScript tracer can."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(28 * 28, len(CLASSES))

    def forward(self, x):
        h = x.float().flatten(1) / 255
        if h.mean() >= 0:  # always true for pixels
            h = h * 2
        return self.fc(h)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_falls_back_to_torchscript_when_dynamo_fails(tmp_path):
    images, _ = toy_data(8, seed=2)
    report = export_classifier(BranchyNet().eval(), tiny_meta(), tmp_path, images, images, opset=17)
    assert report["exporter"] == "torchscript" and report["opset"] == 17
    assert "export" in report["exporter_fallback_reason"] and "\x1b[" not in report["exporter_fallback_reason"]
    assert OnnxClassifier(tmp_path).predict_arrays(images[:3].numpy()).shape == (3, len(CLASSES))


def test_metadata_from_a_checkpoint_card():
    log_prior = np.log(np.array([600, 300, 150, 40, 10]) / 1100).tolist()
    card = {"weights_sha256": "cd" * 32, "metrics": {"val": 0.4}, "test": {"top1": 0.61},
            "logit_adjustment": {"tau": 1.0, "log_prior": log_prior, "val_mean_per_class": {}},
            "data": {"name": "fmnist", "class_names": CLASSES, "channels": 1, "image_size": [28, 28],
                     "counts": [600, 300, 150, 40, 10], "groups": ["many", "medium", "few", "few", "few"],
                     "index_sha256": "ef" * 32, "build_args": {"dataset": "fmnist", "many_threshold": None,
                                                               "few_threshold": 30}}}
    meta = metadata_from_card(card)
    assert meta["input"]["resize_policy"] == "resize" and (meta["input"]["height"], meta["input"]["width"]) == (28, 28)
    assert meta["group_thresholds"] == {"many_above": 500, "few_below": 30}
    assert meta["metrics"] == {"top1": 0.61}  # the test report, not training's validation metrics
    # a card from before the prior was named (only stage 2 chose one): the stage-2 subset's counts
    assert meta["logit_adjustment"] == {"tau": 1.0, "log_prior": log_prior, "prior": "stage2-subset"}
    assert meta["dataset"] == {"name": "fmnist", "index_sha256": "ef" * 32}

    card["data"].update(name="folder", channels=3, image_size=[224, 224], build_args={"dataset": "folder"})
    card["logit_adjustment"]["tau"] = 0.0
    meta = metadata_from_card(card)
    assert meta["input"]["resize_policy"] == "shorter-center-crop" and meta["logit_adjustment"] is None


def test_parse_variants():
    assert parse_variants("fp16, int8,fp16") == ("fp16", "int8")
    assert parse_variants("") == ()


def test_export_run_names_its_own_parameters(tmp_path, capsys):
    """Bad options are refused before anything loads, named as the caller spells them: `variants=` from Python,
    `--variants` from the command line."""
    from tailwise.cli import main as tailwise_main
    from tailwise.export.model_folder import export_run

    with pytest.raises(UserError, match=r"^variants=: unknown fp8"):
        export_run(tmp_path / "run", tmp_path / "m", variants=("fp16", "fp8"))
    with pytest.raises(UserError, match=r"^parity_images= must be >= 1"):
        export_run(tmp_path / "run", tmp_path / "m", parity_images=0)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x").write_text("mine")
    with pytest.raises(UserError, match=r"out= .* holds files export did not write \(x\).*even with force="):
        export_run(tmp_path / "run", tmp_path / "m", force=True)
    assert tailwise_main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "m"), "--variants", "fp8"]) == 2
    assert "error: --variants: unknown fp8" in capsys.readouterr().err
    assert tailwise_main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "m"), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"error: --out {tmp_path / 'm'} holds files export did not write (x)" in err and "even with --force" in err
    assert (tmp_path / "m" / "x").read_text() == "mine"


def test_tailwise_export_end_to_end(tmp_path, cifar_archive):
    """`tailwise export` on a real checkpoint written by training.checkpoint, data rebuilt from its card."""
    checkpoint = pytest.importorskip("tailwise.training.checkpoint")
    from tailwise.training.data import build_lt_data
    from tailwise.training.config import load_config
    from tailwise.training.networks import Classifier
    from tailwise.cli import main

    archive, _, _ = cifar_archive(per_class=40)
    data = build_lt_data("cifar10", root=str(archive), imbalance_factor=10, val_per_class=10)
    torch.manual_seed(0)
    model = Classifier("resnet32", 3, 10, data.mean, data.std)
    with torch.no_grad():  # batch-norm statistics from the data, as training leaves them (at init logits reach ~300)
        model.train()(data.train_source.load(data.train_idx))
    model.eval()
    run = tmp_path / "run"
    checkpoint.save_checkpoint(run, 2, model, {"epoch": 1, "kind": "classifier", "finished": True,
                                               "config": load_config(None, ["name='t'"]),
                                               "data": data.card(), "test": {"top1": 0.1}})
    out = tmp_path / "models" / "cifar"
    assert main(["export", str(run), "--out", str(out), "--parity-images", "40"]) == 0
    meta = read_metadata(out)
    assert meta["class_names"] == data.class_names and meta["input"]["channels"] == 3
    assert meta["weights_sha256"] == json.loads((run / "stage2.json").read_text())["weights_sha256"]
    assert meta["metrics"] == {"top1": 0.1}
    card = json.loads((out / "card.json").read_text())
    assert card["export"]["parity"]["n_images"] == 40 and "accuracy" in card["export"]["parity"]
    readme = (out / "README.md").read_text()   # the model card lists every file with its sha256
    # "t" is no recipe here, so the reproduce command spells the config out against the defaults
    assert 'tailwise train --set name="t" ' in readme and card["training"]["weights_sha256"] in readme


def test_card_gives_one_command_when_stage_1_was_shared_under_another_name(tmp_path):
    """The accuracy runner trains a stage 1 once for every row that shares it, under the first row's name: the
    model card of another row then reproduces with that row's one command, since the name is only a label. A
    stage 1 that differs in anything it depends on keeps its own command."""
    from tailwise.export.model_card import trained_stages
    from tailwise.training.config import load_config

    cfg = load_config("tailwise", ["name='row-b'", "seed=0"])
    first = dict(cfg, name="row-a", stage2=dict(cfg["stage2"], sampler="none"))   # the row that trained it
    one = 'tailwise train --set name="row-a" --stage 1 --out runs/a'
    both = 'tailwise train --set name="row-b" --out runs/b'
    card = {"stage": 2, "epoch": 18, "_dir": str(tmp_path), "config": cfg,
            "trained": {"1": {"epochs": 15, "command": one}, "2": {"epochs": 18, "command": both}}}
    (tmp_path / "stage1.json").write_text(json.dumps({"config": first}))
    assert trained_stages(card, "m")[1] == ['tailwise train --set name="row-b" --out runs/m']
    (tmp_path / "stage1.json").write_text(json.dumps({"config": dict(first, seed=1)}))
    assert trained_stages(card, "m")[1] == [one.replace("runs/a", "runs/m"), both.replace("runs/b", "runs/m")]
    stage2_alone = {"epochs": 18, "command": both.replace(" --out", " --stage 2 --out")}
    separate = dict(card, trained={"1": card["trained"]["1"], "2": stage2_alone})
    (tmp_path / "stage1.json").write_text(json.dumps({"config": first}))
    assert len(trained_stages(separate, "m")[1]) == 2   # stages trained by two commands: both are given
