"""Subcommands owned by serving/: `predict`, `serve` and `manifest`.

Registering imports neither torch nor onnxruntime; each handler imports what it needs.
"""

from __future__ import annotations


def register(subparsers) -> None:
    """Add the serving subcommands to the `tailwise` parser."""
    predict = subparsers.add_parser(
        "predict", help="classify image files with an exported model (batch, onnxruntime)",
        description="Classify image files with an exported ONNX model and write one JSONL or CSV record per "
                    "file (path, top-k labels, probabilities, many/medium/few groups, and the conformal prediction "
                    "set with `unsure` when the model is calibrated). Unreadable files are "
                    "reported on stderr and as error records; the exit code is then 1.")
    predict.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="image files, folders (recursive), glob patterns, or @list.txt (one path a line)")
    predict.add_argument("--model", help=MODEL_HELP)
    predict.add_argument("--top-k", type=int, default=3,
                         help="classes per image, 1 to the model's number of classes (default 3)")
    predict.add_argument("--batch-size", type=int, default=64, help="images per onnxruntime call (default 64)")
    predict.add_argument("--format", choices=("jsonl", "csv", "parquet"), default="jsonl",
                         help="output format (default jsonl; parquet with --engine ray and --output)")
    predict.add_argument("--output", help="output file (default: stdout)")
    predict.add_argument("--shard", metavar="I/N",
                         help="process only the files whose position in the sorted input list mod N is I, "
                              "to split one job across N machines without Ray (merge the N outputs yourself)")
    predict.add_argument("--engine", choices=("local", "ray"), default="local",
                         help="local: this process (default); ray: Ray Data, decoding in tasks and classifying in "
                              "an actor pool, same records (needs pip install 'tailwise[ray]')")
    predict.add_argument("--ray-address", metavar="ADDRESS",
                         help="with --engine ray: the cluster to join (auto, ray://HOST:10001, ...; "
                              "default: start a local one on this machine's CPUs)")
    predict.add_argument("--actors", type=int,
                         help="with --engine ray: model actors (one onnxruntime session and one CPU each; "
                              "default half the cluster's CPUs, at least 1)")
    predict.add_argument("--max-pixels", type=int,
                         help="refuse images with more pixels (width * height) than this "
                              "(default: Pillow's limit, 89478485)")
    predict.add_argument("--coverage", metavar="C",
                         help="the prediction sets' coverage, one the model was calibrated for (e.g. 0.9), or off "
                              "(no set, unsure fields null); default: the model's default coverage")
    predict.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    predict.set_defaults(handler=run_predict_command)

    serve = subparsers.add_parser(
        "serve", help="serve an exported model over HTTP (BentoML, onnxruntime)",
        description="Check the model against its manifest and the port, then become the BentoML server of "
                    "tailwise.serving.service:TailwiseClassifier: POST /classify (multipart file field 'image', or the "
                    "raw image as the body with its Content-Type image/png, image/jpeg ...; optional top_k from 1 "
                    "to the number of classes), /classify_batch (file fields 'images'), /model_info; "
                    "GET /readyz, /livez, and the docs page at / (or /docs). Every 4xx body is "
                    "{\"error\": \"...\"}. Limits come from the environment: TAILWISE_MAX_UPLOAD_BYTES (default "
                    "16 MiB), TAILWISE_MAX_PIXELS (default 50000000), TAILWISE_MAX_BATCH_FILES (default 64), "
                    "TAILWISE_MAX_BATCH_SIZE (default 64), TAILWISE_MAX_IN_FLIGHT (default: the batch size; past "
                    "it, 503 with Retry-After); TAILWISE_BATCHING=0 turns adaptive batching off; the rest in "
                    "serving/settings.py. SIGTERM or "
                    "Ctrl+C: new connections are refused, in-flight requests finish, the process exits within "
                    "--shutdown-timeout + about 10 s.")
    serve.add_argument("--model", help=MODEL_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; "
                                                           "0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=3000, help="port (default 3000)")
    serve.add_argument("--keep-alive", type=int, default=75, metavar="SECONDS",
                       help="close an idle keep-alive connection after this long (default 75, above the idle "
                            "timeouts of common client pools (httpx 5 s, aiohttp 15 s), so such a client does not "
                            "reuse a connection the server is closing)")
    serve.add_argument("--shutdown-timeout", type=int, default=20, metavar="SECONDS",
                       help="on SIGTERM or Ctrl+C, stop accepting, let in-flight requests finish for at most "
                            "this long, then exit (default 20)")
    serve.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    serve.set_defaults(handler=run_serve_command)

    manifest = subparsers.add_parser(
        "manifest", help="write or check a model folder's manifest.json (sha256 of each model file)",
        description="Write MODEL_DIR/manifest.json with the size and sha256 of each model file (model.onnx, "
                    "model.*.onnx, model.*.json, weights.safetensors, card.json), as `tailwise export` does; "
                    "predict and serve refuse a model file that does not match it. Use it after changing a "
                    "model on purpose. --check verifies every listed file instead (exit 1 on a mismatch).")
    manifest.add_argument("model_dir", metavar="MODEL_DIR", help="model folder, e.g. models/NAME")
    manifest.add_argument("--check", action="store_true", help="verify instead of writing")
    manifest.set_defaults(handler=run_manifest_command)


MODEL_HELP = ("model folder (models/NAME) or .onnx file; default: $TAILWISE_MODEL, else the model shipped with "
              "tailwise (your own models are used only when named)")
NO_VERIFY_HELP = ("load the model without checking it against its folder's manifest.json (also: TAILWISE_VERIFY=0); "
                  "for a model you changed on purpose")


def run_predict_command(args) -> int:
    from tailwise.serving.artifact import DEFAULT_MAX_PIXELS
    from tailwise.serving.predict import run_predict

    max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels
    return run_predict(args.inputs, model=args.model, top_k=args.top_k, batch_size=args.batch_size, fmt=args.format,
                       output=args.output, shard=args.shard, max_pixels=max_pixels,
                       verify=False if args.no_verify else None, engine=args.engine, ray_address=args.ray_address,
                       actors=args.actors, coverage=args.coverage)


def run_serve_command(args) -> int:
    from tailwise.serving.server import serve

    serve(args.model, host=args.host, port=args.port, keep_alive=args.keep_alive,
          shutdown_timeout=args.shutdown_timeout, verify=False if args.no_verify else None)
    return 0  # not reached: serve() becomes the server


def run_manifest_command(args) -> int:
    import sys
    from pathlib import Path

    from tailwise.serving.integrity import check_folder, write_manifest
    from tailwise import UserError

    folder = Path(args.model_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    if args.check:
        problems = check_folder(folder)
        for problem in problems:
            print(f"tailwise manifest: {problem}", file=sys.stderr)
        print(f"tailwise manifest: {folder}: {'mismatch' if problems else 'every listed file matches'}",
              file=sys.stderr)
        return 1 if problems else 0
    path = write_manifest(folder)
    print(f"tailwise manifest: wrote {path}", file=sys.stderr)
    return 0
