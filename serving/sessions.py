"""`Fastest`: one-image model calls on whichever of several onnxruntime sessions of the model is fastest lately.

A lone image is fastest on every core with threads that spin between calls (onnxruntime's default) when the
cores are idle, and on one thread whose pool sleeps as soon as another process wants a core (the spinning
threads then fight it, and the event loop with it: docs/BENCHMARKS.md measured half the requests/s). Which holds
changes while a server runs, so the service does not guess: each call runs on the session with the lowest recent
cost, and every `explore`-th call on the other one, so that a change is noticed within a few hundred calls. The
cost of a call is the time since the previous call ended (the request handling between calls, which spinning
threads slow down too, and the call itself), or the call alone when the previous call ended more than
`gap_s` ago (the server was idle, or busy with batches).
"""

from __future__ import annotations

import time

import numpy as np


class Fastest:
    """Calls `predict_arrays` on the fastest of `models` lately (see the module docstring)."""

    def __init__(self, models, explore: int = 32, weight: float = 0.1, gap_s: float = 0.02):
        self.models, self.explore, self.weight, self.gap_s = list(models), explore, weight, gap_s
        self.seconds = [None] * len(self.models)   # recent cost per call of each, None until measured
        self.calls, self.ended = 0, -1.0

    @property
    def input_shape(self) -> tuple:
        return self.models[0].input_shape

    def choice(self) -> int:
        """The index of the session the next call runs on."""
        unmeasured = [i for i, s in enumerate(self.seconds) if s is None]
        if unmeasured:
            return unmeasured[0]
        best = min(range(len(self.models)), key=self.seconds.__getitem__)
        return (best + 1) % len(self.models) if self.calls % self.explore == 0 else best

    def predict_arrays(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        i = self.choice()
        start = time.perf_counter()
        out = self.models[i].predict_arrays(batch)
        end = time.perf_counter()
        took = end - (self.ended if start - self.ended < self.gap_s else start)
        self.ended, last = end, self.seconds[i]
        self.seconds[i] = took if last is None else last + self.weight * (took - last)
        return out


def lone_image_runner(model, threads: int, spinning: str, verify: bool):
    """What runs a one-image call beside `model` (the batch session, `threads` threads), by TAILWISE_ORT_SPINNING:
    "1": `model` itself (its threads spin); "0": a one-thread session; "auto": a Fastest of a one-thread session
    and a spinning session on every thread."""
    from tailwise.serving.artifact import OnnxClassifier

    if threads == 1 or spinning == "1":
        return model
    one = OnnxClassifier(model.path, intra_op_threads=1, verify=verify)
    if spinning == "0":
        return one
    return Fastest([one, OnnxClassifier(model.path, intra_op_threads=threads, verify=verify, spinning=True)])


def threads(model) -> int | list[int]:
    """The onnxruntime intra-op threads of an OnnxClassifier (a list for a Fastest, one per session)."""
    if isinstance(model, Fastest):
        return [threads(m) for m in model.models]
    return model.session.get_session_options().intra_op_num_threads
