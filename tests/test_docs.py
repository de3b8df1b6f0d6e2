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


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_commands_parse_and_name_real_recipes_and_files(doc):
    parser = build_parser()
    for argv in tailwise_commands(doc):
        args = parser.parse_args(argv)   # SystemExit on an unknown option or a missing argument
        if argv[0] == "train":
            load_config(args.config, args.overrides)   # the recipe exists and every --set value is valid
    for path in set(re.findall(r"models/fmnist-lt-tailwise/[\w./-]+\w", doc.read_text())):
        assert (REPO / path).exists(), f"{doc.name}: {path}"


def test_the_docs_show_every_command_name_every_recipe_and_every_exported_file():
    commands = [c for doc in DOCS for c in tailwise_commands(doc)]
    assert {c[0] for c in commands} >= {"data", "train", "evaluate", "probe", "export", "predict", "serve"}
    text = "\n".join(doc.read_text() for doc in DOCS)
    for name in recipe_names():
        assert f"`{name}`" in text, name
    for name in ("model.onnx", "weights.safetensors", "card.json", "model.int8.onnx", "model.fp16.onnx", "--force"):
        assert name in text, name


def test_readme_is_a_front_door():
    """Issue 25, item 11: at most 250 lines; Start here first (the shipped model, train on a folder, export,
    serve it), its training and export lines those of the walkthrough CI runs; make test-fast is one of the two
    commands; every docs/ page is linked from it."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    headings = re.findall(r"^## (.+)$", readme, re.M)
    assert headings[:3] == ["Start here", "Two commands", "Install"], headings
    start = readme.split("## Start here", 1)[1].split("\n## ", 1)[0]
    steps = re.findall(r"^\*\*(\d)\. ([^*]+)\*\*", start, re.M)
    assert [n for n, _ in steps] == ["1", "2", "3", "4"]
    assert [w.split()[0] for _, w in steps] == ["Serve", "Train", "Export", "Serve"]
    order = [c[0] for c in tailwise_commands_in(start)]
    assert order == ["predict", "train", "export", "evaluate", "serve"], order
    walkthrough = (REPO / "docs" / "YOUR-DATA.md").read_text().split("<!-- walkthrough:begin -->", 1)[1]
    for line in start.splitlines():
        if line.startswith(("tailwise train", "tailwise export", "python experiments/")):
            assert line in walkthrough, f"Start here runs a line the walkthrough test does not: {line}"
    two = re.search(r"## Two commands\n\n```bash\n(.*?)```", readme, re.S).group(1)
    assert [line.split()[:2] for line in two.splitlines()] == [["make", "serve"], ["make", "test-fast"]]
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"
    assert re.search(r"`--minutes M`.*budget, not a time limit", readme.replace("\n", " "))


def tailwise_commands_in(text: str) -> list[list[str]]:
    """The `tailwise` (or `.venv/bin/tailwise`) commands of the bash blocks in `text`, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            words = shlex.split(line.split("  #")[0].strip().removesuffix("&"), comments=True)
            for i, word in enumerate(words):
                if word.endswith("tailwise") and (i == 0 or words[i - 1] == "-m"):
                    commands.append(words[i + 1:])
                    break
    return commands
