"""The accuracy table: baselines, peers, BNS + IP-DPP and its ablations, trained by one loop on identical data.

    python experiments/accuracy.py run   --imbalance-factor 100 --budget 200 --seeds 0 1 2 [--methods ce,bns-kdpp]
    python experiments/accuracy.py table --imbalance-factor 100 --budget 200 [--doc docs/RESULTS.md]
    python experiments/accuracy.py grid  --imbalance-factor 100 --budget 4 --seeds 0 [--methods la,ce]
    python experiments/accuracy.py grid-table --imbalance-factor 100 --budget 4

Every method is a config in experiments/methods.toml over the base recipe (fmnist-lt-r32: ResNet-32 on
Fashion-MNIST-LT). All get the same budget in image passes: `--budget B` is B passes over the LT training set
(a BNS epoch counts two passes, one per view); two-stage methods spend 3/4 of it (in whole epochs) in stage 1
and what is left in stage 2, at least one epoch; a frozen encoder's classifier re-training (cRT, Weight
Balancing, MiSLAS) gets 5 % of it, as in those papers (at least one epoch).
Numbers are final-epoch test results; every tuned choice is made on the validation split: the tau of post-hoc
logit adjustment (every row: "served" beside "plain" logits) and, through `grid`, each method's augmentation
and learning rate. Each finished run is kept as JSON under experiments/results/; `run` only fills the gaps and
resumes interrupted runs from their checkpoints, so the table can be completed over several sessions and
machines. Several `run` processes may share the work: each claims a run with a lock file in the workdir and
skips runs another live process holds; a row whose shared stage 1 another process is training waits until the
end of the pass. A run folder started with another config (a row changed since) is trained again. `table` prints mean +- std over the seeds found (served and plain
logits, image passes, optimizer steps, training seconds) and names the best method overall and on the few-shot
classes; with `--doc` it also plots the best methods' per-class accuracy and replaces the table between its
markers (`<!-- accuracy-table:<results folder>:begin/end -->`) in docs/RESULTS.md (the README links there).

`grid` trains the validation grid (GRID_AUG x GRID_LR below; a method whose paper tunes more adds that axis:
`grid_wd`, `grid_shift_bn` in methods.toml) applied alike to every method, validation only (no
test set is loaded), one JSON per point under experiments/results/grid/; `grid-table` prints each method's
points and the one chosen: the best validation balanced accuracy of the served (logit-adjusted) logits.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import os
import shutil
import statistics
import sys
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS_FILE = HERE / "methods.toml"
RESULTS = HERE / "results"
STAGE1_SHARE = 0.75
# a frozen encoder's stage 2 trains the classifier alone: the decoupled papers give it 10 epochs against 200 for
# the encoder (cRT, MiSLAS; Weight Balancing 10 of 320), so such rows spend 5 % of the passes there (at least an epoch)
FROZEN_STAGE2_SHARE = 0.05
GRID_LR = (1.0, 0.5, 2.0)              # learning-rate multipliers, applied to every stage
GRID_AUG = ("simclr", "light")         # augmentation, chosen per stage
# the fight: the default recipe, the rows it must beat (baselines, peers, the paper's BNS + IP-DPP) and the controls
# of where its gain comes from; first in the grid's order and trained first at budget 20 (experiments/fair_fight.sh)
FIGHT = ("la", "tailwise-la-kdpp", "ce", "ldam-drw", "bsce", "weight-balancing", "mislas", "crt-la",
         "la-restart", "tailwise-la-none", "tailwise-la-random", "bns-kdpp", "crt")
DOC = HERE.parent / "docs" / "RESULTS.md"


def load_methods() -> dict:
    return tomllib.loads(METHODS_FILE.read_text())


def results_dir(args) -> Path:
    """experiments/results/<recipe>-if<IF>-b<budget>; "-ldamsubset" when the head keeps its validation images
    (`--set data.holdout_kept=false`: the literature's subset, as the tables before that option were run)."""
    from tailwise.training.config import load_config

    name = f"{Path(args.recipe).stem}-if{args.imbalance_factor:g}-b{args.budget}"
    named = [o for o in getattr(args, "overrides", []) if o.startswith("data.holdout_kept")]
    if not load_config(None, named)["data"]["holdout_kept"]:
        name += "-ldamsubset"
    return Path(args.results) / name


@functools.lru_cache(maxsize=None)
def train_counts(data_json: str) -> tuple[int, tuple[int, ...]]:
    """(training images, per-class counts) of the LT data a config's [data] table (as JSON) describes: built once
    per process, as every row and grid point of a table asks for the same data."""
    from tailwise.training.train import data_from_config

    data = data_from_config({"data": json.loads(data_json)})
    return len(data.train_idx), tuple(data.counts)


def method_config(name: str, spec: dict, args, seed: int, point: dict | None = None) -> dict:
    """The full config of one table row: base recipe + --set + the method's fields + its grid setting + epochs
    from the budget. The grid setting (aug1, aug2, lr multiplier; see grid_points) is `point` when the grid
    trains it (the run is then named after it), else the row's `tuned` entry in methods.toml, if any."""
    from tailwise.training.config import load_config
    from tailwise.training.ipdpp import class_targets

    overrides = [f"data.imbalance_factor={args.imbalance_factor}", *args.overrides, f"seed={seed}",
                 f"device='{args.device}'", f"name='{name}-s{seed}'"]
    for section in ("data", "stage1", "stage2"):
        for key, value in spec.get(section, {}).items():
            overrides.append(f"{section}.{key}={json.dumps(value)}")
    if point:
        overrides[overrides.index(f"name='{name}-s{seed}'")] = f"name='{name}__{point_id(point)}-s{seed}'"
    point = point or spec.get("tuned")
    if point:
        overrides += [f"stage1.aug={json.dumps(point['aug1'])}"]
        overrides += [f"stage2.aug={json.dumps(point['aug2'])}"] if point.get("aug2") else []
    cfg = load_config(args.recipe, overrides)
    if point:
        cfg["stage1"]["lr"] *= point["lr"]
        cfg["stage2"]["lr"] *= point["lr"]
        for stage in ("stage1", "stage2"):
            cfg[stage]["weight_decay"] *= point.get("wd", 1.0)
        if "shift_bn" in point:
            cfg["stage2"]["shift_bn"] = point["shift_bn"]
    lt_cfg = load_config(args.recipe, overrides[:1 + len(args.overrides)])
    n_lt, _ = train_counts(json.dumps(lt_cfg["data"], sort_keys=True))
    n_train, counts = train_counts(json.dumps(cfg["data"], sort_keys=True))
    passes = args.budget * n_lt
    s1, s2 = cfg["stage1"], cfg["stage2"]
    views = 2 if s1["method"] == "bns" else 1
    pool = n_train if s2["sampler"] == "none" else sum(class_targets(list(counts), s2["ratio"]))
    if s2["enabled"] and s2["freeze_encoder"]:
        frozen_epochs = max(1, round(FROZEN_STAGE2_SHARE * passes / pool))
        s1["epochs"] = max(1, round((passes - frozen_epochs * pool) / (views * n_train)))
    else:
        share1 = STAGE1_SHARE if s2["enabled"] else 1.0
        s1["epochs"] = max(1, round(share1 * passes / (views * n_train)))
    s1["warmup_epochs"] = max(1, round(0.05 * s1["epochs"]))
    if s2["enabled"]:       # stage 2 gets what stage 1's whole epochs left of the budget (at least one epoch)
        s2["epochs"] = max(1, round((passes - views * n_train * s1["epochs"]) / pool))
        s2["warmup_epochs"] = max(0, round(0.05 * s2["epochs"]))
    return cfg


def image_passes(run_dir: Path, cfg: dict) -> int:
    total = 0
    for stage in (1, 2):
        path = run_dir / f"stage{stage}_metrics.jsonl"
        if path.exists():
            views = 2 if stage == 1 and cfg["stage1"]["method"] == "bns" else 1
            total += views * sum(json.loads(line)["images"] for line in path.read_text().splitlines())
    return total


def optimizer_steps(run_dir: Path, cfg: dict) -> int:
    """Optimizer steps of both stages (a shared stage 1 counts in full), as the metrics log them; runs logged
    before `steps` was recorded: images / batch size per epoch (every batch is full but a one-batch epoch)."""
    import math

    total = 0
    for stage in (1, 2):
        path = run_dir / f"stage{stage}_metrics.jsonl"
        if path.exists():
            batch = cfg[f"stage{stage}"]["batch_size"]
            total += sum(line.get("steps", max(1, math.ceil(line["images"] / batch)))
                         for line in map(json.loads, path.read_text().splitlines()))
    return total


def planned_steps(cfg: dict, counts: list[int]) -> int:
    """Optimizer steps the training loop takes for `cfg` on an LT set with these class counts (engine.fit: whole
    batches of the epoch's pool, at least one); for results recorded before optimizer steps were."""
    from tailwise.training.ipdpp import class_targets

    s1, s2, n = cfg["stage1"], cfg["stage2"], sum(counts)
    steps = s1["epochs"] * max(1, n // s1["batch_size"])
    if s2["enabled"]:
        pool = n if s2["sampler"] == "none" else sum(class_targets(counts, s2["ratio"]))
        steps += s2["epochs"] * max(1, pool // s2["batch_size"])
    return steps


def served_validation(card: dict) -> dict:
    """{"val_served": the validation balanced accuracy of the served logits (at the tau chosen on it; what ranks
    rows and grid points), "val_by_tau": that accuracy for every tau tried} of a finished run's card."""
    la = card.get("logit_adjustment") or {}
    by_tau = {float(t): v for t, v in la.get("val_mean_per_class", {}).items()}
    return {"val_served": by_tau[float(la["tau"])] if la else None, "val_by_tau": by_tau}


def train_seconds(run_dir: Path) -> float:
    """Seconds spent in training steps, both stages (a shared stage 1 counts in full for every row using it)."""
    return round(sum(json.loads(line)["seconds"] for stage in (1, 2)
                     if (run_dir / f"stage{stage}_metrics.jsonl").exists()
                     for line in (run_dir / f"stage{stage}_metrics.jsonl").read_text().splitlines()), 1)


def non_defaults(cfg: dict, sections) -> dict:
    """The fields of `sections` that differ from the defaults (a field added later, at its default, is no change)."""
    from tailwise.training.config import DEFAULTS

    return {k: {f: v for f, v in cfg.get(k, {}).items() if DEFAULTS[k].get(f) != v} for k in sections}


def stage1_key(cfg: dict) -> str:
    """What makes two rows' stage 1 the same run: data, model, stage-1 config and seed."""
    import hashlib

    same = non_defaults(cfg, ("data", "model", "stage1"))
    same.update(seed=cfg["seed"], device=cfg["device"])
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()[:12]


class Deferred(Exception):
    """Another process is training the stage 1 this row shares: the row waits until the others are done."""


def shared_stage1(cfg: dict, args, run_dir: Path, data=None, wait: bool = True) -> None:
    """Train (or wait for another process to train) the stage 1 this row shares with every row of the same
    `stage1_key`, then place its finished checkpoint in `run_dir`, so the row trains only its stage 2.
    `wait=False`: Deferred instead of waiting while another process trains it (the caller does other rows first)."""
    from tailwise.training import checkpoint
    from tailwise.training.train import run

    s1 = cfg["stage1"]
    what = s1["method"] if s1["method"] == "bns" else s1["loss"]
    shared = run_dir.parent / f"stage1-{what}-{stage1_key(cfg)}-s{cfg['seed']}"
    shared.parent.mkdir(parents=True, exist_ok=True)
    with open(shared.with_name(shared.name + ".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))   # waits while another trains it
        except BlockingIOError:
            raise Deferred(shared.name) from None
        card = checkpoint.load_card(shared, stage=1) if (shared / "stage1.json").exists() else None
        if not (card and card.get("finished")):
            print(f"-- shared stage 1 -> {shared}", flush=True)
            run(cfg, shared, stages=(1,), resume=shared.exists(), progress=not args.no_progress, data=data)
            card = checkpoint.load_card(shared, stage=1)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in (card["weights"], "stage1_metrics.jsonl"):
        target = run_dir / name
        if not target.exists():
            os.link(shared / name, target)
    # the card last: its presence tells `run` that stage 1 is done
    stored = json.loads((shared / "stage1.json").read_text())
    checkpoint.atomic_write_text(run_dir / "stage1.json", json.dumps(dict(stored, resume=None, shared_from=str(shared)),
                                                                     indent=2, sort_keys=True))


def recorded_differently(result: dict, spec: dict, args) -> list[str]:
    """The config sections in which a recorded result (a run's or a grid point's JSON) differs from what
    methods.toml gives its row now (a row changed after it ran): [] when it is the row as it stands."""
    now = argparse.Namespace(recipe=args.recipe, overrides=getattr(args, "overrides", []), device="auto",
                             imbalance_factor=result["imbalance_factor"], budget=result["budget"])
    cfg = method_config(result["method"], spec, now, result["seed"], result.get("point"))
    return sections_differ(result["config"], cfg, ("data", "model", "stage1", "stage2"), spec)


def sections_differ(recorded: dict, cfg: dict, sections, spec: dict | None = None) -> list[str]:
    """The `sections` in which a recorded config and `cfg` differ, field by field past the defaults (a field added
    since, at its default, is no change). With the row's `spec` (a result recorded, maybe on another machine): a
    field the record lacks counts only where the row itself sets it (where it came from a default or --set, what
    the record's run used is not known), and data.root, where a machine keeps the files, is no setting."""
    differ = []
    for k in sections:
        known = None if spec is None else (set(recorded.get(k, {})) | set(spec.get(k, {}))) - {"root"}
        pair = [{f: v for f, v in non_defaults(c, (k,))[k].items() if known is None or f in known}
                for c in (recorded, cfg)]
        differ += [k] if pair[0] != pair[1] else []
    return differ


def stale_line(stale: list[str]) -> list[str]:
    if not stale:
        return []
    return ["", "Recorded with other settings than experiments/methods.toml gives these rows now (a row changed "
                f"after they ran; delete them to train them again): {', '.join(stale)}."]


def drop_if_stale(run_dir: Path, cfg: dict) -> None:
    """Remove the runner's own unfinished-or-finished run folder when it was started with another config than
    `cfg` (a row changed in methods.toml after its run began): resuming it would train, or record, the old row."""
    for stage, sections in ((1, ("data", "model", "stage1")), (2, ("stage2",))):
        card = run_dir / f"stage{stage}.json"
        if not card.exists():
            continue
        stored = json.loads(card.read_text())["config"]
        changed = sections_differ(stored, cfg, sections)
        changed += ["seed"] if stage == 1 and stored.get("seed") != cfg["seed"] else []
        if changed:
            print(f"-- {run_dir.name}: started with other {', '.join(changed)} settings; trained again", flush=True)
            shutil.rmtree(run_dir)
            return


@contextlib.contextmanager
def claim(lock_path: Path):
    """Yield True if this process now holds the lock on `lock_path` (released when the process ends)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def run_one(name: str, spec: dict, args, seed: int, wait: bool = True) -> Path | None:
    out = results_dir(args) / f"{name}-s{seed}.json"
    if out.exists() and "run" not in spec and (differ := recorded_differently(json.loads(out.read_text()), spec, args)):
        print(f"!! {out.name}: recorded with other {', '.join(differ)} settings than methods.toml gives {name} now; "
              "kept (delete it to train the row again)", flush=True)
    if out.exists() or "run" in spec:
        return None
    run_dir = Path(args.workdir) / results_dir(args).name / f"{name}-s{seed}"
    with claim(run_dir.with_name(run_dir.name + ".lock")) as mine:
        if not mine:
            print(f"-- {name} seed {seed}: another process is running it, skipped", flush=True)
            return None
        if out.exists():                  # finished by another process while we waited for the lock
            return None
        return _train_and_record(name, spec, args, seed, run_dir, out, wait)


def _train_and_record(name: str, spec: dict, args, seed: int, run_dir: Path, out: Path, wait: bool = True) -> Path:
    from tailwise.training import checkpoint
    from tailwise._core import atomic_write_text
    from tailwise.training.train import run

    cfg = method_config(name, spec, args, seed)
    print(f"== {name} seed {seed}: stage1 {cfg['stage1']['epochs']} ep"
          + (f", stage2 {cfg['stage2']['epochs']} ep" if cfg["stage2"]["enabled"] else "") + f" -> {run_dir}",
          flush=True)
    t0 = time.time()
    drop_if_stale(run_dir, cfg)
    if cfg["stage2"]["enabled"] and not (run_dir / "stage1.json").exists():
        shared_stage1(cfg, args, run_dir, wait=wait)
    run(cfg, run_dir, resume=run_dir.exists(), progress=not args.no_progress)
    card = checkpoint.load_card(run_dir)
    result = {
        "method": name, "label": spec["label"], "seed": seed, "budget": args.budget, **served_validation(card),
        "imbalance_factor": args.imbalance_factor, "image_passes": image_passes(run_dir, cfg),
        "optimizer_steps": optimizer_steps(run_dir, cfg),
        "seconds_this_session": round(time.time() - t0, 1), "train_seconds": train_seconds(run_dir),
        "device": cfg["device"],
        "tailwise_version": card["tailwise_version"], "index_sha256": card["data"]["index_sha256"],
        "final_epoch": card["epoch"], "val": card["metrics"], "test": card["test"],
        "logit_adjustment_tau": (card.get("logit_adjustment") or {}).get("tau"), "config": cfg,
        "tuned": spec.get("tuned"),
        "classes": {key: card["data"][key] for key in ("class_names", "counts", "groups")},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(run_dir / "eval" / "per_class.png", out.with_suffix(".png"))
    atomic_write_text(out, json.dumps(result, indent=2, sort_keys=True) + "\n")   # last: its presence means done
    return out


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.1f}"
    return f"{statistics.mean(pct):.1f} +- {statistics.stdev(pct):.1f}"


def collect(args) -> list[dict]:
    """One entry per methods.toml row: its label and, for every seed found, the test report of the served logits
    (post-hoc logit adjustment with the tau chosen on validation) in `tests` and of the plain logits in `plain`.
    A run recorded without a tuned tau (before every row had one) serves its plain logits, flagged `untuned`."""
    from tailwise.training.metrics import group_means

    every, folder, rows = load_methods(), results_dir(args), []
    methods = every
    wanted = getattr(args, "methods", "all")
    if wanted != "all":               # the rows named, in methods.toml order (a `run = ...` row needs its run named too)
        methods = {k: v for k, v in methods.items() if k in wanted.split(",")}
    for name, spec in methods.items():
        row = {"name": name, "label": spec["label"], "reference": spec.get("reference", False),
               "role": spec.get("role"), "tests": [],
               "plain": [], "taus": [], "untuned": 0, "passes": [], "steps": [], "seconds": [], "vals": [],
               "classes": None}
        for path in sorted(folder.glob(f"{spec.get('run', name)}-s*.json")):
            result = json.loads(path.read_text())
            if result.get("config") and recorded_differently(result, every[result["method"]], args):
                row.setdefault("stale", []).append(path.stem)
            plain = {k: v for k, v in result["test"].items() if k != "logit_adjusted"} if result.get("test") else None
            if not plain:
                continue
            served = result["test"].get("logit_adjusted")
            row["untuned"] += served is None
            row["tests"].append(served or plain)
            row["plain"].append(plain)
            row["taus"].append(served["tau"] if served else None)
            row["passes"].append(result["image_passes"])
            steps = result.get("optimizer_steps")
            if steps is None and result.get("config") and result.get("classes"):
                steps = planned_steps(result["config"], result["classes"]["counts"])
            row["steps"].append(steps)
            row["seconds"].append(result.get("train_seconds"))
            row["vals"].append(result.get("val_served"))
            row["classes"] = row["classes"] or result.get("classes")
        rows.append(row)
    lt = next((r["classes"] for r in rows if r["classes"] and not r["reference"]), None)
    for row in rows:          # a balanced reference has only "many" classes: score it on the LT rows' groups
        if lt and row["reference"] and row["classes"] and row["classes"]["groups"] != lt["groups"]:
            for key in ("tests", "plain"):
                row[key] = [{**t, **group_means(t["per_class"], lt["groups"])} for t in row[key]]
            row["regrouped"] = True
    return rows


def _mean(row: dict, key: str) -> float:
    """Mean over seeds, in percent (computed as `_fmt` does, so the prose rounds as the table does)."""
    return statistics.mean(100 * t[key] for t in row["tests"])


def _std(row: dict, key: str) -> float:
    return statistics.stdev(100 * t[key] for t in row["tests"]) if len(row["tests"]) > 1 else float("nan")


def _contenders(rows: list[dict], key: str) -> list[dict]:
    """Rows that compete on `key`: not the reference, and every seed has a value for it."""
    return [r for r in rows if r["tests"] and not r["reference"] and all(t.get(key) is not None for t in r["tests"])]


def winners(rows: list[dict]) -> list[str]:
    """Sentences naming the best long-tailed method overall and on the few-shot classes, and by how much.
    The reference row (trained on balanced data) is not a contender."""
    lines = []
    for key, what in (("top1", "overall"), ("few", "on the few-shot classes")):
        contenders = _contenders(rows, key)
        if len(contenders) < 2:
            if key == "few" and lines:
                lines.append("- No few-shot winner: no class is few-shot at this imbalance factor.")
            continue
        by_name = {r["name"]: r for r in contenders}
        ranked = sorted(contenders, key=lambda r: _mean(r, key), reverse=True)
        best = ranked[0]
        ties = [r for r in ranked[1:] if abs(_mean(r, key) - _mean(best, key)) < 0.05]
        runner_up = next((r for r in ranked[1:] if r not in ties), None)
        name = best["label"] + "".join(f" (tied with {r['label']})" for r in ties)
        text = f"- Best {what}: **{name}**, {_mean(best, key):.1f} %"
        if runner_up:
            text += (f", {_mean(best, key) - _mean(runner_up, key):.1f} points above the next, "
                     f"{runner_up['label']} ({_mean(runner_up, key):.1f} %)")
        if "ce" in by_name and best["name"] != "ce":
            text += f", and {_mean(best, key) - _mean(by_name['ce'], key):+.1f} points against CE"
        spread = [_std(r, key) for r in [best, runner_up] if r]
        if runner_up and all(s == s for s in spread):      # not NaN: at least two seeds each
            text += " (std over seeds " + " and ".join(f"{s:.1f}" for s in spread) + ")"
            if _mean(best, key) - _mean(runner_up, key) < max(spread):
                text += "; the gap to the next is smaller than the spread over seeds, so not a clear win"
        lines.append(text + ".")
    return lines


def verdict(rows: list[dict]) -> list[str]:
    """The default recipe (role "recipe") against the best baseline or peer of the table overall: its lead overall
    and on the few-shot classes (as the table rounds them), whether that is a clear one (at least 1.0 point
    overall, none below on the few-shot), whether it exceeds the spread over seeds, and whether every baseline
    and peer has the recipe's seeds (else the answer is not final)."""
    recipe = next((r for r in _contenders(rows, "top1") if r.get("role") == "recipe"), None)
    rivals = [r for r in rows if r.get("role") in ("baseline", "peer") and not r["reference"]]
    others = [r for r in _contenders(rows, "top1") if r in rivals]
    if recipe is None or not others:
        return []
    best = max(others, key=lambda r: _mean(r, "top1"))
    lead = round(_mean(recipe, "top1") - _mean(best, "top1"), 1)
    text = (f"- The default recipe, **{recipe['label']}**, against the best baseline or peer of this table, "
            f"{best['label']}: {lead:+.1f} points overall")
    few = all(t.get("few") is not None for t in recipe["tests"] + best["tests"])
    few_lead = round(_mean(recipe, "few") - _mean(best, "few"), 1) if few else None
    if few_lead is not None:
        text += f", {few_lead:+.1f} on the few-shot classes"
    clear = lead >= 1.0 and (few_lead is None or few_lead >= 0)
    text += f"; a lead of at least 1.0 point overall and none below it on the few-shot classes: {'yes' if clear else 'no'}"
    spread = max(_std(r, "top1") for r in (recipe, best))
    if spread == spread and clear and lead < spread:      # not NaN: two seeds or more each
        text += f", though smaller than the spread over seeds ({spread:.1f})"
    short = [r["name"] for r in rivals if len(r["tests"]) < len(recipe["tests"])]
    if short:
        text += (f" (not final: {', '.join(short)} {'has' if len(short) == 1 else 'have'} fewer than the recipe's "
                 f"{len(recipe['tests'])} seed(s))")
    return [text + "."]


def plot_best(rows: list[dict], path: Path) -> Path | None:
    """Per-class test accuracy (mean over seeds) against training images per class, for the best method
    overall, the best on few-shot classes, and CE."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    picks = []
    for key in ("top1", "few"):
        contenders = [r for r in _contenders(rows, key) if r["classes"]]
        picks += [max(contenders, key=lambda r: _mean(r, key))] if contenders else []
    if not picks:
        return None
    picks += [r for r in _contenders(rows, "top1") if r["classes"] and r["name"] == "ce"]
    seen = [r for i, r in enumerate(picks) if r not in picks[:i]]
    counts, names = seen[0]["classes"]["counts"], seen[0]["classes"]["class_names"]
    order = sorted(range(len(counts)), key=lambda c: -counts[c])          # head class first
    fig = Figure(figsize=(9, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(seen)
    for i, row in enumerate(seen):
        acc = [statistics.mean(t["per_class"][c] for t in row["tests"]) for c in order]
        ax.bar([x + (i - (len(seen) - 1) / 2) * width for x in range(len(order))], acc, width,
               label=f"{row['label']} (overall {_mean(row, 'top1'):.1f} %, {len(row['tests'])} seed(s))")
    ax.set_xticks(range(len(order)), [f"{names[c]}\n{counts[c]}" for c in order], fontsize=7)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("class, with its training images (head class left)")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def table(args, rows: list[dict] | None = None) -> str:
    rows = collect(args) if rows is None else rows
    lines = [f"Recipe {Path(args.recipe).stem}, IF {args.imbalance_factor:g}, budget {args.budget} passes over the "
             "LT set; final-epoch test accuracy % (mean +- std over seeds). Served: logits adjusted post hoc by the "
             "tau chosen on validation (what `predict` and the service return; tau 0 is a choice); plain: the raw "
             "logits.", "",
             "| method | seeds | overall | many | medium | few | plain overall | plain few | tau | image passes "
             "| optimizer steps | train s | val served |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def mean_of(values, fmt):
        known = [x for x in values if x is not None]
        return fmt(statistics.mean(known)) if known and len(known) == len(values) else "-"

    for row in rows:
        tests, plain = row["tests"], row.get("plain", row["tests"])
        cells = [_fmt([t[k] for t in tests if t.get(k) is not None]) for k in ("top1", "many", "medium", "few")]
        cells += [_fmt([t[k] for t in plain if t.get(k) is not None]) for k in ("top1", "few")]
        taus = [t for t in row.get("taus", []) if t is not None]
        cells.append("/".join(f"{t:g}" for t in taus) if taus else "-")
        cells.append(mean_of(row["passes"], "{:,.0f}".format))
        cells.append(mean_of(row.get("steps", [None]), "{:,.0f}".format))
        cells.append(mean_of(row["seconds"], "{:,.0f}".format))
        cells.append(mean_of(row["vals"], lambda v: f"{100 * v:.1f}") if row["vals"] else "-")
        mark = " *" if row.get("untuned") else ""
        lines.append(f"| {row['label']}{mark} | {len(tests)} | " + " | ".join(cells) + " |")
    untuned = [row["label"] for row in rows if row.get("untuned")]
    if untuned:
        lines += ["", "*: run before every row had a tuned tau; its served columns are its plain logits "
                  f"({', '.join(untuned)})."]
    regrouped = [row["label"] for row in rows if row.get("regrouped")]
    if regrouped:
        lines += ["", f"{', '.join(regrouped)}: many / medium / few are the means over the classes that are many / "
                  "medium / few in the LT set (its own training set is balanced)."]
    missing = [row["name"] for row in rows if not row["tests"]]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    lines += stale_line([stem for row in rows for stem in row.get("stale", [])])
    found = winners(rows) + verdict(rows)
    if found:
        lines += ["", "On the served logits:", *found]
    ranked = rank_on_validation(rows)
    if ranked:
        best = next(r for r in rows if r["name"] == ranked[0])
        lines += ["", f"Best on validation (served balanced accuracy, mean over seeds; what chooses the default "
                      f"recipe): **{best['label']}**, {100 * statistics.mean(best['vals']):.1f} %. Ranking: "
                      + ", ".join(ranked) + "."]
    return "\n".join(lines)


def rank_on_validation(rows: list[dict], distinct: bool = False) -> list[str]:
    """Row names by mean validation balanced accuracy of the served logits, best first: rows (not the reference)
    whose every seed recorded it. `distinct`: a row whose every seed gave exactly the numbers of a row ranked above
    it (one method under two names, as LA and Balanced Softmax are) is left out, so that N rows are N methods."""
    scored = [r for r in rows if r["vals"] and not r["reference"] and all(v is not None for v in r["vals"])]
    ranked = sorted(scored, key=lambda r: statistics.mean(r["vals"]), reverse=True)
    if distinct:
        ranked = [r for i, r in enumerate(ranked) if not any(same_runs(r, above) for above in ranked[:i])]
    return [r["name"] for r in ranked]


def same_runs(a: dict, b: dict) -> bool:
    """Two rows with the same seeds whose every run gave the same validation and test numbers: one method."""
    return bool(a["tests"]) and (a["vals"], a["tests"], a["plain"]) == (b["vals"], b["tests"], b["plain"])


def write_doc(doc: Path, key: str, text: str) -> None:
    """Replace what lies between this table's markers in `doc` (each results folder has its own pair); a doc
    without the pair gets it, under a heading, at its end (a missing doc is created)."""
    from tailwise._core import atomic_write_text

    begin, end = f"<!-- accuracy-table:{key}:begin -->", f"<!-- accuracy-table:{key}:end -->"
    current = doc.read_text() if doc.exists() else "# Accuracy results\n"
    before, found, rest = current.partition(begin)
    middle, found_end, after = rest.partition(end)
    if not found or not found_end:
        before, after = current.rstrip("\n") + f"\n\n## {key}\n\n", "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(doc, f"{before}{begin}\n{text}\n{end}{after}")


def doc_key(args) -> str:
    """The name of a table's markers in the doc: its results folder, relative to experiments/results/ when it lies
    there (tuned/fmnist-lt-r32-if100-b20 and fmnist-lt-r32-if100-b20 are two tables), else its own name."""
    folder = results_dir(args).resolve()
    return folder.relative_to(RESULTS.resolve()).as_posix() if folder.is_relative_to(RESULTS.resolve()) else folder.name


def doc_path(args) -> Path | None:
    """Where `table` writes: --doc, or for the older --readme the docs/RESULTS.md beside that file's folder
    (tables no longer go into the README itself)."""
    if args.doc:
        return Path(args.doc)
    if args.readme:
        given = Path(args.readme)
        return given.parent / "docs" / "RESULTS.md" if given.name == "README.md" else given
    return None


# ----------------------------------------------------------------------------- the validation grid
def grid_points(spec: dict, args) -> list[dict]:
    """The grid every method gets alike: stage-1 augmentation x stage-2 augmentation (two-stage methods) x the
    learning-rate multiplier (every stage). Ordered so the points sharing a stage 1 are neighbours and the
    recipe's own setting (x1, SimCLR stage 1) comes first."""
    from tailwise.training.config import load_config

    base = load_config(args.recipe, [f"stage2.enabled={json.dumps(spec.get('stage2', {}).get('enabled', True))}"])
    two_stage = base["stage2"]["enabled"]
    common = [{"aug1": a1, **({"aug2": a2} if two_stage else {}), "lr": lr}
              for lr in GRID_LR for a1 in GRID_AUG for a2 in (GRID_AUG if two_stage else (None,))]
    # a method whose paper tunes more adds its own axis after the common points (whose ids stay as they are):
    # Weight Balancing's weight decay (multipliers of the row's, every stage); MiSLAS's shifted BN statistics
    # (its released configs turn them off for CIFAR-10, on for CIFAR-100 and ImageNet)
    extra = [dict(point, wd=wd) for wd in spec.get("grid_wd", []) if wd != 1.0 for point in common]
    extra += [dict(point, shift_bn=on) for on in spec.get("grid_shift_bn", [])
              if on != spec.get("stage2", {}).get("shift_bn", False) for point in common]
    return common + extra


def point_id(point: dict) -> str:
    return "-".join([f"s1{point['aug1']}", *([f"s2{point['aug2']}"] if point.get("aug2") else []),
                     f"lr{point['lr']:g}", *([f"wd{point['wd']:g}"] if "wd" in point else []),
                     *([f"shiftbn{int(point['shift_bn'])}"] if "shift_bn" in point else [])])


def grid_methods(methods: dict) -> list[str]:
    """The methods the grid tunes (not aliases of another row's run, not the balanced reference), FIGHT first."""
    names = [n for n, spec in methods.items() if "run" not in spec and not spec.get("reference")]
    return [n for n in FIGHT if n in names] + [n for n in names if n not in FIGHT]


def run_grid_point(name: str, spec: dict, point: dict, args, seed: int, wait: bool = True) -> Path | None:
    """Train one grid point (validation only: the test set is never loaded) and record its JSON."""
    import dataclasses

    from tailwise._core import atomic_write_text
    from tailwise.training import checkpoint
    from tailwise.training.train import data_from_config, run

    stem = f"{name}__{point_id(point)}-s{seed}"
    out = results_dir(args) / f"{stem}.json"
    if out.exists():
        return None
    run_dir = Path(args.workdir) / f"grid-{results_dir(args).name}" / stem
    with claim(run_dir.with_name(run_dir.name + ".lock")) as mine:
        if not mine:
            print(f"-- {stem}: another process is running it, skipped", flush=True)
            return None
        if out.exists():
            return None
        cfg = method_config(name, spec, args, seed, point)
        data = dataclasses.replace(data_from_config(cfg), test_source=None)     # validation only
        print(f"== grid {stem}: stage1 {cfg['stage1']['epochs']} ep"
              + (f", stage2 {cfg['stage2']['epochs']} ep" if cfg["stage2"]["enabled"] else "") + f" -> {run_dir}",
              flush=True)
        t0 = time.time()
        drop_if_stale(run_dir, cfg)
        if cfg["stage2"]["enabled"] and not (run_dir / "stage1.json").exists():
            shared_stage1(cfg, args, run_dir, data=data, wait=wait)
        run(cfg, run_dir, resume=run_dir.exists(), progress=not args.no_progress, data=data)
        card = checkpoint.load_card(run_dir)
        result = {
            "method": name, "label": spec["label"], "point": point, "point_id": point_id(point), "seed": seed,
            "budget": args.budget, "imbalance_factor": args.imbalance_factor,
            "val_plain": card["metrics"].get("val_mean_per_class"), **served_validation(card),
            "tau": (card.get("logit_adjustment") or {}).get("tau"),
            "val": card["metrics"], "image_passes": image_passes(run_dir, cfg),
            "optimizer_steps": optimizer_steps(run_dir, cfg), "train_seconds": train_seconds(run_dir),
            "seconds_this_session": round(time.time() - t0, 1), "device": cfg["device"],
            "tailwise_version": card["tailwise_version"], "index_sha256": card["data"]["index_sha256"],
            "config": cfg,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"== grid {stem}: val balanced accuracy served {100 * (result['val_served'] or 0):.2f} % "
              f"(tau {result['tau']}), plain {100 * (result['val_plain'] or 0):.2f} %", flush=True)
        return out


def grid_results(args) -> dict[str, list[dict]]:
    """The grid JSONs found, by method, each list in grid order."""
    methods, found = load_methods(), {}
    folder = results_dir(args)
    for name in grid_methods(methods):
        order = {point_id(p): i for i, p in enumerate(grid_points(methods[name], args))}
        results = [json.loads(p.read_text()) for p in folder.glob(f"{name}__*.json")]
        results = [r for r in results if r["method"] == name and r["point_id"] in order]
        for r in results:
            r["stale"] = bool(recorded_differently(r, methods[name], args))
        found[name] = sorted(results, key=lambda r: (r["seed"], order[r["point_id"]]))
    return found


def chosen_point(results: list[dict]) -> dict | None:
    """The point with the best validation balanced accuracy of the served logits (ties: plain, then grid order)."""
    scored = [r for r in results if r.get("val_served") is not None]
    if not scored:
        return None
    return max(scored, key=lambda r: (round(r["val_served"], 6), round(r["val_plain"] or 0, 6), -scored.index(r)))


def grid_table(args) -> str:
    methods = load_methods()
    found = grid_results(args)
    lines = [f"Validation grid: recipe {Path(args.recipe).stem}, IF {args.imbalance_factor:g}, budget {args.budget}; "
             "validation balanced accuracy % (served: post-hoc logit adjustment, tau chosen on validation; "
             "plain: raw logits). Points: stage-1 aug (s1), stage-2 aug (s2), learning-rate multiplier (lr).", "",
             "| method | point | seed | val served | tau | val plain | val few | optimizer steps | train s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    chosen_lines = []
    for name, results in found.items():
        best = chosen_point(results)
        for r in results:
            few = r["val"].get("val_few")
            lines.append(f"| {name} | {r['point_id']}{' **chosen**' if r is best else ''} | {r['seed']} | "
                         f"{100 * r['val_served']:.2f} | {r['tau']:g} | {100 * r['val_plain']:.2f} | "
                         + (f"{100 * few:.2f}" if few is not None else "-")
                         + f" | {r['optimizer_steps']:,} | {r['train_seconds']:,.0f} |")
        total = len(grid_points(methods[name], args))
        if best:
            chosen_lines.append(f"- {name}: {best['point_id']} (val served {100 * best['val_served']:.2f} %, "
                                f"tau {best['tau']:g}; {len(results)}/{total} points run)")
        else:
            chosen_lines.append(f"- {name}: nothing run yet (0/{total} points)")
    stale = [f"{name}__{r['point_id']}-s{r['seed']}" for name, results in found.items() for r in results if r["stale"]]
    return "\n".join(lines + ["", "Chosen on validation (so far):", *chosen_lines, *stale_line(stale)])


def write_tuned(args, methods_file: Path = METHODS_FILE) -> list[str]:
    """Record in methods.toml, as each row's `tuned = {...}` line, the grid point chosen on validation (with the
    numbers that chose it), for every method whose grid is complete; `run` then trains that setting. Returns
    one line per method saying what was written or why not."""
    from tailwise._core import atomic_write_text

    methods, text, said = load_methods(), methods_file.read_text(), []
    for name, results in grid_results(args).items():
        total, best = len(grid_points(methods[name], args)), chosen_point(results)
        if len(results) < total or best is None:
            said.append(f"- {name}: not written, {len(results)}/{total} grid points run")
            continue
        if stale := [r["point_id"] for r in results if r["stale"]]:
            said.append(f"- {name}: not written, {len(stale)} point(s) recorded with other settings than "
                        f"methods.toml gives now ({', '.join(stale)}): delete them to train them again")
            continue
        fields = {**best["point"], "val_served": round(best["val_served"], 4), "val_plain": round(best["val_plain"], 4),
                  "tau": best["tau"], "grid": f"{results_dir(args).name} seed {best['seed']}"}
        line = "tuned = { " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in fields.items()) + " }"
        lines, out, section = text.splitlines(), [], None
        for raw in lines:
            stripped = raw.strip()
            if stripped.startswith("[") and not stripped.startswith("[["):
                section = stripped.split("]")[0][1:]
            if section == name and stripped.startswith("tuned ="):
                continue                                      # replaced below
            out.append(raw)
            if section == name and stripped.startswith("label ="):
                out.append(line)
        text = "\n".join(out) + "\n"
        said.append(f"- {name}: {best['point_id']} (val served {100 * best['val_served']:.2f} %)")
    atomic_write_text(methods_file, text)
    load_methods()                                            # still valid TOML
    return said


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "table", "grid", "grid-table"):
        p = sub.add_parser(name)
        p.add_argument("--imbalance-factor", type=float, default=100)
        grid = name.startswith("grid")
        p.add_argument("--budget", type=int, default=4 if grid else 200,
                       help=f"passes over the LT training set (default {4 if grid else 200})")
        p.add_argument("--recipe", default="fmnist-lt-r32", help="base recipe (default fmnist-lt-r32)")
        folder = RESULTS / "grid" if grid else RESULTS
        p.add_argument("--results", default=str(folder), help=f"results folder (default {folder.relative_to(HERE.parent)})")
        p.add_argument("--methods", default="all", help="comma list of methods.toml names (default all)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field of the base recipe for every method")
    for name in ("run", "grid"):
        r = sub.choices[name]
        r.add_argument("--seeds", type=int, nargs="+", default=[0] if name == "grid" else [0, 1, 2])
        r.add_argument("--device", default="auto")
        r.add_argument("--workdir", default="runs/bench")
        r.add_argument("--no-progress", action="store_true")
    t = sub.choices["table"]
    t.add_argument("--doc", nargs="?", const=str(DOC),
                   help="also replace the table between its markers in this file (default docs/RESULTS.md)")
    t.add_argument("--readme", help="older spelling: README.md means docs/RESULTS.md beside it (never README.md)")
    t.add_argument("--rank-val", type=int, metavar="N",
                   help="print only the N best rows on validation (served), comma-separated, and write nothing; "
                        "a row that is the same runs as a row above it (LA and Balanced Softmax) is not counted")
    sub.choices["grid-table"].add_argument("--write-tuned", action="store_true",
                                           help="record each complete method's chosen point in methods.toml")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    if args.command in ("table", "grid-table"):
        args.overrides = [o for o in args.overrides if o.startswith("data.holdout_kept")]   # names the folder
    if args.command == "grid-table":
        print(grid_table(args))
        if args.write_tuned:
            print("\nRecorded in experiments/methods.toml (`tuned`; `run` trains it):", *write_tuned(args), sep="\n")
        return 0
    if args.command == "table":
        rows = collect(args)
        if args.rank_val:
            print(",".join(rank_on_validation(rows, distinct=True)[:args.rank_val]))
            return 0
        text = table(args, rows)
        doc = doc_path(args)
        if doc:
            plot = plot_best(rows, results_dir(args) / "best_per_class.png")
            if plot:
                rel = Path(os.path.relpath(plot.resolve(), doc.resolve().parent)).as_posix()
                text += f"\n\n![Per-class accuracy of the best methods]({rel})"
        print(text)
        if doc:
            write_doc(doc, doc_key(args), text)
        return 0
    methods = load_methods()
    names = (grid_methods(methods) if args.command == "grid" else list(methods)) if args.methods == "all" \
        else args.methods.split(",")
    unknown = [n for n in names if n not in methods]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(methods)}")
    if args.command == "grid":
        failed = []

        def point_once(item, wait):
            name, point, seed = item
            try:                   # a long background grid goes on past one failing point, and says so
                run_grid_point(name, methods[name], point, args, seed, wait=wait)
            except Deferred:
                raise
            except Exception:
                import traceback

                failed.append(f"{name}__{point_id(point)}-s{seed}")
                print(f"!! grid {failed[-1]} failed:\n{traceback.format_exc()}", flush=True)

        each_deferring([(name, point, seed) for seed in args.seeds for name in names     # method-major
                        for point in grid_points(methods[name], args)],
                       point_once, lambda item: f"{item[0]}__{point_id(item[1])}-s{item[2]}")
        if failed:
            print(f"!! grid: {len(failed)} point(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0
    each_deferring([(name, seed) for seed in args.seeds for name in names],        # seed-major
                   lambda item, wait: run_one(item[0], methods[item[0]], args, item[1], wait=wait),
                   lambda item: f"{item[0]} seed {item[1]}")
    return 0


def each_deferring(work: list, attempt, what) -> None:
    """attempt(item, wait=False) for every item of `work`, in order; an item whose shared stage 1 another process
    is training (Deferred) is not waited for: it is attempted again, waiting, after all the others."""
    deferred = []
    for item in work:
        try:
            attempt(item, False)
        except Deferred as busy:
            print(f"-- {what(item)}: {busy} is being trained by another process; later", flush=True)
            deferred.append(item)
    for item in deferred:
        attempt(item, True)


if __name__ == "__main__":
    sys.exit(main())
