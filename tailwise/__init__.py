"""tailwise: long-tailed image classification (BNS + IP-DPP), ONNX export and serving."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("tailwise")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"


class UserError(Exception):
    """An error the user can fix (missing or corrupt file, bad option). The CLI prints it without a traceback;
    the message must name the offending path or option."""
