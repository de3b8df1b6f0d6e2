"""experiments/gpu_run.sh on CPU (--dry-run): the same steps at a tiny size, the same output layout, and a second
run that continues from the first one's output instead of starting over; then each way a first real lease could
be wasted (issue 28), reproduced on CPU: missing data, a tiny time budget, a leftover export staging folder, a
carry over the tool's limit, a failing nvidia-smi, a hanging nccl test, a step that fails once, and --check."""

import argparse
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
STEPS = ["env", "cuda-tests", "cuda-nccl", "bench", "recipe", "accuracy"]


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
    # continuing from the empty run with the data folder missing (not carried): the steps that need no data
    # still run (item 1); those that read it are not started, and not marked failed
    out1 = tmp_path / "out1"
    log = run_script(tmp_path, tmp_path / "not-carried", out1, "--state", str(out0))
    first = results(out1)
    assert statuses(out1) == {"env": "done", "cuda-tests": "done", "cuda-nccl": "done", "bench": "done",
                              "recipe": "not-started", "accuracy": "not-started"}
    assert "lacks train-images-idx3-ubyte.gz" in log and "== recipe: not started, no data" in log
    assert {"env.json", "cuda-tests.xml", "cuda-nccl.xml", "bench_stage1.json", "steps/bench.json"} <= set(first)
    assert json.loads(first["bench_stage1.json"])["rows"][0]["ce_images_per_s"] > 0
    # a second run from the first one's output, with the data: skips what is finished, does the rest
    out2 = tmp_path / "out2"
    log = run_script(tmp_path, data, out2, "--state", str(out1))
    for step in ("env", "cuda-tests", "cuda-nccl", "bench"):
        assert f"== {step}: skipped (done in an earlier run)" in log
    assert "== recipe: started" in log and "== accuracy: started" in log
    assert statuses(out2) == dict.fromkeys(STEPS, "done")
    second = results(out2)
    for name in ("env.json", "bench_stage1.json", "steps/env.json", "steps/bench.json"):
        assert second[name] == first[name], name                      # carried, not redone
    model = "models/" + gpu_run.MODEL_NAME
    assert {f"{model}/model.onnx", f"{model}/card.json", f"{model}/README.md", "recipe/stage2.json",
            "recipe/eval/report.json", "accuracy/fmnist-lt-r32-if10-b1/ce-s0.json",
            "accuracy/table-fmnist-lt-r32-if10-b1.md"} <= set(second)
    assert not any(name.endswith(".safetensors") and name.startswith("recipe/") for name in second)
    recipe = json.loads(second["steps/recipe.json"])
    assert recipe["parity"]["max_abs_logit_diff"] <= 1e-4
    assert recipe["run"]["stage1"]["images_per_second"] > 0 and recipe["run"]["stage2"]["epochs"] == 1
    accuracy = json.loads(second["steps/accuracy.json"])
    assert (accuracy["budget"], accuracy["runs_done"], accuracy["runs_wanted"]) == (1, 1, 1)
    assert (out2 / "gpu_run.log").read_text().startswith((out1 / "gpu_run.log").read_text())
    with tarfile.open(out2 / "gpu_state.tar.gz") as tar:
        assert tar.getnames() == []                                     # nothing left unfinished
    # what came back unpacks into a repository for commit; models/ only with --install-model (issue 23)
    repo = tmp_path / "repo"
    done = collect(out2, repo)
    assert (repo / "experiments/results/gpu/steps/recipe.json").exists()
    assert (repo / "experiments/results/gpu/cuda-nccl.txt").exists()
    assert (repo / "experiments/results/gpu/gpu_run.log").exists()
    assert (repo / "experiments/results/fmnist-lt-r32-if10-b1/ce-s0.json").exists()
    assert "accuracy.py table --recipe fmnist-lt-r32 --imbalance-factor 10 --budget 1" in done.stdout
    assert not (repo / "models").exists() and "pass --install-model" in done.stdout
    (repo / "experiments/results/fmnist-lt-r32-if10-b1/ce-s0.json").write_text("{}")   # a CPU run of that name
    done = collect(out2, repo)
    assert "kept the 1 file(s) already in experiments/results/fmnist-lt-r32-if10-b1 that differ" in done.stdout
    done = collect(out2, repo, "--results-into", "experiments/results/tuned-cuda")      # kept apart instead
    assert json.loads((repo / "experiments/results/tuned-cuda/fmnist-lt-r32-if10-b1/ce-s0.json").read_text())
    assert "--budget 1 --results experiments/results/tuned-cuda" in done.stdout
    done = collect(out2, repo, "--install-model")     # no shipped model in this repository: the candidate goes in
    assert (repo / model / "model.onnx").exists() and "copied to" in done.stdout


def collect(out, repo, *args):
    done = subprocess.run([sys.executable, str(REPO / "experiments" / "gpu_collect.py"), str(out), "--repo", str(repo),
                           *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done


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
    # ce-s1 finished in another table (budget 4): that does not finish it at budget 200 (item 9)
    gpu_run.write_json(s.results / "accuracy" / "fmnist-lt-r32-if100-b4" / "ce-s1.json", {})
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


# ------------------------------------------------------------------------------- issue 28, item by item
def session(tmp_path, *args, name="w") -> "gpu_run.Session":
    return gpu_run.Session(gpu_run.parse_args(["--data", str(tmp_path / "data"), "--out", str(tmp_path / f"{name}-out"),
                                               "--work", str(tmp_path / name), *args]))


def stand_in(folder: Path, name: str, script: str) -> Path:
    """An executable bash script named `name` in `folder`: a stand-in for a program that misbehaves."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + script)
    path.chmod(0o755)
    return path


def test_a_tiny_time_budget_does_not_pin_the_smallest_budget(tmp_path):
    """Item 2: the accuracy step reached with little time left is not started (no budget recorded), so a later run
    with time plans the largest budget that fits; a budget is kept only where a table made progress at it."""
    data = write_fmnist_files(tmp_path / "data", per_class=20, test_per_class=5)
    s = session(tmp_path, "--imbalance-factor", "10", "--acc-methods", "ce")
    s.data_root, s.device = str(data), "cuda"
    # 1 CE image/s (x 4 workers x 0.5): budget B needs ~B x 74 x 1.25 / 2 s for the one run of seed 0
    gpu_run.write_json(s.results / "steps" / "bench.json",
                       {"status": "done", "rows": [{"device_type": "cuda", "batch": 512, "ce_images_per_s": 1.0}]})
    result = gpu_run.step_accuracy(s, 60)
    assert result["status"] == "not-started" and "budget" not in result and "too little time" in result["note"]
    gpu_run.write_json(s.results / "steps" / "accuracy.json", result)
    assert gpu_run.choose_budget(s, 3000)[0] == 50           # the largest that fits, not 4
    # a previous run that recorded budget 4 but made no progress at it does not pin it either
    gpu_run.write_json(s.results / "steps" / "accuracy.json", {"status": "partial", "budget": 4})
    assert gpu_run.choose_budget(s, 3000)[0] == 50
    # a table started at budget 20 (a finished row, or a row's checkpoints carried in) keeps its budget
    gpu_run.write_json(s.results / "steps" / "accuracy.json", {"status": "partial", "budget": 20})
    (s.state / "accuracy" / "fmnist-lt-r32-if10-b20" / "ce-s0").mkdir(parents=True)
    assert gpu_run.choose_budget(s, 60) == (20, "kept: a previous run started the table at this budget")


def test_a_leftover_export_staging_folder_is_neither_packed_nor_collected(tmp_path):
    """Item 3: an export cut off leaves `.NAME.new-*` beside its --out; it never goes into the results tarball,
    the recipe step removes it, and the collector never takes a hidden folder for the model. Item 9: the
    collector reads "-ldamsubset" table folders right."""
    s = session(tmp_path)
    models = s.results / "models"
    staging = models / f".{gpu_run.MODEL_NAME}.new-x1y2"
    staging.mkdir(parents=True)
    for name in ("model.onnx", "card.json"):
        (staging / name).write_text("{}")
    gpu_run.write_json(s.results / "accuracy" / "fmnist-lt-r32-if100-b200-ldamsubset" / "ce-s0.json", {})
    s.pack()
    with tarfile.open(s.out / "gpu_results.tar.gz") as tar:
        names = tar.getnames()
    assert "gpu-results/accuracy/fmnist-lt-r32-if100-b200-ldamsubset/ce-s0.json" in names
    assert not any(".new-" in name for name in names)
    assert gpu_run.remove_staging(models) == [staging.name] and not staging.exists()
    # a results tarball that holds only such a folder (as packed before this fix)
    came_back = tmp_path / "came-back"
    came_back.mkdir()
    with tarfile.open(came_back / "gpu_results.tar.gz", "w:gz") as tar:
        for path in (s.results / "accuracy").rglob("*"):
            tar.add(path, arcname=f"gpu-results/{path.relative_to(s.results)}", recursive=False)
        for name in ("model.onnx", "card.json"):
            info = tarfile.TarInfo(f"gpu-results/models/.{gpu_run.MODEL_NAME}.new-x1y2/{name}")
            tar.addfile(info)
    repo = tmp_path / "repo"
    done = collect(came_back, repo, "--install-model")
    assert "model: none came back" in done.stdout and not (repo / "models").exists()
    assert ("python experiments/accuracy.py table --recipe fmnist-lt-r32 --imbalance-factor 100 --budget 200 "
            "--set data.holdout_kept=false") in done.stdout


def git_repo(path: Path, tracked_mib: float = 1) -> Path:
    path.mkdir()
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    (path / ".gitignore").write_text("/data/\n/gpu-state/\n")
    with open(path / "code.bin", "wb") as f:
        f.write(os.urandom(int(tracked_mib * 2**20)))
    subprocess.run(["git", "-C", str(path), "add", ".gitignore", "code.bin"], check=True)
    return path


def sparse(path: Path, mib: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(int(mib * 2**20))


def test_check_prints_the_run_call_and_fails_over_the_carry_limit(tmp_path, capsys):
    """Item 4 and --check: tree + data + state over 60 MiB fails before any lease; under it, the exact call of the
    device tool's `run` is printed, with the room the run's output may take (--carry-mib)."""
    repo = git_repo(tmp_path / "repo", tracked_mib=1)
    data, state = repo / "data" / "fashion-mnist", repo / "gpu-state"
    for name in gpu_run.FMNIST_FILES:
        sparse(data / name, 10)                                     # 40 MiB of data
    sparse(state / "gpu_results.tar.gz", 5)
    sparse(state / "gpu_state.tar.gz", 15)                         # 1 + 40 + 20 = 61 MiB: over
    args = gpu_run.parse_args(["--check", "--data", str(data)])
    assert gpu_run.check(args, ["--check", "--data", str(data)], repo=repo) == 1
    out, err = capsys.readouterr()
    assert "61.0 MiB of 60 MiB" in out and "over the 60 MiB" in err and "drop gpu_state.tar.gz" in err
    # the state's checkpoints dropped (unfinished training restarts): it fits, and the call is printed
    sparse(state / "gpu_state.tar.gz", 0)
    argv = ["--check", "--data", str(data), "--minutes", "7", "--steps", "env,bench"]
    assert gpu_run.check(gpu_run.parse_args(argv), argv, repo=repo) == 0
    out, err = capsys.readouterr()
    call = json.loads(out.strip().splitlines()[-1])
    assert call["carry"] == ["data/fashion-mnist", "gpu-state"] and call["timeout_s"] == 480
    assert call["command"] == ('bash experiments/gpu_run.sh --data data/fashion-mnist --out "$OUT" --state gpu-state '
                               '--carry-mib 19 --minutes 7 --steps env,bench')    # 60 - 1 - 40: what --out may hold
    assert "46.0 MiB of 60 MiB" in out and err == ""
    # a data folder that lacks a file, or one outside the repository (the tool would not carry it)
    (data / gpu_run.FMNIST_FILES[0]).unlink()
    assert gpu_run.check(args, [], repo=repo) == 1
    assert "lacks train-images-idx3-ubyte.gz" in capsys.readouterr().err
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_run.sh"), "--check", "--data", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHON=sys.executable))
    assert done.returncode == 1 and "outside the repository" in done.stderr, done.stderr


def test_the_state_gives_way_under_the_carry_cap_and_the_log_says_so(tmp_path):
    """Item 4 at run time: the four --out files stay under --carry-mib (the next run carries them in); a run's
    checkpoints that do not fit are left out, and the log says so (item 9: it only went to stdout)."""
    s = session(tmp_path, "--carry-mib", "1.5")
    run = s.state / "recipe"
    run.mkdir()
    (run / "stage1.json").write_text('{"finished": false}')
    (run / "stage1-e0003.resume.safetensors").write_bytes(os.urandom(2 * 2**20))    # 2 MiB: over the cap
    s.pack()
    with tarfile.open(s.out / "gpu_state.tar.gz") as tar:
        assert tar.getnames() == []
    assert "state: no room left for state/recipe (2.0 MiB" in (s.out / "gpu_run.log").read_text()
    assert sum(f.stat().st_size for f in s.out.iterdir()) < 1.5 * 2**20
    roomy = session(tmp_path, "--carry-mib", "20", name="w2")
    (roomy.state / "recipe").mkdir()
    for f in run.iterdir():
        (roomy.state / "recipe" / f.name).write_bytes(f.read_bytes())
    roomy.pack()
    with tarfile.open(roomy.out / "gpu_state.tar.gz") as tar:
        assert "state/recipe/stage1-e0003.resume.safetensors" in tar.getnames()


@pytest.mark.slow      # the env probe imports torch, onnx and onnxruntime in a subprocess
def test_a_failing_nvidia_smi_does_not_fail_the_env_step(tmp_path, monkeypatch):
    """Item 5: nvidia-smi that hangs, exits non-zero or cannot start is noted in env.json; the step is done."""
    bin_dir = tmp_path / "bin"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(gpu_run, "NVIDIA_SMI_TIMEOUT_S", 1, raising=False)
    stand_in(bin_dir, "nvidia-smi", "exec sleep 60\n")
    s = session(tmp_path, "--dry-run")
    result = gpu_run.step_env(s, 60)
    env = json.loads((s.results / "env.json").read_text())
    assert result["status"] == "done", result
    assert env["nvidia_smi"] == "failed: no answer in 1s (stopped)" and env["torch"][0].isdigit()
    stand_in(bin_dir, "nvidia-smi", "echo 'NVIDIA-SMI has failed because it could not communicate'; exit 9\n")
    assert gpu_run.nvidia_smi().startswith("failed: exit code 9: NVIDIA-SMI has failed")
    (bin_dir / "nvidia-smi").write_text("#!/nonexistent/interpreter\n")
    assert gpu_run.nvidia_smi().startswith("failed: FileNotFoundError")


def test_the_nccl_test_runs_alone_under_its_own_short_cap(tmp_path):
    """Item 6: the torchrun + nccl test is its own step with a short cap, with nccl on loopback; a hang there
    costs only that cap, and the other CUDA tests ran (and were reported) before it."""
    calls = tmp_path / "calls.txt"
    python = stand_in(tmp_path / "bin", "python", f'echo "NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME $*" >> {calls}\n'
                      'case "$*" in *"-k nccl"*) exec sleep 60;; esac\n'
                      'echo "======= 5 passed in 1.00s ======="\n')
    s = session(tmp_path, "--python", str(python))
    assert gpu_run.step_cuda_tests(s, 30)["status"] == "done"
    result = gpu_run.step_cuda_nccl(s, 1)
    assert result["status"] == "failed" and "hung" in result["note"]
    first, second = calls.read_text().splitlines()
    assert first.startswith("NCCL_SOCKET_IFNAME=lo ") and "-k not nccl" in first
    assert second.startswith("NCCL_SOCKET_IFNAME=lo ") and "-k nccl" in second
    caps = {step.name: step.cap_s for step in gpu_run.STEPS}
    assert caps["cuda-nccl"] <= 90 < caps["cuda-tests"]
    assert "TORCHRUN_TIMEOUT_S = 60" in (REPO / "tests" / "test_cuda.py").read_text()


def test_a_failed_step_is_tried_again_in_the_next_run(tmp_path):
    """Item 7: a step that failed is tried again by the next run (it once stayed failed for good), up to
    --max-failures runs in a row; --redo still forces it. (A stand-in python: pytest crashes once, then passes.)"""
    flaky = stand_in(tmp_path / "bin", "python", f'if mkdir {tmp_path / "crashed"} 2>/dev/null; then '
                     'echo "Fatal Python error: Segmentation fault"; exit 139; fi\n'
                     'echo "======= 5 passed in 1.00s ======="\n')
    data = write_fmnist_files(tmp_path / "data", per_class=2, test_per_class=1)
    common = ["--dry-run", "--data", str(data), "--steps", "cuda-tests", "--python", str(flaky)]

    def run(n, state=None, *args):
        gpu_run.main([*common, "--out", str(tmp_path / f"out{n}"), "--work", str(tmp_path / f"w{n}"),
                      *(["--state", str(tmp_path / f"out{state}")] if state else []), *args])
        return statuses(tmp_path / f"out{n}")["cuda-tests"], (tmp_path / f"out{n}" / "gpu_run.log").read_text()

    assert run(1)[0] == "failed"
    status, log = run(2, 1)
    assert status == "done" and "== cuda-tests: started (cap 240s), try 2 after 1 failure(s)" in log
    # one that keeps failing is left alone after --max-failures runs in a row, until --redo names it
    stand_in(tmp_path / "bin", "python", "exit 1\n")
    assert run(3)[0] == run(4, 3)[0] == "failed"
    status, log = run(5, 4)
    assert "== cuda-tests: skipped (failed in the last 2 runs; --redo cuda-tests tries again)" in log
    record = json.loads(results(tmp_path / "out5")["steps/cuda-tests.json"])
    assert (record["status"], record["attempts"], record["failures"]) == ("failed", 2, 2)
    status, log = run(6, 5, "--redo", "cuda-tests")
    assert "try 3 after 2 failure(s)" in log


def test_accuracy_workers_get_the_recipe_and_one_crash_does_not_fail_a_table_that_moved_on(tmp_path):
    """Items 7 and 9: `accuracy.py run` and `table` are given --recipe (which names the results folder); a
    crashed worker beside one that finished a row leaves the table partial (continued next run), not failed."""
    calls = tmp_path / "calls.txt"
    s = session(tmp_path, "--dry-run", "--recipe", "fmnist-lt-r32-cpu", "--workers", "2", "--acc-seeds", "0", "1")
    folder = s.results / "accuracy" / "fmnist-lt-r32-cpu-if100-b1"
    python = stand_in(tmp_path / "bin", "python", f'echo "$*" >> {calls}\n'
                      'case "$*" in *" table "*) exit 0;; esac\n'
                      f'if mkdir {tmp_path / "crashed"} 2>/dev/null; then exit 1; fi\n'
                      f'mkdir -p {folder}; echo \'{{"image_passes": 8, "seconds_this_session": 2}}\' > {folder}/ce-s0.json\n')
    s.python, s.data_root, s.device = str(python), str(tmp_path / "data"), "cpu"
    result = gpu_run.step_accuracy(s, 120)
    assert (result["status"], result["runs_done"], result["runs_wanted"]) == ("partial", 1, 2)
    lines = calls.read_text().splitlines()
    assert len(lines) == 3 and all("--recipe fmnist-lt-r32-cpu" in line for line in lines)
    (tmp_path / "crashed").rmdir()
    python.write_text("#!/usr/bin/env bash\ncase \"$*\" in *\" table \"*) exit 0;; esac\nexit 1\n")
    assert gpu_run.step_accuracy(s, 120)["status"] == "failed"       # crashed, and nothing new finished


def test_bench_sets_the_device_up_as_training_does(monkeypatch):
    """Item 8: the bench plans the accuracy budget, so it runs as training runs: cuDNN autotuning on (set by
    engine.resolve_device); torch.compile's bench times one batch size (each new shape compiles again)."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_stage1
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)      # no kernel runs: only the set-up is read
    assert bench_stage1.bench_devices("cuda") == [torch.device("cuda", 0)]
    assert torch.backends.cudnn.benchmark
    s = argparse.Namespace(args=gpu_run.parse_args([]), python="python3")
    compiled = gpu_run.bench_command(s, Path("b.json"), compile=True)
    assert compiled[compiled.index("--batch") + 1:compiled.index("--steps")] == ["512"]
