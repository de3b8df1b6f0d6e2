"""`tailwise export` writes a whole model folder beside --out and swaps it in (issue 18, item 1), and never
deletes a file it did not write (issue 25, item 1)."""

import os
import subprocess
import sys

import pytest
from pathlib import Path

from tailwise.export.model_folder import check_out, staged_folder
from tailwise import UserError


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _model_folder(out, **extra):
    out.mkdir(parents=True)
    for name, data in {"model.onnx": b"old model", "manifest.json": b"{}", **extra}.items():
        (out / name).write_bytes(data)


def test_a_failed_export_leaves_the_old_folder_and_nothing_beside_it(tmp_path):
    out = tmp_path / "models" / "m"
    _model_folder(out, **{"model.int8.onnx": b"old int8"})
    before = _files(out)
    with pytest.raises(RuntimeError, match="parity"):
        with staged_folder(out, force=True) as staging:
            (staging / "model.onnx").write_bytes(b"half-written new model")
            raise RuntimeError("parity check failed")
    assert _files(out) == before
    assert [p.name for p in out.parent.iterdir()] == ["m"]


def test_force_replaces_a_model_folder_whole(tmp_path):
    out = tmp_path / "m"
    _model_folder(out, **{"model.int8.onnx": b"old int8", "README.md": b"card", "per_class.png": b"png"})
    (out / "samples").mkdir()
    (out / "samples" / "bag-1.png").write_bytes(b"png")
    with pytest.raises(UserError, match="already holds a tailwise model; pass force=True"):
        with staged_folder(out) as staging:
            pytest.fail("must refuse before the block runs")
    with staged_folder(out, force=True) as staging:
        (staging / "model.onnx").write_bytes(b"new")
    assert _files(out) == {"model.onnx": b"new"} and [p.name for p in tmp_path.iterdir()] == ["m"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)


@pytest.mark.parametrize("layout", ["user file", "model plus user file", "user file in samples", "no manifest"])
def test_force_never_deletes_a_file_export_did_not_write(tmp_path, layout):
    out = tmp_path / "m"
    if layout == "user file":
        out.mkdir()
        (out / "important.txt").write_text("mine")
    elif layout == "model plus user file":
        _model_folder(out, **{"notes.txt": b"mine"})
    elif layout == "user file in samples":
        _model_folder(out)
        (out / "samples").mkdir()
        (out / "samples" / "keep.jpg").write_bytes(b"mine")
    else:
        out.mkdir()
        (out / "model.onnx").write_bytes(b"someone's onnx")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for force in (False, True):
        with pytest.raises(UserError) as err:
            with staged_folder(out, force=force):
                pytest.fail("must refuse before the block runs")
        message = str(err.value)
        if layout != "no manifest":   # the files it would have deleted are named
            assert {"user file": "important.txt", "model plus user file": "notes.txt",
                    "user file in samples": "samples/keep.jpg"}[layout] in message and "even with force=" in message
        else:
            assert "no manifest.json and model.onnx" in message
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_the_current_folder_and_folders_above_the_run_are_refused(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (tmp_path / "mine.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for out, what in ((".", "the current folder"), ("..", "the current folder or a folder above it"),
                      (str(run), "the run"), (str(run.parent), "the run")):
        with pytest.raises(UserError, match=what):
            check_out(Path(out), force=True, run=run)
    assert (tmp_path / "mine.txt").read_text() == "mine" and not list(tmp_path.glob(".*"))


def test_cli_names_the_flags_in_one_line(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "important.txt").write_text("mine")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    for out in ("out", "."):
        proc = subprocess.run([sys.executable, "-m", "tailwise", "export", "nowhere-run", "--out", out, "--force"],
                              cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "--out" in proc.stderr and "out=" not in proc.stderr
    assert "important.txt" in proc.stderr or "current folder" in proc.stderr
    assert (tmp_path / "out" / "important.txt").read_text() == "mine"


def test_new_and_empty_folders_need_no_force(tmp_path):
    for out in (tmp_path / "new" / "m", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        with staged_folder(out) as staging:
            (staging / "model.onnx").write_bytes(b"x")
        assert _files(out) == {"model.onnx": b"x"}
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        with staged_folder(tmp_path / "file"):
            pass
