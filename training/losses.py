"""Losses: Balanced Negative Sampling (stage 1, both forms of METHOD.md), the long-tail baselines (logit
adjustment, Balanced Softmax, LDAM with DRW class weights) and the parts of the two-stage peers (Weight
Balancing: class-balanced loss and MaxNorm; MiSLAS: mixup and label-aware smoothing)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _at_least_float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def bns_loss_released(z: Tensor, labels: Tensor, tau: float = 0.5) -> Tensor:
    """BNS loss as in the released code, in-batch over all 2B views.

    z: [2B, D] L2-normalised embeddings (view 1 of every image, then view 2); labels: [2B] (`labels.repeat(2)`).
    For view a, with s_ab = z_a . z_b:
      pos_a = mean over views b != a with labels[b] == labels[a] of exp(s_ab / tau),
      neg_a = 1/(2B) * sum over views b with labels[b] != labels[a] of exp(s_ab / tau),
      L = -mean_a [log sigmoid(pos_a) + log sigmoid(-neg_a)].
    Edge cases: a view's own other view always has its label, so pos_a is never empty for labels built as
    above (were it empty, pos_a would be 0). A batch of a single class has no negatives: neg_a = 0, so that
    term is the constant log(1/2) and carries no gradient. Computed in float32 at least.
    """
    z = _at_least_float32(z)
    n = z.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape [{n}], got {list(labels.shape)}")
    exp_sim = torch.exp(z @ z.t() / tau)
    same = labels[:, None] == labels[None, :]
    not_self = ~torch.eye(n, dtype=torch.bool, device=z.device)
    pos_mask = (same & not_self).to(z.dtype)
    neg_mask = (~same).to(z.dtype)
    pos = (exp_sim * pos_mask).sum(1) / pos_mask.sum(1).clamp(min=1)
    neg = (exp_sim * neg_mask).sum(1) / n
    return -(F.logsigmoid(pos) + F.logsigmoid(-neg)).mean()


def sample_bns_anchors(labels: Tensor, m: int, generator: torch.Generator | None = None) -> Tensor:
    """Anchor mask for `bns_loss_paper`: bool [B, B], row i marks i itself plus min(m, n_i) other images with
    labels[i], n_i being how many the batch holds, drawn uniformly without replacement (from `generator`, on
    any device, or torch's global RNG for labels' device)."""
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    b = labels.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=labels.device)
    k = min(m, b - 1)
    if k == 0:
        return eye
    candidates = (labels[:, None] == labels[None, :]) & ~eye
    rand_device = generator.device if generator is not None else labels.device
    scores = torch.rand(b, b, generator=generator, device=rand_device)
    scores = scores.to(labels.device).masked_fill(~candidates, -1.0)  # candidates rank first, in random order
    chosen = torch.zeros_like(eye).scatter_(1, scores.topk(k, dim=1).indices, True)
    return eye | (chosen & candidates)


def bns_loss_paper(
    z1: Tensor,
    z2: Tensor,
    labels: Tensor,
    tau: float = 0.5,
    m: int = 2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """BNS loss of the paper (Eq. 12), vectorised with masks.

    z1, z2: [B, D] L2-normalised embeddings of the two views; labels: [B].
    For image i: the positive is v+ = z2[i]; the negatives v-_j are all views (z1 and z2) of images whose label
    differs from labels[i]; the anchors are q_i = z1[i] plus Q+_i = the view-1 embeddings of m other in-batch
    images with label labels[i], drawn uniformly at random without replacement (`sample_bns_anchors`, from
    `generator`). If the batch holds fewer than m such images, all of them are used: m_i shrinks to what is
    there (0 for an image alone in its class, leaving q_i only). Then
      L(i) = -1/(m_i+1) * sum_{q* in {q_i} U Q+_i} [log sigmoid(q*.v+/tau) + sum_j log sigmoid(-q*.v-_j/tau)],
    and the loss is the mean over i. A batch of a single class has no negatives (that sum is 0).
    Computed in float32 at least.
    """
    z1, z2 = _at_least_float32(z1), _at_least_float32(z2)
    b = z1.shape[0]
    if z2.shape != z1.shape or labels.shape != (b,):
        raise ValueError(f"z1, z2 must be [B, D] and labels [B]; got {list(z1.shape)}, {list(z2.shape)}, "
                         f"{list(labels.shape)}")
    anchors = sample_bns_anchors(labels, m, generator).to(z1.dtype)  # anchors[i, k]: z1[k] anchors image i

    # pos_term[k, i] = log sigmoid(z1[k] . z2[i] / tau)
    pos_term = F.logsigmoid(z1 @ z2.t() / tau)
    # neg_term[k] = sum over views v of images labelled differently from k of log sigmoid(-z1[k] . v / tau);
    # an anchor k of image i has i's label, so its negatives are exactly i's negatives.
    different = (labels[:, None] != labels[None, :]).repeat(1, 2).to(z1.dtype)
    neg_term = (F.logsigmoid(-(z1 @ torch.cat([z1, z2]).t()) / tau) * different).sum(1)

    per_anchor = pos_term.t() + neg_term[None, :]  # [i, k]
    per_image = (anchors * per_anchor).sum(1) / anchors.sum(1)
    return -per_image.mean()


def logit_adjusted_ce(logits: Tensor, targets: Tensor, log_prior: Tensor, tau: float = 1.0) -> Tensor:
    """Logit-adjusted cross-entropy (Menon et al. 2021): CE on logits + tau * log_prior (log class frequencies)."""
    return F.cross_entropy(logits + tau * log_prior.to(logits.dtype), targets)


def balanced_softmax_ce(logits: Tensor, targets: Tensor, log_prior: Tensor) -> Tensor:
    """Balanced Softmax (Ren et al. 2020): CE on logits + log_prior."""
    return logit_adjusted_ce(logits, targets, log_prior, tau=1.0)


class LDAMLoss(nn.Module):
    """LDAM (Cao et al. 2019): subtract margin m_y = C / n_y^(1/4) (largest = max_m) from the true-class logit,
    scale by s, cross-entropy with optional per-class weights (DRW sets them later with `set_weight`).
    Expects cosine logits in [-1, 1] (a `Classifier` with head="cosine")."""

    def __init__(self, counts: Sequence[int] | Tensor, max_m: float = 0.5, s: float = 30.0,
                 weight: Tensor | None = None):
        super().__init__()
        counts = torch.as_tensor(counts, dtype=torch.float64)
        margins = counts.pow(-0.25)
        self.register_buffer("margins", (margins * (max_m / margins.max())).float())
        self.register_buffer("weight", None)
        self.s = s
        self.set_weight(weight)

    def set_weight(self, weight: Tensor | None) -> None:
        self.weight = None if weight is None else torch.as_tensor(weight, dtype=torch.float32,
                                                                  device=self.margins.device)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        margin = self.margins[targets].to(logits.dtype)
        adjusted = logits - F.one_hot(targets, logits.shape[1]).to(logits.dtype) * margin[:, None]
        weight = None if self.weight is None else self.weight.to(logits.dtype)
        return F.cross_entropy(self.s * adjusted, targets, weight=weight)


def drw_weights(counts: Sequence[int] | Tensor, beta: float = 0.9999) -> Tensor:
    """Class-balanced weights by effective number (Cui et al. 2019): w_c = (1 - beta) / (1 - beta^n_c),
    normalised to sum to C. Used by deferred re-weighting (DRW) in the later epochs."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    weights = (1.0 - beta) / (1.0 - torch.pow(beta, counts))
    return (weights / weights.sum() * len(counts)).float()


def class_balanced_ce(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Class-balanced cross-entropy (Cui et al. 2019; Weight Balancing's stage 2): mean over the batch of
    w_y * CE, with w the effective-number weights of `drw_weights` (they sum to C)."""
    ce = F.cross_entropy(logits, targets, reduction="none")
    return (weights.to(ce.dtype)[targets] * ce).mean()


def label_aware_smoothing(counts: Sequence[int] | Tensor, head: float = 0.3, tail: float = 0.0) -> Tensor:
    """Per-class smoothing factors of MiSLAS (Zhong et al. 2021), concave form of its released code:
    eps_c = tail + (head - tail) * sin(pi/2 * (n_c - n_min) / (n_max - n_min)); the head class gets `head`, the
    rarest `tail`. All classes equally frequent: every class gets `head`."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    spread = counts.max() - counts.min()
    if spread == 0:
        return torch.full(counts.shape, float(head))
    return (tail + (head - tail) * torch.sin(torch.pi / 2 * (counts - counts.min()) / spread)).float()


def label_aware_smoothing_ce(logits: Tensor, targets: Tensor, eps: Tensor) -> Tensor:
    """Cross-entropy against smoothed labels, the smoothing eps_y chosen by the true class:
    mean_i [ (1 - eps_y) * (-log p_y) + eps_y * mean_c (-log p_c) ]."""
    logp = F.log_softmax(logits, dim=1)
    e = eps.to(logp.dtype)[targets]
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    return ((1 - e) * nll + e * (-logp.mean(1))).mean()


def max_norm_threshold(weight: Tensor, fraction: float) -> float:
    """Weight Balancing's MaxNorm radius: min + fraction * (max - min) of the per-class weight norms (rows of
    `weight`), fixed once from the classifier stage 2 starts from."""
    norms = weight.detach().flatten(1).norm(dim=1)
    return float(norms.min() + fraction * (norms.max() - norms.min()))


@torch.no_grad()
def max_norm_(weight: Tensor, radius: float) -> Tensor:
    """Project each class's weight vector (a row) onto the ball of `radius` in place (projected gradient
    descent after every step): rows longer than radius are rescaled to it, the others are left alone."""
    norms = weight.flatten(1).norm(dim=1)
    scale = torch.where(norms > radius, radius / norms.clamp(min=1e-12), torch.ones_like(norms))
    weight.mul_(scale.view(-1, *([1] * (weight.ndim - 1))))
    return weight


def mixup(x: Tensor, alpha: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, float]:
    """Mixup (Zhang et al. 2018; MiSLAS's stage 1): lam ~ Beta(alpha, alpha) and a random pairing of the batch;
    returns (lam * x + (1 - lam) * x[perm], perm, lam). The loss is lam * L(y) + (1 - lam) * L(y[perm])."""
    device = generator.device if generator is not None else x.device
    perm = torch.randperm(x.shape[0], generator=generator, device=device).to(x.device)
    u = torch.rand(2, generator=generator, device=device, dtype=torch.float64).cpu().numpy()
    # Beta drawn by numpy, seeded from the generator: the same lam when a resumed run redraws the epoch
    lam = float(np.random.default_rng(int(u[0] * 2**53) ^ int(u[1] * 2**31)).beta(alpha, alpha))
    return lam * x + (1 - lam) * x[perm], perm, lam


def mixup_criterion(criterion, perm: Tensor, lam: float):
    """The loss of a batch mixed by `mixup`: lam * criterion(logits, y) + (1 - lam) * criterion(logits, y[perm])."""
    return lambda logits, y, epoch: lam * criterion(logits, y, epoch) + (1 - lam) * criterion(logits, y[perm], epoch)
