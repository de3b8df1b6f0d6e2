import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from tailwise.training.losses import (
    LDAMLoss,
    balanced_softmax_ce,
    bns_loss_paper,
    bns_loss_released,
    drw_weights,
    logit_adjusted_ce,
    sample_bns_anchors,
)

# --- slow, obviously-correct references (Python loops over anchors) ----------------------------------------------


def reference_released(z, labels, tau):
    n = len(z)
    total = 0.0
    for a in range(n):
        pos = [torch.exp(z[a] @ z[b] / tau) for b in range(n) if b != a and labels[b] == labels[a]]
        neg = [torch.exp(z[a] @ z[b] / tau) for b in range(n) if labels[b] != labels[a]]
        pos_a = sum(pos) / len(pos)
        neg_a = sum(neg) / n if neg else torch.zeros((), dtype=z.dtype)
        total = total + torch.log(torch.sigmoid(pos_a)) + torch.log(torch.sigmoid(-neg_a))
    return -total / n


def reference_paper(z1, z2, labels, tau, anchors_of):
    """anchors_of(i) -> list of indices k (including i) whose view 1 anchors image i."""
    b = len(z1)
    total = 0.0
    for i in range(b):
        negatives = [z[j] for z in (z1, z2) for j in range(b) if labels[j] != labels[i]]
        anchors = anchors_of(i)
        per_image = 0.0
        for k in anchors:
            q = z1[k]
            term = torch.log(torch.sigmoid(q @ z2[i] / tau))
            for v in negatives:
                term = term + torch.log(torch.sigmoid(-(q @ v) / tau))
            per_image = per_image + term
        total = total - per_image / len(anchors)
    return total / b


def all_same_label_anchors(labels):
    return lambda i: [i] + [k for k in range(len(labels)) if k != i and labels[k] == labels[i]]


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def value_and_grad(fn, *tensors):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


# --- released form ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels",
    [
        [0, 1, 0, 2, 1, 0],  # mixed classes, several per class
        [0, 0, 0, 1],  # class 1 alone in the batch: its only positive is its own other view
        [3, 3, 3],  # a single class: no negatives, neg = 0
    ],
)
@pytest.mark.parametrize("tau", [0.5, 0.2])
def test_bns_released_matches_reference(labels, tau):
    b = len(labels)
    z = unit(2 * b, 8, seed=b)
    labels2 = torch.tensor(labels).repeat(2)
    value, (grad,) = value_and_grad(lambda z: bns_loss_released(z, labels2, tau), z)
    ref_value, (ref_grad,) = value_and_grad(lambda z: reference_released(z, labels2, tau), z)
    torch.testing.assert_close(value, ref_value)
    torch.testing.assert_close(grad, ref_grad)
    assert value.dtype == torch.float64


def test_bns_released_single_class_negative_term_is_constant():
    z = unit(6, 4)
    labels2 = torch.zeros(6, dtype=torch.long)
    pos = torch.stack([
        torch.stack([torch.exp(z[a] @ z[b] / 0.5) for b in range(6) if b != a]).mean() for a in range(6)
    ])
    expected = -(F.logsigmoid(pos) + math.log(0.5)).mean()
    torch.testing.assert_close(bns_loss_released(z, labels2), expected)


def test_bns_released_half_precision_input_computes_in_float32():
    z = unit(8, 16).float()
    labels2 = torch.tensor([0, 1, 1, 2]).repeat(2)
    out = bns_loss_released(z.half(), labels2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, bns_loss_released(z, labels2), rtol=1e-3, atol=1e-3)


# --- paper form ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels",
    [
        [0, 1, 0, 2, 1, 0, 0],
        [0, 0, 0, 1],  # class 1 alone: m_i = 0 for it
        [4, 4, 4, 4],  # a single class: no negatives
    ],
)
def test_bns_paper_matches_reference_when_m_exceeds_available(labels):
    # m larger than any class's other images: every same-label image is an anchor, whatever the generator
    b = len(labels)
    z1, z2 = unit(b, 8, seed=1), unit(b, 8, seed=2)
    y = torch.tensor(labels)
    value, grads = value_and_grad(lambda a, c: bns_loss_paper(a, c, y, tau=0.5, m=10), z1, z2)
    ref_value, ref_grads = value_and_grad(
        lambda a, c: reference_paper(a, c, labels, 0.5, all_same_label_anchors(labels)), z1, z2
    )
    torch.testing.assert_close(value, ref_value)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


@pytest.mark.parametrize("m", [0, 1, 2])
def test_bns_paper_matches_reference_with_random_anchors(m):
    labels = [0, 1, 0, 2, 1, 0, 0, 1, 3]
    b = len(labels)
    z1, z2 = unit(b, 8, seed=3), unit(b, 8, seed=4)
    y = torch.tensor(labels)
    mask = sample_bns_anchors(y, m, torch.Generator().manual_seed(7))
    value, grads = value_and_grad(
        lambda a, c: bns_loss_paper(a, c, y, tau=0.3, m=m, generator=torch.Generator().manual_seed(7)), z1, z2
    )
    ref_value, ref_grads = value_and_grad(
        lambda a, c: reference_paper(a, c, labels, 0.3, lambda i: mask[i].nonzero().flatten().tolist()), z1, z2
    )
    torch.testing.assert_close(value, ref_value)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


def test_bns_paper_m0_is_plain_negative_sampling():
    labels = [0, 1, 1, 2]
    z1, z2 = unit(4, 8, seed=5), unit(4, 8, seed=6)
    value = bns_loss_paper(z1, z2, torch.tensor(labels), m=0)
    torch.testing.assert_close(value, reference_paper(z1, z2, labels, 0.5, lambda i: [i]))


def test_sample_bns_anchors_rules():
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    picks = {}
    for seed in range(40):
        mask = sample_bns_anchors(labels, 2, torch.Generator().manual_seed(seed))
        assert mask.diagonal().all()
        same = labels[:, None] == labels[None, :]
        assert not (mask & ~same).any()  # anchors share the image's label
        # min(m, other same-label images) extra anchors: 2 for class 0, 1 for class 1, 0 for the lone class 2
        assert mask.sum(1).tolist() == [3, 3, 3, 3, 3, 2, 2, 1]
        picks.setdefault(tuple(mask[0].nonzero().flatten().tolist()), 0)
        picks[tuple(mask[0].nonzero().flatten().tolist())] += 1
    assert len(picks) > 3  # random choice, not always the first m
    same_seed = [sample_bns_anchors(labels, 2, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*same_seed)


class CountTorchCalls(TorchFunctionMode):
    """Counts the torch functions and tensor methods/operators called inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def torch_calls(loss_fn, batch):
    """How many torch calls loss_fn(z1, z2, labels) makes for a batch of `batch` images; its value must be finite."""
    z1, z2 = unit(batch, 16, seed=8).float(), unit(batch, 16, seed=9).float()
    labels = torch.arange(batch) % 4   # every class several times, so every image has m = 2 other anchors
    with CountTorchCalls() as counter:
        loss = loss_fn(z1, z2, labels)
    assert torch.isfinite(loss)
    return counter.calls


def test_bns_paper_is_vectorised_for_a_large_batch():
    """No Python loop over images, anchors or negatives: the loss makes as many torch calls for a batch of 512 as
    for a batch of 8 (a loop makes O(B) or more). bns_loss_paper vs the loop reference is checked above;
    benchmarks/bench_bns_loss.py prints how long a call takes."""
    paper = lambda z1, z2, labels: bns_loss_paper(z1, z2, labels, m=2, generator=torch.Generator().manual_seed(0))
    assert torch_calls(paper, 512) == torch_calls(paper, 8)
    # the count does see a loop: the Python-loop reference makes more calls for 16 images than for 8
    loop = lambda z1, z2, labels: reference_paper(z1, z2, labels.tolist(), 0.5, lambda i: [i])
    assert torch_calls(loop, 16) > 2 * torch_calls(loop, 8)


# --- baselines -------------------------------------------------------------------------------------------------


def test_logit_adjusted_and_balanced_softmax():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([0, 2])
    counts = torch.tensor([100.0, 10.0, 1.0])
    log_prior = torch.log(counts / counts.sum())
    for tau in (1.0, 0.5):
        torch.testing.assert_close(
            logit_adjusted_ce(logits, targets, log_prior, tau), F.cross_entropy(logits + tau * log_prior, targets)
        )
    # by hand: -log( n_y e^{z_y} / sum_j n_j e^{z_j} )
    hand = []
    for row, y in zip(logits.tolist(), targets.tolist()):
        weighted = [n * math.exp(v) for n, v in zip(counts.tolist(), row)]
        hand.append(-math.log(weighted[y] / sum(weighted)))
    torch.testing.assert_close(balanced_softmax_ce(logits, targets, log_prior), torch.tensor(sum(hand) / 2))


def test_ldam_margins_and_loss():
    counts = [10000, 625, 16]
    loss_fn = LDAMLoss(counts, max_m=0.5, s=30.0)
    # n^(-1/4) = 0.1, 0.2, 0.5 -> scaled so the largest is 0.5
    torch.testing.assert_close(loss_fn.margins, torch.tensor([0.1, 0.2, 0.5]))
    cosines = torch.tensor([[0.9, 0.1, -0.2], [0.3, 0.2, 0.4]])
    targets = torch.tensor([0, 2])
    hand = []
    for row, y in zip(cosines.tolist(), targets.tolist()):
        row = [30 * (c - (loss_fn.margins[y].item() if j == y else 0.0)) for j, c in enumerate(row)]
        hand.append(-row[y] + math.log(sum(math.exp(v) for v in row)))
    torch.testing.assert_close(loss_fn(cosines, targets), torch.tensor(sum(hand) / 2))
    weight = torch.tensor([0.2, 1.0, 1.8])
    loss_fn.set_weight(weight)
    expected = (hand[0] * 0.2 + hand[1] * 1.8) / (0.2 + 1.8)
    torch.testing.assert_close(loss_fn(cosines, targets), torch.tensor(expected))
    loss_fn.set_weight(None)
    torch.testing.assert_close(loss_fn(cosines, targets), torch.tensor(sum(hand) / 2))


def test_drw_weights_formula():
    counts = [5000, 500, 50]
    beta = 0.9999
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    expected = torch.tensor([w / sum(raw) * 3 for w in raw])
    weights = drw_weights(counts, beta)
    torch.testing.assert_close(weights, expected)
    assert weights.sum().item() == pytest.approx(3.0)
    assert weights[0] < weights[1] < weights[2]
