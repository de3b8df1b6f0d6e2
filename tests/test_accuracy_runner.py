"""The accuracy-table runner on tiny data: methods are configs, results are kept as JSON, re-runs fill gaps."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_accuracy_runner, write_recipe

REPO = Path(__file__).resolve().parents[1]


def runner(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "experiments" / "accuracy.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_runner_fills_gaps_and_prints_table(tmp_path, cifar_archive):
    archive, _, _ = cifar_archive(per_class=40, test_per_class=5)
    recipe = write_recipe(tmp_path, archive)
    common = ["--recipe", str(recipe), "--imbalance-factor", "10", "--budget", "2", "--results", str(tmp_path / "res")]
    run = ["run", *common, "--seeds", "0", "--methods", "ce,bns-kdpp,bns-random,bns-kdpp-la", "--workdir", str(tmp_path / "w"),
           "--no-progress", "--device", "cpu"]
    first = runner(*run, cwd=REPO)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    folder = tmp_path / "res" / "tiny-if10-b2"
    assert sorted(p.name for p in folder.glob("*.json")) == ["bns-kdpp-s0.json", "bns-random-s0.json", "ce-s0.json"]
    # the two BNS rows share one stage-1 run (trained once) and differ only in stage 2
    work = tmp_path / "w" / "tiny-if10-b2"
    (shared,) = [p for p in work.iterdir() if p.name.startswith("stage1-bns-") and p.is_dir()]
    cards = [json.loads((work / f"{m}-s0" / "stage1.json").read_text()) for m in ("bns-kdpp", "bns-random")]
    assert {c["weights_sha256"] for c in cards} == {json.loads((shared / "stage1.json").read_text())["weights_sha256"]}
    assert all(c["shared_from"] == str(shared) for c in cards)
    assert first.stdout.count("-- shared stage 1") == 1
    ce = json.loads((folder / "ce-s0.json").read_text())
    bns = json.loads((folder / "bns-kdpp-s0.json").read_text())
    # the same budget in image passes: CE 2 passes of the LT set; BNS 3/4 of it in two-view stage 1 + stage 2
    assert ce["config"]["stage1"]["epochs"] == 2 and not ce["config"]["stage2"]["enabled"]
    assert bns["config"]["stage1"]["method"] == "bns" and bns["config"]["stage2"]["sampler"] == "kdpp"
    assert 0 <= ce["test"]["top1"] <= 1 and ce["train_seconds"] > 0
    # the shared stage 1 counts in full for each row that uses it, in image passes and in seconds
    random_row = json.loads((folder / "bns-random-s0.json").read_text())
    assert random_row["image_passes"] == bns["image_passes"] and random_row["train_seconds"] > 0
    assert bns["test"]["logit_adjusted"]["tau"] == bns["logit_adjustment_tau"]   # tau picked on validation
    second = runner(*run, cwd=REPO)               # nothing left to do: no training
    assert second.returncode == 0 and "==" not in second.stdout
    readme = tmp_path / "README.md"
    readme.write_text("the README is never written\n")
    doc = tmp_path / "docs" / "RESULTS.md"
    doc.parent.mkdir()
    doc.write_text("intro\n<!-- accuracy-table:tiny-if10-b2:begin -->\nstale\n<!-- accuracy-table:tiny-if10-b2:end -->\noutro\n")
    table = runner("table", *common, "--readme", str(readme), cwd=REPO)      # the older flag: docs/RESULTS.md
    assert table.returncode == 0, table.stderr
    assert readme.read_text() == "the README is never written\n"
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "stale" not in text
    assert "| CE |" in text and (folder / "best_per_class.png").stat().st_size > 0
    assert "](../res/tiny-if10-b2/best_per_class.png)" in text         # the plot's path, relative to the doc
    # every row has a tuned tau now, the single-stage CE too; its served and plain columns sit side by side
    assert ce["test"]["logit_adjusted"]["tau"] == ce["logit_adjustment_tau"] in accuracy_taus()
    assert ce["optimizer_steps"] == sum(json.loads(line)["steps"] for line in
                                        (work / "ce-s0" / "stage1_metrics.jsonl").read_text().splitlines())
    # results recorded before optimizer steps were: the count follows from the config, as the loop takes them
    for row in (ce, bns):
        assert _load_runner_module().planned_steps(row["config"], row["classes"]["counts"]) == row["optimizer_steps"]
    # the winner sentence names the row(s) with the highest mean served test accuracy, read from the JSON
    overall = {"CE": ce["test"]["logit_adjusted"]["top1"], "BNS + IP-DPP (kdpp)": bns["test"]["logit_adjusted"]["top1"],
               "BNS + IP-DPP + post-hoc logit adjustment": bns["test"]["logit_adjusted"]["top1"],
               "BNS + random undersampling (released code's behaviour)": random_row["test"]["logit_adjusted"]["top1"]}
    best_line = next(line for line in table.stdout.splitlines() if line.startswith("- Best overall:"))
    top = max(overall.values())
    for label, value in overall.items():
        assert (label in best_line.split(" %")[0]) == (abs(value - top) < 5e-4), (label, best_line)
    assert f"{100 * top:.1f} %" in best_line
    lines = table.stdout.splitlines()
    ce_row = next(line for line in lines if line.startswith("| CE |"))
    cells = [c.strip() for c in ce_row.split("|")[1:-1]]
    assert cells[1] == "1" and cells[2] == f"{100 * ce['test']['logit_adjusted']['top1']:.1f}"
    assert cells[6] == f"{100 * ce['test']['top1']:.1f}" and cells[8] == f"{ce['logit_adjustment_tau']:g}"
    assert "optimizer steps | train s |" in table.stdout
    assert cells[10] == f"{ce['optimizer_steps']:,}" and cells[11] == f"{ce['train_seconds']:,.0f}"
    # validation served balanced accuracy: recorded per run (at the chosen tau) and what ranks the rows
    from tailwise.training import checkpoint

    la = checkpoint.load_card(work / "ce-s0")["logit_adjustment"]
    assert ce["val_served"] == {float(t): v for t, v in la["val_mean_per_class"].items()}[float(la["tau"])]
    assert cells[12] == f"{100 * ce['val_served']:.1f}"
    vals = {name: json.loads((folder / f"{name}-s0.json").read_text())["val_served"]
            for name in ("ce", "bns-kdpp", "bns-random")}
    ranked = runner("table", *common, "--rank-val", "2", cwd=REPO)
    assert ranked.returncode == 0 and ranked.stdout.strip() == ",".join(sorted(vals, key=vals.get, reverse=True)[:2])
    assert "Best on validation" in table.stdout
    other = tmp_path / "OTHER.md"
    other.write_text("no markers here\n")
    added = runner("table", *common, "--doc", str(other), cwd=REPO)     # no markers yet: a section is added
    assert added.returncode == 0, added.stderr
    assert other.read_text().startswith("no markers here\n\n## tiny-if10-b2\n\n<!-- accuracy-table:tiny-if10-b2:begin -->")
    assert "Not run yet:" in table.stdout and "ldam-drw" in table.stdout


def test_runner_skips_a_run_another_process_holds(tmp_path, cifar_archive):
    import fcntl

    archive, _, _ = cifar_archive(per_class=40, test_per_class=5)
    recipe = write_recipe(tmp_path, archive)
    lock = tmp_path / "w" / "tiny-if10-b2" / "ce-s0.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)       # as a second `run` process would hold it
        held = runner("run", "--recipe", str(recipe), "--imbalance-factor", "10", "--budget", "2", "--results",
                      str(tmp_path / "res"), "--seeds", "0", "--methods", "ce", "--workdir", str(tmp_path / "w"),
                      "--no-progress", "--device", "cpu", cwd=REPO)
    assert held.returncode == 0, held.stderr[-3000:]
    assert "another process is running it, skipped" in held.stdout
    assert not (tmp_path / "res" / "tiny-if10-b2" / "ce-s0.json").exists()
    assert not (tmp_path / "w" / "tiny-if10-b2" / "ce-s0").exists()


def accuracy_taus():
    from tailwise.training.train import LA_TAU_GRID

    return LA_TAU_GRID


_load_runner_module = load_accuracy_runner


def test_table_scores_the_balanced_reference_on_lt_groups_and_never_names_it_best(tmp_path):
    accuracy = _load_runner_module()
    args = argparse.Namespace(results=str(tmp_path), recipe="tiny", imbalance_factor=100, budget=4)
    folder = accuracy.results_dir(args)
    folder.mkdir(parents=True)
    names = ["a", "b", "c", "d"]

    def write(stem, per_class, counts, groups):
        test = {"top1": sum(per_class) / 4, "per_class": per_class,
                **{g: sum(a for a, x in zip(per_class, groups) if x == g) / groups.count(g) for g in set(groups)}}
        (folder / f"{stem}.json").write_text(json.dumps({"test": test, "image_passes": 100, "classes": {
            "class_names": names, "counts": counts, "groups": groups}}))

    lt_groups = ["many", "many", "medium", "few"]
    write("ce-s0", [0.9, 0.8, 0.4, 0.1], [100, 50, 20, 5], lt_groups)
    write("ce-s1", [0.9, 0.7, 0.5, 0.3], [100, 50, 20, 5], lt_groups)
    write("bsce-s0", [0.8, 0.7, 0.6, 0.5], [100, 50, 20, 5], lt_groups)
    write("la-s0", [0.8, 0.7, 0.6, 0.5], [100, 50, 20, 5], lt_groups)          # the same loss: a tie
    write("balanced-ce-s0", [0.95, 0.9, 0.9, 0.85], [100] * 4, ["many"] * 4)
    rows = {r["name"]: r for r in accuracy.collect(args)}
    ref = rows["balanced-ce"]["tests"][0]
    assert ref["many"] == (0.95 + 0.9) / 2 and ref["medium"] == 0.9 and ref["few"] == 0.85
    text = accuracy.table(args)
    # no tuned tau recorded (runs from before every row had one): served = plain, flagged with *
    assert ("| CE * | 2 | 57.5 +- 3.5 | 82.5 +- 3.5 | 45.0 +- 7.1 | 20.0 +- 14.1 | 57.5 +- 3.5 | 20.0 +- 14.1 | - "
            "| 100 | - | - |") in text
    assert "*: run before every row had a tuned tau; its served columns are its plain logits" in text
    assert "many / medium / few are the means over the classes that are many / medium / few in the LT set" in text
    best = [line for line in text.splitlines() if line.startswith("- Best")]
    tied = "**Logit-adjusted loss (tau = 1) (tied with Balanced Softmax)**"
    assert best[0].startswith(f"- Best overall: {tied}, 65.0 %, 7.5 points above the next, CE (57.5 %)")
    assert best[1].startswith(f"- Best on the few-shot classes: {tied}, 50.0 %, 30.0 points above the next, CE (20.0 %)")
    assert "Upper bound" not in "".join(best)


def test_winner_within_seed_spread_is_not_called_clear():
    accuracy = _load_runner_module()

    def row(name, label, tops):
        return {"name": name, "label": label, "reference": False,
                "tests": [{"top1": t, "few": t} for t in tops], "passes": [1] * len(tops), "classes": None}

    close = accuracy.winners([row("ce", "CE", [0.50, 0.60, 0.55]), row("la", "LA", [0.50, 0.70, 0.60])])
    assert close[0].startswith("- Best overall: **LA**, 60.0 %, 5.0 points above the next, CE (55.0 %)")
    assert close[0].endswith("(std over seeds 10.0 and 5.0); the gap to the next is smaller than the spread "
                             "over seeds, so not a clear win.")
    clear = accuracy.winners([row("ce", "CE", [0.50, 0.52]), row("la", "LA", [0.70, 0.72])])
    assert clear[0].endswith("(std over seeds 1.4 and 1.4).")


def test_rank_val_counts_one_method_under_two_names_once():
    """LA and Balanced Softmax are one formula and their runs give the same numbers: `--rank-val 2` (the IF 10 rows)
    names two methods, not the one method twice; the ranking line keeps both names."""
    accuracy = _load_runner_module()

    def row(name, val, top, seeds=2):
        tests = [{"top1": top + s / 100, "few": top} for s in range(seeds)]
        return {"name": name, "reference": False, "vals": [val] * seeds, "tests": tests, "plain": tests}

    rows = [row("ce", 0.85, 0.80), row("la", 0.87, 0.82), row("bsce", 0.87, 0.82), row("crt", 0.86, 0.81)]
    assert accuracy.rank_on_validation(rows) == ["la", "bsce", "crt", "ce"]
    assert accuracy.rank_on_validation(rows, distinct=True) == ["la", "crt", "ce"]
    rows[2] = row("bsce", 0.87, 0.83)       # the same validation score, other test numbers: another method
    assert accuracy.rank_on_validation(rows, distinct=True) == ["la", "bsce", "crt", "ce"]
    rows[2] = row("bsce", 0.87, 0.82, seeds=1)   # one seed of the two: not known to be the same runs
    assert accuracy.rank_on_validation(rows, distinct=True) == ["la", "bsce", "crt", "ce"]


def test_no_few_shot_winner_when_no_class_is_few_shot():
    accuracy = _load_runner_module()
    rows = [{"name": n, "label": n.upper(), "reference": False, "passes": [1], "classes": None,
             "tests": [{"top1": t, "many": t, "medium": None, "few": None}]} for n, t in (("ce", 0.8), ("la", 0.7))]
    lines = accuracy.winners(rows)
    assert lines[0].startswith("- Best overall: **CE**, 80.0 %, 10.0 points above the next, LA (70.0 %)")
    assert lines[1] == "- No few-shot winner: no class is few-shot at this imbalance factor."


@pytest.mark.slow
def test_grid_trains_each_point_on_validation_only_and_picks_the_best_served(tmp_path, cifar_archive, monkeypatch):
    """The grid on tiny data (two of its lr multipliers, one augmentation): one JSON per point with validation
    numbers and optimizer steps and no test numbers; a second call trains nothing; grid-table marks the point
    with the best served validation accuracy."""
    accuracy = _load_runner_module()
    monkeypatch.setattr(accuracy, "GRID_LR", (1.0, 2.0))
    monkeypatch.setattr(accuracy, "GRID_AUG", ("light",))
    archive, _, _ = cifar_archive(per_class=40, test_per_class=5)
    recipe = write_recipe(tmp_path, archive)
    common = ["--recipe", str(recipe), "--imbalance-factor", "10", "--budget", "2", "--results", str(tmp_path / "g")]
    grid = ["grid", *common, "--methods", "la,tailwise-la-kdpp", "--workdir", str(tmp_path / "w"),
            "--no-progress", "--device", "cpu"]
    assert accuracy.main(grid) == 0
    folder = tmp_path / "g" / "tiny-if10-b2"
    assert sorted(p.name for p in folder.glob("*.json")) == [
        "la__s1light-lr1-s0.json", "la__s1light-lr2-s0.json",
        "tailwise-la-kdpp__s1light-s2light-lr1-s0.json", "tailwise-la-kdpp__s1light-s2light-lr2-s0.json"]
    la1, la2 = (json.loads((folder / f"la__s1light-lr{m}-s0.json").read_text()) for m in (1, 2))
    # the point's settings reach the config: augmentation on every stage, the lr multiplied on every stage
    assert la1["config"]["stage1"]["aug"] == "light" and la2["config"]["stage1"]["lr"] == 2 * la1["config"]["stage1"]["lr"]
    # Weight Balancing's own axis: weight decay x0.1 and x10 on both stages, after the common points
    wb = accuracy.load_methods()["weight-balancing"]
    points = accuracy.grid_points(wb, argparse.Namespace(recipe=str(recipe)))
    assert [accuracy.point_id(p) for p in points] == [
        "s1light-s2light-lr1", "s1light-s2light-lr2", "s1light-s2light-lr1-wd0.1", "s1light-s2light-lr2-wd0.1",
        "s1light-s2light-lr1-wd10", "s1light-s2light-lr2-wd10"]
    run_args = argparse.Namespace(recipe=str(recipe), imbalance_factor=10, budget=2, overrides=[], device="cpu")
    cfg = accuracy.method_config("weight-balancing", wb, run_args, 0, points[-1])
    assert cfg["stage1"]["weight_decay"] == pytest.approx(5.0) and cfg["stage2"]["weight_decay"] == pytest.approx(5.0)
    # MiSLAS's own axis: its shifted BN statistics off, after the common points (on: the row's setting)
    mislas = accuracy.load_methods()["mislas"]
    points = accuracy.grid_points(mislas, argparse.Namespace(recipe=str(recipe)))
    assert [accuracy.point_id(p) for p in points][-2:] == ["s1light-s2light-lr1-shiftbn0", "s1light-s2light-lr2-shiftbn0"]
    assert [accuracy.method_config("mislas", mislas, run_args, 0, p)["stage2"]["shift_bn"]
            for p in (points[0], points[-1])] == [True, False]
    one, two = (json.loads((folder / f"tailwise-la-kdpp__s1light-s2light-lr{m}-s0.json").read_text()) for m in (1, 2))
    assert two["config"]["stage2"]["lr"] == 2 * one["config"]["stage2"]["lr"] and two["config"]["stage2"]["aug"] == "light"
    assert two["config"]["stage1"]["lr"] == la2["config"]["stage1"]["lr"]
    for r in (la1, la2, two):
        assert "test" not in r and 0 <= r["val_plain"] <= 1
        assert r["val_served"] == max(r["val_by_tau"].values()) and r["val_by_tau"]["0.0"] == r["val_plain"]
    # optimizer steps counted from the metrics: a single-stage LA epoch is len(LT) // batch steps
    card = json.loads((tmp_path / "w" / "grid-tiny-if10-b2" / "la__s1light-lr1-s0" / "stage1.json").read_text())
    assert la1["optimizer_steps"] == la1["config"]["stage1"]["epochs"] * (card["data"]["num_train"] // 32)
    assert two["optimizer_steps"] > 0 and two["image_passes"] > 0
    # no run folder scored a test set
    assert not list((tmp_path / "w").rglob("report.json"))
    before = {p.name: p.stat().st_mtime for p in folder.glob("*.json")}
    assert accuracy.main(grid) == 0                      # resumable: nothing left to train
    assert {p.name: p.stat().st_mtime for p in folder.glob("*.json")} == before
    args = argparse.Namespace(results=str(tmp_path / "g"), recipe=str(recipe), imbalance_factor=10, budget=2,
                              overrides=[], methods="all")
    text = accuracy.grid_table(args)
    best = max((la1, la2), key=lambda r: (round(r["val_served"], 6), round(r["val_plain"], 6)))
    assert f"| la | {best['point_id']} **chosen** |" in text
    assert f"- la: {best['point_id']} (val served {100 * best['val_served']:.2f} %" in text
    assert "- ce: nothing run yet (0/2 points)" in text
    assert "- weight-balancing: nothing run yet (0/6 points)" in text          # + its weight-decay axis
    # the chosen point goes into methods.toml (a copy here) for complete grids only; `run` then trains it
    methods_copy = tmp_path / "methods.toml"                # without the repository's own tuned lines
    methods_copy.write_text("".join(line for line in accuracy.METHODS_FILE.read_text().splitlines(keepends=True)
                                    if not line.startswith("tuned =")))
    monkeypatch.setattr(accuracy, "METHODS_FILE", methods_copy)
    said = accuracy.write_tuned(args, methods_copy)
    assert f"- la: {best['point_id']} (val served {100 * best['val_served']:.2f} %)" in said
    assert "- ce: not written, 0/2 grid points run" in said
    methods = accuracy.load_methods()
    assert methods["la"]["tuned"]["lr"] == best["point"]["lr"] and "tuned" not in methods["ce"]
    assert methods["la"]["tuned"]["val_served"] == round(best["val_served"], 4)
    cfg = accuracy.method_config("la", methods["la"], run_args, 0)
    assert cfg["name"] == "la-s0" and cfg["stage1"]["lr"] == best["config"]["stage1"]["lr"]
    assert cfg["stage1"]["aug"] == "light"
    accuracy.write_tuned(args, methods_copy)                 # written again: replaced, not repeated
    assert methods_copy.read_text().count("tuned = ") == 2
    # the LA row changed after its points ran: they are flagged, and its tuned setting is not rewritten from them
    methods_copy.write_text(methods_copy.read_text().replace(
        'stage1 = { method = "supervised", loss = "la" }\nstage2 = { enabled = false }',
        'stage1 = { method = "supervised", loss = "la", weight_decay = 0.1 }\nstage2 = { enabled = false }', 1))
    assert accuracy.load_methods()["la"]["stage1"]["weight_decay"] == 0.1
    assert "(a row changed after they ran; delete them to train them again): la__s1light-lr1-s0, " \
        "la__s1light-lr2-s0." in accuracy.grid_table(args)
    assert any(line.startswith("- la: not written, 2 point(s) recorded with other settings")
               for line in accuracy.write_tuned(args, methods_copy))


def test_grid_goes_on_past_a_failing_point_and_comes_back_to_a_deferred_one(tmp_path, monkeypatch, capsys):
    """The grid's loop: a failing point does not stop the others; a point whose shared stage 1 another process is
    training (Deferred) is tried again after all the others, waiting then."""
    accuracy = _load_runner_module()
    monkeypatch.setattr(accuracy, "GRID_LR", (1.0, 2.0, 0.5))
    monkeypatch.setattr(accuracy, "GRID_AUG", ("light",))
    tried = []

    def fake_point(name, spec, point, args, seed, wait=True):   # the first fails, the second is busy once
        tried.append((accuracy.point_id(point), wait))
        if len(tried) == 1:
            raise RuntimeError("disk full")
        if len(tried) == 2:
            raise accuracy.Deferred("stage1-la-abc-s0")

    monkeypatch.setattr(accuracy, "run_grid_point", fake_point)
    assert accuracy.main(["grid", "--methods", "la", "--results", str(tmp_path)]) == 1
    assert tried == [("s1light-lr1", False), ("s1light-lr2", False), ("s1light-lr0.5", False), ("s1light-lr2", True)]
    out = capsys.readouterr()
    assert "!! grid la__s1light-lr1-s0 failed" in out.out and "disk full" in out.out
    assert "-- la__s1light-lr2-s0: stage1-la-abc-s0 is being trained by another process; later" in out.out
    assert "1 point(s) failed: la__s1light-lr1-s0" in out.err


def test_a_frozen_encoder_row_spends_five_percent_of_the_budget_on_its_classifier(tmp_path, cifar_archive):
    """The decoupled papers re-train a frozen encoder's classifier for 10 epochs against 200 for the encoder: such
    rows (cRT, Weight Balancing, MiSLAS) give stage 2 5 % of the image passes, at least one epoch; rows that
    re-train the whole network keep the 3/4 : 1/4 split; every row spends the same passes."""
    accuracy = _load_runner_module()
    archive, _, _ = cifar_archive(per_class=40, test_per_class=5)
    recipe = write_recipe(tmp_path, archive)
    methods = accuracy.load_methods()
    for budget, frozen in ((40, (38, 2)), (2, (1, 1))):
        args = argparse.Namespace(recipe=str(recipe), imbalance_factor=10, budget=budget, overrides=[], device="cpu")
        for name in ("crt", "crt-la", "weight-balancing", "mislas"):
            cfg = accuracy.method_config(name, methods[name], args, 0)
            assert cfg["stage2"]["freeze_encoder"] and (cfg["stage1"]["epochs"], cfg["stage2"]["epochs"]) == frozen
            # stage 2 samples the whole LT set (class-balanced or not): the same passes as a single-stage row
            assert sum(cfg[s]["epochs"] for s in ("stage1", "stage2")) == budget
        cfg = accuracy.method_config("tailwise-la-none", methods["tailwise-la-none"], args, 0)
        assert (cfg["stage1"]["epochs"], cfg["stage2"]["epochs"]) == ((30, 10) if budget == 40 else (2, 1))


def test_a_run_folder_started_with_another_config_is_trained_again(tmp_path, cifar_archive, capsys):
    """A row changed in methods.toml after its run began (another augmentation, a tuned lr, a new option): the
    runner's folder of that run is dropped, not resumed or recorded as the new row; the same config (a field
    added later at its default included) keeps it."""
    accuracy = _load_runner_module()
    archive, _, _ = cifar_archive(per_class=40, test_per_class=5)
    recipe = write_recipe(tmp_path, archive)
    args = argparse.Namespace(recipe=str(recipe), imbalance_factor=10, budget=2, overrides=[], device="cpu")
    methods = accuracy.load_methods()
    cfg = accuracy.method_config("tailwise-la-kdpp", methods["tailwise-la-kdpp"], args, 0)
    run_dir = tmp_path / "w" / "tailwise-la-kdpp-s0"
    run_dir.mkdir(parents=True)
    older = json.loads(json.dumps(cfg))
    del older["stage1"]["decay_all"]                                   # written before the field existed
    (run_dir / "stage1.json").write_text(json.dumps({"config": older}))
    (run_dir / "stage2.json").write_text(json.dumps({"config": older}))
    accuracy.drop_if_stale(run_dir, cfg)
    assert run_dir.exists() and capsys.readouterr().out == ""
    for section, field, value in (("stage2", "aug", "simclr"), ("stage1", "lr", 1.0), ("data", "imbalance_factor", 3.0)):
        changed = json.loads(json.dumps(cfg))
        changed[section][field] = value
        run_dir.mkdir(exist_ok=True)
        (run_dir / f"stage{2 if section == 'stage2' else 1}.json").write_text(json.dumps({"config": changed}))
        accuracy.drop_if_stale(run_dir, cfg)
        assert not run_dir.exists() and f"started with other {section} settings" in capsys.readouterr().out


def test_the_verdict_measures_the_recipe_against_the_best_baseline_or_peer():
    """The recipe's lead over the best baseline or peer overall (its own ablations and the balanced reference are
    not rivals), on the few-shot classes against that same row, whether it is a clear one (as rounded), whether it
    beats the spread over seeds, and whether every rival has the recipe's seeds."""
    accuracy = _load_runner_module()

    def row(name, role, top, few, reference=False, spread=0.01, seeds=3):
        return {"name": name, "label": name.upper(), "role": role, "reference": reference, "classes": None,
                "tests": [{"top1": top + d, "few": few + d} for d in (-spread, 0.0, spread)[:seeds]]}

    rows = [row("recipe", "recipe", 0.86, 0.90), row("wb", "peer", 0.84, 0.91), row("la", "baseline", 0.845, 0.88),
            row("random-subset", "ablation", 0.87, 0.95), row("balanced", None, 0.95, 0.95, reference=True)]
    (line,) = accuracy.verdict(rows)
    assert line == ("- The default recipe, **RECIPE**, against the best baseline or peer of this table, LA: +1.5 "
                    "points overall, +2.0 on the few-shot classes; a lead of at least 1.0 point overall and none below "
                    "it on the few-shot classes: yes.")
    rows[2] = row("la", "baseline", 0.845, 0.92)                 # the best rival is better on the few-shot classes
    assert accuracy.verdict(rows)[0].endswith("-2.0 on the few-shot classes; a lead of at least 1.0 point overall "
                                              "and none below it on the few-shot classes: no.")
    rows[2] = row("la", "baseline", 0.8504, 0.88)                # 0.96 points: +1.0 as shown, so a clear lead
    assert ": +1.0 points overall" in accuracy.verdict(rows)[0] and accuracy.verdict(rows)[0].endswith(": yes.")
    rows[0] = row("recipe", "recipe", 0.86, 0.90, spread=0.02)   # the seeds spread 2 points
    assert accuracy.verdict(rows)[0].endswith(": yes, though smaller than the spread over seeds (2.0).")
    rows[1] = row("wb", "peer", 0.84, 0.91, seeds=1)             # a rival short of seeds: not final
    assert accuracy.verdict(rows)[0].endswith("(not final: wb has fewer than the recipe's 3 seed(s)).")
    assert accuracy.verdict(rows[1:]) == []                      # no recipe row run yet


def test_every_row_the_verdict_compares_is_in_the_fight():
    """fair_fight.sh trains accuracy.FIGHT first at budget 20: it must hold the recipe and every baseline and peer
    (the rows the verdict measures), and every row has a role."""
    accuracy = _load_runner_module()
    methods = accuracy.load_methods()
    roles = {name: spec.get("role") for name, spec in methods.items() if "run" not in spec and not spec.get("reference")}
    assert set(roles.values()) <= {"recipe", "baseline", "peer", "ablation"} and list(roles.values()).count("recipe") == 1
    assert {name for name, role in roles.items() if role != "ablation"} <= set(accuracy.FIGHT) <= set(roles)


def test_a_row_whose_shared_stage_1_another_process_trains_is_deferred_not_waited_for(tmp_path, cifar_archive):
    """While another process holds a shared stage 1's lock (it is training it), a row that needs it is Deferred
    (the runner does other rows first and comes back, waiting, at the end), and nothing is written for it."""
    import fcntl

    accuracy = _load_runner_module()
    archive, _, _ = cifar_archive(per_class=40, test_per_class=5)
    recipe = write_recipe(tmp_path, archive)
    args = argparse.Namespace(recipe=str(recipe), imbalance_factor=10, budget=2, overrides=[], device="cpu",
                              no_progress=True)
    cfg = accuracy.method_config("tailwise-la-kdpp", accuracy.load_methods()["tailwise-la-kdpp"], args, 0)
    run_dir = tmp_path / "w" / "tailwise-la-kdpp-s0"
    lock = run_dir.parent / f"stage1-la-{accuracy.stage1_key(cfg)}-s0.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "a") as other:              # another open file description: as another process holds it
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(accuracy.Deferred, match=lock.stem):
            accuracy.shared_stage1(cfg, args, run_dir, wait=False)
    assert sorted(p.name for p in lock.parent.iterdir()) == [lock.name]


def test_run_comes_back_to_a_row_deferred_for_its_shared_stage_1(tmp_path, monkeypatch, capsys):
    accuracy = _load_runner_module()
    tried = []

    def fake_run_one(name, spec, args, seed, wait=True):
        tried.append((name, seed, wait))
        if (name, seed, wait) == ("tailwise-la-kdpp", 0, False):
            raise accuracy.Deferred("stage1-la-abc-s0")

    monkeypatch.setattr(accuracy, "run_one", fake_run_one)
    assert accuracy.main(["run", "--methods", "la,tailwise-la-kdpp", "--seeds", "0", "1",
                          "--results", str(tmp_path)]) == 0
    assert tried == [("la", 0, False), ("tailwise-la-kdpp", 0, False), ("la", 1, False), ("tailwise-la-kdpp", 1, False),
                     ("tailwise-la-kdpp", 0, True)]
    assert "-- tailwise-la-kdpp seed 0: stage1-la-abc-s0 is being trained by another process; later" in capsys.readouterr().out


def test_a_tuned_table_has_its_own_markers_in_the_doc():
    """`table --doc` replaces the text between its table's markers: the tuned budget-20 table and the older one of
    the same recipe, IF and budget are two tables (two marker pairs), not one overwriting the other."""
    accuracy = _load_runner_module()

    def key(results):
        return accuracy.doc_key(argparse.Namespace(results=results, recipe="fmnist-lt-r32", imbalance_factor=100,
                                                   budget=20, overrides=[]))

    assert key(str(accuracy.RESULTS)) == "fmnist-lt-r32-if100-b20"
    assert key(str(accuracy.RESULTS / "tuned")) == "tuned/fmnist-lt-r32-if100-b20"
    assert key("/elsewhere") == "fmnist-lt-r32-if100-b20"
