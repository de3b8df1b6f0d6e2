"""The model folder's manifest: each model file's size and sha256, written by export, checked before loading.

`manifest.json`, beside model.onnx:

    {"format_version": 1, "files": {"model.onnx": {"size": int, "sha256": str}, ...}}

It lists MODEL_FILES (the files `tailwise export` writes: model.onnx, its variants and their reports,
weights.safetensors, card.json), never itself; its schema and writer are the shared format's (tailwise/format.py),
this module checks files against it. `predict`, `serve` and the Bento read a model file's bytes once,
check them against the manifest and load those same bytes. A mismatch, a file the manifest does not list, or a
folder without a manifest is refused with a UserError naming the file (and both hashes). Opt out with
`--no-verify` or TAILWISE_VERIFY=0; after editing a model on purpose, `tailwise manifest MODEL_DIR` rewrites it.
Torch-free (the format module and the core's sha256 only).
"""

from __future__ import annotations

import os
from pathlib import Path

from tailwise import OptionError, UserError
from tailwise._core import sha256_bytes
from tailwise.format import (MANIFEST_FILE, MANIFEST_FORMAT, MODEL_FILES, build_manifest,  # noqa: F401 (re-exported)
                             model_files, parse_manifest, write_manifest)

MANIFEST_NAME = MANIFEST_FILE   # the name this module has always exported
# how to skip the check, as the caller spells it (OptionError): `--no-verify` on the command line, `verify=False`
# in Python (tailwise.load)
OPT_OUT = "{verify=False} or TAILWISE_VERIFY=0"


def verify_enabled(verify: bool | None = None) -> bool:
    """`verify` if given, else False only when $TAILWISE_VERIFY is "0"."""
    if verify is not None:
        return bool(verify)
    return os.environ.get("TAILWISE_VERIFY", "1").strip() != "0"


def read_manifest(folder: str | os.PathLike, for_file: str | os.PathLike | None = None) -> dict:
    """`folder`/manifest.json, checked for shape; UserError naming it (and `for_file`) if absent or malformed."""
    path = Path(folder) / MANIFEST_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise OptionError(f"{for_file or folder}: no {MANIFEST_NAME} in {Path(folder)} to verify it against; if "
                          f"you trust these files, create one with `tailwise manifest {Path(folder)}`, or skip the "
                          f"check with {OPT_OUT}", "verify") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: unreadable manifest ({exc})") from None
    return parse_manifest(text, path)


def read_verified(path: str | os.PathLike, verify: bool | None = None) -> bytes:
    """The bytes of model file `path`, checked against the manifest beside it (unless verification is off).
    UserError naming the file and both hashes on a mismatch."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not verify_enabled(verify):
        return data
    manifest = read_manifest(path.parent, path)
    entry = manifest["files"].get(path.name)
    where = path.parent / MANIFEST_NAME
    if entry is None:
        raise OptionError(f"{path}: not listed in {where}; refusing an unverified model file "
                          f"(`tailwise manifest {path.parent}` adds it, or skip the check with {OPT_OUT})", "verify")
    actual = sha256_bytes(data)
    if actual != entry["sha256"] or len(data) != entry["size"]:
        raise OptionError(f"{path}: sha256 {actual} ({len(data)} bytes) does not match {entry['sha256']} "
                          f"({entry['size']} bytes) in {where}: the file changed after export. Re-export it; if you "
                          f"changed it on purpose, run `tailwise manifest {path.parent}` or skip the check with "
                          f"{OPT_OUT}", "verify")
    return data


def check_folder(folder: str | os.PathLike) -> list[str]:
    """Problems with every file the manifest of `folder` lists (missing, size or sha256 mismatch); [] if none.
    Spelled for `tailwise manifest --check`, its caller (`--no-verify`, not `verify=False`)."""
    folder = Path(folder)
    problems = []
    for name in read_manifest(folder)["files"]:
        try:
            read_verified(folder / name, verify=True)
        except UserError as exc:
            problems.append(exc.render(lambda name, value: f"--no-{name}") if isinstance(exc, OptionError)
                            else str(exc))
    return problems
