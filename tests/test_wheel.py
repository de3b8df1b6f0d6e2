"""The installed package is one namespace, `tailwise`: the wheel holds nothing outside tailwise/, and a fresh
venv with only the wheel (no repository on the path) predicts with the shipped model; an editable install of
the same layout imports the layers from the repository folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # builds wheels and virtual environments

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "fmnist-lt-tailwise"   # the shipped model
SOURCES = ("pyproject.toml", "README.md", "tailwise", "training", "export", "serving")


def pip(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *map(str, args)],
                            cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    """The files a build reads, copied, so that building leaves no build/ or egg-info in the repository."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    return src


@pytest.fixture(scope="module")
def wheel(source_copy, tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", dist, source_copy, cwd=source_copy)
    (found,) = dist.glob("tailwise-*.whl")
    return found


def fresh_venv(path: Path) -> Path:
    """A new venv with no tailwise in it. Its third-party packages (numpy, onnxruntime, ...) come from this
    interpreter's site-packages through a .pth line; .pth files there (an editable tailwise's finder) do not run."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def run_in(python: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TAILWISE_MODEL")}
    return subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_the_wheel_holds_only_tailwise(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    outside = [n for n in names if not n.startswith(("tailwise/", "tailwise-"))]
    assert not outside, outside
    assert {n.split("/")[0] for n in names if n.startswith("tailwise-")} == {wheel.name.split("-py")[0] + ".dist-info"}
    for name in ("tailwise/__init__.py", "tailwise/_core.py", "tailwise/format.py", "tailwise/_api.py",
                 "tailwise/training/train.py", "tailwise/training/recipes/tailwise.toml", "tailwise/export/onnx_export.py",
                 "tailwise/serving/service.py"):
        assert name in names, name
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["tailwise"]


PREDICT = """
import json, sys
import tailwise
from pathlib import Path
assert Path(tailwise.__file__).is_relative_to(sys.prefix), tailwise.__file__
samples = sorted(Path(sys.argv[1] if len(sys.argv) > 1 else {shipped!r}).joinpath("samples").glob("*.png"))
model = tailwise.load({shipped!r})
predictions = model.predict(samples, top_k=2)
layers = [m for m in ("training", "export", "serving", "torch", "tailwise.training") if m in sys.modules]
assert not layers, layers
from tailwise.cli import build_parser
commands = sorted(build_parser()._subparsers._group_actions[0].choices)
from tailwise.training.config import load_config
load_config("tailwise")   # the recipes are package data
print(json.dumps({{"predictions": predictions, "commands": commands, "version": tailwise.__version__,
                  "serving": tailwise.serving.__file__}}))
"""


def test_a_fresh_venv_with_only_the_wheel_predicts_with_the_shipped_model(wheel, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    pip("--python", python, "install", "--no-deps", "--no-index", "-q", wheel, cwd=tmp_path)
    result = run_in(python, PREDICT.format(shipped=str(SHIPPED)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout)
    assert Path(out["serving"]).is_relative_to(tmp_path / "venv"), out["serving"]
    assert out["commands"] == sorted(["data", "train", "evaluate", "probe", "export", "calibrate", "predict", "serve",
                                      "manifest"])
    import tailwise

    assert out["version"] == tailwise.__version__
    expected = tailwise.load(SHIPPED).predict(sorted((SHIPPED / "samples").glob("*.png")), top_k=2)
    assert json.loads(json.dumps(expected)) == out["predictions"]


def test_an_editable_install_imports_the_repository_folders(source_copy, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    pip("--python", python, "install", "--no-deps", "--no-index", "--no-build-isolation", "-q", "-e", source_copy,
        cwd=tmp_path)
    code = ("import tailwise.serving.artifact as a, tailwise.training.config as c, tailwise.export.cli as e; "
            "print(a.__file__); print(c.__file__); print(e.__file__)")
    result = run_in(python, code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [Path(line).relative_to(source_copy).as_posix() for line in result.stdout.split()] == [
        "serving/artifact.py", "training/config.py", "export/cli.py"]
