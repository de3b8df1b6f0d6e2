"""The Python API: tailwise.load(...).predict(...) on the shipped model, lazy and torch-free imports, model
format versions, and train/export mirroring the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

import tailwise
from tailwise.serving.artifact import FORMAT_VERSION, METADATA_KEY, OnnxClassifier
from tailwise.serving.integrity import write_manifest
from tailwise.serving.predict import predict_files

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "fmnist-lt-tailwise"   # the shipped model
SAMPLES = sorted((SHIPPED / "samples").glob("*.png"))


def test_all_lists_the_api_and_import_tailwise_is_light():
    assert set(tailwise.__all__) == {"Classifier", "ImageError", "OptionError", "UserError", "__version__",
                                     "evaluate", "export", "load", "predict_dataset", "train"}
    code = ("import sys, tailwise; tailwise.__all__; "
            "bad = [m for m in ('numpy', 'PIL', 'onnx', 'onnxruntime', 'torch') if m in sys.modules]; "
            "assert not bad, bad; "
            "tailwise.load; tailwise.export; "   # the API names resolve without torch
            "bad = [m for m in ('torch', 'tailwise.training') if m in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_predict_gives_the_records_of_tailwise_predict_for_paths_pil_images_bytes_and_arrays():
    model = tailwise.load(SHIPPED)
    expected = [{k: r[k] for k in ("predictions", "set", "unsure")}
                for r in predict_files(OnnxClassifier(SHIPPED), [str(p) for p in SAMPLES])]
    assert model.predict(SAMPLES) == expected
    assert model.predict(str(SAMPLES[0])) == expected[0]               # one image: its answer, no outer list
    assert model.predict([p.read_bytes() for p in SAMPLES[:2]]) == expected[:2]
    with Image.open(SAMPLES[1]) as image:
        assert model.predict(image, top_k=3) == expected[1]
        pixels = np.asarray(image.convert("L"))
    assert model.predict([pixels]) == expected[1:2]                    # H x W uint8
    assert model.predict(pixels[None]) == expected[1]                  # C x H x W, the model's input
    assert model.predict(np.stack([pixels[None]] * 3)) == expected[1:2] * 3   # N x C x H x W
    top1 = model.predict(SAMPLES, top_k=1)
    assert [len(a["predictions"]) for a in top1] == [1] * len(SAMPLES)
    assert set(top1[0]) == {"predictions", "set", "unsure"}            # the shape of the service's answer
    assert set(top1[0]["predictions"][0]) == {"label", "index", "probability", "group"}
    assert model.predict([]) == []


def test_predict_logits_plain_and_adjusted():
    model = tailwise.load(SHIPPED / "model.onnx")
    plain = model.predict_logits(SAMPLES, adjusted=False)
    adjusted = model.predict_logits(SAMPLES, batch_size=2)
    assert plain.shape == adjusted.shape == (len(SAMPLES), len(model.class_names)) and plain.dtype == np.float32
    la = model.metadata["logit_adjustment"]
    shift = 0 if la is None else la["tau"] * np.asarray(la["log_prior"])
    np.testing.assert_allclose(adjusted, plain - shift, rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_image(tmp_path):
    model = tailwise.load(SHIPPED)
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(tailwise.ImageError, match="x.png"):
        model.predict([SAMPLES[0], tmp_path / "x.png"])
    with pytest.raises(tailwise.ImageError, match="uint8"):
        model.predict(np.zeros((28, 28), np.float32))
    with pytest.raises(TypeError, match="a path"):
        model.predict([1.5])
    with pytest.raises(tailwise.UserError, match="no such model"):
        tailwise.load(tmp_path / "missing")


def test_load_with_no_path_or_the_shipped_name_from_anywhere(tmp_path, monkeypatch):
    """tailwise.load() is the default model ($TAILWISE_MODEL, else the shipped one); "models/fmnist-lt-tailwise"
    names the shipped model outside the checkout too (issue 25, item 5)."""
    monkeypatch.delenv("TAILWISE_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tailwise.load().path == SHIPPED / "model.onnx"
    assert tailwise.load("models/fmnist-lt-tailwise").path == SHIPPED / "model.onnx"
    assert tailwise.load("models/fmnist-lt-tailwise/model.onnx").path == SHIPPED / "model.onnx"
    shutil.copytree(SHIPPED, tmp_path / "models" / "fmnist-lt-tailwise")   # a folder here of that name wins
    assert tailwise.load("models/fmnist-lt-tailwise").path == Path("models/fmnist-lt-tailwise/model.onnx")
    shutil.copytree(SHIPPED, tmp_path / "mine")
    monkeypatch.setenv("TAILWISE_MODEL", str(tmp_path / "mine"))
    assert tailwise.load().path == tmp_path / "mine" / "model.onnx"
    monkeypatch.setenv("TAILWISE_MODEL", str(tmp_path / "gone"))
    with pytest.raises(tailwise.UserError, match="TAILWISE_MODEL=.*gone: no such model"):
        tailwise.load()
    with pytest.raises(tailwise.UserError, match="models/other: no such model folder or file"):
        tailwise.load("models/other")


def test_without_a_manifest_python_is_told_verify_false(tmp_path, capsys):
    shutil.copytree(SHIPPED, tmp_path / "m")
    (tmp_path / "m" / "manifest.json").unlink()
    with pytest.raises(tailwise.UserError) as err:
        tailwise.load(tmp_path / "m")
    assert "verify=False" in str(err.value) and "--no-verify" not in str(err.value)
    assert tailwise.load(tmp_path / "m", verify=False).class_names
    from tailwise.cli import main

    assert main(["predict", "--model", str(tmp_path / "m"), str(SAMPLES[0])]) == 2
    err = capsys.readouterr().err
    assert "--no-verify or TAILWISE_VERIFY=0" in err and "verify=False" not in err


def test_load_verifies_the_manifest_unless_told_not_to(tmp_path):
    shutil.copytree(SHIPPED, tmp_path / "m")
    data = bytearray((tmp_path / "m" / "model.onnx").read_bytes())
    data[-1] ^= 0xFF   # the last byte (inside the metadata text or the graph) changed after export
    (tmp_path / "m" / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(tailwise.UserError, match="does not match"):
        tailwise.load(tmp_path / "m")


def with_format_version(tmp_path: Path, version) -> Path:
    proto = onnx.load(str(SHIPPED / "model.onnx"))
    prop = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    meta = json.loads(prop.value)
    meta["format_version"] = version
    prop.value = json.dumps(meta)
    path = tmp_path / f"v{version}" / "model.onnx"
    path.parent.mkdir()
    onnx.save(proto, str(path))
    write_manifest(path.parent, ["model.onnx"])   # an intact export of that format
    return path


def test_a_newer_model_format_is_refused_with_a_clear_message(tmp_path):
    path = with_format_version(tmp_path, FORMAT_VERSION + 1)
    with pytest.raises(tailwise.UserError, match=rf"format {FORMAT_VERSION + 1} is newer .* upgrade tailwise"):
        tailwise.load(path)


@pytest.mark.parametrize("version", [0, None])
def test_an_older_model_format_is_refused_by_rule(tmp_path, version):
    """Format 1 is the first; anything older (or unversioned) is refused with the fix, not a schema error."""
    path = with_format_version(tmp_path, version)
    with pytest.raises(tailwise.UserError, match=r"is older than .* re-export the run with `tailwise export`"):
        tailwise.load(path)
    result = subprocess.run([sys.executable, "-m", "tailwise", "predict", str(SAMPLES[0]), "--model", str(path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "older than" in result.stderr


def test_train_export_and_evaluate_call_the_library_functions_with_keywords(monkeypatch, tmp_path):
    """tailwise.train/export/evaluate call training.launch.train, export.model_folder.export_run and
    training.launch.evaluate with keyword arguments (stubbed here; real runs: test_train, test_run_lifecycle)."""
    import tailwise.export.model_folder as model_folder
    import tailwise.training.launch as launch
    from tailwise._api import _flatten

    assert list(_flatten({"stage2": {"sampler": "random"}, "stage1__epochs": 3})) == [
        ("stage2.sampler", "random"), ("stage1.epochs", 3)]
    seen = {}
    monkeypatch.setattr(launch, "train", lambda *a, **k: seen.setdefault("train", (a, k)) and tmp_path / "run")
    assert tailwise.train("fmnist-lt-r32-cpu", out=tmp_path / "run", epochs=1, stage2__sampler="random",
                          progress=False) == tmp_path / "run"
    args, kwargs = seen["train"]
    assert args == ("fmnist-lt-r32-cpu", tmp_path / "run")
    assert (kwargs["epochs"], kwargs["progress"], kwargs["overrides"]) == (1, False, {"stage2.sampler": "random"})

    monkeypatch.setattr(model_folder, "export_run", lambda *a, **k: seen.setdefault("export", (a, k)) and {})
    assert tailwise.export(tmp_path / "run", tmp_path / "model", variants=["int8"], force=True) == tmp_path / "model"
    args, kwargs = seen["export"]
    assert args == (tmp_path / "run", tmp_path / "model")
    assert (kwargs["variants"], kwargs["force"], kwargs["opset"]) == (("int8",), True, model_folder.DEFAULT_OPSET)

    monkeypatch.setattr(launch, "evaluate", lambda *a, **k: seen.setdefault("evaluate", (a, k)) and
                        launch.Evaluation({"top1": 0.5}, ["a"], None))
    assert tailwise.evaluate(tmp_path / "model", device="cpu") == {"top1": 0.5}
    assert seen["evaluate"] == ((tmp_path / "model",), {"device": "cpu", "out": None, "data": None,
                                                        "progress": True})


def test_api_errors_name_the_api_parameters(tmp_path, capsys):
    """The same check, worded for whoever called: `budget=` from Python, `--budget` on the command line."""
    with pytest.raises(tailwise.UserError, match=r"^test=, budget= and minutes= go with data=DIR$"):
        tailwise.train(budget=3)
    with pytest.raises(tailwise.UserError, match=r"^stage= must be 1 or 2"):
        tailwise.train(stage=3)
    with pytest.raises(tailwise.UserError, match=r"^variants=: unknown fp8"):
        tailwise.export(tmp_path / "run", tmp_path / "m", variants=["fp8"])
    from tailwise.cli import main

    assert main(["train", "--budget", "3"]) == 2
    assert capsys.readouterr().err == "tailwise train: error: --test, --budget and --minutes go with --data DIR\n"
