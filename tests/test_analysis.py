"""analysis: every quantity computed from the factors equals the same quantity computed on the dense ΔW (float64
torch.linalg / the NumPy energy reference), plus invariances and the zero / oversized-rank / NaN edge cases."""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from loralab.analysis import (delta_cosine, delta_fro_norm, delta_inner, effective_rank, energy, factor_stats,
                              factor_svd, rank_for_energy, singular_values, stable_rank, stacked_factor_svd,
                              subspace_overlap)
from loralab.reference.energy import cumulative_energy

dims = st.integers(1, 12)
ranks = st.integers(1, 10)
scalings = st.floats(-4, 4).filter(lambda s: abs(s) > 1e-3)


def _factors(seed, r, n_in, n_out, true_rank=None):
    """A (r, in), B (out, r) in float64; with true_rank < r, B·A has rank ≤ true_rank."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n_in, generator=g, dtype=torch.float64)
    B = torch.randn(n_out, r, generator=g, dtype=torch.float64)
    if true_rank is not None and true_rank < r:
        B = B[:, :true_rank] @ torch.randn(true_rank, r, generator=g, dtype=torch.float64)
    return A, B


def _dense_erank(s):
    p = s[s > 1e-300] / s.sum()
    return math.exp(-(p * p.log()).sum().item())


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2 ** 16), ranks, dims, dims, scalings, st.integers(1, 10))
def test_factor_svd_is_the_svd_of_the_dense_update(seed, r, n_in, n_out, s, true_rank):
    A, B = _factors(seed, r, n_in, n_out, true_rank)
    dense = s * B @ A                                        # (out, in), the thing we never form
    U, S, Vh = factor_svd(A, B, s)
    k = min(r, n_in, n_out)
    assert U.shape == (n_out, k) and S.shape == (k,) and Vh.shape == (k, n_in)
    ref = torch.linalg.svdvals(dense)                         # (min(out, in),)
    tol = 1e-10 * max(1.0, ref[0].item())
    torch.testing.assert_close(S, ref[:k], atol=tol, rtol=0)
    assert (ref[k:] <= tol).all()                             # the rest of the dense spectrum is zero
    assert (S[:-1] >= S[1:]).all() and (S >= 0).all()
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, dense, atol=tol, rtol=0)
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(singular_values(A, B, s), S)
    assert delta_fro_norm(A, B, s) == pytest.approx(dense.norm().item(), rel=1e-10, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 16), ranks, dims, dims, st.integers(1, 10))
def test_energy_matches_the_numpy_reference_on_the_same_matrix(seed, r, n_in, n_out, true_rank):
    A, B = _factors(seed, r, n_in, n_out, true_rank)
    dense = (B @ A).numpy()
    n = min(n_in, n_out)
    wanted = list(range(1, n + 1))
    ours = energy(singular_values(A, B), wanted + [n + 5])
    ref = cumulative_energy(dense, wanted, power=2)
    for k in wanted:
        assert 100 * ours[k] == pytest.approx(ref[k], abs=1e-8)
    assert ours[n + 5] == 1.0                                # beyond the rank: everything is captured


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 16), ranks, dims, dims, scalings, st.integers(1, 10))
def test_effective_and_stable_rank_match_the_dense_spectrum(seed, r, n_in, n_out, s, true_rank):
    A, B = _factors(seed, r, n_in, n_out, true_rank)
    dense = s * B @ A
    ref = torch.linalg.svdvals(dense)
    S = singular_values(A, B, s)
    assert effective_rank(S) == pytest.approx(_dense_erank(ref), rel=1e-8)
    spectral = torch.linalg.matrix_norm(dense, ord=2).item()
    assert stable_rank(S) == pytest.approx(dense.norm().item() ** 2 / spectral ** 2, rel=1e-8)
    assert 1 - 1e-9 <= effective_rank(S) <= min(true_rank, r, n_in, n_out) + 1e-9
    assert 1 - 1e-9 <= stable_rank(S) <= min(true_rank, r, n_in, n_out) + 1e-9


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 16), ranks, ranks, dims, dims, scalings, scalings)
def test_cosine_and_inner_product_match_dense(seed, r1, r2, n_in, n_out, s1, s2):
    A1, B1 = _factors(seed, r1, n_in, n_out)
    A2, B2 = _factors(seed + 1, r2, n_in, n_out)
    W1, W2 = s1 * B1 @ A1, s2 * B2 @ A2
    inner = (W1 * W2).sum().item()
    assert delta_inner((A1, B1, s1), (A2, B2, s2)) == pytest.approx(inner, rel=1e-9, abs=1e-9)
    assert delta_cosine((A1, B1, s1), (A2, B2, s2)) == pytest.approx(
        inner / (W1.norm() * W2.norm()).item(), rel=1e-9, abs=1e-12)
    assert delta_cosine((A1, B1, s1), (A1, B1, 2 * s1)) == pytest.approx(1.0, abs=1e-12)
    assert delta_cosine((A1, B1, s1), (A1, B1, -s1)) == pytest.approx(-1.0, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 16), st.integers(2, 6), st.integers(8, 14), st.integers(8, 14), st.integers(1, 3))
def test_subspace_overlap_matches_dense_singular_vectors(seed, r, n_in, n_out, k):
    A1, B1 = _factors(seed, r, n_in, n_out)
    A2, B2 = _factors(seed + 7, r, n_in, n_out)
    A2 = A2 + 0.5 * A1  # partly shared directions, so the overlap is neither 0 nor 1
    B2 = B2 + 0.5 * B1
    k = min(k, r)
    dense = [torch.linalg.svd(B @ A, full_matrices=False) for A, B in ((A1, B1), (A2, B2))]
    for Ud, Sd, _ in dense:  # the top-k subspace is well defined only with a gap after σ_k
        assume((Sd[k - 1] - Sd[k]).item() > 1e-3 * Sd[0].item())
    U1, _, Vh1 = factor_svd(A1, B1)
    U2, _, Vh2 = factor_svd(A2, B2)
    left = (dense[0][0][:, :k].T @ dense[1][0][:, :k]).square().sum().item() / k
    right = (dense[0][2][:k] @ dense[1][2][:k].T).square().sum().item() / k
    assert subspace_overlap(U1, U2, k) == pytest.approx(left, abs=1e-7)
    assert subspace_overlap(Vh1.T, Vh2.T, k) == pytest.approx(right, abs=1e-7)
    assert 0 <= subspace_overlap(U1, U2, k) <= 1


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2 ** 16), st.integers(4, 20), st.integers(1, 4))
def test_overlap_invariances(seed, n, k):
    k = min(k, n // 2)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, 2 * k, generator=g, dtype=torch.float64))   # (n, 2k) orthonormal
    R, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))       # a rotation within
    assert subspace_overlap(Q[:, :k], Q[:, :k], k) == pytest.approx(1.0, abs=1e-12)
    assert subspace_overlap(Q[:, :k], Q[:, :k] @ R, k) == pytest.approx(1.0, abs=1e-12)   # basis-independent
    assert subspace_overlap(Q[:, :k], -Q[:, :k], k) == pytest.approx(1.0, abs=1e-12)      # sign-independent
    assert subspace_overlap(Q[:, :k], Q[:, k:], k) == pytest.approx(0.0, abs=1e-12)       # orthogonal
    assert subspace_overlap(Q[:, :k], Q[:, :k], 100) == pytest.approx(1.0, abs=1e-12)     # k capped


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2 ** 16), st.lists(st.tuples(ranks, scalings), min_size=1, max_size=3), dims, dims)
def test_stacked_factor_svd_is_the_svd_of_the_sum(seed, parts, n_in, n_out):
    factors = [(*_factors(seed + i, r, n_in, n_out), c) for i, (r, c) in enumerate(parts)]
    dense = sum(c * B @ A for A, B, c in factors)
    U, S, Vh = stacked_factor_svd(factors)
    tol = 1e-10 * max(1.0, torch.linalg.svdvals(dense)[0].item())
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, dense, atol=tol, rtol=0)


def test_float32_inputs_are_computed_in_float64():
    A, B = _factors(0, 4, 10, 8)
    U, S, Vh = factor_svd(A.float(), B.float(), 0.5)
    assert S.dtype == U.dtype == Vh.dtype == torch.float64
    ref = torch.linalg.svdvals(0.5 * B.float().double() @ A.float().double())
    torch.testing.assert_close(S, ref[:4], atol=1e-12, rtol=0)


def test_known_spectra():
    assert effective_rank(torch.ones(5)) == pytest.approx(5.0)         # r equal singular values: rank r
    assert effective_rank(torch.tensor([3.0, 0, 0])) == pytest.approx(1.0)
    assert stable_rank(torch.tensor([2.0, 1.0])) == pytest.approx(1.25)
    assert energy(torch.tensor([3.0, 4.0]), [1, 2]) == {1: pytest.approx(16 / 25), 2: 1.0}  # unsorted input
    assert energy(torch.tensor([4.0, 3.0]), [1, 2]) == {1: pytest.approx(16 / 25), 2: 1.0}
    assert rank_for_energy(torch.tensor([4.0, 3.0]), 0.64) == 1
    assert rank_for_energy(torch.tensor([4.0, 3.0]), 0.99) == 2
    assert rank_for_energy(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5) == 2   # exactly half: rank 2 suffices


def test_energy_is_the_squared_error_of_truncation():
    A, B = _factors(3, 6, 15, 11)
    U, S, Vh = factor_svd(A, B, 1.3)
    dense = 1.3 * B @ A
    for k, e in energy(S, [1, 2, 4]).items():
        approx = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
        assert 1 - e == pytest.approx(((dense - approx).norm() / dense.norm()).item() ** 2, rel=1e-9)


def test_zero_update_is_defined_everywhere():
    A = torch.randn(4, 9)
    B = torch.zeros(7, 4)  # a fresh adapter
    U, S, Vh = factor_svd(A, B, 2.0)
    assert S.shape == (4,) and (S == 0).all()
    assert energy(S, [1, 2, 8]) == {1: 1.0, 2: 1.0, 8: 1.0}
    assert effective_rank(S) == 0.0 and stable_rank(S) == 0.0 and rank_for_energy(S) == 0
    assert delta_fro_norm(A, B, 2.0) == 0.0
    assert delta_cosine((A, B, 2.0), (A, torch.randn(7, 4), 1.0)) == 0.0


def test_rank_above_the_layer_dims_is_capped():
    A, B = _factors(1, 10, 5, 3)   # r=10 on a 3×5 layer
    S = singular_values(A, B)
    assert S.shape == (3,)
    torch.testing.assert_close(S, torch.linalg.svdvals(B @ A), atol=1e-10, rtol=0)
    assert energy(S, [8]) == {8: 1.0}


@pytest.mark.parametrize("which, value, match", [
    ("B", float("nan"), "B holds 1 NaN and 0 Inf"),
    ("A", float("inf"), "A holds 0 NaN and 1 Inf"),
    ("A", float("-inf"), "A holds 0 NaN and 1 Inf"),
])
def test_non_finite_factors_raise_naming_them(which, value, match):
    A, B = torch.randn(3, 6), torch.randn(5, 3)
    (A if which == "A" else B)[1, 2] = value
    for fn in (lambda: factor_svd(A, B), lambda: delta_fro_norm(A, B), lambda: singular_values(A, B),
               lambda: delta_cosine((A, B, 1.0), (torch.randn(3, 6), torch.randn(5, 3), 1.0))):
        with pytest.raises(ValueError, match=match):
            fn()


@pytest.mark.parametrize("call, match", [
    (lambda: factor_svd(torch.randn(3, 6), torch.randn(5, 2)), r"same r, got A \(3, 6\) and B \(5, 2\)"),
    (lambda: factor_svd(torch.randn(3, 6), torch.randn(5, 3), float("nan")), "scaling=nan is not finite"),
    (lambda: energy(torch.ones(3), [0]), "ranks must be integers ≥ 1"),
    (lambda: energy(torch.tensor([1.0, -1.0]), [1]), "must be ≥ 0"),
    (lambda: energy(torch.tensor([1.0, float("nan")]), [1]), "S holds 1 NaN"),
    (lambda: subspace_overlap(torch.eye(4), torch.eye(5), 1), "same n"),
    (lambda: subspace_overlap(torch.eye(4), torch.eye(4), 0), "k=0"),
    (lambda: delta_cosine((torch.randn(2, 4), torch.randn(3, 2), 1), (torch.randn(2, 5), torch.randn(3, 2), 1)),
     "different shapes"),
    (lambda: stacked_factor_svd([]), "at least one"),
    (lambda: stacked_factor_svd([(torch.randn(2, 4), torch.randn(3, 2), 1), (torch.randn(2, 5), torch.randn(3, 2), 1)]),
     "different \\(out, in\\) shapes"),
    (lambda: factor_svd(np.ones((2, 3)), torch.ones(3, 2)), "must be a torch.Tensor"),
])
def test_bad_input_is_refused_with_the_reason(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_factor_stats_against_direct_computation():
    A = torch.tensor([[1.0, -3.0, 0.0], [2.0, 0.0, 4.0]])
    B = torch.zeros(4, 2)
    stats = factor_stats(A, B)
    flat = A.double().reshape(-1)
    assert stats["A"]["mean"] == pytest.approx(flat.mean().item())
    assert stats["A"]["std"] == pytest.approx(flat.std().item())
    assert stats["A"]["max_abs"] == 4.0 and stats["A"]["zero_fraction"] == pytest.approx(2 / 6)
    assert stats["B"] == {"mean": 0.0, "std": 0.0, "max_abs": 0.0, "zero_fraction": 1.0, "nonfinite": 0}


def test_factor_stats_count_nan_without_raising():
    A = torch.tensor([[1.0, float("nan"), 3.0, float("inf")]])
    stats = factor_stats(A, torch.ones(2, 1))
    assert stats["A"]["nonfinite"] == 2
    assert stats["A"]["mean"] == pytest.approx(2.0) and stats["A"]["max_abs"] == 3.0
