"""The matrices the explorer shows and their SVDs, computed once in NumPy.

Every matrix M (m, n) is kept as its thin SVD

    M = U·diag(S)·Vt        U: (m, K) orthonormal columns,  S: (K,) descending,  Vt: (K, n),  K = min(m, n)

and the page truncates it: M_k = U[:, :k]·diag(S[:k])·Vt[:k] = B·A with B = U_k·diag(S_k) (m, k), A = Vt_k (k, n),
k·(m + n) numbers instead of m·n.  By Eckart–Young M_k is the best rank-k approximation in the Frobenius (and
spectral) norm, with

    ‖M − M_k‖²_F = Σ_{i>k} σᵢ²        E(k) = Σ_{i≤k} σᵢ² / Σ σᵢ²  (loralab.reference.energy's definition)

so 1 − E(k) is the relative squared error ‖M − M_k‖²_F / ‖M‖²_F.

An adapter's update ΔW = scaling·B·A (B: (m, r), A: (r, n)) has rank ≤ r, and its SVD comes from the factors
without forming ΔW (O((m + n)·r²) instead of O(m·n·min(m, n))):

    B = Q_B·R_B,  Aᵀ = Q_A·R_A  (reduced QR)      C = scaling·R_B·R_Aᵀ = U_c·diag(S)·V_cᵀ  (r × r)
    ΔW = (Q_B·U_c)·diag(S)·(Q_A·V_c)ᵀ             U = Q_B·U_c,  Vt = V_cᵀ·Q_Aᵀ,  K = min(r, m, n)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..reference.energy import low_rank_plus_noise

__all__ = ["Spectrum", "dense_svd", "factored_svd", "energy", "truncation_error", "BUILTIN", "builtin_matrix"]


@dataclass(frozen=True)
class Spectrum:
    """M = U·diag(S)·Vt.  U: (m, K), S: (K,) float64 descending, Vt: (K, n)."""
    U: np.ndarray
    S: np.ndarray
    Vt: np.ndarray

    def __post_init__(self):
        K = self.U.shape[-1]
        if self.U.ndim != 2 or self.Vt.ndim != 2 or self.S.shape != (K,) or self.Vt.shape[0] != K:
            raise ValueError(f"SVD factors do not fit: U {self.U.shape}, S {self.S.shape}, Vt {self.Vt.shape}")
        if K and (np.any(self.S < 0) or np.any(np.diff(self.S) > 0)):
            raise ValueError("singular values must be non-negative and sorted in descending order")

    @property
    def shape(self) -> tuple[int, int]:
        return self.U.shape[0], self.Vt.shape[1]

    def truncate(self, k: int) -> np.ndarray:
        """M_k (m, n), the dense rank-k truncation."""
        return (self.U[:, :k] * self.S[:k]) @ self.Vt[:k]


def dense_svd(M: np.ndarray) -> Spectrum:
    """The thin SVD of a dense matrix, in float64."""
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2 or 0 in M.shape:
        raise ValueError(f"expected a non-empty 2-D matrix, got shape {M.shape}")
    if not np.isfinite(M).all():
        raise ValueError("the matrix holds NaN or Inf; its SVD is undefined")
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    return Spectrum(U, S, Vt)


def factored_svd(A: np.ndarray, B: np.ndarray, scaling: float) -> Spectrum:
    """The thin SVD of ΔW = scaling·B·A from the factors, without forming ΔW.
    A: (r, n), B: (m, r), scaling > 0 -> U (m, K), S (K,), Vt (K, n) with K = min(r, m, n)."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"factors do not multiply: B {B.shape} · A {A.shape} (need B: (m, r), A: (r, n))")
    if not (np.isfinite(A).all() and np.isfinite(B).all()):
        raise ValueError("the adapter factors hold NaN or Inf; the update is undefined")
    if not (np.isfinite(scaling) and scaling > 0):
        raise ValueError(f"scaling must be a positive number, got {scaling!r}")
    Q_B, R_B = np.linalg.qr(B)                       # (m, p), (p, r), p = min(m, r)
    Q_A, R_A = np.linalg.qr(A.T)                     # (n, q), (q, r), q = min(n, r)
    core = scaling * (R_B @ R_A.T)                   # (p, q)
    U_c, S, Vt_c = np.linalg.svd(core, full_matrices=False)
    return Spectrum(Q_B @ U_c, S, Vt_c @ Q_A.T)


def energy(S: np.ndarray, k: int) -> float:
    """E(k) = Σ_{i≤k} σᵢ² / Σ σᵢ² as a fraction; NaN for an all-zero matrix."""
    w = np.asarray(S, dtype=np.float64) ** 2
    total = w.sum()
    return float(w[:k].sum() / total) if total > 0 else float("nan")


def truncation_error(S: np.ndarray, k: int) -> float:
    """‖M − M_k‖_F = sqrt(Σ_{i>k} σᵢ²), summed over the tail (no cancellation)."""
    return float(np.sqrt(np.sum(np.asarray(S, dtype=np.float64)[k:] ** 2)))


# ---- the built-in matrices ----------------------------------------------------------------------------------
# id: (label, one-line description, shape, builder)
BUILTIN = {
    "synthetic": ("Synthetic update: 8 strong directions + noise 0.05 (256 × 256)",
                  "M = U·V + N, U (256, 8), V (8, 256) ~ N(0, 1)·2, N ~ N(0, 1)·0.05, seed 42: "
                  "the matrix of `loralab energy`. Rank 8 holds 99.998% of the energy.",
                  (256, 256), lambda: low_rank_plus_noise(256, 8, 2.0, 0.05, 42)),
    "synthetic-noisy": ("Synthetic update: 8 strong directions + noise 2.0 (256 × 256)",
                        "The same construction with noise 2.0: about 97% of the energy in the 8 strong "
                        "directions and a long, flat tail of noise.",
                        (256, 256), lambda: low_rank_plus_noise(256, 8, 2.0, 2.0, 42)),
    "random": ("Random Gaussian matrix (192 × 256)",
               "Entries ~ N(0, 1), seed 0: no low-rank structure, so energy grows almost linearly with k "
               "(the singular values follow the Marchenko–Pastur law).",
               (192, 256), lambda: np.random.RandomState(0).randn(192, 256)),
}


def builtin_matrix(matrix_id: str) -> np.ndarray:
    """The dense built-in matrix with this id (see BUILTIN)."""
    if matrix_id not in BUILTIN:
        raise KeyError(f"no built-in matrix {matrix_id!r}; choose one of {sorted(BUILTIN)}")
    _, _, shape, build = BUILTIN[matrix_id]
    M = build()
    assert M.shape == shape, (matrix_id, M.shape, shape)
    return M
