"""engine.Streams: a run's random streams by name, each a pure function of (seed, where it is drawn), with the
entropy first released (runs trained before the streams had names reproduce exactly)."""

import numpy as np
import torch

from tailwise.training.engine import Streams, epoch_order


def draws(rng: np.random.Generator) -> list[int]:
    return rng.integers(0, 2**31, size=4).tolist()


def test_streams_are_pure_functions_of_seed_and_place():
    a, b = Streams(7), Streams(7)
    assert draws(a.order(3)) == draws(b.order(3)) and draws(a.redraw(3)) == draws(b.redraw(3))
    assert a.augment(2, 3, 0) == b.augment(2, 3, 0) and a.init(1) == b.init(1)
    assert draws(a.order(3)) != draws(a.order(4)) and draws(a.redraw(3)) != draws(a.redraw(4))
    assert draws(a.order(3)) != draws(Streams(8).order(3))


def test_streams_differ_from_one_another():
    s = Streams(0)
    assert draws(s.order(5)) != draws(s.redraw(5))
    augment = {s.augment(stage, 5, rank) for stage in (1, 2) for rank in (0, 1)}
    assert len(augment) == 4          # per stage and per rank


def test_streams_keep_the_first_released_entropy():
    """What the streams replaced: bare [seed, epoch], [seed, epoch, 2], seed + 1, seed + rank."""
    s = Streams(11)
    assert draws(s.order(4)) == draws(np.random.default_rng([11, 4]))
    assert draws(s.redraw(4)) == draws(np.random.default_rng([11, 4, 2]))
    for stage, base in ((1, 11), (2, 12)):
        assert s.augment(stage, 4, 1) == int(np.random.SeedSequence([base, 4, 1]).generate_state(1)[0])
    assert s.init(3) == 14
    indices, labels = np.arange(50), np.zeros(50, dtype=np.int64)
    assert np.array_equal(epoch_order(indices, labels, 11, 4), indices[np.random.default_rng([11, 4]).permutation(50)])


def test_augment_seeds_a_torch_generator():
    g = torch.Generator().manual_seed(Streams(0).augment(1, 0, 0))
    h = torch.Generator().manual_seed(Streams(0).augment(1, 0, 0))
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=h))
