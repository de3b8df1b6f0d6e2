"""tailwise: long-tailed image classification (BNS + IP-DPP), ONNX export and serving."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("tailwise")
except PackageNotFoundError:  # a source tree or a Bento that is not installed: read pyproject.toml if it is there
    import re
    from pathlib import Path

    _pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    _match = re.search(r'^version = "([^"]+)"', _pyproject.read_text(), re.M) if _pyproject.exists() else None
    __version__ = _match.group(1) if _match else "0.0.0+unknown"


class UserError(Exception):
    """An error the user can fix (missing or corrupt file, bad option). The CLI prints it without a traceback;
    the message must name the offending path or option."""
