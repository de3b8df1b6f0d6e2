"""The README and docs/ as a new user reads them (issue 18, item 9): links stay inside the repository, every
`tailwise` command parses and names real recipes and files, the install block installs one extra."""

import re
import shlex
from pathlib import Path

import pytest

from tailwise.cli import build_parser
from tailwise.training.config import load_config, recipe_names

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def bash_blocks(path: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)


def tailwise_commands(path: Path) -> list[list[str]]:
    """Every `tailwise ...` command line (also under torchrun) in the file's bash blocks, as argv after `tailwise`."""
    commands = []
    for block in bash_blocks(path):
        for line in block.replace("\\\n", " ").splitlines():       # continuation lines are one command
            for part in re.split(r"\s*(?:&&|;)\s*", line.split("  #")[0].strip().removesuffix("&")):
                words = shlex.split(part, comments=True)
                for i, word in enumerate(words):
                    if word in ("tailwise", "tailwise.cli") and (i == 0 or words[i - 1] == "-m"):
                        commands.append(words[i + 1:])
                        break
    return commands


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_resolve_inside_the_repository(doc):
    for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path = (doc.parent / target).resolve()
        assert path.is_relative_to(REPO), f"{doc.name} links {target}, outside the repository"
        assert path.exists(), f"{doc.name} links {target}, which does not exist"


def test_readme_points_to_the_method_in_docs():
    readme = (REPO / "README.md").read_text()
    assert "(docs/METHOD.md)" in readme and "shared/" not in readme
    assert "IP-DPP" in (REPO / "docs" / "METHOD.md").read_text()


def test_install_block_installs_one_onnxruntime_extra():
    for block in bash_blocks(REPO / "README.md"):
        extras = re.findall(r'pip install -e "\.\[([^\]]*)\]"', block)
        kinds = {kind for group in extras for kind in group.split(",") if kind in ("cpu", "gpu")}
        assert len(kinds) <= 1, f"pasting this block installs both onnxruntime extras:\n{block}"


def test_readme_commands_parse_and_name_real_recipes_and_files():
    parser = build_parser()
    commands = tailwise_commands(REPO / "README.md")
    assert {c[0] for c in commands} >= {"data", "train", "evaluate", "probe", "export", "predict", "serve"}
    for argv in commands:
        args = parser.parse_args(argv)   # SystemExit on an unknown option or a missing argument
        if argv[0] == "train":
            load_config(args.config, args.overrides)   # the recipe exists and every --set value is valid
    text = (REPO / "README.md").read_text()
    for path in set(re.findall(r"models/fmnist-lt-tailwise/[\w./-]+\w", text)):
        assert (REPO / path).exists(), path


def test_readme_names_every_recipe_and_every_exported_file():
    readme = (REPO / "README.md").read_text()
    for name in recipe_names():
        assert f"`{name}`" in readme, name
    for name in ("model.onnx", "weights.safetensors", "card.json", "model.int8.onnx", "model.fp16.onnx", "--force"):
        assert name in readme, name
    assert re.search(r"full `fmnist-lt-r32` .*hours", readme.replace("\n", " "))
