"""The `tailwise` console command: one parser, subcommands registered by the folder that owns them."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tailwise import OptionError, UserError, __version__

# Each module exposes register(subparsers); registering must not import torch.
SUBCOMMAND_MODULES = ("tailwise.training.cli", "tailwise.export.cli", "tailwise.serving.cli")
# What the train extra installs (pyproject.toml): a command that imports one of these without it says so.
TRAIN_EXTRA = ("torch", "torchvision", "safetensors", "onnxscript", "matplotlib")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tailwise",
        description="Long-tailed image classification: train (by default a supervised network with the "
                    "logit-adjusted loss, then fine-tuned on redrawn IP-DPP subsets; BNS and the baselines are other "
                    "recipes), export to ONNX, serve.",
    )
    parser.add_argument("--version", action="version", version=f"tailwise {__version__}")
    parser.add_argument("--debug", action="store_true", help="on an error, print the full traceback")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name not in (name, name.rpartition(".")[0]):  # a real missing dependency inside the module
                # (a missing layer folder, as in a Bento that carries only serving/, just drops its commands)
                raise
            continue
        module.register(subparsers)
    for sub in subparsers.choices.values():  # also after the subcommand: `tailwise train ... --debug`
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="on an error, print the full traceback")
    parser.set_defaults(subcommands=subparsers.choices)
    return parser


def unknown_options(command: str, sub: argparse.ArgumentParser, extra: list[str]) -> str:
    """One line for arguments the subcommand does not take, with the option the user probably meant
    (`-o` -> `--output`, `--outptu` -> `--output`)."""
    import difflib

    known = [o for action in sub._actions for o in action.option_strings if o.startswith("--")]
    hints = []
    for arg in extra:
        name = arg.split("=", 1)[0]
        if not name.startswith("-"):
            continue
        close = ([o for o in known if o.startswith("--" + name[1:])] if not name.startswith("--") else []) \
            or difflib.get_close_matches(name, known, n=2, cutoff=0.6)
        if close:
            hints.append(f"{name}: did you mean {' or '.join(close)}?")
    return (f"tailwise {command}: error: unrecognized arguments: {' '.join(extra)}"
            + (f" ({'; '.join(hints)})" if hints else "") + f"; `tailwise {command} --help` lists the options")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command is None:
            parser.parse_args(argv)   # argparse's own message and exit
        print(unknown_options(args.command, args.subcommands[args.command], extra), file=sys.stderr)
        return 2
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"tailwise {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every error is one line; the traceback only with --debug
        if args.debug:
            raise
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").partition(".")[0] in TRAIN_EXTRA:
            print(f"tailwise {args.command}: error: this command needs the train extra ({exc.name} is not "
                  "installed): pip install 'tailwise[train]'", file=sys.stderr)
            return 2
        print(f"tailwise {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, UserError) else 1


def one_line(exc: BaseException) -> str:
    """The message of `exc` on one line; an unexpected error also names its type and points to --debug."""
    text = " ".join((cli_message(exc) if isinstance(exc, OptionError) else str(exc)).split()) or type(exc).__name__
    if isinstance(exc, UserError):
        return text
    if len(text) > 300:
        text = text[:300] + " ..."
    return f"{type(exc).__name__}: {text} (run with --debug for the traceback)"


# The API's parameters whose flag is not --<name with - for _>.
FLAGS = {"overrides": "--set", "run": "RUN_OR_CHECKPOINT"}


def cli_message(exc: OptionError) -> str:
    """An OptionError's message with its options spelled as flags (`--budget`, `--stage 1`, `--resume`,
    `--no-verify` for verify=False)."""
    def flag(name: str, value: str | None) -> str:
        spelled = FLAGS.get(name, "--" + name.replace("_", "-"))
        if value == "False" and spelled.startswith("--"):
            return "--no-" + spelled[2:]
        return spelled if value in (None, "True") else f"{spelled} {value}"
    return exc.render(flag)


if __name__ == "__main__":
    sys.exit(main())
