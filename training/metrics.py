"""Long-tailed evaluation metrics from logits: top-1, many/medium/few, per-class accuracy, confusion, NLL, ECE.

numpy and matplotlib only (no torch), so it evaluates logits from a torch model or from onnxruntime alike.
"""

import json
import math
from pathlib import Path

import numpy as np

from tailwise import UserError
from tailwise._core import GROUP_NAMES, atomic_path
from tailwise.format import PER_CLASS_PLOT, REPORT_FILE

GROUPS = GROUP_NAMES  # tailwise._core, the one definition


def _check_inputs(logits, labels, counts, groups):
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must be a non-empty N x C array, got shape {logits.shape}")
    if not np.issubdtype(logits.dtype, np.number):
        raise ValueError(f"logits must be numeric, got dtype {logits.dtype}")
    if not np.all(np.isfinite(logits)):
        raise ValueError("logits contain NaN or infinity")
    num_samples, num_classes = logits.shape
    if labels.shape != (num_samples,):
        raise ValueError(f"labels must have shape ({num_samples},) to match logits {logits.shape}, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    if len(counts) != num_classes:
        raise ValueError(f"counts has {len(counts)} entries but logits have {num_classes} classes")
    if len(groups) != num_classes:
        raise ValueError(f"groups has {len(groups)} entries but logits have {num_classes} classes")
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"groups must be one of {GROUPS}, got {unknown}")
    return logits.astype(np.float64), labels.astype(np.int64)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, num_bins: int = 15) -> float:
    """ECE: sum over equal-width bins (lo, hi] of |bin accuracy - bin mean confidence| * bin fraction."""
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    upper_edges = np.linspace(0.0, 1.0, num_bins + 1)[1:]
    bins = np.minimum(np.searchsorted(upper_edges, confidence, side="left"), num_bins - 1)
    ece = 0.0
    for b in range(num_bins):
        in_bin = bins == b
        if in_bin.any():
            gap = abs(correct[in_bin].mean() - confidence[in_bin].mean())
            ece += gap * in_bin.mean()
    return float(ece)


def _mean_of(per_class: list, classes) -> float | None:
    accs = [per_class[c] for c in classes if per_class[c] is not None]
    return float(np.mean(accs)) if accs else None


def group_means(per_class: list, groups: list[str]) -> dict:
    """{'many', 'medium', 'few'}: the mean per-class accuracy of each group's classes (None if it has none)."""
    return {g: _mean_of(per_class, [c for c, x in enumerate(groups) if x == g]) for g in GROUPS}


def evaluate_logits(logits: np.ndarray, labels: np.ndarray, counts: list[int], groups: list[str],
                    num_bins: int = 15) -> dict:
    """Evaluate N x C logits against N integer labels; `counts` / `groups` are per-class training counts and
    many/medium/few groups. Returns a JSON-safe dict; accuracies are fractions, None where a class or group
    has no test samples."""
    logits, labels = _check_inputs(logits, labels, counts, groups)
    num_samples, num_classes = logits.shape

    log_probs = _log_softmax(logits)
    predictions = log_probs.argmax(axis=1)
    correct = predictions == labels
    confidence = np.exp(log_probs.max(axis=1))

    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    support = confusion.sum(axis=1)
    per_class = [float(confusion[c, c] / support[c]) if support[c] else None for c in range(num_classes)]

    report = {
        "num_samples": int(num_samples),
        "top1": float(correct.mean()),
        **group_means(per_class, groups),
        "mean_per_class": _mean_of(per_class, range(num_classes)),
        "per_class": per_class,
        "per_class_support": [int(s) for s in support],
        "confusion": confusion.tolist(),
        "nll": float(-log_probs[np.arange(num_samples), labels].mean()),
        "ece": expected_calibration_error(confidence, correct.astype(np.float64), num_bins),
        "num_bins": int(num_bins),
        "train_counts": [int(n) for n in counts],
        "groups": list(groups),
    }
    return report


def _atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a temp file next to `path`, then move it into place."""
    with atomic_path(path) as tmp:
        write(str(tmp))


def _plot_per_class(report: dict, class_names: list[str], title: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colours = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for group in GROUPS:
        points = [(max(n, 1), acc, name)
                  for n, acc, g, name in zip(report["train_counts"], report["per_class"], report["groups"], class_names)
                  if g == group and acc is not None]
        if not points:
            continue
        xs, ys, names = zip(*points)
        mean = report[group]
        ax.scatter(xs, ys, color=colours[group], label=f"{group} (mean {mean:.3f})", zorder=3)
        for x, y, name in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or f"per-class accuracy (top-1 {report['top1']:.3f})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


REPORT_KEYS = frozenset({"per_class", "mean_per_class", "top1"})     # what makes a JSON a tailwise report
DATA_CARD_KEYS = frozenset({"index_sha256", "class_names", "counts"})  # ... a `tailwise data` card


def check_overwrite(json_path: Path, png_path: Path, keys: frozenset, what: str) -> None:
    """Before a JSON + PNG pair is written into a folder the user may have named: a file already there under
    either name is replaced only when it is tailwise's own (the JSON holds `keys`; the PNG has such a JSON
    beside it), else a UserError naming it (a user's file of the same name is never overwritten)."""
    ours = False
    if json_path.exists():
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
            ours = isinstance(data, dict) and keys <= data.keys()
        except (OSError, ValueError):
            pass
        if not ours:
            raise UserError(f"{json_path} exists and is not {what} tailwise wrote; it is left alone: move it, or "
                            "choose another --out")
    if png_path.exists() and not ours:
        raise UserError(f"{png_path} exists without {what} of tailwise's beside it; it is left alone: move it, or "
                        "choose another --out")


def check_report_folder(out_dir) -> None:
    """UserError unless save_report may write into `out_dir` (check_overwrite): asked before the scoring."""
    check_overwrite(Path(out_dir) / REPORT_FILE, Path(out_dir) / PER_CLASS_PLOT, REPORT_KEYS, "a report")


def save_report(report: dict, out_dir, class_names: list[str], title: str = "") -> tuple[Path, Path]:
    """Write `out_dir/report.json` and `out_dir/per_class.png` (per-class accuracy against training count,
    coloured by group) atomically, replacing only tailwise's own files (check_overwrite); returns (json_path,
    png_path)."""
    if len(class_names) != len(report["per_class"]):
        raise ValueError(f"class_names has {len(class_names)} entries but the report has "
                         f"{len(report['per_class'])} classes")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / REPORT_FILE, out_dir / PER_CLASS_PLOT
    check_report_folder(out_dir)
    text = json.dumps(report, indent=2, allow_nan=False)

    def write_json(tmp):
        Path(tmp).write_text(text + "\n", encoding="utf-8")

    _atomic_write(json_path, write_json)
    _plot_per_class(report, class_names, title, png_path)
    return json_path, png_path


def format_report(report: dict, class_names: list[str]) -> str:
    """Readable text summary: overall, many / medium / few, NLL / ECE, then a per-class table."""
    def pct(x):
        return "   n/a" if x is None else f"{100 * x:6.2f}"

    num_per_group = {g: sum(1 for x in report["groups"] if x == g) for g in GROUPS}
    lines = [
        f"samples         {report['num_samples']}",
        f"top-1           {pct(report['top1'])} %",
        f"mean per-class  {pct(report['mean_per_class'])} %",
        *(f"{g:<15} {pct(report[g])} %  ({num_per_group[g]} classes)" for g in GROUPS),
        f"NLL             {report['nll']:.4f}",
        f"ECE             {report['ece']:.4f}",
        "",
    ]
    width = max([len("class")] + [len(n) for n in class_names])
    lines.append(f"{'class':<{width}}  {'group':<6}  {'train':>7}  {'test':>6}  {'acc %':>6}")
    for name, group, n_train, n_test, acc in zip(class_names, report["groups"], report["train_counts"],
                                                 report["per_class_support"], report["per_class"]):
        lines.append(f"{name:<{width}}  {group:<6}  {n_train:>7}  {n_test:>6}  {pct(acc)}")
    return "\n".join(lines)


def format_evaluation(report: dict, class_names: list[str]) -> str:
    """Readable test report in percent: plain-logit and served (logit-adjusted, what `predict` and the service
    return) numbers side by side, then per class; a model without logit adjustment serves its plain logits."""
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f} %"

    served = report.get("logit_adjusted")
    if served is not None:
        head = ("plain logits", f"served (logit-adjusted, tau {served['tau']:g})")
        note = "served = what `tailwise predict` and the service return (logits - tau * log training prior)"
    else:
        served = report
        head = ("plain logits", "served (= plain: no logit adjustment)")
        note = "served = what `tailwise predict` and the service return"
    num_per_group = {g: sum(1 for x in report["groups"] if x == g) for g in GROUPS}
    rows = [("overall (top-1)", "top1"), ("mean per class", "mean_per_class"),
            *((f"{g} ({num_per_group[g]} classes)", g) for g in GROUPS)]
    w0, w1 = max(len(r[0]) for r in rows), max(len(head[0]), 9)
    scored_on = f"{report['data']}" if report.get("data") else "test set"
    left_out = f" ({report['skipped']} files that do not decode left out)" if report.get("skipped") else ""
    lines = [f"{scored_on}, {report['num_samples']} images{left_out}; {note}", "",
             f"{'':<{w0}}  {head[0]:>{w1}}  {head[1]}"]
    lines += [f"{label:<{w0}}  {pct(report[key]):>{w1}}  {pct(served[key]):>9}" for label, key in rows]
    lines += [f"NLL {report['nll']:.4f}, ECE {100 * report['ece']:.2f} % (plain logits)", ""]
    width = max([len("class")] + [len(n) for n in class_names])
    lines.append(f"{'class':<{width}}  {'group':<6}  {'train':>7}  {'test':>6}  {'plain %':>7}  {'served %':>8}")
    for c, name in enumerate(class_names):
        plain, adj = report["per_class"][c], served["per_class"][c]
        lines.append(f"{name:<{width}}  {report['groups'][c]:<6}  {report['train_counts'][c]:>7}  "
                     f"{report['per_class_support'][c]:>6}  "
                     + ("    n/a" if plain is None else f"{100 * plain:>7.2f}") + "  "
                     + ("     n/a" if adj is None else f"{100 * adj:>8.2f}"))
    if report.get("prediction_sets"):
        lines += ["", *format_sets(report["prediction_sets"], class_names, report["groups"])]
    return "\n".join(lines)


def format_sets(sets: dict, class_names: list[str], groups: list[str]) -> list[str]:
    """The prediction sets' lines of the report (tailwise.conformal.set_report per calibrated coverage, the default
    first): coverage and mean set size per group of the true class, then coverage per class at the default."""
    def pct(x):
        return "    n/a" if x is None else f"{100 * x:6.2f} %"

    def size(x):
        return "  n/a" if x is None else f"{x:5.2f}"

    lines = ["prediction sets (conformal, calibrated on validation): coverage = how often the set holds the true "
             "class, by the group of the true class; size = labels per set; unsure = sets of other than one label",
             f"{'target':<8}  {'thresholds':<10}  {'coverage':>8}  " + "  ".join(f"{g:>8}" for g in GROUPS)
             + f"  {'size':>5}  " + "  ".join(f"{g + ' size':>11}" for g in GROUPS) + f"  {'unsure':>8}"
             + f"  {'empty':>8}"]
    thresholds = {"class": "per class", "group": "per group", "marginal": "one for all"}
    for r in sets.values():
        lines.append(f"{100 * r['coverage_target']:>6g} %  {thresholds[r['conditional']]:<10}  {pct(r['coverage'])}  "
                     + "  ".join(pct(r["per_group"][g]) for g in GROUPS) + f"  {size(r['mean_size'])}  "
                     + "  ".join(f"{size(r['mean_size_per_group'][g]):>11}" for g in GROUPS)
                     + f"  {pct(r['unsure'])}  {pct(r['empty'])}")
    default = next(iter(sets.values()))
    width = max([len("class")] + [len(n) for n in class_names])
    lines += ["", f"coverage per class at {100 * default['coverage_target']:g} %:",
              f"{'class':<{width}}  {'group':<6}  {'coverage':>8}"]
    lines += [f"{name:<{width}}  {groups[c]:<6}  {pct(default['per_class'][c])}" for c, name in enumerate(class_names)]
    return lines


GROUP_COLOURS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}


def plot_class_counts(counts: list[int], groups: list[str], class_names: list[str], thresholds: tuple[int, int],
                      title: str, path: Path) -> None:
    """The class-count histogram, classes sorted by count (log scale), coloured by group, with the many and few
    bands' thresholds drawn across; written atomically to `path` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import ScalarFormatter

    order = sorted(range(len(counts)), key=lambda c: -counts[c])
    fig = Figure(figsize=(max(6, min(16, 0.35 * len(counts) + 3)), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(order)), [max(counts[c], 0.8) for c in order], color=[GROUP_COLOURS[groups[c]] for c in order])
    many, few = thresholds
    ax.axhline(many + 0.5, color=GROUP_COLOURS["many"], ls="--", lw=1, label=f"many: more than {many}")
    ax.axhline(max(few - 0.5, 0.5), color=GROUP_COLOURS["few"], ls="--", lw=1, label=f"few: fewer than {few}")
    handles = [Patch(color=GROUP_COLOURS[group], label=f"{group} ({sum(g == group for g in groups)} classes)")
               for group in GROUPS]
    if len(order) <= 40:
        ax.set_xticks(range(len(order)), [class_names[c] for c in order], rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(order)} classes, by training count")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_ylabel("training images (log scale)")
    ax.set_title(title)
    ax.legend(handles=ax.get_legend_handles_labels()[0] + handles, loc="upper right", fontsize=8)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def count_bars(counts: list[int], groups: list[str], class_names: list[str], width: int = 40,
               max_rows: int = 40) -> list[str]:
    """A terminal bar chart of the class counts (largest first, bars on a linear scale), each row tagged with
    its group; with more than `max_rows` classes, every k-th class by count is shown."""
    order = sorted(range(len(counts)), key=lambda c: -counts[c])
    step = max(1, math.ceil(len(order) / max_rows))
    shown = order[::step] + ([order[-1]] if (len(order) - 1) % step else [])
    top = max(1, max(counts))
    name_width = max(len(class_names[c]) for c in shown)
    lines = [] if step == 1 else [f"(every {step}th class by count, of {len(order)})"]
    for c in shown:
        bar = "#" * max(1 if counts[c] else 0, round(width * counts[c] / top))
        lines.append(f"{class_names[c]:<{name_width}}  {counts[c]:>7}  {groups[c]:<6}  {bar}")
    return lines
