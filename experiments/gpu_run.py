"""One prepared GPU session: everything tailwise needs a GPU for, in order of value, inside a time budget.

    experiments/gpu_run.sh --check                                                     # here, before a lease
    experiments/gpu_run.sh --data data/fashion-mnist --out "$OUT"                      # first run
    experiments/gpu_run.sh --data data/fashion-mnist --out "$OUT" --state gpu-state    # continue a previous one
    experiments/gpu_run.sh --dry-run --data FIXTURE --out /tmp/out --imbalance-factor 10   # the same on CPU, tiny

--check runs nothing: it verifies here that the folders the device machine needs (--data, and --state when
there is one) exist, hold what the run reads, and fit with the working tree under the tool's carry limit,
then prints the device tool's `run` call to paste (carry list, timeout_s, command) and the carried size.

Steps (each skipped when a previous run finished it; a failed one is tried again, --max-failures runs in a row):
  env         python, torch, GPU name and memory, nvidia-smi                       -> env.json
  cuda-tests  pytest -m cuda tests/test_cuda.py tests/test_engine.py, but the nccl test
                                                                                   -> cuda-tests.xml / .txt
  cuda-nccl   the torchrun + nccl test alone, under its own short cap (loopback only: it may hang)
                                                                                   -> cuda-nccl.xml / .txt
  bench       stage-1 throughput, BNS vs CE, fraction of bf16 peak                 -> bench_stage1.json
  (bench-compile, only when named in --steps: the same with torch.compile, batch 512 -> bench_stage1_compile.json)
  recipe      fmnist-lt-r32 (100 BNS epochs, then IP-DPP) trained, evaluated, exported
                                                                                   -> recipe/, models/<name>/
  accuracy    the accuracy table at the largest budget that fits (200 is the goal), --workers processes
              sharing the GPU; not started when even the smallest budget would not fit   -> accuracy/
The steps that read the data (recipe, accuracy) are not started when --data lacks a file; the others run.

Everything lands in --out, as at most four files (a device machine returns few files):
  gpu_run.log           everything printed, appended to the log of the runs before
  gpu_results.tar.gz    gpu-results/: one steps/<step>.json per step (status, seconds, numbers) plus each
                        step's files; refreshed after every step and every --pack-every seconds
  gpu_state.tar.gz      checkpoints of unfinished training, only to continue (capped at --state-mib, and so that
                        the four files stay under --carry-mib: the next run carries them back in)
  gpu_summary.json      the status of every step
Nothing finished is lost when the run is cut off: each step's results are packed, atomically, when it ends.
--state DIR points at the files of a previous --out: finished steps are skipped, a partly trained recipe
or accuracy table resumes from its checkpoints. The whole run stops starting steps when its budget
(--minutes, default 8) is nearly spent; each step also has its own cap.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz")
MODEL_NAME = "fmnist-lt-r32-cuda"
CUDA_TESTS = ["tests/test_cuda.py", "tests/test_engine.py"]   # listed: collecting tests/ would import bentoml
NCCL_TESTS = "nccl"       # pytest -k expression of the torchrun + nccl test (in tests/test_cuda.py), its own step
RESERVE_S = 25            # kept back from the budget for the final packing
BUDGETS = (200, 100, 50, 20, 10, 4)
NVIDIA_SMI_TIMEOUT_S = 30
MiB = 2**20
CARRY_LIMIT_MIB = 60      # the device tool carries at most 64 MiB (tree + carried folders); 4 kept back
DEFAULT_DATA = "data/fashion-mnist"
# The dry run: the same steps at a size a 2-core CPU does in seconds (on a tiny Fashion-MNIST-format fixture).
DRY_SETS = ["stage1.epochs=1", "stage2.epochs=1", "stage1.batch_size=32", "stage2.batch_size=16",
            "stage1.warmup_epochs=1", "stage2.warmup_epochs=0", "model.proj_hidden=64", "model.proj_dim=32",
            "data.val_per_class=5"]


@dataclass
class Step:
    name: str
    cap_s: float        # the longest this step may run
    min_left_s: float   # not started with less than this left of the whole budget
    needs_data: bool = False


STEPS = (Step("env", 60, 5), Step("cuda-tests", 240, 60), Step("cuda-nccl", 75, 30), Step("bench", 120, 30),
         Step("bench-compile", 300, 120), Step("recipe", 360, 60, needs_data=True),
         Step("accuracy", 1e9, 90, needs_data=True))
DEFAULT_STEPS = "env,cuda-tests,cuda-nccl,bench,recipe,accuracy"     # bench-compile only when asked for


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_json(path: Path, obj) -> None:
    """Atomic: a reader (or a tarball taken at that moment) sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class Session:
    """The run's folders, log, deadline and subprocesses."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.minutes * 60 - RESERVE_S
        self.out, self.work = Path(args.out).resolve(), Path(args.work).resolve()
        self.results, self.state = self.work / "gpu-results", self.work / "state"
        for folder in (self.out, self.results / "steps", self.state):
            folder.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "gpu_run.log"
        self.lock = threading.RLock()      # pack() logs while it holds it
        self.procs: list[subprocess.Popen] = []
        self.python = args.python
        self.data_root: str | None = None
        self.device = "cpu" if args.dry_run else "cuda"
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                        PYTHONUNBUFFERED="1", BENTOML_DO_NOT_TRACK="true", TQDM_DISABLE="1")
        if args.dry_run:      # CPU only, also on a machine with a GPU (the CUDA tests then skip)
            self.env["CUDA_VISIBLE_DEVICES"] = ""

    # ------------------------------------------------------------------ log, time
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, text: str) -> None:
        stamp = f"[{time.monotonic() - self.t0:6.0f}s]"
        with self.lock:
            lines = [f"{stamp} {line}" for line in text.rstrip("\n").splitlines() or [""]]
            print("\n".join(lines), flush=True)
            with open(self.log_path, "a") as f:
                f.write("\n".join(lines) + "\n")

    # ------------------------------------------------------------------ state in, results out
    def restore(self, state_dir: Path) -> None:
        """Unpack a previous run's --out into the work folder (results and checkpoints) and continue its log."""
        for name, into in (("gpu_results.tar.gz", self.work), ("gpu_state.tar.gz", self.work)):
            path = state_dir / name
            if path.exists():
                with tarfile.open(path) as tar:
                    tar.extractall(into, filter="data")
        old_log = state_dir / "gpu_run.log"
        if old_log.exists() and not self.log_path.exists():
            shutil.copy(old_log, self.log_path)

    def pack(self, with_state: bool = True) -> None:
        """Refresh the files in --out; each is replaced atomically. The checkpoints of unfinished runs go into
        gpu_state.tar.gz while they fit under --state-mib and, with the results and the log, under --carry-mib
        (the next run carries these files in); a run that does not fit restarts next time, and the log says so."""
        with self.lock:
            _tar(self.out / "gpu_results.tar.gz", self.work, sorted(self.results.rglob("*")))
            if with_state:
                room = self.args.state_mib * MiB
                if self.args.carry_mib:
                    used = sum(p.stat().st_size for p in (self.out / "gpu_results.tar.gz", self.log_path)
                               if p.exists()) + 64 * 1024          # and the summary, a few KiB
                    if used > self.args.carry_mib * MiB:
                        self.log(f"carry: the results and the log already take {used / MiB:.1f} MiB, over "
                                 f"--carry-mib {self.args.carry_mib:g}: the next run cannot carry all of --out")
                    room = min(room, self.args.carry_mib * MiB - used)
                kept = []
                for folder in self.unfinished_runs():
                    files = resume_files(folder)
                    size = sum(f.stat().st_size for f in files)
                    if size > room:
                        self.log(f"state: no room left for {folder.relative_to(self.work)} ({size / MiB:.1f} MiB, "
                                 f"{max(room, 0) / MiB:.1f} MiB left under --state-mib/--carry-mib): it restarts "
                                 "in the next run")
                        continue
                    kept, room = kept + files, room - size
                _tar(self.out / "gpu_state.tar.gz", self.work, kept)
            write_json(self.out / "gpu_summary.json", {"updated": now_utc(), "steps": self.records()})

    def unfinished_runs(self) -> list[Path]:
        """Run folders whose training has not finished: the recipe first, then the accuracy runs without a
        result in their own table's folder (and the shared stage-1 runs of tables that still have such runs)."""
        runs = []
        if self.record("recipe").get("status") != "done" and (self.state / "recipe").exists():
            runs.append(self.state / "recipe")
        for table in sorted(p for p in (self.state / "accuracy").glob("*") if p.is_dir()):
            done = {p.stem for p in (self.results / "accuracy" / table.name).glob("*.json")}
            rows = [p for p in sorted(table.iterdir()) if p.is_dir() and not p.name.startswith("stage1-")
                    and p.name not in done]
            if rows:
                runs += [p for p in sorted(table.glob("stage1-*")) if p.is_dir()] + rows
        return runs

    def record(self, name: str) -> dict:
        path = self.results / "steps" / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def records(self) -> dict:
        records = {step.name: self.record(step.name) for step in STEPS}
        return {name: {k: v for k, v in r.items() if k in ("status", "seconds", "note")} for name, r in records.items() if r}

    # ------------------------------------------------------------------ subprocesses
    def start(self, cmd: list[str], tag: str, env: dict | None = None, stdout_file: Path | None = None):
        self.log(f"$ {' '.join(cmd)}")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env or self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", process_group=0)   # its own group: stopped whole
        self.procs.append(proc)

        def pump():
            sink = open(stdout_file, "w") if stdout_file else None
            for line in proc.stdout:
                self.log(f"{tag} {line.rstrip()}")
                if sink:
                    sink.write(line)
            if sink:
                sink.close()
        proc.pump = threading.Thread(target=pump, daemon=True)
        proc.pump.start()
        return proc

    def wait(self, procs: list, timeout: float) -> bool:
        """Wait for all; pack the results every --pack-every seconds; stop them all at the timeout.
        Returns False if the timeout stopped them."""
        end, next_pack = time.monotonic() + timeout, time.monotonic() + self.args.pack_every
        while any(p.poll() is None for p in procs):
            if time.monotonic() >= end:
                self.log(f"time cap reached ({timeout:.0f}s): stopping {len([p for p in procs if p.poll() is None])} "
                         "process(es)")
                self.stop(procs)
                return False
            if time.monotonic() >= next_pack:
                self.pack(with_state=False)
                next_pack = time.monotonic() + self.args.pack_every
            time.sleep(0.2)
        for p in procs:
            p.pump.join(timeout=5)
        return True

    def stop(self, procs: list) -> None:
        """SIGTERM each process group, then SIGKILL whatever is left of them (children included)."""
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            for p in procs:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + grace
            while time.monotonic() < end and any(p.poll() is None for p in procs):
                time.sleep(0.1)

    def run(self, cmd: list[str], timeout: float, tag: str, stdout_file: Path | None = None,
            env: dict | None = None) -> int | None:
        """Run one command to its end or its timeout; returns its exit code, None if stopped at the timeout."""
        proc = self.start(cmd, tag, env=env, stdout_file=stdout_file)
        return proc.returncode if self.wait([proc], timeout) else None


def resume_files(run_dir: Path) -> list[Path]:
    """The files a run folder needs to resume: all but the optimizer state of a stage that has finished."""
    finished = {p.stem for p in run_dir.glob("stage?.json") if json.loads(p.read_text()).get("finished")}
    return [f for f in sorted(run_dir.rglob("*")) if f.is_file()
            and not (f.name.endswith(".resume.safetensors") and f.name.split("-")[0] in finished)]


def _tar(path: Path, base: Path, files: list[Path]) -> None:
    """gzip tarball of `files` (named relative to `base`), skipping temp files and files that vanish while it
    is written; written beside `path` and moved into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w:gz", compresslevel=3) as tar:
        for file in files:
            if not file.is_file() or file.suffix in (".tmp", ".lock") \
                    or any(part.startswith(".") for part in file.relative_to(base).parts):
                continue          # temp files, locks, and hidden staging folders (an export cut off)
            try:
                data, mtime = file.read_bytes(), file.stat().st_mtime
            except FileNotFoundError:
                continue
            info = tarfile.TarInfo(str(file.relative_to(base)))
            info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- the steps
def nvidia_smi(timeout: float | None = None) -> str:
    """nvidia-smi's report, or one line saying why there is none: a missing, failing or hanging nvidia-smi is
    noted in env.json, never a reason to fail the step (torch's own probe says whether CUDA works)."""
    if not shutil.which("nvidia-smi"):
        return "not run: no nvidia-smi on PATH"
    timeout = NVIDIA_SMI_TIMEOUT_S if timeout is None else timeout
    try:
        with tempfile.TemporaryFile("w+", errors="replace") as out:    # a file, not a pipe: nothing can block
            proc = subprocess.Popen(["nvidia-smi"], stdout=out, stderr=subprocess.STDOUT, text=True,
                                    process_group=0)
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return f"failed: no answer in {timeout:g}s (stopped)"
            out.seek(0)
            text = out.read()
    except OSError as exc:
        return f"failed: {type(exc).__name__}: {exc}"
    return text if rc == 0 else f"failed: exit code {rc}: {text.strip()[-500:]}"


def step_env(s: Session, timeout: float) -> dict:
    probe = ("import json, os, platform, sys\n"
             "info = {'python': sys.version.split()[0], 'platform': platform.platform(), 'cpu_count': os.cpu_count()}\n"
             "for name in ('torch', 'torchvision', 'onnx', 'onnxscript', 'onnxruntime', 'safetensors', 'numpy', "
             "'pytest'):\n"
             "    try:\n"
             "        info[name] = __import__(name).__version__\n"
             "    except Exception as exc:\n"
             "        info[name] = f'missing: {type(exc).__name__}: {exc}'\n"
             "import torch\n"
             "cuda = torch.cuda.is_available()\n"
             "p = torch.cuda.get_device_properties(0) if cuda else None\n"
             "info.update({'cuda_available': cuda, 'torch_cuda': torch.version.cuda, 'device': p.name if p else 'cpu', "
             "'capability': list(torch.cuda.get_device_capability(0)) if cuda else None, "
             "'memory_gib': round(p.total_memory / 2**30, 1) if p else None})\n"
             "print(json.dumps(info))")
    out = s.results / "env.txt"
    rc = s.run([s.python, "-c", probe], timeout, "[env]", stdout_file=out)
    if rc != 0:
        return {"status": "failed", "returncode": rc}
    env = json.loads(out.read_text().strip().splitlines()[-1])
    env["nvidia_smi"] = nvidia_smi()
    if env["nvidia_smi"].startswith(("failed", "not run")):
        s.log(f"env: nvidia-smi {env['nvidia_smi']}")
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    env["git_commit"] = env["git_commit"] or s.args.commit      # no .git on the machine: what --check saw
    write_json(s.results / "env.json", env)
    out.unlink()
    if not s.args.dry_run and not env["cuda_available"]:
        return {"status": "failed", "note": "no CUDA device: run with --dry-run on a CPU machine", **env}
    return {"status": "done", "device": env["device"]}


def _pytest(s: Session, timeout: float, name: str, files: list[str], select: str) -> dict:
    """pytest -m cuda on `files` with `-k select`; the report in <name>.txt / <name>.xml. nccl on one machine
    with loopback only: its sockets on lo, no InfiniBand probing. The machine's own pytest plugins (cov,
    hypothesis, xdist, ...) are not loaded: these tests use none, and each costs start-up time."""
    env = dict(s.env, NCCL_SOCKET_IFNAME=s.env.get("NCCL_SOCKET_IFNAME", "lo"),
               NCCL_IB_DISABLE=s.env.get("NCCL_IB_DISABLE", "1"), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    cmd = [s.python, "-m", "pytest", "-m", "cuda", *files, "-k", select, "-v", "-rA", "-p", "no:cacheprovider",
           f"--junitxml={s.results / f'{name}.xml'}"]
    rc = s.run(cmd, timeout, f"[{name}]", stdout_file=s.results / f"{name}.txt", env=env)
    if rc is None:
        return {"status": "failed" if name == "cuda-nccl" else "partial",
                "note": f"stopped at its time cap ({timeout:.0f}s)" + (": hung?" if name == "cuda-nccl" else "")}
    summary = ((s.results / f"{name}.txt").read_text().strip().splitlines() or [""])[-1]
    ran = s.args.dry_run or "passed" in summary or "failed" in summary    # on a GPU, all skipped is a failure
    return {"status": "done" if rc == 0 and ran else "failed", "returncode": rc, "summary": summary}


def step_cuda_tests(s: Session, timeout: float) -> dict:
    return _pytest(s, timeout, "cuda-tests", CUDA_TESTS, f"not {NCCL_TESTS}")


def step_cuda_nccl(s: Session, timeout: float) -> dict:
    """The torchrun + nccl test alone: where nccl hangs, only this step's short cap is lost."""
    return _pytest(s, timeout, "cuda-nccl", CUDA_TESTS[:1], NCCL_TESTS)


def bench_command(s: Session, out: Path, compile: bool = False) -> list[str]:
    """bench_stage1.py's command line. Compiled: batch 512 only (each new shape compiles again), few steps."""
    if s.args.dry_run:
        sizes = ["--devices", "cpu", "--batch", "8", "--steps", "1", "--warmup", "1"]
    elif compile:
        sizes = ["--devices", "cuda", "--batch", "512", "--steps", "10", "--warmup", "3"]
    else:
        sizes = ["--devices", "cuda", "--batch", "512", "4096", "--steps", "20", "--warmup", "5"]
    return [s.python, "benchmarks/bench_stage1.py", *sizes, "--json", str(out), *(["--compile"] if compile else [])]


def step_bench(s: Session, timeout: float, compile: bool = False) -> dict:
    out = s.results / f"bench_stage1{'_compile' if compile else ''}.json"
    rc = s.run(bench_command(s, out, compile), timeout, "[bench]")
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    status = "done" if rc == 0 else "partial" if rc is None and rows else "failed"
    return {"status": status, "returncode": rc, "rows": rows}


def data_sets(s: Session) -> list[str]:
    return [f"data.root='{s.data_root}'", *(DRY_SETS if s.args.dry_run else []), *s.args.overrides]


def remove_staging(folder: Path) -> list[str]:
    """Delete the hidden folders an export leaves beside its --out when it is killed (`.NAME.new-*`,
    `.NAME.old-*`); returns their names."""
    gone = []
    for path in sorted(folder.glob(".*")) if folder.exists() else []:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path.name)
    return gone


def step_recipe(s: Session, timeout: float) -> dict:
    end = time.monotonic() + timeout
    run_dir, model_dir = s.state / "recipe", s.results / "models" / MODEL_NAME
    staged = s.work / "export" / MODEL_NAME     # exported outside gpu-results, moved in once whole
    cmd = [s.python, "-m", "tailwise", "train", "--config", s.args.recipe, "--device", s.device, "--out", str(run_dir),
           "--no-progress", "--set", f"data.imbalance_factor={s.args.imbalance_factor}"]
    for item in data_sets(s):
        cmd += ["--set", item]
    if (run_dir / "stage1.json").exists():
        cmd.append("--resume")
    rc = s.run(cmd, end - time.monotonic(), "[recipe]")
    info = {"run": summarize_run(run_dir)}
    if rc is None:
        return {"status": "partial", "note": "stopped at its time cap; resumes from its checkpoint", **info}
    if rc != 0:
        return {"status": "failed", "returncode": rc, **info}
    for folder in (model_dir, staged):
        if folder.exists():
            shutil.rmtree(folder)
    for folder in (model_dir.parent, staged.parent):
        for name in remove_staging(folder):
            s.log(f"recipe: removed {name}, left by an export that was cut off")
    export = [s.python, "-m", "tailwise", "export", str(run_dir), "--out", str(staged), "--variants", "int8",
              "--samples", "1"]
    rc = s.run(export, max(1.0, end - time.monotonic()), "[export]")
    keep = s.results / "recipe"
    if keep.exists():
        shutil.rmtree(keep)
    shutil.copytree(run_dir, keep, ignore=shutil.ignore_patterns("*.safetensors", "*.tmp"))
    info["run"] = summarize_run(run_dir)
    if rc is None or not (staged / "model.onnx").exists():
        return {"status": "partial" if rc is None else "failed", "note": "trained, export did not finish", **info}
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, model_dir)
    parity = json.loads((model_dir / "card.json").read_text())["export"]["parity"]
    return {"status": "done", "model": f"models/{MODEL_NAME}", "export_returncode": rc, "parity": parity, **info}


def summarize_run(run_dir: Path) -> dict:
    """Per stage: epochs done, seconds, images/s (what the next run's plan needs); test and validation numbers."""
    info = {}
    for stage in (1, 2):
        path = run_dir / f"stage{stage}_metrics.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        if lines:
            seconds = sum(x["seconds"] for x in lines)
            info[f"stage{stage}"] = {"epochs": len(lines), "seconds": round(seconds, 1),
                                     "images_per_second": round(sum(x["images"] for x in lines) / seconds, 1)}
    card = run_dir / "stage2.json"
    if card.exists():
        card = json.loads(card.read_text())
        la = card.get("logit_adjustment") or {}
        info["val"] = {k: v for k, v in card.get("metrics", {}).items() if k.startswith("val_")}
        if la:
            info["val"]["logit_adjusted_mean_per_class"] = la["val_mean_per_class"][str(float(la["tau"]))]
            info["val"]["tau"] = la["tau"]
        test = card.get("test") or {}
        info["test"] = {k: test.get(k) for k in ("top1", "many", "medium", "few")}
        if "logit_adjusted" in test:
            info["test"]["logit_adjusted"] = {k: test["logit_adjusted"][k] for k in ("top1", "many", "medium", "few")}
        info["hardware"] = (card.get("training") or {}).get("hardware")
    return info


def expected_runs(s: Session, seeds: list[int]) -> list[str]:
    methods = tomllib.loads((REPO / "experiments" / "methods.toml").read_text())
    names = list(methods) if s.args.acc_methods == "all" else s.args.acc_methods.split(",")
    return [f"{name}-s{seed}" for seed in seeds for name in names if "run" not in methods[name]]


def table_folder(s: Session, budget: int) -> Path:
    """The folder experiments/accuracy.py writes this table's results into (its own naming rule)."""
    from accuracy import results_dir      # experiments/accuracy.py, beside this file

    return results_dir(argparse.Namespace(recipe=s.args.recipe, imbalance_factor=s.args.imbalance_factor,
                                          budget=budget, results=str(s.results / "accuracy"),
                                          overrides=s.args.overrides))


def started_at(s: Session, budget: int) -> bool:
    """Whether a previous run made progress on the table at `budget`: a finished row, or a row's checkpoints
    carried in the state."""
    folder = table_folder(s, budget)
    return any(folder.glob("*.json")) or any(
        p.is_dir() and not p.name.startswith("stage1-") for p in (s.state / "accuracy" / folder.name).glob("*"))


def choose_budget(s: Session, left: float) -> tuple[int | None, str]:
    """The largest budget in BUDGETS whose first seed fits in `left` seconds, from the bench step's CE
    images/s: a rough estimate (a run also spends ~15 s on start-up and evaluation). A table a previous run
    made progress on keeps its budget; None when not even the smallest budget fits: better not started than
    started at a budget chosen only because little time was left (later runs would have to keep it)."""
    if s.args.acc_budget != "auto":
        return int(s.args.acc_budget), "given"
    previous = s.record("accuracy")
    if previous.get("budget") and previous.get("status") != "done" and started_at(s, previous["budget"]):
        return previous["budget"], "kept: a previous run started the table at this budget"
    if s.args.dry_run:
        return 1, "dry run"
    rows = [r for r in s.record("bench").get("rows", []) if r["device_type"] == "cuda" and r["batch"] == 512]
    if not rows:
        return BUDGETS[0], "no throughput measured: the goal"
    from tailwise.training.data import build_lt_data

    n_lt = len(build_lt_data("fmnist", root=s.data_root, imbalance_factor=s.args.imbalance_factor).train_idx)
    runs = len(expected_runs(s, s.args.acc_seeds[:1]))
    rate = rows[0]["ce_images_per_s"] * min(s.args.workers, 4) * 0.5      # processes share one GPU: not linear
    for budget in BUDGETS:
        seconds = runs * budget * n_lt * 1.25 / rate + runs / s.args.workers * 15
        if seconds <= left:
            return budget, f"estimated {seconds:.0f}s for seed {s.args.acc_seeds[0]} at {rate:.0f} images/s in all"
    return None, (f"too little time: even budget {BUDGETS[-1]} needs about {seconds:.0f}s for seed "
                  f"{s.args.acc_seeds[0]}, {max(left, 0):.0f}s left; left to a run with more time")


def step_accuracy(s: Session, timeout: float) -> dict:
    budget, why = choose_budget(s, timeout - 45)     # the workers stop 30 s early, for the table
    if budget is None:
        return {"status": "not-started", "note": why}
    seeds = s.args.acc_seeds
    s.log(f"accuracy: budget {budget} ({why}), seeds {seeds}, {s.args.workers} worker(s)")
    results = s.results / "accuracy"
    folder = table_folder(s, budget)
    common = ["--recipe", s.args.recipe, "--imbalance-factor", f"{s.args.imbalance_factor:g}", "--budget",
              str(budget), "--results", str(results)]
    cmd = [s.python, "experiments/accuracy.py", "run", *common, "--seeds", *map(str, seeds), "--device", s.device,
           "--workdir", str(s.state / "accuracy"), "--methods", s.args.acc_methods, "--no-progress"]
    for item in data_sets(s):
        cmd += ["--set", item]
    before = {p.stem for p in folder.glob("*.json")}
    workers = []
    for w in range(s.args.workers):
        env = dict(s.env, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // s.args.workers)))
        workers.append(s.start(cmd, f"[acc w{w}]", env=env))
        if w + 1 < s.args.workers:
            time.sleep(2)      # each claims a different run
    finished = s.wait(workers, timeout - 30)
    table = [s.python, "experiments/accuracy.py", "table", *common]
    for item in s.args.overrides:      # the table reads those that name the results folder
        table += ["--set", item]
    s.run(table, 30, "[table]", stdout_file=results / f"table-{folder.name}.md")
    want = expected_runs(s, seeds)
    have = sorted(p.stem for p in folder.glob("*.json"))
    speeds = {}
    for name in have:
        r = json.loads((folder / f"{name}.json").read_text())
        speeds[name] = round(r["image_passes"] / max(r["seconds_this_session"], 1e-9), 1)
    s.log(f"accuracy: {len(set(want) & set(have))}/{len(want)} runs have results; image passes/s per run "
          f"(whole run, GPU shared): {speeds}")
    complete = set(want) <= set(have)
    crashed = [w.returncode for w in workers if w.returncode]
    # failed only when a worker crashed and nothing new was finished: a table that moves on is partial
    failed = bool(finished and not complete and crashed and not set(have) - before)
    return {"status": "done" if complete else "failed" if failed else "partial", "budget": budget,
            "budget_reason": why, "seeds": seeds, "runs_done": len(set(want) & set(have)), "runs_wanted": len(want),
            "worker_returncodes": [w.returncode for w in workers],
            "image_passes_per_second": speeds, "results": str(folder.relative_to(s.results))}


STEP_FUNCTIONS = {"env": step_env, "cuda-tests": step_cuda_tests, "cuda-nccl": step_cuda_nccl, "bench": step_bench,
                  "bench-compile": lambda s, timeout: step_bench(s, timeout, compile=True), "recipe": step_recipe,
                  "accuracy": step_accuracy}


# ---------------------------------------------------------------------------------------------- main
def missing_data(data: Path) -> list[str]:
    return [name for name in FMNIST_FILES if not (data / name).is_file()]


def resolve_data(s: Session) -> str | None:
    """The Fashion-MNIST folder runs read, or None when --data lacks a file (the steps that read it are then
    not started; the others run). On a GPU machine without the Debian package, the carried folder
    is linked to the Debian path, so trained cards and the exported model name the path every other
    machine has (`tailwise export` / the tests rebuild the data from a card)."""
    data = Path(s.args.data).resolve()
    missing = missing_data(data)
    if missing:
        s.log(f"data: --data {data} lacks {', '.join(missing)}: "
              f"{', '.join(step.name for step in STEPS if step.needs_data)} will not start")
        return None
    if s.args.dry_run or data == DEBIAN_FMNIST.resolve():
        return str(data)
    if not DEBIAN_FMNIST.exists():
        try:
            DEBIAN_FMNIST.parent.mkdir(parents=True, exist_ok=True)
            DEBIAN_FMNIST.symlink_to(data, target_is_directory=True)
        except OSError as exc:
            s.log(f"data: could not link {DEBIAN_FMNIST} -> {data} ({exc}); cards will name {data}")
    same = DEBIAN_FMNIST.exists() and all(
        (DEBIAN_FMNIST / n).exists() and (DEBIAN_FMNIST / n).stat().st_size == (data / n).stat().st_size
        for n in FMNIST_FILES)
    return str(DEBIAN_FMNIST) if same else str(data)


# ---------------------------------------------------------------------------------------------- --check
def tree_bytes(repo: Path) -> int:
    """What the device tool sends of a checkout besides the carried folders: tracked files and untracked ones
    git does not ignore (and shared/, when there is one)."""
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    files = {repo / name for name in listed if name}
    if (repo / "shared").is_dir():
        files |= set((repo / "shared").rglob("*"))
    return sum(f.lstat().st_size for f in files if f.is_file() or f.is_symlink())


def folder_bytes(folder: Path) -> int:
    return sum(f.lstat().st_size for f in folder.rglob("*") if f.is_file() or f.is_symlink())


def carry_plan(repo: Path, data: Path, state: Path | None, limit_mib: float = CARRY_LIMIT_MIB) -> dict:
    """What a device run would carry in from `repo`: the tree, the data folder and the state folder, with their
    sizes in MiB, the room left for the run's --out (the next run carries it back in as its state) and the
    problems that would waste the lease. Carried folders are paths inside `repo`, ignored by git."""
    problems, carry, sizes = [], [], {}
    repo = repo.resolve()
    try:
        sizes["tree (tracked and untracked files)"] = tree_bytes(repo) / MiB
    except (OSError, subprocess.CalledProcessError) as exc:
        problems.append(f"cannot list the files of {repo} with git: {exc}")
    for label, folder in (("--data", data), ("--state", state)):
        if folder is None:
            continue
        folder = folder.resolve()
        if not folder.is_dir():
            problems.append(f"{label} {folder} is not a folder")
            continue
        if not folder.is_relative_to(repo):
            problems.append(f"{label} {folder} is outside the repository {repo}: the device tool carries only "
                            "paths inside it; copy it there (into an ignored folder)")
            continue
        rel = folder.relative_to(repo).as_posix()
        ignored = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", rel]).returncode == 0
        if ignored:       # an ignored path travels only when carried; an unignored one is in the tree already
            carry.append(rel)
            sizes[rel] = folder_bytes(folder) / MiB
        if label == "--data" and missing_data(folder):
            problems.append(f"--data {rel} lacks {', '.join(missing_data(folder))}")
        if label == "--state" and not (folder / "gpu_results.tar.gz").is_file():
            problems.append(f"--state {rel} holds no gpu_results.tar.gz: copy the files a run returned into it")
    total = sum(sizes.values())
    state_rel = state.resolve().relative_to(repo).as_posix() if state is not None and state.resolve().is_relative_to(
        repo) else None
    room = limit_mib - total + sizes.get(state_rel, 0)      # the run's --out replaces the state next time
    if total > limit_mib:
        problems.append(f"{total:.1f} MiB to carry, over the {limit_mib:g} MiB kept under the tool's 64 MiB limit: "
                        + ("drop gpu_state.tar.gz from the state folder (unfinished training restarts), or "
                           if state is not None else "") + "carry less")
    elif room < 5:
        problems.append(f"only {room:.1f} MiB left for what the run returns (its state next time); carry less")
    return {"carry": carry, "sizes_mib": {k: round(v, 1) for k, v in sizes.items()}, "total_mib": round(total, 1),
            "limit_mib": limit_mib, "out_room_mib": round(room, 1), "problems": problems}


def strip_options(argv: list[str], names: set[str], flags: set[str]) -> list[str]:
    """argv without the options in `names` (with their values, `--x v` or `--x=v`) and the flags in `flags`."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in flags:
            continue
        elif word in names:
            skip = True
        elif not word.split("=", 1)[0] in names:
            kept.append(word)
    return kept


def check(args, argv: list[str], repo: Path = REPO) -> int:
    """--check: nothing runs; prints the device tool's `run` call for this checkout, or what is wrong."""
    repo, data = repo.resolve(), Path(args.data)
    state = Path(args.state) if args.state else (repo / "gpu-state" if (repo / "gpu-state").is_dir() else None)
    plan = carry_plan(repo, data, state)
    timeout_s = math.ceil(args.minutes * 60 + 60)     # the script stops itself; a minute for start-up and packing
    if timeout_s > 600:
        plan["problems"].append(f"--minutes {args.minutes:g} does not fit one run call (at most 600 s with a "
                                "minute to spare): at most 9")
    sizes = " + ".join(f"{name} {size:.1f} MiB" for name, size in plan["sizes_mib"].items())
    print(f"carried: {sizes} = {plan['total_mib']:.1f} MiB of {plan['limit_mib']:g} MiB (the tool's limit is 64)")
    if plan["problems"]:
        for problem in plan["problems"]:
            print(f"gpu_run --check: {problem}", file=sys.stderr)
        return 1
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        commit += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = None
    rel = {"data": data.resolve().relative_to(repo).as_posix(),
           "state": state.resolve().relative_to(repo).as_posix() if state else None}
    words = ["bash", "experiments/gpu_run.sh", "--data", rel["data"], "--out", "$OUT"]
    if rel["state"]:
        words += ["--state", rel["state"]]
    words += ["--carry-mib", f"{plan['out_room_mib']:g}"] + (["--commit", commit] if commit else [])
    words += strip_options(argv, {"--data", "--out", "--state", "--carry-mib", "--commit", "--work", "--python"},
                           {"--check"})
    command = " ".join('"$OUT"' if w == "$OUT" else shlex.quote(w) for w in words)
    print(f"its --out may hold {plan['out_room_mib']:.1f} MiB (--carry-mib): copy what it returns into "
          f"{rel['state'] or 'gpu-state'}/ for the next run")
    print("paste this call of the device tool's `run`:")
    print(json.dumps({"carry": plan["carry"], "timeout_s": timeout_s, "command": command}))
    return 0


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true",
                   help="run nothing: check here that the carried folders exist and fit, print the `run` call")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help=f"folder with the four Fashion-MNIST .gz files (default {DEFAULT_DATA})")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu" / "out"),
                   help="output folder (default $OUT, else runs/gpu/out)")
    p.add_argument("--state", default=os.environ.get("GPU_STATE"),
                   help="files of a previous --out to continue from (default $GPU_STATE; --check: gpu-state/ "
                        "when it exists)")
    p.add_argument("--work", default=str(REPO / "runs" / "gpu" / "work"),
                   help="local working folder (default runs/gpu/work)")
    p.add_argument("--minutes", type=float, default=8.0, help="total budget in minutes (default 8)")
    p.add_argument("--steps", default=DEFAULT_STEPS, help=f"comma list of steps to run (default {DEFAULT_STEPS}; "
                   "bench-compile, the same bench with torch.compile, only when named)")
    p.add_argument("--redo", default="", help="comma list of steps to run again even if finished or failed")
    p.add_argument("--max-failures", type=int, default=2,
                   help="a step that failed this many runs in a row is skipped until --redo names it (default 2)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, same steps and output layout")
    p.add_argument("--recipe", default="fmnist-lt-r32")
    p.add_argument("--imbalance-factor", type=float, default=100)
    p.add_argument("--acc-budget", default="auto", help="accuracy-table budget, or auto (default)")
    p.add_argument("--acc-seeds", type=int, nargs="+", help="default 0 1 2 (dry run: 0)")
    p.add_argument("--acc-methods", help="comma list of methods.toml names (default all; dry run: ce)")
    p.add_argument("--workers", type=int, help="accuracy-table processes sharing the GPU (default 4; dry run: 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the recipe and the accuracy runs (repeatable)")
    p.add_argument("--pack-every", type=float, default=60, help="seconds between refreshes of the results tarball")
    p.add_argument("--state-mib", type=float, default=15, help="cap on gpu_state.tar.gz's contents (default 15)")
    p.add_argument("--carry-mib", type=float, default=20,
                   help="cap on the four --out files together, which the next run carries in: the state gives way "
                        "(default 20; --check prints the room this checkout leaves)")
    p.add_argument("--commit", help="the commit the tree is at, recorded when git cannot tell (--check passes it)")
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)
    unknown = set(args.steps.split(",")) - {step.name for step in STEPS}
    if unknown:
        p.error(f"--steps: unknown {', '.join(sorted(unknown))}; known: {', '.join(step.name for step in STEPS)}")
    for name, normal, dry in (("acc_seeds", [0, 1, 2], [0]), ("acc_methods", "all", "ce"), ("workers", 4, 1)):
        if getattr(args, name) is None:
            setattr(args, name, dry if args.dry_run else normal)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.check:
        return check(args, argv)
    s = Session(args)
    if args.state:
        s.restore(Path(args.state))
    s.log(f"gpu_run {'(dry run, CPU) ' if args.dry_run else ''}started {now_utc()}: budget {args.minutes:g} min, "
          f"out {s.out}, work {s.work}, state {args.state or '-'}")

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)      # one is enough (timeout(1) sends two): now pack
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    wanted, redo = set(args.steps.split(",")), set(filter(None, args.redo.split(",")))
    try:
        s.data_root = resolve_data(s)
        s.log(f"data: {s.data_root or '-'}")
        for step in STEPS:
            previous = s.record(step.name)
            if step.name not in wanted:
                continue
            failures = previous.get("failures", 1 if previous.get("status") == "failed" else 0)
            if step.name not in redo and previous.get("status") == "done":
                s.log(f"== {step.name}: skipped (done in an earlier run)")
                continue
            if step.name not in redo and failures >= args.max_failures:
                s.log(f"== {step.name}: skipped (failed in the last {failures} runs; --redo {step.name} tries again)")
                continue
            if step.needs_data and s.data_root is None:
                s.log(f"== {step.name}: not started, no data (--data {args.data})")
                if previous.get("status") in (None, "not-started"):
                    write_json(s.results / "steps" / f"{step.name}.json",
                               {"status": "not-started", "note": f"no data: --data {args.data} lacks files"})
                continue
            left = s.left()
            if left < step.min_left_s:
                s.log(f"== {step.name}: not started, {max(left, 0):.0f}s left of the budget")
                if not previous:
                    write_json(s.results / "steps" / f"{step.name}.json", {"status": "not-started"})
                continue
            timeout = min(step.cap_s, left)
            s.log(f"== {step.name}: started (cap {timeout:.0f}s)"
                  + (f", try {failures + 1} after {failures} failure(s)" if failures else ""))
            t0, started = time.monotonic(), now_utc()
            try:
                result = STEP_FUNCTIONS[step.name](s, timeout)
            except Exception as exc:        # a broken step must not cost the steps after it
                result = {"status": "failed", "note": f"{type(exc).__name__}: {exc}"}
            seconds = round(time.monotonic() - t0, 1)
            result.update(step=step.name, seconds=seconds, started=started, finished=now_utc(),
                          attempts=previous.get("attempts", 0) + 1,
                          failures=failures + 1 if result["status"] == "failed" else 0,
                          total_seconds=round(previous.get("total_seconds", 0) + seconds, 1))
            write_json(s.results / "steps" / f"{step.name}.json", result)
            s.log(f"== {step.name}: {result['status']} in {seconds:.0f}s"
                  + (f" ({result['note']})" if result.get("note") else ""))
            s.pack()
            if step.name == "env" and result.get("cuda_available") is False and not args.dry_run:
                s.log("no CUDA device: the other steps are not started")
                break
    except KeyboardInterrupt as exc:
        s.log(f"interrupted ({exc}): packing what is finished")
        s.stop(s.procs)
    finally:
        s.pack()
        s.log(f"gpu_run finished {now_utc()}: " + ", ".join(f"{k} {v.get('status', '-')}" for k, v in s.records().items()))
        s.pack(with_state=False)   # the log line above is in gpu_run.log; the summary is current
    return 0


if __name__ == "__main__":
    sys.exit(main())
