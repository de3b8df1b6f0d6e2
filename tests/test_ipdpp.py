"""IP-DPP samplers: the exact k-DPP against brute-force enumeration, the kernel, edge cases, select_subset."""

import itertools

import numpy as np
import pytest

from tailwise import UserError
from tailwise.training.ipdpp import (
    SAMPLERS,
    class_targets,
    kernel_diagonal,
    kernel_matrix,
    sample_kdpp,
    sample_paper_alg1,
    sample_random,
    select_subset,
)


def enumerate_kdpp(p, k):
    """Every k-subset of range(len(p)) and its k-DPP probability det(S_Y) / sum det(S_Y'), S built explicitly."""
    s = kernel_matrix(p)
    subsets = list(itertools.combinations(range(len(p)), k))
    dets = np.array([np.linalg.det(s[np.ix_(y, y)]) for y in subsets])
    return subsets, dets / dets.sum()


def empirical(sampler, p, k, subsets, draws, seed):
    rng = np.random.default_rng(seed)
    position = {y: i for i, y in enumerate(subsets)}
    counts = np.zeros(len(subsets))
    for _ in range(draws):
        counts[position[tuple(sampler(p, k, rng).tolist())]] += 1
    return counts / draws


def total_variation(a, b):
    return 0.5 * float(np.abs(a - b).sum())


def test_kernel_is_eq16_rows_sum_to_one_psd_and_determinant_lemma():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 9)
    n = p.size
    eq16 = np.outer(p, p) / n
    np.fill_diagonal(eq16, [1 - sum(p[i] * p[j] for j in range(n) if j != i) / n for i in range(n)])
    s = kernel_matrix(p)
    np.testing.assert_allclose(s, eq16, atol=1e-15)
    np.testing.assert_allclose(s.sum(axis=1), 1.0, atol=1e-14)
    eigvals = np.linalg.eigvalsh(s)
    assert eigvals.min() > 0 and eigvals.max() <= 1 + 1e-12
    d = kernel_diagonal(p)
    for y in [(0,), (1, 4), (0, 2, 5, 8), tuple(range(n))]:
        y = list(y)
        lemma = np.prod(d[y]) * (1 + np.sum(p[y] ** 2 / d[y]) / n)
        mixture = np.prod(d[y]) + sum(p[j] ** 2 * np.prod(d[[i for i in y if i != j]]) for j in y) / n
        np.testing.assert_allclose([lemma, mixture], np.linalg.det(s[np.ix_(y, y)]), rtol=1e-12)


@pytest.mark.parametrize(
    "p, k, draws",
    [
        (np.array([0.03, 0.3, 0.6, 0.9, 0.97, 0.99, 0.995, 0.999]), 3, 30_000),
        # A confident model (every p ~ 1, d ~ 1e-3): here the pp^T/N term carries most of the mass.
        (np.array([0.991, 0.993, 0.99995, 0.99998, 0.99999, 0.999995, 0.999996]), 3, 25_000),
    ],
)
def test_kdpp_matches_exact_subset_probabilities(p, k, draws):
    subsets, exact = enumerate_kdpp(p, k)
    freq = empirical(sample_kdpp, p, k, subsets, draws, seed=1234)
    bound = 0.03  # sampling noise at these draw counts: TV ~0.015 on average, < 0.023 in 200 simulated runs
    # The bound tells the law apart from near misses: the prod(d) part alone (forgetting the pp^T/N term
    # of the kernel) is 0.071 / 0.11 away, the uniform law 0.22 / 0.25, the second case's law with its two
    # determinant-lemma parts mis-weighted (the unmarked draws never thinned) 0.057.
    d = kernel_diagonal(p)
    prod_d_only = np.array([np.prod(d[list(y)]) for y in subsets])
    assert total_variation(prod_d_only / prod_d_only.sum(), exact) > bound + 0.015
    assert total_variation(np.full(len(subsets), 1 / len(subsets)), exact) > bound + 0.015
    assert total_variation(freq, exact) < bound


def test_kdpp_is_not_uniform_unlike_the_released_code():
    p = np.array([0.1, 0.7, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999])
    subsets, exact = enumerate_kdpp(p, 3)
    uniform = np.full(len(subsets), 1 / len(subsets))
    assert total_variation(exact, uniform) > 0.28
    assert total_variation(empirical(sample_kdpp, p, 3, subsets, 5000, seed=5), uniform) > 0.22
    assert total_variation(empirical(sample_random, p, 3, subsets, 5000, seed=5), uniform) < 0.07


def test_low_p_items_are_drawn_more_often():
    rng = np.random.default_rng(3)
    n, k, draws = 60, 12, 3000
    p = np.linspace(0.01, 0.99, n)
    inclusion = np.zeros(n)
    for _ in range(draws):
        inclusion[sample_kdpp(p, k, rng)] += 1
    inclusion /= draws
    assert inclusion.sum() == pytest.approx(k)
    thirds = inclusion.reshape(3, n // 3).mean(axis=1)  # low-p, mid-p, high-p items
    assert thirds[0] > thirds[1] > thirds[2]
    assert thirds[0] > 1.3 * thirds[2]
    assert np.corrcoef(p, inclusion)[0, 1] < -0.9

    # A confident model (most p ~ 1): the few unsure images dominate the subset.
    p = np.where(np.arange(1000) < 100, 0.3, 0.999)
    picked = np.concatenate([sample_kdpp(p, 100, rng) for _ in range(20)])
    assert np.mean(picked < 100) > 0.4  # uniform would give 0.1


def test_large_class_is_fast_path_safe():
    rng = np.random.default_rng(0)
    p = 1 - 10 ** rng.uniform(-12, 0, 100_000)  # spans unsure to extremely confident
    y = sample_kdpp(p, 10_000, rng)
    assert y.shape == (10_000,) and y.dtype == np.int64
    assert np.unique(y).size == 10_000 and y.min() >= 0 and y.max() < p.size
    assert np.all(np.diff(y) > 0)


def test_edge_cases():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 6)
    assert sample_kdpp(p, 0, rng).size == 0
    np.testing.assert_array_equal(sample_kdpp(p, 6, rng), np.arange(6))
    np.testing.assert_array_equal(sample_kdpp(np.array([0.7]), 1, rng), [0])
    for constant in (0.0, 0.4, 1.0):  # equal p (1.0: d = 0, S of rank 1): every k-subset equally likely
        q = np.full(6, constant)
        subsets = list(itertools.combinations(range(6), 2))
        freq = empirical(sample_kdpp, q, 2, subsets, 3000, seed=2)
        assert total_variation(freq, np.full(len(subsets), 1 / len(subsets))) < 0.08
    with pytest.raises(ValueError):
        sample_kdpp(p, 7, rng)
    with pytest.raises(ValueError):
        sample_kdpp(np.array([0.5, 1.5]), 1, rng)
    with pytest.raises(ValueError):
        sample_kdpp(np.array([0.5, np.nan]), 1, rng)


@pytest.mark.parametrize("sampler", [sample_paper_alg1, sample_random, sample_kdpp])
@pytest.mark.parametrize("n, k", [(50, 5), (50, 40), (1, 1), (5, 0)])
def test_samplers_return_k_unique_sorted_indices(sampler, n, k):
    rng = np.random.default_rng(0)
    y = sampler(rng.uniform(0, 1, n), k, rng)
    assert y.size == k and np.unique(y).size == k and np.all(np.diff(y) > 0)
    assert y.size == 0 or (y.min() >= 0 and y.max() < n)


def test_paper_alg1_prefers_low_p_but_is_not_the_kdpp():
    rng = np.random.default_rng(0)
    p = np.linspace(0.01, 0.99, 30)
    picked = np.bincount(np.concatenate([sample_paper_alg1(p, 6, rng) for _ in range(100)]), minlength=30)
    assert picked[:10].sum() > 3 * picked[20:].sum()
    p = np.array([0.03, 0.3, 0.6, 0.9, 0.97, 0.99, 0.995, 0.999])
    subsets, exact = enumerate_kdpp(p, 3)
    assert total_variation(empirical(sample_paper_alg1, p, 3, subsets, 2000, seed=0), exact) > 0.1


def test_class_targets():
    cifar10_lt = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert class_targets(cifar10_lt) == [500] * 5 + [387, 232, 139, 83, 50]
    assert class_targets([30, 3, 7], ratio=2) == [6, 3, 6]
    assert class_targets([10, 0, 4], ratio=1.5) == [6, 0, 4]
    with pytest.raises(UserError, match="ratio"):
        class_targets([10, 5], ratio=0)


@pytest.mark.parametrize("method", SAMPLERS)
def test_select_subset_gives_every_class_its_k(method):
    rng = np.random.default_rng(0)
    counts = {0: 200, 1: 60, 2: 15, 3: 5}
    labels = rng.permutation(np.repeat(list(counts), list(counts.values())))
    probs = rng.dirichlet(np.ones(4), size=labels.size)
    indices, stats = select_subset(probs, labels, method, 2, np.random.default_rng(7))
    expected = list(counts.values()) if method == "none" else [10, 10, 10, 5]
    assert np.unique(indices).size == indices.size == sum(expected) == stats["size"]
    assert np.bincount(labels[indices], minlength=4).tolist() == expected == stats["per_class"]["k"]
    assert np.array_equal(np.sort(indices[labels[indices] == 3]), np.flatnonzero(labels == 3))  # kept whole
    assert stats["per_class"]["class"] == [0, 1, 2, 3] and stats["per_class"]["n"] == list(counts.values())
    p = probs[np.arange(labels.size), labels]
    assert stats["per_class"]["p_min"][0] == pytest.approx(p[labels == 0].min())
    assert stats["per_class"]["sel_p_mean"][0] == pytest.approx(p[indices[labels[indices] == 0]].mean())
    same, _ = select_subset(p, labels, method, 2, np.random.default_rng(7))  # (N,) p == (N, C) softmax rows
    np.testing.assert_array_equal(same, indices)


def test_select_subset_rejects_unknown_method():
    with pytest.raises(UserError, match="dpp"):
        select_subset(np.full(4, 0.5), np.zeros(4, dtype=int), "dpp", 10, np.random.default_rng(0))
