"""Subcommands owned by serving/: `predict` (`serve` joins later).

Registering imports neither torch nor onnxruntime; each handler imports what it needs.
"""

from __future__ import annotations


def register(subparsers) -> None:
    """Add the serving subcommands to the `tailwise` parser."""
    predict = subparsers.add_parser(
        "predict", help="classify image files with an exported model (batch, onnxruntime)",
        description="Classify image files with an exported ONNX model and write one JSONL or CSV record per "
                    "file (path, top-k labels, probabilities, many/medium/few groups). Unreadable files are "
                    "reported on stderr and as error records; the exit code is then 1.")
    predict.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="image files, folders (recursive), glob patterns, or @list.txt (one path a line)")
    predict.add_argument("--model", help="model folder (models/NAME) or .onnx file; default: $TAILWISE_MODEL, "
                                         "else the shipped model, else the newest models/*/model.onnx")
    predict.add_argument("--top-k", type=int, default=3, help="classes per image (default 3)")
    predict.add_argument("--batch-size", type=int, default=64, help="images per onnxruntime call (default 64)")
    predict.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="output format (default jsonl)")
    predict.add_argument("--output", help="output file (default: stdout)")
    predict.add_argument("--shard", metavar="I/N",
                         help="process only the files whose position in the sorted input list mod N is I, "
                              "to split one job across N machines")
    predict.add_argument("--max-pixels", type=int,
                         help="refuse images with more pixels (width * height) than this "
                              "(default: Pillow's limit, 89478485)")
    predict.set_defaults(handler=run_predict_command)


def run_predict_command(args) -> int:
    from serving.artifact import DEFAULT_MAX_PIXELS
    from serving.predict import run_predict

    max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels
    return run_predict(args.inputs, model=args.model, top_k=args.top_k, batch_size=args.batch_size, fmt=args.format,
                       output=args.output, shard=args.shard, max_pixels=max_pixels)
