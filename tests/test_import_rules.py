"""Which layer may import which (docs/ARCHITECTURE.md), checked on the AST of every module: top-level imports and
those inside functions alike. A wrong-way import fails here before it can make serving need torch."""

from __future__ import annotations

import ast
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
    # tailwise/__init__.py, cli.py, __main__.py: the command dispatches to the layers by name; the API names
    # (tailwise.load ...) are imported on first use (tests/test_api.py checks that `import tailwise` stays light)
    "root": {"tailwise": ("tailwise", "tailwise.cli", "tailwise._api", "tailwise._core", "tailwise.export"),
             "never": ("torch", "torchvision", "safetensors", "onnx", "onnxruntime", "bentoml", "numpy", "PIL")},
    # the Python API: load() is serving's classifier (no torch); train() and export() run the CLI's handlers
    "api": {"tailwise": ("tailwise", "tailwise.cli", "tailwise._core", "tailwise.serving", "tailwise.training.cli",
                         "tailwise.export"),
            "never": ("torch", "torchvision", "safetensors", "onnx", "onnxruntime", "bentoml")},
    # serving: everything it needs is inside model.onnx
    "serving": {"tailwise": ("tailwise", "tailwise._core", "tailwise.serving"),
                "never": ("torch", "torchvision", "safetensors", "onnxscript")},
    # training reads an exported model (tailwise evaluate MODEL_DIR) with onnxruntime, never with onnx
    "training": {"tailwise": ("tailwise", "tailwise._core", "tailwise.training"),
                 "never": ("onnx", "onnxscript", "bentoml")},
    # export rebuilds networks and reads checkpoints from training; of serving it uses only the definitions of
    # what it writes: serving.artifact (the ONNX metadata) and serving.integrity (the folder's manifest.json)
    # (export/__init__.py makes the package callable as the API's tailwise.export(run, out), via tailwise._api)
    "export": {"tailwise": ("tailwise", "tailwise._core", "tailwise.export", "tailwise.training",
                            "tailwise.serving.artifact", "tailwise.serving.integrity", "tailwise._api"),
               "never": ("bentoml",)},
}


def layer_of(path: Path) -> str:
    rel = path.relative_to(REPO)
    if rel.parts[0] == "tailwise":
        return {"_core.py": "core", "_api.py": "api"}.get(rel.name, "root")
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
                      if f"{module}.{alias.name}".startswith(tuple(f"tailwise.{x}" for x in (*LAYERS, "_core")))]
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
