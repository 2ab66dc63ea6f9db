"""What an update ΔW = s·B·A is, read from its factors alone: spectrum, energy, ranks, norms, similarity.

A: (r, in), B: (out, r), s the scaling (α/r, or α/√r with rsLoRA).  ΔW is (out, in) and never formed: every
quantity below comes from the thin QR of each factor and the SVD of a core of at most r×r, computed in float64.

    B = Q_B·R_B   (Q_B: (out, q), R_B: (q, r), q = min(out, r))
    Aᵀ = Q_A·R_A  (Q_A: (in, p),  R_A: (p, r), p = min(in, r))
    ΔW = s·Q_B·(R_B·R_Aᵀ)·Q_Aᵀ,   R_B·R_Aᵀ = U_c·S_c·V_cᵀ  (q×p)
    =>  ΔW = (Q_B·U_c)·(|s|·S_c)·(V_cᵀ·Q_Aᵀ)·sign(s)

Q_B·U_c and Q_A·V_c have orthonormal columns, so this is the thin SVD of ΔW at O((out + in)·r² + r³) cost
instead of O(out·in·r).  A sum Σ c_i·B_i·A_i is one product of stacked factors [c_1·B_1, …]·[A_1; …].

With σ₁ ≥ σ₂ ≥ … ≥ 0 the singular values of ΔW:

    energy(k)       E(k) = Σ_{i≤k} σᵢ² / Σ σᵢ²   (squared Frobenius; 1 − E(k) is the relative squared error of the
                    best rank-k approximation, Eckart–Young; as in loralab/reference/energy.py)
    effective rank  exp(H(p)), pᵢ = σᵢ / Σσ, H = −Σ pᵢ·log pᵢ   (Roy & Vetterli 2007; 1 for rank one, r for
                    r equal singular values)
    stable rank     Σ σᵢ² / σ₁² = ‖ΔW‖²_F / ‖ΔW‖²_2   (≤ rank; insensitive to tiny singular values)
    ‖s·B·A‖²_F      = s²·Σ (BᵀB) ⊙ (A·Aᵀ)            (r×r Gram matrices)
    ⟨ΔW₁, ΔW₂⟩_F    = s₁·s₂·Σ (B₁ᵀB₂) ⊙ (A₁·A₂ᵀ)      (r₁×r₂), so cosine similarity needs no dense matrix
    overlap(U, V, k) = ‖U_kᵀ·V_k‖²_F / k ∈ [0, 1]     (mean squared cosine of the principal angles between two
                    k-dimensional subspaces: 1 = the same subspace, 0 = orthogonal)

A zero update (B = 0, a fresh adapter) has all σᵢ = 0.  Then energy(k) = 1 for every k (any rank-k
approximation of the zero matrix is exact), effective and stable rank are 0 (the rank of the zero matrix), and
the cosine with anything is 0.  Non-finite inputs (NaN/Inf) raise ValueError naming the tensor.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["factor_svd", "stacked_factor_svd", "singular_values", "energy", "effective_rank", "stable_rank",
           "rank_for_energy", "delta_fro_norm", "delta_inner", "delta_cosine", "subspace_overlap", "factor_stats",
           "check_factors"]

Factors = tuple  # (A (r, in), B (out, r), scaling)


def _finite(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex():
        bad = (~torch.isfinite(t)).sum().item()
        if bad:
            n_nan = torch.isnan(t).sum().item()
            raise ValueError(f"{name} holds {n_nan} NaN and {bad - n_nan} Inf values out of {t.numel()}; the "
                             f"update is undefined. Retrain or reload the adapter (a diverged run leaves NaN).")
    return t.detach().to(torch.float64)


def check_factors(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0, name: str = "") -> tuple:
    """(A, B, scaling) as float64 tensors and a float, after checking shapes (A: (r, in), B: (out, r)) and that
    all are finite.  `name` prefixes the error messages (e.g. the module path)."""
    where = f"{name}: " if name else ""
    A, B = _finite(f"{where}A", A), _finite(f"{where}B", B)
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"{where}expected A (r, in) and B (out, r) with the same r, got A {tuple(A.shape)} and "
                         f"B {tuple(B.shape)}")
    scaling = float(scaling)
    if not math.isfinite(scaling):
        raise ValueError(f"{where}scaling={scaling} is not finite; it is lora_alpha / r (or / √r with rsLoRA)")
    return A, B, scaling


def factor_svd(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ΔW = scaling·B·A without forming ΔW.  A: (r, in), B: (out, r).

    Returns float64 U: (out, k), S: (k,) descending and ≥ 0, Vh: (k, in), k = min(r, out, in), with
    U·diag(S)·Vh = ΔW.  If r > min(out, in) the extra rank cannot show: k is capped there."""
    A, B, scaling = check_factors(A, B, scaling)
    QB, RB = torch.linalg.qr(B)                             # (out, q), (q, r)
    QA, RA = torch.linalg.qr(A.T)                           # (in, p), (p, r)
    Uc, S, Vhc = torch.linalg.svd(RB @ RA.T, full_matrices=False)  # (q, m), (m,), (m, p); m = min(q, p)
    U = QB @ Uc                                              # (out, m)
    if scaling < 0:
        U = -U
    return U, S * abs(scaling), Vhc @ QA.T                   # (out, m), (m,), (m, in)


def stacked_factor_svd(factors: Sequence[Factors]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of Σ c_i·B_i·A_i, [(A_i (r_i, in), B_i (out, r_i), c_i)], as factor_svd of the stacked
    factors A = [A_1; …; A_n] (Σr_i, in) and B = [c_1·B_1, …, c_n·B_n] (out, Σr_i)."""
    if not factors:
        raise ValueError("stacked_factor_svd needs at least one (A, B, c) triple")
    checked = [check_factors(A, B, c, f"factors[{i}]") for i, (A, B, c) in enumerate(factors)]
    shapes = {(B.shape[0], A.shape[1]) for A, B, _ in checked}
    if len(shapes) > 1:
        raise ValueError(f"the updates have different (out, in) shapes {sorted(shapes)}; only updates of one "
                         f"layer can be added")
    return factor_svd(torch.cat([A for A, _, _ in checked], 0), torch.cat([c * B for _, B, c in checked], 1))


def singular_values(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """σ of ΔW = scaling·B·A, float64 (k,) descending, k = min(r, out, in)."""
    return factor_svd(A, B, scaling)[1]


def _spectrum(S: torch.Tensor) -> torch.Tensor:
    """S as a float64 vector sorted descending, checked finite and ≥ 0."""
    S = _finite("S", torch.as_tensor(S)).reshape(-1)
    if (S < 0).any():
        raise ValueError(f"singular values must be ≥ 0, got min {S.min().item():.3g}")
    return S.sort(descending=True).values


def energy(S: torch.Tensor, ranks: Sequence[int]) -> dict[int, float]:
    """{k: Σ_{i≤k} σᵢ² / Σ σᵢ²} for each k in ranks (k ≥ 1; k beyond len(S) captures everything: 1.0).
    All-zero S: 1.0 for every k (the zero matrix is its own rank-k approximation)."""
    S = _spectrum(S)
    bad = [k for k in ranks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad:
        raise ValueError(f"ranks must be integers ≥ 1, got {bad}")
    w = S.square()
    total = w.sum().item()
    if total == 0:
        return {int(k): 1.0 for k in ranks}
    cumulative = (w.cumsum(0) / total).tolist()
    return {int(k): 1.0 if k >= len(cumulative) else min(cumulative[k - 1], 1.0) for k in ranks}


def rank_for_energy(S: torch.Tensor, fraction: float = 0.99) -> int:
    """The smallest k with energy(S, [k]) ≥ fraction (0 for an all-zero S)."""
    S = _spectrum(S)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction}: must be in (0, 1]")
    w = S.square()
    total = w.sum().item()
    if total == 0:
        return 0
    cumulative = w.cumsum(0) / total
    return min(int((cumulative < fraction * (1 - 1e-12)).sum().item()) + 1, S.numel())


def effective_rank(S: torch.Tensor) -> float:
    """exp(−Σ pᵢ·log pᵢ), pᵢ = σᵢ/Σσ (0·log 0 = 0); in [1, len(S)] for a nonzero S, 0.0 for an all-zero S."""
    S = _spectrum(S)
    total = S.sum()
    if total.item() == 0:
        return 0.0
    p = S[S > 0] / total
    return math.exp(-(p * p.log()).sum().item())


def stable_rank(S: torch.Tensor) -> float:
    """Σ σᵢ² / σ₁² (σ₁ the largest); 0.0 for an all-zero S."""
    S = _spectrum(S)
    top = S.max().item() if S.numel() else 0.0
    return 0.0 if top == 0 else S.square().sum().item() / top ** 2


def delta_inner(f1: Factors, f2: Factors) -> float:
    """⟨ΔW₁, ΔW₂⟩_F = s₁·s₂·Σ (B₁ᵀB₂) ⊙ (A₁·A₂ᵀ) for f = (A, B, s), in float64 (no dense matrix)."""
    A1, B1, s1 = check_factors(*f1, name="first")
    A2, B2, s2 = check_factors(*f2, name="second")
    if (B1.shape[0], A1.shape[1]) != (B2.shape[0], A2.shape[1]):
        raise ValueError(f"the updates have different shapes (out, in) = {(B1.shape[0], A1.shape[1])} and "
                         f"{(B2.shape[0], A2.shape[1])}; compare adapters of the same layer")
    return s1 * s2 * ((B1.T @ B2) * (A1 @ A2.T)).sum().item()  # (r1, r2) ⊙ (r1, r2)


def delta_fro_norm(A: torch.Tensor, B: torch.Tensor, scaling: float = 1.0) -> float:
    """‖scaling·B·A‖_F = |scaling|·sqrt(Σ (BᵀB) ⊙ (A·Aᵀ)), from r×r Gram matrices in float64."""
    A, B, scaling = check_factors(A, B, scaling)
    return abs(scaling) * math.sqrt(max(((B.T @ B) * (A @ A.T)).sum().item(), 0.0))


def delta_cosine(f1: Factors, f2: Factors) -> float:
    """⟨ΔW₁, ΔW₂⟩_F / (‖ΔW₁‖_F·‖ΔW₂‖_F) in [−1, 1] for f = (A, B, s); 0.0 if either update is zero."""
    n1, n2 = delta_fro_norm(*f1), delta_fro_norm(*f2)
    if n1 == 0 or n2 == 0:
        return 0.0
    return max(-1.0, min(1.0, delta_inner(f1, f2) / (n1 * n2)))


def subspace_overlap(U1: torch.Tensor, U2: torch.Tensor, k: int) -> float:
    """‖U1[:, :k]ᵀ·U2[:, :k]‖²_F / k for U1: (n, k1), U2: (n, k2) with orthonormal columns (the left singular
    vectors U from factor_svd; for the right ones pass Vh.T).  k is capped at min(k1, k2).  1.0 means the top-k
    subspaces are the same, 0.0 that they are orthogonal; two random k-dim subspaces of Rⁿ give about k/n."""
    U1, U2 = _finite("U1", U1), _finite("U2", U2)
    if U1.dim() != 2 or U2.dim() != 2 or U1.shape[0] != U2.shape[0]:
        raise ValueError(f"expected U1 (n, k1) and U2 (n, k2) with the same n, got {tuple(U1.shape)} and "
                         f"{tuple(U2.shape)}; for right singular vectors pass Vh.T")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}: must be an integer ≥ 1")
    k = min(k, U1.shape[1], U2.shape[1])
    if k == 0:
        raise ValueError("a basis has no columns; there is no subspace to compare")
    return min((U1[:, :k].T @ U2[:, :k]).square().sum().item() / k, 1.0)


def _tensor_stats(t: torch.Tensor) -> dict:
    t = t.detach()
    finite = t[torch.isfinite(t)].to(torch.float64) if t.is_floating_point() else t.to(torch.float64).reshape(-1)
    n = t.numel()
    return {"mean": finite.mean().item() if finite.numel() else 0.0,
            "std": finite.std().item() if finite.numel() > 1 else 0.0,
            "max_abs": finite.abs().max().item() if finite.numel() else 0.0,
            "zero_fraction": (t == 0).sum().item() / n if n else 0.0,
            "nonfinite": n - finite.numel()}


def factor_stats(A: torch.Tensor, B: torch.Tensor) -> dict:
    """{"A": {...}, "B": {...}} with mean, std (unbiased), max_abs and zero_fraction of each factor's entries,
    plus nonfinite (the count of NaN/Inf entries, which the other figures leave out).  Never raises on NaN."""
    return {"A": _tensor_stats(A), "B": _tensor_stats(B)}
