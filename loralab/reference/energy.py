"""How much of a matrix's energy its top singular directions hold: the reason low rank can be enough.

Test matrix ("a few strong directions plus noise"), drawn from NumPy's legacy seeded stream in this order:

    np.random.seed(seed);  U = randn(d, k)·scale;  V = randn(k, d)·scale;  N = randn(d, d)·noise;  M = U·V + N

Energy captured by rank r, with σ₁ ≥ σ₂ ≥ … the singular values of M:

    E(r) = Σ_{i≤r} σᵢ² / Σ_i σᵢ²

the squared-Frobenius definition: by Eckart–Young, 1 − E(r) is exactly the relative squared error
‖M − M_r‖²_F / ‖M‖²_F of the best rank-r approximation M_r.  Some write-ups use Σ_{i≤r} σᵢ / Σ_i σᵢ (a share of
the nuclear norm) instead; it weights the small singular values more, so it rises more slowly.  Both are returned.
"""

from __future__ import annotations

import numpy as np

__all__ = ["low_rank_plus_noise", "cumulative_energy", "energy_table", "DEFAULT_RANKS"]

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32)


def low_rank_plus_noise(d: int = 256, strong: int = 8, scale: float = 2.0, noise: float = 0.05,
                        seed: int = 42) -> np.ndarray:
    """M (d, d) = U·V + N with U (d, strong), V (strong, d) ~ N(0, 1)·scale and N ~ N(0, 1)·noise.

    Uses a private RandomState, which yields the same numbers as `np.random.seed(seed)` followed by
    `np.random.randn` calls, without touching the global generator."""
    if d <= 0 or strong <= 0:
        raise ValueError(f"d={d}, strong={strong}: both must be positive integers")
    if strong > d:
        raise ValueError(f"strong={strong} exceeds d={d}: a d×d matrix has at most d directions")
    if not (np.isfinite(scale) and np.isfinite(noise)) or noise < 0:
        raise ValueError(f"scale={scale}, noise={noise}: need finite numbers and noise >= 0")
    rs = np.random.RandomState(seed)
    U = rs.randn(d, strong) * scale       # (d, k)
    V = rs.randn(strong, d) * scale       # (k, d)
    N = rs.randn(d, d) * noise            # (d, d)
    return U @ V + N


def cumulative_energy(M: np.ndarray, ranks=DEFAULT_RANKS, power: int = 2) -> dict[int, float]:
    """{r: 100 · Σ_{i≤r} σᵢ^power / Σ σᵢ^power} for each r.
    power=2: the squared-Frobenius energy; power=1: the share of the σ sum."""
    s = np.linalg.svd(M, compute_uv=False)
    bad = [r for r in ranks if not 1 <= r <= len(s)]
    if bad:
        raise ValueError(f"ranks {bad} are out of range: this matrix has {len(s)} singular values (use 1..{len(s)})")
    w = s.astype(np.float64) ** power
    if w.sum() == 0:
        raise ValueError("the matrix is all zeros: its energy is undefined")
    cumulative = 100.0 * np.cumsum(w) / w.sum()
    return {int(r): float(cumulative[r - 1]) for r in ranks}


def energy_table(d: int = 256, strong: int = 8, scale: float = 2.0, noise: float = 0.05, seed: int = 42,
                 ranks=DEFAULT_RANKS) -> dict:
    """The matrix's parameters, and the cumulative energy in percent per rank under both definitions."""
    M = low_rank_plus_noise(d, strong, scale, noise, seed)
    return {"d": d, "strong": strong, "scale": scale, "noise": noise, "seed": seed, "ranks": list(ranks),
            "energy_percent": cumulative_energy(M, ranks, power=2),
            "energy_percent_sigma_sum": cumulative_energy(M, ranks, power=1)}
