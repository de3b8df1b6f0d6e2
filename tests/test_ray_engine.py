"""The Ray engine (serving/ray_engine.py, `tailwise predict --engine ray`, `tailwise.predict_dataset`): the local
engine's records over real Fashion-MNIST PNGs and corrupt files, every input exactly once even when a model actor
is killed mid-run, the missing extra as a one-line error, and no Ray import without the engine.

One local Ray cluster, limited to 2 CPUs, serves the whole session (the `ray_cluster` fixture)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tailwise.serving.artifact import OnnxClassifier
from tailwise.serving.predict import expand_inputs, predict_files

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "fmnist-lt-tailwise"
FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not (FMNIST_ROOT / "t10k-images-idx3-ubyte.gz").exists(),
                                  reason="Fashion-MNIST not installed at /usr/share/datasets/fashion-mnist "
                                         "(apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster on 2 CPUs, started once per session (in this process: the engine joins it)."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'tailwise[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def write_pngs(folder: Path, count: int, split: str = "t10k") -> list[Path]:
    """The first `count` real Fashion-MNIST images of `split` as 28 x 28 grayscale PNGs."""
    from tailwise.training.data import read_idx

    images = read_idx(str(FMNIST_ROOT / f"{split}-images-idx3-ubyte.gz"), 2051)[:count]
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.png" for i in range(len(images))]
    for path, image in zip(paths, images):
        Image.fromarray(image, mode="L").save(path)
    return paths


@pytest.fixture(scope="module")
def fmnist_folder(tmp_path_factory):
    """300 real Fashion-MNIST test images as PNGs, plus corrupt files: text named .png, a truncated PNG, an
    empty file and random bytes named .jpg."""
    folder = tmp_path_factory.mktemp("fmnist-pngs")
    paths = write_pngs(folder / "images", 300)
    (folder / "images" / "notes.png").write_text("not an image, just words\n")
    (folder / "images" / "truncated.png").write_bytes(paths[0].read_bytes()[:60])
    (folder / "images" / "empty.png").write_bytes(b"")
    (folder / "images" / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    return folder / "images"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_records(ray_records: list[dict], local_records: list[dict]):
    """Same paths in the same order, identical error records, identical labels, probabilities within 1e-6."""
    assert [r["path"] for r in ray_records] == [r["path"] for r in local_records]
    for mine, theirs in zip(ray_records, local_records):
        assert mine["error"] == theirs["error"], mine["path"]
        assert [p["label"] for p in mine["predictions"]] == [p["label"] for p in theirs["predictions"]], mine["path"]
        assert [p["group"] for p in mine["predictions"]] == [p["group"] for p in theirs["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in mine["predictions"]],
                                   [p["probability"] for p in theirs["predictions"]], rtol=0, atol=1e-6)


@pytest.mark.slow
@needs_fmnist
def test_ray_engine_gives_the_local_engines_records_over_real_images_and_corrupt_files(
        ray_cluster, fmnist_folder, tmp_path, capsys):
    from tailwise.cli import main

    local, ray_out, ray_parquet = (tmp_path / name for name in ("local.jsonl", "ray.jsonl", "ray.parquet"))
    base = ["predict", "--model", str(SHIPPED), str(fmnist_folder), "--top-k", "3"]
    assert main([*base, "--output", str(local)]) == 1  # 1: some files failed
    assert main([*base, "--engine", "ray", "--output", str(ray_out), "--batch-size", "32"]) == 1
    local_records, ray_records = read_jsonl(local), read_jsonl(ray_out)
    assert len(local_records) == 304 and sum(r["error"] is not None for r in local_records) == 4
    assert sorted(r["path"] for r in local_records) == expand_inputs([str(fmnist_folder)])  # each input once
    assert_same_records(ray_records, local_records)
    assert ray_out.read_text() == local.read_text()  # in fact byte for byte: one decoding, one record shape

    assert main([*base, "--engine", "ray", "--format", "parquet", "--output", str(ray_parquet)]) == 1
    import pyarrow.parquet as pq

    table = pq.read_table(ray_parquet).to_pylist()
    assert_same_records(table, local_records)
    assert [row["label"] for row in table] == [r["predictions"][0]["label"] if r["predictions"] else None
                                               for r in local_records]
    assert "4 failed" in capsys.readouterr().err


def classify_actor_pids() -> list[int]:
    """Pids of this session's model actors (Ray names their processes ray::MapWorker(MapBatches(_Classify)));
    only descendants of this process count, so another Ray on the machine is never touched."""
    mine = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"_Classify" in cmdline and cmdline.startswith(b"ray::") and _descends_from_me(int(entry)):
            mine.append(int(entry))
    return mine


def _descends_from_me(pid: int) -> bool:
    while pid > 1:
        if pid == os.getpid():
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


@pytest.mark.slow
@needs_fmnist
def test_every_input_exactly_once_when_a_model_actor_is_killed_mid_run(ray_cluster, fmnist_folder, tmp_path):
    """The only model actor is frozen after the first records arrive, the consumer then drains what was already
    done, and the actor is killed while inputs are still owed: Ray restarts it and retries its batches, and the
    output is still every input exactly once, in order, with the local engine's answers."""
    from tailwise.serving.ray_engine import predict_records

    write_pngs(tmp_path / "more", 1500, split="train")
    paths = sorted(expand_inputs([str(fmnist_folder), str(tmp_path / "more")]))
    classifier = OnnxClassifier(SHIPPED)
    received: list[dict] = []
    killed: list[int] = []
    first = threading.Event()
    drained = threading.Event()

    def consume():
        for record in predict_records(classifier, paths, top_k=3, batch_size=8, actors=1):
            received.append(record)
            first.set()
        drained.set()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    assert first.wait(120), "no record within 120 s"
    (pid,) = classify_actor_pids()
    os.kill(pid, signal.SIGSTOP)          # freeze it: no more batches get classified
    before = -1
    while before != len(received):       # drain what was classified before the freeze
        before = len(received)
        time.sleep(1.0)
    owed = len(paths) - len(received)
    os.kill(pid, signal.SIGKILL)
    killed.append(pid)
    consumer.join(300)
    assert drained.is_set(), "the run did not finish after the actor was killed"
    assert owed > 0, "the actor was killed after the last batch: nothing was tested"
    print(f"killed the model actor with {owed} of {len(paths)} records owed")
    assert [r["path"] for r in received] == paths  # every input, exactly once, in order
    assert pid not in classify_actor_pids()
    assert_same_records(received, list(predict_files(classifier, paths, top_k=3)))


@pytest.mark.slow
@needs_fmnist
def test_predict_dataset_over_read_binary_files(ray_cluster, fmnist_folder):
    """The Python API on a dataset of image bytes, as a Ray pipeline reads them: the local engine's answers,
    plus top-1 columns; corrupt files are error rows named by their path, not a failed job."""
    import tailwise

    dataset = ray_cluster.data.read_binary_files(str(fmnist_folder), include_paths=True)
    rows = sorted(tailwise.predict_dataset(dataset, SHIPPED, top_k=2).take_all(), key=lambda row: row["path"])
    local = list(predict_files(OnnxClassifier(SHIPPED), expand_inputs([str(fmnist_folder)]), top_k=2))
    assert_same_records(rows, local)
    assert all(row["label"] == row["predictions"][0]["label"] for row in rows if row["error"] is None)
    assert {row["error"].split(":")[0] for row in rows if row["error"]} == {
        str(fmnist_folder / name) for name in ("notes.png", "truncated.png", "empty.png", "noise.jpg")}


def test_without_ray_the_engine_is_a_one_line_error_naming_the_extra(tmp_path):
    """Ray made unimportable (sys.modules["ray"] = None), as on an install without the extra."""
    code = ("import sys; sys.modules['ray'] = None; from tailwise.cli import main; "
            f"sys.exit(main(['predict', '--engine', 'ray', {str(SHIPPED / 'samples')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'tailwise[ray]'" in lines[0], result.stderr


def test_ray_is_imported_only_by_the_ray_engine(tmp_path):
    """The local engine, the CLI parser and `tailwise.predict_dataset`'s name import no Ray (nor torch)."""
    code = ("import sys, tailwise; from tailwise.cli import main; tailwise.predict_dataset; "
            f"rc = main(['predict', {str(SHIPPED / 'samples')!r}, '--output', 'out.jsonl']); assert rc == 0; "
            "bad = [m for m in ('ray', 'torch') if m in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == len(list((SHIPPED / "samples").glob("*.png")))


def test_an_address_where_no_cluster_answers_is_a_one_line_error(tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'tailwise[ray]')")
    from conftest import free_port

    result = subprocess.run([sys.executable, "-m", "tailwise", "predict", "--engine", "ray", "--ray-address",
                             f"127.0.0.1:{free_port()}", str(SHIPPED / "samples"), "--output", "out.jsonl"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode != 0 and not (tmp_path / "out.jsonl").exists()
    assert "no Ray cluster answers there" in result.stderr.strip().splitlines()[-1], result.stderr
