"""IP-DPP subset selection for stage 2 (METHOD.md, "Stage 2").

Per class c with N images and p_i = the model's probability of the true class, the paper's kernel is

    S = diag(d) + (1/N) p p^T,    d_i = 1 - p_i * mean(p)      (rows sum to 1, eigenvalues in (0, 1])

and a k-DPP on S draws a k-subset Y with P(Y) = det(S_Y) / sum_{|Y'|=k} det(S_Y'). By the matrix determinant
lemma det(S_Y) = prod_{Y} d + (1/N) sum_{j in Y} p_j^2 prod_{Y \\ j} d, so images the model is unsure about
(small p, large d) are drawn more often. `sample_kdpp` samples this law exactly without any N x N matrix;
`sample_paper_alg1` is the paper's (inexact, O(N^3)) Algorithm 1, kept for comparison; `sample_random` is the
uniform ablation (what the released code actually did); `select_subset` applies one of them per class.
"""

from __future__ import annotations

import math

import numpy as np

from tailwise import UserError

SAMPLERS = ("kdpp", "paper-alg1", "random", "none")

_UNIFORMS_PER_BATCH = 1 << 20  # uniforms drawn at once by the rejection loop (8 MB)


def class_targets(counts: list[int], ratio: float = 10) -> list[int]:
    """Per-class subset sizes k_c = min(N_c, floor(ratio * N_min)), N_min = the smallest non-zero count.

    Classes with N_c <= k_c are kept whole, so the subset's imbalance factor is about `ratio`.
    """
    if not math.isfinite(ratio) or ratio <= 0:
        raise UserError(f"ratio must be a positive number (got {ratio!r})")
    counts = [int(n) for n in counts]
    if any(n < 0 for n in counts):
        raise UserError(f"class counts must be >= 0 (got {counts})")
    present = [n for n in counts if n > 0]
    if not present:
        return [0] * len(counts)
    cap = max(1, int(ratio * min(present)))
    return [min(n, cap) for n in counts]


def kernel_diagonal(p: np.ndarray) -> np.ndarray:
    """d_i = 1 - p_i * mean(p), computed as (1 - p_i) + p_i * mean(1 - p): a sum of non-negative terms, so it
    keeps its relative precision when every p is close to 1 (a confident model), and is 0 only when all p = 1."""
    q = 1.0 - p
    return q + p * q.mean()


def sample_kdpp(p: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Exact k-DPP sample from the paper's kernel S = diag(d) + pp^T/N; returns k sorted indices into p.

    Method (exact rejection sampling from independent per-item draws). Write det(S_Y) as a sum over "marks":
    m = none with weight prod_{Y} d, or one marked item j in Y with weight (p_j^2/N) prod_{Y \\ j} d. Each
    item independently is out (weight 1), in (weight lam * d_i) or in-and-marked (weight lam * mu * p_i^2).
    Conditioned on exactly k items in and at most one marked, the pair (Y, m) has probability proportional
    to lam^k * [prod_Y d, or mu p_j^2 prod_{Y \\ j} d]; with c = N * mu <= 1, also accepting an unmarked
    draw with probability c makes it proportional to the target weights, so Y ~ det(S_Y) exactly, whatever
    lam and mu are. lam and mu only set the speed: lam makes the expected number of items in equal k (so k
    is the mode of the count) and c = min(1, 1/R), R ~ (1/N) sum_j p_j^2 lam / (1 + lam d_j) the estimated
    ratio of the marked to the unmarked mass, keeps the mark acceptance >= 1/e.

    Cost: each trial is O(N) vectorised work (N uniforms) and O(N) memory (batches of trials share an
    8 MB buffer). A trial is kept with probability about P(count = k) * e^-1..1, and the count is a
    Poisson-binomial (log-concave, mode k) with variance s2 = sum pi_i (1 - pi_i) <= min(k, N - k), so
    P(count = k) ~ 1 / sqrt(2 pi s2): expected trials ~ sqrt(2 pi s2) * (1..e), expected time
    O(N sqrt(min(k, N - k))), below O(N k). N = 1e5, k = 1e4: a few hundred trials, well under a second.

    Edge cases: k = 0 -> empty; k = N -> everything; all p = 1 (d = 0, S = 11^T/N of rank 1, so every
    det(S_Y) with |Y| >= 2 is 0 and the k-DPP is undefined) -> a uniform k-subset, which is the limit of
    the k-DPP as all p -> 1 together and exact for k = 1.
    """
    p, k, trivial = _checked(p, k)
    if trivial is not None:
        return trivial
    n = p.size
    d = kernel_diagonal(p)
    if not d.any():
        return sample_random(p, k, rng)

    # Inclusion probabilities pi_i = lam d_i / (1 + lam d_i) with sum = k; then R and c from them.
    log_lam = _solve_log_scale(np.log(d), k)
    lam = math.exp(log_lam)
    r_estimate = float(np.sum(p * p * lam / (1.0 + lam * d))) / n
    c = 1.0 if r_estimate <= 1.0 else 1.0 / r_estimate
    mu = c / n
    in_weight = d + mu * p * p  # an item is in (marked or not) with weight lam * in_weight
    log_lam = _solve_log_scale(np.log(in_weight), k, start=log_lam)
    pi_in = _sigmoid(log_lam + np.log(in_weight))
    pi_marked = pi_in * (mu * p * p / in_weight)  # marked <=> u < pi_marked (<= pi_in, so marked items are in)

    spread = float(np.dot(pi_in, 1.0 - pi_in))  # variance of the count; ~sqrt(2 pi spread) trials per draw
    batch = max(1, min(_UNIFORMS_PER_BATCH // n, 8 + int(4.0 * math.sqrt(2.0 * math.pi * spread))))
    while True:
        u = rng.random((batch, n))
        inside = u < pi_in
        for row in np.flatnonzero(np.count_nonzero(inside, axis=1) == k):
            marks = np.count_nonzero(u[row] < pi_marked)
            if marks > 1 or (marks == 0 and c < 1.0 and rng.random() >= c):
                continue
            return np.flatnonzero(inside[row]).astype(np.int64)


def kernel_matrix(p: np.ndarray) -> np.ndarray:
    """The explicit N x N kernel S = diag(d) + pp^T/N (Eq. 16). O(N^2) memory: tests and Algorithm 1 only."""
    p = _check_probabilities(p)
    s = np.outer(p, p) / p.size
    s[np.diag_indices_from(s)] += kernel_diagonal(p)
    return s


def sample_paper_alg1(p: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """The paper's Algorithm 1, for comparison; returns k sorted indices into p.

    1. Build S explicitly and eigendecompose it: O(N^2) memory, O(N^3) time (N = 1e4: 0.8 GB per matrix and
       minutes on 2 cores; N = 1e5: 80 GB, infeasible).
    2. Visit the eigenvectors in decreasing eigenvalue order (the order is our choice; the text does not
       fix it) and keep eigenvector i with probability lambda_i / (lambda_i + 1), stopping once k are kept.
       If the pass ends with fewer than k kept (likely when k > N/2, since lambda_i <= 1 makes every
       probability <= 1/2), top up with the unkept eigenvectors of largest eigenvalue.
    3. k times: take the item with the largest squared norm of its row in the kept span (deterministic
       argmax, lowest index on ties) and project that coordinate out of the span (Gram-Schmidt on the rows,
       done as a rank-one Cholesky-style update of the residual norms: O(N k^2) in all).

    This is neither an exact DPP nor an exact k-DPP sampler: step 2 ignores the elementary symmetric
    polynomials a k-DPP needs (Kulesza & Taskar, Alg. 8) and uses lambda/(lambda+1), the marginal of an
    L-ensemble, and step 3 maximises instead of sampling proportionally to the squared norms.
    """
    p, k, trivial = _checked(p, k)
    if trivial is not None:
        return trivial
    n = p.size
    eigvals, eigvecs = np.linalg.eigh(kernel_matrix(p))
    order = np.argsort(-eigvals, kind="stable")
    keep_probability = np.clip(eigvals[order], 0.0, None) / (np.clip(eigvals[order], 0.0, None) + 1.0)
    hits = rng.random(n) < keep_probability
    kept = order[hits][:k]
    if kept.size < k:
        kept = np.concatenate([kept, order[~hits][: k - kept.size]])
    basis = eigvecs[:, kept]  # N x k, orthonormal columns

    residual = np.einsum("ij,ij->i", basis, basis)  # squared norm of each row's component left in the span
    chol = np.empty((n, k))
    chosen = np.empty(k, dtype=np.int64)
    for t in range(k):
        i = int(np.argmax(residual))
        chosen[t] = i
        column = basis @ basis[i] - chol[:, :t] @ chol[i, :t]
        column /= math.sqrt(max(residual[i], np.finfo(float).tiny))
        chol[:, t] = column
        residual -= column * column
        residual[chosen[: t + 1]] = -np.inf
    return np.sort(chosen)


def sample_random(p: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random k-subset of range(len(p)) (p itself is ignored); sorted indices."""
    n = np.asarray(p).shape[0]
    k = _check_k(k, n)
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


_SAMPLE = {"kdpp": sample_kdpp, "paper-alg1": sample_paper_alg1, "random": sample_random}


def select_subset(
    probs: np.ndarray, labels: np.ndarray, method: str, ratio: float, rng: np.random.Generator
) -> tuple[np.ndarray, dict]:
    """Draw the stage-2 training subset: per class (in label order) k_c = class_targets(...) of its items.

    probs: p_i, the probability of the true class, shape (N,); or softmax rows, shape (N, C), from which
    p_i = probs[i, labels[i]] is taken. labels: (N,) integer class labels. Classes with N_c <= k_c are kept
    whole; method "none" keeps everything. Returns (sorted indices into probs/labels, stats) where stats
    holds the method, ratio, total size and, per class (lists in label order): class, n, k, and
    p_mean/p_min/p_max over the class and sel_p_mean/sel_p_min/sel_p_max over the selected items.
    """
    if method not in SAMPLERS:
        raise UserError(f"unknown sampler method {method!r}; choose one of {', '.join(SAMPLERS)}")
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.ndim != 1 or probs.shape[:1] != labels.shape:
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} must have the same length N")
    if probs.ndim == 2:
        p = probs[np.arange(labels.size), labels]
    elif probs.ndim == 1:
        p = probs
    else:
        raise ValueError(f"probs must have shape (N,) or (N, C), got {probs.shape}")

    classes, counts = np.unique(labels, return_counts=True)
    targets = counts.tolist() if method == "none" else class_targets(counts.tolist(), ratio)
    columns = ("class", "n", "k", "p_mean", "p_min", "p_max", "sel_p_mean", "sel_p_min", "sel_p_max")
    per_class: dict[str, list] = {name: [] for name in columns}
    selected = []
    for cls, n_c, k_c in zip(classes.tolist(), counts.tolist(), targets):
        members = np.flatnonzero(labels == cls)
        if k_c >= n_c:
            chosen = members
        else:
            chosen = members[_SAMPLE[method](p[members], k_c, rng)]
        selected.append(chosen)
        for prefix, values in (("", p[members]), ("sel_", p[chosen])):
            per_class[prefix + "p_mean"].append(float(values.mean()) if values.size else float("nan"))
            per_class[prefix + "p_min"].append(float(values.min()) if values.size else float("nan"))
            per_class[prefix + "p_max"].append(float(values.max()) if values.size else float("nan"))
        per_class["class"].append(cls)
        per_class["n"].append(n_c)
        per_class["k"].append(int(chosen.size))
    indices = np.sort(np.concatenate(selected)) if selected else np.empty(0, dtype=np.int64)
    stats = {"method": method, "ratio": float(ratio), "size": int(indices.size), "per_class": per_class}
    return indices.astype(np.int64), stats


def _check_probabilities(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p must be a 1-D array of probabilities, got shape {p.shape}")
    if p.size and not (p.min() >= 0.0 and p.max() <= 1.0):  # NaN fails both comparisons
        raise ValueError("p must hold probabilities in [0, 1] (found NaN, inf or values outside)")
    return p


def _checked(p: np.ndarray, k: int) -> tuple[np.ndarray, int, np.ndarray | None]:
    """Validated p and k, plus the answer when it needs no sampling (k = 0: nothing; k = N: everything)."""
    p = _check_probabilities(p)
    k = _check_k(k, p.size)
    trivial = np.empty(0, dtype=np.int64) if k == 0 else np.arange(p.size, dtype=np.int64) if k == p.size else None
    return p, k, trivial


def _check_k(k: int, n: int) -> int:
    if int(k) != k or not 0 <= k <= n:
        raise ValueError(f"k must be an integer in [0, {n}], got {k!r}")
    return int(k)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))


def _solve_log_scale(log_weights: np.ndarray, k: int, start: float | None = None) -> float:
    """s with sum_i sigmoid(s + log_weights_i) = k (0 < k < N): safeguarded Newton on a known bracket."""
    n = log_weights.size
    base = math.log(k) - math.log(n - k)  # at s = base - max(w), every term is <= k/N; at base - min(w), >= k/N
    lo, hi = base - float(log_weights.max()), base - float(log_weights.min())
    s = base - float(log_weights.mean()) if start is None else min(max(start, lo), hi)
    for _ in range(200):
        pi = _sigmoid(s + log_weights)
        excess = float(pi.sum()) - k
        if abs(excess) <= 1e-3:  # close enough: lam only sets the speed, never the law
            break
        if excess > 0:
            hi = s
        else:
            lo = s
        slope = float(np.dot(pi, 1.0 - pi))
        step = s - excess / slope if slope > 0 else math.nan
        s = step if lo < step < hi else 0.5 * (lo + hi)
        if hi - lo <= 1e-15 * max(1.0, abs(s)):
            break
    return s
