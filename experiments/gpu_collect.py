"""Unpack what a GPU run brought back (experiments/gpu_run.sh's --out files) into the repository, for commit.

    python experiments/gpu_collect.py DIR                    # DIR holds gpu_results.tar.gz (and gpu_run.log)
    python experiments/gpu_collect.py DIR --install-model    # also the CUDA-trained model into models/

* experiments/results/gpu/: env.json, the step records, the CUDA test reports, the bench JSON, the recipe's
  cards, metrics and evaluation (no weights), and gpu_run.log;
* experiments/results/<table folder>/: the accuracy table's per-run JSON and plots (kept if already there; a file
  there that differs is named); `--results-into experiments/results/tuned-cuda` puts them elsewhere, e.g. CUDA runs
  of the tuned rows beside the CPU ones of the same recipe, IF and budget, never mixed into one table;
* models/<name>/ (fmnist-lt-r32-cuda): only with --install-model, and only if it beats the shipped model on
  validation (the balanced validation accuracy of what is served: logits adjusted by the tau chosen on
  validation). Without the flag models/ is never touched: it prints the comparison.

Then prints the numbers for the benchmark's CUDA rows and the command that prints the accuracy table.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = "models/fmnist-lt-tailwise"
RESULT_FILES = ("env.json", "cuda-tests.xml", "cuda-tests.txt", "cuda-nccl.xml", "cuda-nccl.txt", "bench_stage1.json",
                "bench_stage1_compile.json", "steps", "recipe")
TABLE_FOLDER = re.compile(r"-if(?P<factor>[0-9.]+)-b(?P<budget>[0-9]+)(?P<ldamsubset>-ldamsubset)?$")


def served_val(card: dict) -> float | None:
    """Balanced validation accuracy of the served logits (adjusted by the chosen tau) of a checkpoint card."""
    la = card.get("logit_adjustment")
    if la:
        return la["val_mean_per_class"][str(float(la["tau"]))]
    return (card.get("metrics") or {}).get("val_mean_per_class")


def table_command(folder: str, results: str = "experiments/results") -> str | None:
    """The `accuracy.py table` command of a results folder (<recipe>-if<IF>-b<budget>[-ldamsubset]) in `results`."""
    m = TABLE_FOLDER.search(folder)
    if not m:
        return None
    recipe = folder[:m.start()]
    return (f"python experiments/accuracy.py table --recipe {recipe} --imbalance-factor {m['factor']} "
            f"--budget {m['budget']}" + (" --set data.holdout_kept=false" if m["ldamsubset"] else "")
            + (f" --results {results}" if results != "experiments/results" else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="folder with the run's gpu_results.tar.gz (and gpu_run.log)")
    parser.add_argument("--repo", default=str(REPO), help="repository root to unpack into (default this one)")
    parser.add_argument("--results-into", default="experiments/results", metavar="DIR",
                        help="where the accuracy tables' folders go, relative to --repo (default experiments/results)")
    parser.add_argument("--install-model", action="store_true",
                        help="copy the CUDA-trained model into models/ when it beats the shipped one on validation")
    args = parser.parse_args(argv)
    src, repo = Path(args.dir), Path(args.repo)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(src / "gpu_results.tar.gz") as tar:
            tar.extractall(tmp, filter="data")
        res = Path(tmp) / "gpu-results"
        gpu = repo / "experiments" / "results" / "gpu"
        gpu.mkdir(parents=True, exist_ok=True)
        for name in RESULT_FILES:
            if (res / name).is_dir():
                shutil.copytree(res / name, gpu / name, dirs_exist_ok=True)
            elif (res / name).exists():
                shutil.copy(res / name, gpu / name)
        if (src / "gpu_run.log").exists():
            shutil.copy(src / "gpu_run.log", gpu / "gpu_run.log")
        steps = {p.stem: json.loads(p.read_text()) for p in (res / "steps").glob("*.json")}
        print("steps: " + ", ".join(f"{k} {v.get('status')}" for k, v in sorted(steps.items())))
        device = json.loads((res / "env.json").read_text()).get("device") if (res / "env.json").exists() else "?"

        for folder in sorted(p for p in (res / "accuracy").glob("*") if p.is_dir()) if (res / "accuracy").exists() else []:
            target = repo / args.results_into / folder.name
            target.mkdir(parents=True, exist_ok=True)
            new = [f for f in folder.iterdir() if not (target / f.name).exists()]
            differ = [f.name for f in folder.iterdir() if (target / f.name).exists() and f.suffix == ".json"
                      and (target / f.name).read_bytes() != f.read_bytes()]
            for f in new:
                shutil.copy(f, target / f.name)
            print(f"accuracy: {len(new)} new file(s) in {target.relative_to(repo)}; the table: "
                  f"{table_command(folder.name, args.results_into) or '(a folder name accuracy.py does not write)'}")
            if differ:
                print(f"accuracy: kept the {len(differ)} file(s) already in {target.relative_to(repo)} that differ "
                      f"from what came back ({', '.join(differ)}): --results-into another folder keeps both")

        for row in (json.loads((res / "bench_stage1.json").read_text())["rows"]
                    if (res / "bench_stage1.json").exists() else []):
            frac = f"{100 * row['ce_fraction_of_peak']:.1f} %" if row.get("ce_fraction_of_peak") else "-"
            amp = ", bf16" if row["device_type"] == "cuda" else ""
            print(f"README bench row: | {row['device']}, batch {row['batch']}{amp} | {row['ce_images_per_s']:.0f} | "
                  f"{row['bns_images_per_s']:.0f} | {row['bns_over_ce']:.2f} | {frac} ({row.get('ce_tflops', '-')} "
                  "TFLOP/s) |")

        # a whole exported folder only: never a hidden one (an export's staging folder, cut off)
        model = next((p for p in sorted((res / "models").glob("*")) if not p.name.startswith(".")
                      and (p / "model.onnx").is_file() and (p / "card.json").is_file()), None) \
            if (res / "models").exists() else None
        if model is None:
            print("model: none came back (the recipe step has not finished)")
            return 0
        card = json.loads((model / "card.json").read_text())["training"]
        test = card.get("test") or {}
        mine = served_val(card)
        shipped_card = repo / SHIPPED / "card.json"
        theirs = served_val(json.loads(shipped_card.read_text())["training"]) if shipped_card.exists() else None
        la = test.get("logit_adjusted") or {}

        def pct(value):
            return "-" if value is None else f"{100 * value:.2f} %"
        print(f"model: {card['config']['name']} on {device}, {(card.get('training') or {}).get('total_seconds')} s; "
              f"test top-1 {pct(test.get('top1'))} plain, {pct(la.get('top1'))} logit-adjusted (many "
              f"{pct(la.get('many'))}, medium {pct(la.get('medium'))}, few {pct(la.get('few'))})")
        if theirs is not None and not (mine is not None and mine > theirs):
            print(f"model: validation {mine} does not beat the shipped model's {theirs}: not copied into models/")
            return 0
        target = repo / "models" / model.name
        if not args.install_model:
            print(f"model: validation {mine} against the shipped model's {theirs}: pass --install-model to copy it "
                  f"to {target.relative_to(repo)}")
            return 0
        if target.exists():
            from tailwise.format import foreign_files, is_model_folder

            if not is_model_folder(target):   # never delete what is not a tailwise model (issue 25)
                print(f"model: {target.relative_to(repo)} holds files that are not a tailwise model's "
                      f"({', '.join(foreign_files(target)[:4]) or 'no manifest.json + model.onnx'}): not replaced")
                return 1
            shutil.rmtree(target)
        shutil.copytree(model, target)
        print(f"model: validation {mine} beats the shipped model's {theirs}: copied to {target.relative_to(repo)} "
              f"(model card: {target.relative_to(repo)}/README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
