"""Subcommands owned by serving/: `predict` and `serve`.

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

    serve = subparsers.add_parser(
        "serve", help="serve an exported model over HTTP (BentoML, onnxruntime)",
        description="Start the BentoML service serving.service:TailwiseClassifier for an exported model: POST "
                    "/classify (multipart file field 'image', optional top_k), /classify_batch (file fields "
                    "'images'), /model_info; GET /readyz, /livez, /metrics, and the OpenAPI UI at / (or /docs). "
                    "Limits come from the environment: TAILWISE_MAX_UPLOAD_BYTES (default 16 MiB), "
                    "TAILWISE_MAX_PIXELS (default 50000000), TAILWISE_MAX_BATCH_FILES (default 64), "
                    "TAILWISE_MAX_BATCH_SIZE (default 64); TAILWISE_BATCHING=0 turns adaptive batching off.")
    serve.add_argument("--model", help="model folder (models/NAME) or .onnx file; default: $TAILWISE_MODEL, "
                                       "else the shipped model, else the newest models/*/model.onnx")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; "
                                                           "0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=3000, help="port (default 3000)")
    serve.set_defaults(handler=run_serve_command)


def run_predict_command(args) -> int:
    from tailwise.serving.artifact import DEFAULT_MAX_PIXELS
    from tailwise.serving.predict import run_predict

    max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels
    return run_predict(args.inputs, model=args.model, top_k=args.top_k, batch_size=args.batch_size, fmt=args.format,
                       output=args.output, shard=args.shard, max_pixels=max_pixels)


def run_serve_command(args) -> int:
    """Check the model, then run `bentoml serve tailwise.serving.service:TailwiseClassifier` with TAILWISE_MODEL set."""
    import os
    import subprocess
    import sys

    from tailwise.serving.artifact import PACKAGE_PARENT, default_model_path, read_metadata, resolve_model_path
    from tailwise import UserError

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1..65535, got {args.port}")
    path = (resolve_model_path(args.model) if args.model is not None else default_model_path()).resolve()
    meta = read_metadata(path)  # fail here, with the path, rather than in the server's worker
    print(f"tailwise serve: model {path} ({meta['num_classes']} classes) on http://{args.host}:{args.port}",
          file=sys.stderr)
    command = [sys.executable, "-m", "bentoml", "serve", "tailwise.serving.service:TailwiseClassifier",
               "--host", args.host, "--port", str(args.port), "--working-dir", str(PACKAGE_PARENT)]
    try:
        return subprocess.call(command, env={**os.environ, "TAILWISE_MODEL": str(path)})
    except KeyboardInterrupt:
        return 130
