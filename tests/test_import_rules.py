"""Which layer may import which (docs/ARCHITECTURE.md), checked on the AST of every module: top-level imports and
those inside functions alike. A wrong-way import fails here before it can make serving need torch."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("training", "export", "serving")

# Per layer: the tailwise modules it may import (with their submodules; "tailwise" alone is the top module) and third-party packages it
# must never import. Everything else (stdlib, numpy, pillow, ...) is free.
RULES = {
    # the shared core: numpy and pillow only
    "core": {"tailwise": ("tailwise._core",),
             "never": ("torch", "torchvision", "safetensors", "onnx", "onnxruntime", "onnxscript", "bentoml")},
    # the one format every layer reads (file names, metadata, manifest, logit adjustment): numpy and the core only
    "format": {"tailwise": ("tailwise", "tailwise._core"),
               "never": ("torch", "torchvision", "safetensors", "onnx", "onnxruntime", "onnxscript", "bentoml", "PIL")},
    # the conformal prediction sets' math (calibration, sets, their coverage), read by export, serving, training
    "conformal": {"tailwise": ("tailwise._core",),
                  "never": ("torch", "torchvision", "safetensors", "onnx", "onnxruntime", "onnxscript", "bentoml",
                            "PIL")},
    # tailwise/__init__.py, cli.py, __main__.py: the command dispatches to the layers by name; the API names
    # (tailwise.load ...) are imported on first use (tests/test_api.py checks that `import tailwise` stays light)
    "root": {"tailwise": ("tailwise", "tailwise.cli", "tailwise._api", "tailwise._core", "tailwise.export"),
             "never": ("torch", "torchvision", "safetensors", "onnx", "onnxruntime", "bentoml", "numpy", "PIL")},
    # the Python API: load() is serving's classifier (no torch); train(), export() and evaluate() call the typed
    # library functions, never a command-line parser
    "api": {"tailwise": ("tailwise", "tailwise._core", "tailwise.format", "tailwise.conformal",
                         "tailwise.serving.artifact",
                         "tailwise.serving.ray_engine", "tailwise.training.launch", "tailwise.export.model_folder"),
            "never": ("torch", "torchvision", "safetensors", "onnx", "onnxruntime", "bentoml", "argparse")},
    # serving: everything it needs is inside model.onnx
    "serving": {"tailwise": ("tailwise", "tailwise._core", "tailwise.format", "tailwise.conformal",
                             "tailwise.serving"),
                "never": ("torch", "torchvision", "safetensors", "onnxscript")},
    # training reads an exported model (tailwise evaluate MODEL_DIR) with onnxruntime, never with onnx
    "training": {"tailwise": ("tailwise", "tailwise._core", "tailwise.format", "tailwise.conformal",
                              "tailwise.training"),
                 "never": ("onnx", "onnxscript", "bentoml")},
    # export rebuilds networks and reads checkpoints from training and writes by the format module; of serving it
    # uses only OnnxClassifier, to classify the model card's samples exactly as `tailwise predict` does
    # (export/__init__.py makes the package callable as the API's tailwise.export(run, out), via tailwise._api)
    "export": {"tailwise": ("tailwise", "tailwise._core", "tailwise.format", "tailwise.conformal", "tailwise.export",
                            "tailwise.training",
                            "tailwise.serving.artifact", "tailwise._api"),
               "never": ("bentoml",)},
}


def layer_of(path: Path) -> str:
    rel = path.relative_to(REPO)
    if rel.parts[0] == "tailwise":
        return {"_core.py": "core", "_api.py": "api", "format.py": "format",
                "conformal.py": "conformal"}.get(rel.name, "root")
    return rel.parts[0]


def package_of(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts[:-1])
    return ".".join(parts if parts[0] == "tailwise" else ["tailwise", *parts])


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; `from X import Y` also yields X.Y, so that
    `from tailwise import training` counts as importing tailwise.training."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_of(path).split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names
                      if f"{module}.{alias.name}".startswith(tuple(f"tailwise.{x}" for x in (*LAYERS, "_core",
                                                                                               "conformal")))]
    return found


def package_modules() -> list[Path]:
    return sorted(p for d in ("tailwise", *LAYERS) for p in (REPO / d).rglob("*.py"))


def within(module: str, allowed) -> bool:
    """`module` is one of `allowed` or inside one of them ("tailwise" itself allows only the top module)."""
    return any(module == p or (p != "tailwise" and module.startswith(p + ".")) for p in allowed)


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_each_layer_imports_only_what_it_may(path):
    rule = RULES[layer_of(path)]
    wrong = []
    for line, module in imported_modules(path):
        top = module.split(".")[0]
        if top == "tailwise" and not within(module, rule["tailwise"]):
            wrong.append(f"line {line}: {module}")
        elif top in rule["never"]:
            wrong.append(f"line {line}: {module}")
    assert not wrong, f"{path.relative_to(REPO)} ({layer_of(path)}) imports what its layer must not: {wrong}"


def test_nothing_imports_the_layers_by_their_folder_names():
    """`training`, `export` and `serving` install as tailwise.*; a bare `import training` would pick up whatever
    package of that name the user has."""
    files = package_modules() + [p for folder in ("tests", "benchmarks", "experiments")
                                 for p in sorted((REPO / folder).glob("*.py"))]
    wrong = [f"{p.relative_to(REPO)}:{line}: {module}" for p in files for line, module in imported_modules(p)
             if module.split(".")[0] in LAYERS]
    assert not wrong, wrong


def test_the_rules_catch_a_wrong_way_import(tmp_path, monkeypatch):
    """The checker itself: a function-level `from tailwise.serving.artifact import ...` in training is found."""
    fake = REPO / "training" / "data.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (
        "def f():\n    from tailwise.serving.artifact import load_image\n    from ..export import cli\n"))
    modules = [m for _, m in imported_modules(fake)]
    assert "tailwise.serving.artifact" in modules and "tailwise.export.cli" in modules
    with pytest.raises(AssertionError, match="tailwise.serving.artifact"):
        test_each_layer_imports_only_what_it_may(fake)


def test_export_uses_serving_only_to_classify_samples():
    """export writes serving's metadata and manifest by the format module; of serving it imports OnnxClassifier
    alone (export/model_card.py, to classify the samples as `tailwise predict` does; export/calibrate.py, to
    calibrate the prediction sets on what each model file serves)."""
    found = [(p.relative_to(REPO), m) for p in sorted((REPO / "export").glob("*.py")) for _, m in imported_modules(p)
             if m.startswith("tailwise.serving")]
    assert {m for _, m in found} <= {"tailwise.serving.artifact", "tailwise.serving.artifact.OnnxClassifier"}, found
    assert {str(p) for p, _ in found} <= {"export/model_card.py", "export/calibrate.py"}, found


# A run or model file name (training/checkpoint.py's cards and weights, engine's metrics logs, the model folder's
# files): only tailwise/format.py spells one where a path is built.
FILE_NAME = re.compile(r"(^|/)(stage[0-9{*]|model\.|card\.json|weights\.safetensors|manifest\.json|report\.json|"
                       r"per_class\.png|README\.md$|eval$|samples$)")


def path_literals(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string literal (f-string pieces included) that names a path: the right side of a
    `/`, or an argument of glob / rglob / open / joinpath."""
    def texts(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.JoinedStr):   # f"stage{n}.json" reads as "stage{}.json"
            return ["".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)]
        return []

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            found += [(node.lineno, t) for t in texts(node.right)]
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in ("glob", "rglob", "open", "joinpath"):
                found += [(node.lineno, t) for arg in node.args for t in texts(arg)]
    return found


def test_only_the_format_module_spells_run_and_model_file_names():
    wrong = [f"{p.relative_to(REPO)}:{line}: {text!r}" for p in package_modules() if p.name != "format.py"
             for line, text in path_literals(p.read_text()) if FILE_NAME.search(text)]
    assert not wrong, wrong
    # the checker itself: each way a name used to be spelled is found
    snippet = ('card = run_dir / f"stage{stage}.json"\nfound = folder.glob("*/model.onnx")\n'
               'plot = run_dir / "eval" / "per_class.png"\nopen(out / "card.json")\n')
    assert sorted(t for _, t in path_literals(snippet) if FILE_NAME.search(t)) == [
        "*/model.onnx", "card.json", "eval", "per_class.png", "stage{}.json"]
