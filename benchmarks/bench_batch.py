"""Batch inference, local engine vs Ray engine: images/s of `tailwise predict` over the same PNGs on the same CPUs.

    python benchmarks/bench_batch.py                       # 20,000 real Fashion-MNIST PNGs, shipped model, 2 CPUs
    python benchmarks/bench_batch.py --count 2000 --cpus 2 --folder /tmp/pngs

The folder is written on first use from the real Fashion-MNIST training images (28 x 28 grayscale PNGs). Both
engines run in this one process over the same sorted file list, local, Ray, then local again (a drift in the
machine's load shows as two different local times): the local engine (predict.predict_files: a thread pool
decodes, onnxruntime classifies) and the Ray engine (ray_engine.predict_records on a local Ray cluster limited
to --cpus: decode tasks, --actors model actors). Ray's cluster start is timed apart; its job time includes
starting the actors. Also printed, to plan a real cluster: what one core does in each stage alone (decoding,
and one single-threaded onnxruntime session), and the Ray engine's images/s per model actor. The two engines'
records are checked to agree.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from tailwise.serving.artifact import OnnxClassifier  # noqa: E402
from tailwise.serving.predict import decode, expand_inputs, predict_files  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"


def write_folder(folder: Path, count: int) -> None:
    from PIL import Image

    from tailwise.training.data import read_idx

    images = read_idx(os.path.join(FMNIST_ROOT, "train-images-idx3-ubyte.gz"), 2051)[:count]
    if len(images) < count:
        sys.exit(f"only {len(images)} training images")
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image, mode="L").save(folder / f"{i:05d}.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "fmnist-lt-tailwise"))
    parser.add_argument("--folder", type=Path, default=Path("/tmp/tailwise-bench-batch"),
                        help="PNG folder (written on first use)")
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    parser.add_argument("--actors", type=int, help="Ray model actors (default: the engine's, half the CPUs)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    if len(list(args.folder.glob("*.png"))) != args.count:
        start = time.perf_counter()
        for old in args.folder.glob("*.png"):
            old.unlink()
        write_folder(args.folder, args.count)
        print(f"wrote {args.count} PNGs to {args.folder} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    paths = expand_inputs([str(args.folder)])
    classifier = OnnxClassifier(args.model)
    load = os.getloadavg()

    # one core, each stage alone (the planning numbers: decode tasks and model actors scale separately)
    sample = paths[:2000]
    start = time.perf_counter()
    pixels = np.stack([decode(p, classifier.meta)[0] for p in sample])
    decode_rate = len(sample) / (time.perf_counter() - start)
    single = OnnxClassifier(args.model, intra_op_threads=1, spinning=False)
    start = time.perf_counter()
    for i in range(0, len(pixels), args.batch_size):
        single.top_k(single.predict_arrays(pixels[i:i + args.batch_size]), 3)
    model_rate = len(pixels) / (time.perf_counter() - start)

    def run_local():
        start = time.perf_counter()
        records = list(predict_files(classifier, paths, top_k=3, batch_size=args.batch_size))
        return records, time.perf_counter() - start

    local, local_s = run_local()   # local, Ray, local again: a drift in the machine's load shows as two local times

    import ray

    from tailwise.serving.ray_engine import default_actors, predict_records

    start = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray_start_s = time.perf_counter() - start
    actors = args.actors or default_actors()
    start = time.perf_counter()
    remote = list(predict_records(classifier, paths, top_k=3, batch_size=args.batch_size, actors=actors))
    ray_s = time.perf_counter() - start
    ray.shutdown()
    _, local_again_s = run_local()
    load_after = os.getloadavg()

    assert [r["path"] for r in remote] == [r["path"] for r in local]
    assert [[p["label"] for p in r["predictions"]] for r in remote] == [
        [p["label"] for p in r["predictions"]] for r in local]
    worst = max(abs(a["probability"] - b["probability"]) for r, s in zip(remote, local)
                for a, b in zip(r["predictions"], s["predictions"]))

    n = len(paths)
    print(f"{n} PNGs (28 x 28, Fashion-MNIST), model {Path(args.model).name}, batch {args.batch_size}, "
          f"{os.cpu_count()} cores; load average {load[0]:.2f} before, {load_after[0]:.2f} after")
    print()
    local_mean = (local_s + local_again_s) / 2
    print("| engine | seconds | images/s | engine / local time |")
    print("|---|---:|---:|---:|")
    print(f"| local (thread pool + onnxruntime), first | {local_s:.1f} | {n / local_s:.0f} | |")
    print(f"| ray, {args.cpus} CPUs, {actors} model actor(s), job | {ray_s:.1f} | {n / ray_s:.0f} | "
          f"{ray_s / local_mean:.2f} |")
    print(f"| local, again | {local_again_s:.1f} | {n / local_again_s:.0f} | |")
    print()
    print(f"Ray's overhead: the Ray engine takes {ray_s / local_mean:.2f}x the local engine's time (the mean of "
          f"its two runs), plus {ray_start_s:.1f} s to start the local cluster, once.")
    print(f"Per model actor (1 CPU): {n / ray_s / actors:.0f} images/s in this run.")
    print(f"One core, one stage alone: decoding {decode_rate:.0f} images/s; onnxruntime (1 thread, batch "
          f"{args.batch_size}) {model_rate:.0f} images/s.")
    print(f"Records agree: same paths and labels, probabilities within {worst:.1e}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
