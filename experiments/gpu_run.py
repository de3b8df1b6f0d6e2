"""One prepared GPU session: everything tailwise needs a GPU for, in order of value, inside a time budget.

    experiments/gpu_run.sh --data data/fashion-mnist --out "$OUT"                      # first run
    experiments/gpu_run.sh --data data/fashion-mnist --out "$OUT" --state gpu-state    # continue a previous one
    experiments/gpu_run.sh --dry-run --data FIXTURE --out /tmp/out --imbalance-factor 10   # the same on CPU, tiny

Steps (each skipped when a previous run finished it; see --state):
  env         python, torch, GPU name and memory, nvidia-smi                       -> env.json
  cuda-tests  pytest -m cuda tests/test_cuda.py tests/test_engine.py               -> cuda-tests.xml / .txt
  bench       stage-1 throughput, BNS vs CE, fraction of bf16 peak                 -> bench_stage1.json
  (bench-compile, only when named in --steps: the same with torch.compile          -> bench_stage1_compile.json)
  recipe      fmnist-lt-r32 (100 BNS epochs, then IP-DPP) trained, evaluated, exported
                                                                                   -> recipe/, models/<name>/
  accuracy    the accuracy table at the largest budget that fits (200 is the goal), --workers processes
              sharing the GPU                                                      -> accuracy/

Everything lands in --out, as at most four files (a device machine returns few files):
  gpu_run.log           everything printed, appended to the log of the runs before
  gpu_results.tar.gz    gpu-results/: one steps/<step>.json per step (status, seconds, numbers) plus each
                        step's files; refreshed after every step and every --pack-every seconds
  gpu_state.tar.gz      checkpoints of unfinished training, only to continue (capped at --state-mib)
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
import os
import shutil
import signal
import subprocess
import sys
import tarfile
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
RESERVE_S = 25            # kept back from the budget for the final packing
BUDGETS = (200, 100, 50, 20, 10, 4)
# The dry run: the same steps at a size a 2-core CPU does in seconds (on a tiny Fashion-MNIST-format fixture).
DRY_SETS = ["stage1.epochs=1", "stage2.epochs=1", "stage1.batch_size=32", "stage2.batch_size=16",
            "stage1.warmup_epochs=1", "stage2.warmup_epochs=0", "model.proj_hidden=64", "model.proj_dim=32",
            "data.val_per_class=5"]


@dataclass
class Step:
    name: str
    cap_s: float        # the longest this step may run
    min_left_s: float   # not started with less than this left of the whole budget


STEPS = (Step("env", 60, 5), Step("cuda-tests", 270, 60), Step("bench", 120, 30), Step("bench-compile", 180, 60),
         Step("recipe", 360, 60), Step("accuracy", 1e9, 60))
DEFAULT_STEPS = "env,cuda-tests,bench,recipe,accuracy"     # bench-compile only when asked for


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
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self.python = args.python
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
        """Refresh the files in --out; each is replaced atomically."""
        with self.lock:
            _tar(self.out / "gpu_results.tar.gz", self.work, sorted(self.results.rglob("*")))
            if with_state:
                kept, room = [], self.args.state_mib * 2**20
                for folder in self.unfinished_runs():
                    files = resume_files(folder)
                    size = sum(f.stat().st_size for f in files)
                    if size > room:
                        print(f"state: no room left under --state-mib for {folder.relative_to(self.work)}")
                        continue
                    kept, room = kept + files, room - size
                _tar(self.out / "gpu_state.tar.gz", self.work, kept)
            write_json(self.out / "gpu_summary.json", {"updated": now_utc(), "steps": self.records()})

    def unfinished_runs(self) -> list[Path]:
        """Run folders whose training has not finished (recipe first, then the accuracy runs)."""
        runs = []
        if self.record("recipe").get("status") != "done" and (self.state / "recipe").exists():
            runs.append(self.state / "recipe")
        acc = self.state / "accuracy"
        if acc.exists():
            done = {p.stem for p in (self.results / "accuracy").rglob("*.json")}
            runs += [p for p in sorted(acc.glob("*/*")) if p.is_dir() and p.name not in done]
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

    def run(self, cmd: list[str], timeout: float, tag: str, stdout_file: Path | None = None) -> int | None:
        """Run one command to its end or its timeout; returns its exit code, None if stopped at the timeout."""
        proc = self.start(cmd, tag, stdout_file=stdout_file)
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
            if not file.is_file() or file.name.endswith(".tmp") or file.suffix == ".lock":
                continue
            try:
                data, mtime = file.read_bytes(), file.stat().st_mtime
            except FileNotFoundError:
                continue
            info = tarfile.TarInfo(str(file.relative_to(base)))
            info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- the steps
def step_env(s: Session, timeout: float) -> dict:
    probe = ("import json, os, platform, sys, torch, torchvision, onnx, onnxruntime\n"
             "cuda = torch.cuda.is_available()\n"
             "p = torch.cuda.get_device_properties(0) if cuda else None\n"
             "print(json.dumps({'python': sys.version.split()[0], 'platform': platform.platform(), "
             "'cpu_count': os.cpu_count(), 'torch': torch.__version__, 'torchvision': torchvision.__version__, "
             "'onnx': onnx.__version__, 'onnxruntime': onnxruntime.__version__, 'cuda_available': cuda, "
             "'torch_cuda': torch.version.cuda, 'device': p.name if p else 'cpu', "
             "'capability': list(torch.cuda.get_device_capability(0)) if cuda else None, "
             "'memory_gib': round(p.total_memory / 2**30, 1) if p else None}))")
    out = s.results / "env.txt"
    rc = s.run([s.python, "-c", probe], timeout, "[env]", stdout_file=out)
    if rc != 0:
        return {"status": "failed", "returncode": rc}
    env = json.loads(out.read_text().strip().splitlines()[-1])
    if shutil.which("nvidia-smi"):
        env["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except OSError:
        env["git_commit"] = None
    write_json(s.results / "env.json", env)
    out.unlink()
    if not s.args.dry_run and not env["cuda_available"]:
        return {"status": "failed", "note": "no CUDA device: run with --dry-run on a CPU machine", **env}
    return {"status": "done", "device": env["device"]}


def step_cuda_tests(s: Session, timeout: float) -> dict:
    cmd = [s.python, "-m", "pytest", "-m", "cuda", *CUDA_TESTS, "-v", "-rA", "-p", "no:cacheprovider",
           f"--junitxml={s.results / 'cuda-tests.xml'}"]
    rc = s.run(cmd, timeout, "[cuda-tests]", stdout_file=s.results / "cuda-tests.txt")
    if rc is None:
        return {"status": "partial", "note": "stopped at its time cap"}
    summary = ((s.results / "cuda-tests.txt").read_text().strip().splitlines() or [""])[-1]
    ran = s.args.dry_run or "passed" in summary or "failed" in summary    # on a GPU, all skipped is a failure
    return {"status": "done" if rc == 0 and ran else "failed", "returncode": rc, "summary": summary}


def step_bench(s: Session, timeout: float, compile: bool = False) -> dict:
    out = s.results / f"bench_stage1{'_compile' if compile else ''}.json"
    sizes = ["--devices", "cpu", "--batch", "8", "--steps", "1", "--warmup", "1"] if s.args.dry_run else \
        ["--devices", "cuda", "--batch", "512", "4096", "--steps", "20", "--warmup", "5"]
    cmd = [s.python, "benchmarks/bench_stage1.py", *sizes, "--json", str(out), *(["--compile"] if compile else [])]
    rc = s.run(cmd, timeout, "[bench]")
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    status = "done" if rc == 0 else "partial" if rc is None and rows else "failed"
    return {"status": status, "returncode": rc, "rows": rows}


def data_sets(s: Session) -> list[str]:
    return [f"data.root='{s.data_root}'", *(DRY_SETS if s.args.dry_run else []), *s.args.overrides]


def step_recipe(s: Session, timeout: float) -> dict:
    end = time.monotonic() + timeout
    run_dir, model_dir = s.state / "recipe", s.results / "models" / MODEL_NAME
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
    if model_dir.exists():
        shutil.rmtree(model_dir)
    export = [s.python, "-m", "tailwise", "export", str(run_dir), "--out", str(model_dir), "--variants", "int8",
              "--samples", "1"]
    rc = s.run(export, max(1.0, end - time.monotonic()), "[export]")
    keep = s.results / "recipe"
    if keep.exists():
        shutil.rmtree(keep)
    shutil.copytree(run_dir, keep, ignore=shutil.ignore_patterns("*.safetensors", "*.tmp"))
    info["run"] = summarize_run(run_dir)
    if rc is None or not (model_dir / "model.onnx").exists():
        return {"status": "partial" if rc is None else "failed", "note": "trained, export did not finish", **info}
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


def choose_budget(s: Session, left: float) -> tuple[int, str]:
    """The largest budget in BUDGETS whose first seed fits in `left` seconds, from the bench step's CE
    images/s: a rough estimate (a run also spends ~15 s on start-up and evaluation)."""
    if s.args.acc_budget != "auto":
        return int(s.args.acc_budget), "given"
    previous = s.record("accuracy")
    if previous.get("budget") and previous.get("status") != "done":
        return previous["budget"], "kept from the previous run, which did not finish the table"
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
    return BUDGETS[-1], "the smallest: even it may not fit"


def step_accuracy(s: Session, timeout: float) -> dict:
    budget, why = choose_budget(s, timeout - 45)     # the workers stop 30 s early, for the table
    seeds = s.args.acc_seeds
    s.log(f"accuracy: budget {budget} ({why}), seeds {seeds}, {s.args.workers} worker(s)")
    results = s.results / "accuracy"
    common = ["--imbalance-factor", f"{s.args.imbalance_factor:g}", "--budget", str(budget),
              "--results", str(results)]
    cmd = [s.python, "experiments/accuracy.py", "run", *common, "--seeds", *map(str, seeds), "--device", s.device,
           "--workdir", str(s.state / "accuracy"), "--methods", s.args.acc_methods, "--no-progress"]
    for item in data_sets(s):
        cmd += ["--set", item]
    workers = []
    for w in range(s.args.workers):
        env = dict(s.env, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // s.args.workers)))
        workers.append(s.start(cmd, f"[acc w{w}]", env=env))
        time.sleep(2)      # each claims a different run
    finished = s.wait(workers, timeout - 30)
    folder = results / f"{Path(s.args.recipe).stem}-if{s.args.imbalance_factor:g}-b{budget}"
    s.run([s.python, "experiments/accuracy.py", "table", *common], 30, "[table]",
          stdout_file=results / f"table-if{s.args.imbalance_factor:g}-b{budget}.md")
    want = expected_runs(s, seeds)
    have = sorted(p.stem for p in folder.glob("*.json"))
    speeds = {}
    for name in have:
        r = json.loads((folder / f"{name}.json").read_text())
        speeds[name] = round(r["image_passes"] / max(r["seconds_this_session"], 1e-9), 1)
    s.log(f"accuracy: {len(set(want) & set(have))}/{len(want)} runs have results; image passes/s per run "
          f"(whole run, GPU shared): {speeds}")
    complete = set(want) <= set(have)
    failed = finished and not complete and any(w.returncode for w in workers)
    return {"status": "done" if complete else "failed" if failed else "partial", "budget": budget,
            "budget_reason": why, "seeds": seeds, "runs_done": len(set(want) & set(have)), "runs_wanted": len(want),
            "image_passes_per_second": speeds, "results": str(folder.relative_to(s.results))}


STEP_FUNCTIONS = {"env": step_env, "cuda-tests": step_cuda_tests, "bench": step_bench,
                  "bench-compile": lambda s, timeout: step_bench(s, timeout, compile=True), "recipe": step_recipe,
                  "accuracy": step_accuracy}


# ---------------------------------------------------------------------------------------------- main
def resolve_data(s: Session) -> str:
    """The Fashion-MNIST folder runs read. On a GPU machine without the Debian package, the carried folder
    is linked to the Debian path, so trained cards and the exported model name the path every other
    machine has (`tailwise export` / the tests rebuild the data from a card)."""
    data = Path(s.args.data).resolve()
    missing = [name for name in FMNIST_FILES if not (data / name).exists()]
    if missing:
        raise SystemExit(f"gpu_run: --data {data} lacks {', '.join(missing)}")
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with the four Fashion-MNIST .gz files")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu" / "out"),
                   help="output folder (default $OUT, else runs/gpu/out)")
    p.add_argument("--state", default=os.environ.get("GPU_STATE"),
                   help="files of a previous --out to continue from (default $GPU_STATE)")
    p.add_argument("--work", default=str(REPO / "runs" / "gpu" / "work"),
                   help="local working folder (default runs/gpu/work)")
    p.add_argument("--minutes", type=float, default=8.0, help="total budget in minutes (default 8)")
    p.add_argument("--steps", default=DEFAULT_STEPS, help=f"comma list of steps to run (default {DEFAULT_STEPS}; "
                   "bench-compile, the same bench with torch.compile, only when named)")
    p.add_argument("--redo", default="", help="comma list of steps to run again even if finished or failed")
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
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)
    for name, normal, dry in (("acc_seeds", [0, 1, 2], [0]), ("acc_methods", "all", "ce"), ("workers", 4, 1)):
        if getattr(args, name) is None:
            setattr(args, name, dry if args.dry_run else normal)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    s = Session(args)
    s.device = "cpu" if args.dry_run else "cuda"
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
        s.log(f"data: {s.data_root}")
        for step in STEPS:
            previous = s.record(step.name)
            if step.name not in wanted:
                continue
            if previous.get("status") in ("done", "failed") and step.name not in redo:
                s.log(f"== {step.name}: skipped ({previous['status']} in an earlier run)")
                continue
            left = s.left()
            if left < step.min_left_s:
                s.log(f"== {step.name}: not started, {max(left, 0):.0f}s left of the budget")
                if not previous:
                    write_json(s.results / "steps" / f"{step.name}.json", {"status": "not-started"})
                continue
            timeout = min(step.cap_s, left)
            s.log(f"== {step.name}: started (cap {timeout:.0f}s)")
            t0, started = time.monotonic(), now_utc()
            try:
                result = STEP_FUNCTIONS[step.name](s, timeout)
            except Exception as exc:        # a broken step must not cost the steps after it
                result = {"status": "failed", "note": f"{type(exc).__name__}: {exc}"}
            seconds = round(time.monotonic() - t0, 1)
            result.update(step=step.name, seconds=seconds, started=started, finished=now_utc(),
                          attempts=previous.get("attempts", 0) + 1,
                          total_seconds=round(previous.get("total_seconds", 0) + seconds, 1))
            write_json(s.results / "steps" / f"{step.name}.json", result)
            s.log(f"== {step.name}: {result['status']} in {seconds:.0f}s"
                  + (f" ({result['note']})" if result.get("note") else ""))
            s.pack()
            if step.name == "env" and result["status"] == "failed" and not args.dry_run:
                s.log("no usable GPU: the other steps are not started")
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
