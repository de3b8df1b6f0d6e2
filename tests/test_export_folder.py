"""`tailwise export` writes a whole model folder beside --out and swaps it in (issue 18, item 1)."""

import pytest

from tailwise.export.model_folder import staged_folder
from tailwise import UserError


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_failed_export_leaves_the_old_folder_and_nothing_beside_it(tmp_path):
    out = tmp_path / "models" / "m"
    out.mkdir(parents=True)
    (out / "model.onnx").write_bytes(b"old model")
    (out / "model.int8.onnx").write_bytes(b"old int8")
    before = _files(out)
    with pytest.raises(RuntimeError, match="parity"):
        with staged_folder(out, force=True) as staging:
            (staging / "model.onnx").write_bytes(b"half-written new model")
            raise RuntimeError("parity check failed")
    assert _files(out) == before
    assert [p.name for p in out.parent.iterdir()] == ["m"]


def test_force_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "model.int8.onnx").write_bytes(b"old int8")
    with pytest.raises(UserError, match="pass force=True"):
        with staged_folder(out) as staging:
            pytest.fail("must refuse before the block runs")
    with staged_folder(out, force=True) as staging:
        (staging / "model.onnx").write_bytes(b"new")
    assert _files(out) == {"model.onnx": b"new"} and [p.name for p in tmp_path.iterdir()] == ["m"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)


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
