"""experiments/gpu_run.sh on CPU (--dry-run): the same steps at a tiny size, the same output layout, and a second
run that continues from the first one's output instead of starting over."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import write_fmnist_files

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import gpu_run  # noqa: E402

OUT_FILES = ["gpu_results.tar.gz", "gpu_run.log", "gpu_state.tar.gz", "gpu_summary.json"]
STEPS = ["env", "cuda-tests", "bench", "recipe", "accuracy"]


def run_script(cwd, data, out, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_STATE")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(REPO / "experiments" / "gpu_run.sh"), "--dry-run", "--data", str(data),
                           "--imbalance-factor", "10", "--out", str(out), "--work", str(out) + "-work", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(os.listdir(out)) == OUT_FILES
    return done.stdout


def results(out) -> dict:
    with tarfile.open(out / "gpu_results.tar.gz") as tar:
        return {m.name.removeprefix("gpu-results/"): tar.extractfile(m).read() for m in tar.getmembers()}


def statuses(out) -> dict:
    return {k: v["status"] for k, v in json.loads((out / "gpu_summary.json").read_text())["steps"].items()}


@pytest.mark.slow
def test_dry_run_layout_and_continuation(tmp_path):
    data = write_fmnist_files(tmp_path / "fashion-mnist", per_class=20, test_per_class=5)
    # no budget: nothing starts, and the output is there all the same
    out0 = tmp_path / "out0"
    log = run_script(tmp_path, data, out0, "--minutes", "0")
    assert statuses(out0) == dict.fromkeys(STEPS, "not-started")
    assert "== env: not started" in log
    # the first steps only, continuing from the empty run (as if the machine went back after them)
    out1 = tmp_path / "out1"
    run_script(tmp_path, data, out1, "--state", str(out0), "--steps", "env,cuda-tests,bench")
    first = results(out1)
    assert statuses(out1) == {"env": "done", "cuda-tests": "done", "bench": "done", "recipe": "not-started",
                              "accuracy": "not-started"}
    assert {"env.json", "cuda-tests.xml", "bench_stage1.json", "steps/bench.json"} <= set(first)
    assert json.loads(first["bench_stage1.json"])["rows"][0]["ce_images_per_s"] > 0
    # a second run from the first one's output: skips what is finished, does the rest
    out2 = tmp_path / "out2"
    log = run_script(tmp_path, data, out2, "--state", str(out1))
    for step in ("env", "cuda-tests", "bench"):
        assert f"== {step}: skipped (done in an earlier run)" in log
    assert "== recipe: started" in log and "== accuracy: started" in log
    assert statuses(out2) == dict.fromkeys(STEPS, "done")
    second = results(out2)
    for name in ("env.json", "bench_stage1.json", "steps/env.json", "steps/bench.json"):
        assert second[name] == first[name], name                      # carried, not redone
    model = "models/" + gpu_run.MODEL_NAME
    assert {f"{model}/model.onnx", f"{model}/card.json", f"{model}/README.md", "recipe/stage2.json",
            "recipe/eval/report.json", "accuracy/fmnist-lt-r32-if10-b1/ce-s0.json", "accuracy/table-if10-b1.md"} \
        <= set(second)
    assert not any(name.endswith(".safetensors") and name.startswith("recipe/") for name in second)
    recipe = json.loads(second["steps/recipe.json"])
    assert recipe["parity"]["max_abs_logit_diff"] <= 1e-4
    assert recipe["run"]["stage1"]["images_per_second"] > 0 and recipe["run"]["stage2"]["epochs"] == 1
    accuracy = json.loads(second["steps/accuracy.json"])
    assert (accuracy["budget"], accuracy["runs_done"], accuracy["runs_wanted"]) == (1, 1, 1)
    assert (out2 / "gpu_run.log").read_text().startswith((out1 / "gpu_run.log").read_text())
    with tarfile.open(out2 / "gpu_state.tar.gz") as tar:
        assert tar.getnames() == []                                     # nothing left unfinished
    # what came back unpacks into a repository for commit (no shipped model there: the candidate is kept)
    repo = tmp_path / "repo"
    done = subprocess.run([sys.executable, str(REPO / "experiments" / "gpu_collect.py"), str(out2), "--repo", str(repo)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (repo / "experiments/results/gpu/steps/recipe.json").exists()
    assert (repo / "experiments/results/gpu/gpu_run.log").exists()
    assert (repo / "experiments/results/fmnist-lt-r32-if10-b1/ce-s0.json").exists()
    assert (repo / model / "model.onnx").exists() and "copied to" in done.stdout


def test_unfinished_runs_travel_in_the_state(tmp_path):
    """A recipe stopped in stage 2: its checkpoints (without stage 1's optimizer state, no longer needed) go into
    gpu_state.tar.gz and come back with --state; finished accuracy runs stay out of it."""
    args = gpu_run.parse_args(["--data", "x", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w1")])
    s = gpu_run.Session(args)
    recipe = s.state / "recipe"
    recipe.mkdir()
    (recipe / "stage1.json").write_text('{"finished": true}')
    (recipe / "stage2.json").write_text('{"finished": false}')
    for name in ("stage1-e0100.safetensors", "stage1-e0100.resume.safetensors", "stage2-e0003.safetensors",
                 "stage2-e0003.resume.safetensors"):
        (recipe / name).write_bytes(b"weights")
    table = s.state / "accuracy" / "fmnist-lt-r32-if100-b200"
    for name in ("ce-s0", "ce-s1"):
        (table / name).mkdir(parents=True)
        (table / name / "stage1.json").write_text("{}")
    gpu_run.write_json(s.results / "accuracy" / "fmnist-lt-r32-if100-b200" / "ce-s0.json", {})
    gpu_run.write_json(s.results / "steps" / "recipe.json", {"status": "partial"})
    s.pack()
    with tarfile.open(s.out / "gpu_state.tar.gz") as tar:
        assert sorted(tar.getnames()) == [
            "state/accuracy/fmnist-lt-r32-if100-b200/ce-s1/stage1.json", "state/recipe/stage1-e0100.safetensors",
            "state/recipe/stage1.json", "state/recipe/stage2-e0003.resume.safetensors",
            "state/recipe/stage2-e0003.safetensors", "state/recipe/stage2.json"]
    again = gpu_run.Session(gpu_run.parse_args(["--data", "x", "--out", str(tmp_path / "out2"),
                                                "--work", str(tmp_path / "w2")]))
    again.restore(s.out)
    assert (again.state / "recipe" / "stage2-e0003.resume.safetensors").read_bytes() == b"weights"
    assert again.record("recipe")["status"] == "partial"


def test_a_step_past_its_cap_is_stopped(tmp_path):
    s = gpu_run.Session(gpu_run.parse_args(["--data", "x", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w")]))
    assert s.run(["sleep", "30"], 0.5, "[sleep]") is None                # None: stopped at its cap
    assert s.run([sys.executable, "-c", "print('hello')"], 30, "[py]") == 0
    log = (s.out / "gpu_run.log").read_text()
    assert "time cap reached" in log and "[py] hello" in log
