"""serving/sessions.py: one-image calls go to whichever session has been faster lately, with a few calls on the
other so that a change is noticed. Real ONNX sessions of the tiny model; the slower one made slow for real (a
session whose every call also sleeps)."""

import time

import numpy as np

from tailwise.serving.artifact import OnnxClassifier
from tailwise.serving.sessions import Fastest, threads


class Slowed:
    """A real session whose calls take `seconds` longer (stands for a session slowed by a busy neighbour)."""

    def __init__(self, model, seconds):
        self.model, self.seconds, self.calls = model, seconds, 0

    def predict_arrays(self, batch):
        self.calls += 1
        time.sleep(self.seconds)
        return self.model.predict_arrays(batch)


def test_calls_go_to_the_faster_session_and_follow_a_change(tiny_model_dir):
    one, two = (OnnxClassifier(tiny_model_dir, intra_op_threads=1) for _ in range(2))
    slow, fast = Slowed(one, 0.02), Slowed(two, 0.0)     # 20 ms: far above a loaded machine's scheduling noise
    chooser = Fastest([slow, fast], explore=10)
    pixels = np.zeros((1, *one.input_shape), np.uint8)
    expected = one.predict_arrays(pixels)
    for _ in range(100):
        assert np.array_equal(chooser.predict_arrays(pixels), expected)   # same model, same answer
    assert fast.calls >= 85 and 1 <= slow.calls <= 15, (fast.calls, slow.calls)   # measured once, then explored
    slow.seconds, fast.seconds = 0.0, 0.02       # the neighbour moves: the other session is the fast one now
    slow.calls = fast.calls = 0
    for _ in range(200):
        chooser.predict_arrays(pixels)
    assert slow.calls >= 150, (fast.calls, slow.calls)
    assert threads(Fastest([one, OnnxClassifier(tiny_model_dir, intra_op_threads=2)])) == [1, 2]
