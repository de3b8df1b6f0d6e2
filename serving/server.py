"""`tailwise serve` as a library function: check the model, the settings and the port, then become the BentoML
server (`bentoml serve tailwise.serving.service:TailwiseClassifier`, exec'd so that a signal to this process
reaches the server itself)."""

from __future__ import annotations

import os
import socket
import sys

from tailwise import OptionError
from tailwise.serving.artifact import (PACKAGE_PARENT, default_model_path, model_summary, read_metadata,
                                       resolve_model_path)
from tailwise.serving.integrity import verify_enabled
from tailwise.serving.settings import Settings


def check_port(host: str, port: int) -> None:
    """OptionError unless `host:port` can be bound now (TIME_WAIT is no conflict, as for the server)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise OptionError(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                          + (" (another server is using it: pick another {port})"
                             if getattr(exc, "errno", None) == 98 else ""), "port") from None


def server_command(model: str | os.PathLike | None = None, *, host: str = "127.0.0.1", port: int = 3000,
                   keep_alive: int = 75, shutdown_timeout: int = 20,
                   verify: bool | None = None) -> tuple[list[str], dict, str]:
    """Everything checked that can fail before the server starts; returns (argv, environment, a start-up line).
    `model`: a model folder or .onnx file, default tailwise.format.default_model ($TAILWISE_MODEL, else the shipped
    model). `verify`: check the model against its manifest (None: unless TAILWISE_VERIFY=0)."""
    settings = Settings.from_env()    # a bad TAILWISE_* value is a one-line error here, not a traceback in the server
    if not 0 < port < 65536:
        raise OptionError(f"{{port}} must be 1..65535, got {port}", "port")
    for name, value in (("keep_alive", keep_alive), ("shutdown_timeout", shutdown_timeout)):
        if value < 1:
            raise OptionError(f"{{{name}}} must be >= 1, got {value}", name)
    path = (resolve_model_path(model) if model is not None else default_model_path()).resolve()
    verify = verify_enabled(verify)
    meta = read_metadata(path, verify)  # fail here, with the path, rather than in the server's worker
    settings.sets_level(meta["prediction_sets"])   # a coverage the model was not calibrated for, too
    check_port(host, port)
    line = (f"tailwise serve: starting {path} ({model_summary(meta)}{'' if verify else ', NOT verified'}) on "
            f"http://{host}:{port}; ready when /readyz answers 200; SIGTERM or Ctrl+C stops it")
    argv = [sys.executable, "-m", "bentoml", "serve", "tailwise.serving.service:TailwiseClassifier",
            "--host", host, "--port", str(port), "--working-dir", str(PACKAGE_PARENT),
            "--timeout-keep-alive", str(keep_alive), "--timeout-graceful-shutdown", str(shutdown_timeout)]
    env = {**os.environ, "TAILWISE_MODEL": str(path), "TAILWISE_VERIFY": "1" if verify else "0"}
    return argv, env, line


def serve(model: str | os.PathLike | None = None, **options) -> None:
    """Check (server_command), then replace this process by the server; does not return."""
    argv, env, line = server_command(model, **options)
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)
