"""tailwise: long-tailed image classification (by default a network trained with the logit-adjusted loss, then
fine-tuned on redrawn IP-DPP subsets), ONNX export and serving.

The repository keeps `training/`, `export/` and `serving/` as top-level folders; they are the subpackages
`tailwise.training`, `tailwise.export` and `tailwise.serving`. A wheel installs them inside `tailwise/`
(pyproject.toml's package-dir); a source tree (a checkout on PYTHONPATH, a Bento) finds them through
`__path__` below; an editable install through either.
"""

import os as _os
from typing import TYPE_CHECKING as _TYPE_CHECKING
from importlib.metadata import PackageNotFoundError, version as _version

_HERE = _os.path.dirname(_os.path.abspath(__file__))
_ROOT = _os.path.dirname(_HERE)
# A source tree (a checkout, a Bento): the layer folders sit next to this one, not inside it as in a wheel. The
# repository root goes on __path__ after this folder, so `tailwise.serving` is <root>/serving (only the folders
# that are there: a Bento carries serving/ alone).
if (not _os.path.isdir(_os.path.join(_HERE, "serving"))
        and _os.path.isfile(_os.path.join(_ROOT, "serving", "__init__.py"))):
    __path__.append(_ROOT)

try:
    __version__ = _version("tailwise")
except PackageNotFoundError:  # a source tree or a Bento that is not installed: read pyproject.toml if it is there
    import re
    from pathlib import Path

    _pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    _match = re.search(r'^version = "([^"]+)"', _pyproject.read_text(), re.M) if _pyproject.exists() else None
    __version__ = _match.group(1) if _match else "0.0.0+unknown"


__all__ = ["Classifier", "ImageError", "OptionError", "UserError", "__version__", "evaluate", "export", "load",
           "predict_dataset", "train"]


def __getattr__(name: str):
    """The API, imported on first use: `import tailwise` imports neither numpy, onnxruntime nor torch.
    `tailwise.export` is the (callable) subpackage, the same object whichever way it was imported first."""
    if name == "export":
        import importlib

        return importlib.import_module("tailwise.export")
    if name in ("load", "train", "evaluate", "Classifier", "predict_dataset"):
        from tailwise import _api

        return getattr(_api, name)
    if name == "ImageError":
        from tailwise._core import ImageError

        return ImageError
    raise AttributeError(f"module 'tailwise' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


class UserError(Exception):
    """An error the user can fix (missing or corrupt file, bad option). The CLI prints it without a traceback;
    the message must name the offending path or option."""


class OptionError(UserError):
    """A UserError about options, each named the way the caller spells it: `budget=` where the Python API (or a
    library function) was called, `--budget` on the command line (tailwise.cli renders it so).

    `message` holds `{name}` (spelled `name=` / `--name`) or `{name=value}` (`name=value` / `--name value`, just
    `--name` for True) for each of `options`; str(error) is the Python spelling."""

    def __init__(self, message: str, *options: str):
        self.template, self.options = message, options
        super().__init__(self.render(lambda name, value: f"{name}={value}" if value is not None else f"{name}="))

    def render(self, spell) -> str:
        """The message with each option spelled by `spell(name, value or None)`."""
        import re

        def one(match):
            name, value = match.group(1), match.group(2)
            return spell(name, value) if name in self.options else match.group(0)
        return re.sub(r"\{(\w+)(?:=([^{}]*))?\}", one, self.template)


if _TYPE_CHECKING:  # for type checkers and IDEs only: the lazy names above, with their signatures
    from tailwise import export  # noqa: F401
    from tailwise._api import Classifier, evaluate, load, predict_dataset, train  # noqa: F401
    from tailwise._core import ImageError  # noqa: F401
