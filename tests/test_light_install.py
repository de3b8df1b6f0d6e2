"""The light install: without the train extra (no torch, torchvision, safetensors, onnxscript, matplotlib),
`predict`, `tailwise.load` and the service work, and `train` / `export` say in one line which extra to install.
The missing packages are simulated by an import blocker (a sitecustomize on PYTHONPATH), so this runs in the
full test environment; `make serve` on a fresh clone is the real thing (README, Install)."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRAIN_EXTRA = ("torch", "torchvision", "safetensors", "onnxscript", "matplotlib")
BLOCKER = f'''import importlib.abc, sys
BLOCKED = {TRAIN_EXTRA!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Blocker())
'''


@pytest.fixture(scope="module")
def light_env(tmp_path_factory):
    """The environment of a process that cannot import the train extra's packages."""
    folder = tmp_path_factory.mktemp("blocker")
    (folder / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)]), "BENTOML_DO_NOT_TRACK": "true",
            "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml_home"))}


def run(env, *args, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          **kwargs)


def test_the_base_install_has_no_torch():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"] + project["optional-dependencies"]["cpu"])
    assert not [name for name in TRAIN_EXTRA if name in base]
    assert all(any(dep.startswith(name) for dep in project["optional-dependencies"]["train"])
               for name in ("torch", "torchvision", "safetensors", "onnxscript"))


def test_the_blocker_blocks(light_env):
    result = run(light_env, "-c", "import torch")
    assert result.returncode == 1 and "No module named 'torch'" in result.stderr


def test_predict_load_and_the_service_need_no_train_extra(light_env, tiny_model_dir, tmp_path):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("L", (28, 28), 240).save(image)
    result = run(light_env, "-m", "tailwise", "predict", "--model", str(tiny_model_dir), str(image))
    assert result.returncode == 0, result.stderr
    assert '"label": "eel"' in result.stdout
    result = run(light_env, "-c", f"import tailwise; print(tailwise.load({str(tiny_model_dir)!r}).predict("
                                  f"{str(image)!r}))")
    assert result.returncode == 0 and "'label': 'eel'" in result.stdout, result.stderr
    result = run({**light_env, "TAILWISE_MODEL": str(tiny_model_dir)}, "-c",
                 "from tailwise.serving import service; print(service.TailwiseClassifier.name)")
    assert result.returncode == 0 and result.stdout.strip() == "TailwiseClassifier", result.stderr


@pytest.mark.parametrize("command", [["train", "--epochs", "1"], ["export", "runs/none", "--out", "models/none"]])
def test_training_and_export_name_the_extra_in_one_line(light_env, command, tmp_path):
    result = run(light_env, "-m", "tailwise", *command)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"tailwise {command[0]}: error: ")
    assert "needs the train extra" in result.stderr and "pip install 'tailwise[train]'" in result.stderr
