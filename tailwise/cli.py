"""The `tailwise` console command: one parser, subcommands registered by the folder that owns them."""

from __future__ import annotations

import argparse
import importlib
import sys

from tailwise import UserError, __version__

# Each module exposes register(subparsers); registering must not import torch.
SUBCOMMAND_MODULES = ("training.cli", "export.cli", "serving.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tailwise",
        description="Long-tailed image classification: train (BNS + IP-DPP), export to ONNX, serve.",
    )
    parser.add_argument("--version", action="version", version=f"tailwise {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (default: one line)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency inside the module
                raise
            continue
        module.register(subparsers)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        print(f"tailwise {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug or an environment problem: one line, the traceback with --debug
        if args.debug:
            raise
        print(f"tailwise {args.command}: error: {type(exc).__name__}: {_one_line(exc)} (run `tailwise --debug "
              f"{args.command} ...` for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
