"""Combine adapters into a new one, per layer:  ΔW_new ≈ Σ_i w_i·ΔW_i,   ΔW_i = s_i·B_i·A_i.

With c_i = w_i·s_i (weight times the adapter's scaling), on each layer holding any of the named adapters:

    cat     A = [A_1; …; A_n]  (Σr_i, in),   B = [c_1·B_1, …, c_n·B_n]  (out, Σr_i)
            exact: B·A = Σ c_i·B_i·A_i.  The rank is the sum of the ranks.
    linear  A = Σ √|c_i|·A_i,   B = Σ sign(c_i)·√|c_i|·B_i   (PEFT's "linear"; all ranks equal)
            B·A = Σ c_i·B_i·A_i + the cross terms B_i·A_j (i ≠ j): exact only for a single adapter.
    svd     the best rank-k approximation of the exact sum (Eckart–Young), from a QR of the concatenated
            factors and an SVD of the small (Σr × Σr) core, never the dense (out, in) matrix
            (loralab.analysis.stacked_factor_svd, in float64):
            [c_i·B_i] = Q_B·R_B,  [A_i]ᵀ = Q_A·R_A,  R_B·R_Aᵀ = U·S·Vᵀ
            B = Q_B·U_k·√S_k,  A = √S_k·V_kᵀ·Q_Aᵀ.

The new adapter has scaling 1 (lora_alpha = r, no rsLoRA), the first source's dtype and dropout, and is
not activated (set_adapter(model, new_name) to use it).  Each call measures what it lost: the relative
Frobenius error ‖ΔW_new − Σ c_i·B_i·A_i‖_F / ‖Σ c_i·B_i·A_i‖_F per module and over all modules,
computed in float64 from r×r Gram matrices (‖B·A‖²_F = Σ (BᵀB) ⊙ (A·Aᵀ)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .analysis import delta_fro_norm, stacked_factor_svd
from .inject import check_adapter_names, list_adapters, lora_layers
from .layer import LoRAAdapter

__all__ = ["combine_adapters", "combine_factors", "CombineReport", "METHODS"]

METHODS = ("cat", "linear", "svd")


@dataclass(frozen=True)
class CombineReport:
    """The new adapter's rank and measured relative error per module, and the overall error
    sqrt(Σ err²) / sqrt(Σ ‖exact‖²) over all modules."""
    name: str
    method: str
    ranks: dict
    errors: dict
    error: float

    def to_dict(self) -> dict:
        return {"name": self.name, "method": self.method, "error": self.error,
                "max_module_error": max(self.errors.values(), default=0.0), "modules": len(self.errors)}


def combine_factors(factors: list[tuple[torch.Tensor, torch.Tensor, float]], method: str,
                    rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[(A_i (r_i, in), B_i (out, r_i), c_i)] -> (A (k, in), B (out, k)) in float32 with B·A ≈ Σ c_i·B_i·A_i."""
    As = [A.float() for A, _, _ in factors]
    Bs = [B.float() for _, B, _ in factors]
    cs = [float(c) for _, _, c in factors]
    if method == "cat":
        return torch.cat(As, 0), torch.cat([c * B for B, c in zip(Bs, cs)], 1)
    if method == "linear":
        A = sum(math.sqrt(abs(c)) * A for A, c in zip(As, cs))
        B = sum(math.copysign(math.sqrt(abs(c)), c) * B for B, c in zip(Bs, cs))
        return A, B
    if method == "svd":
        U, S, Vh = stacked_factor_svd(factors)                                     # (out, m), (m,), (m, in)
        k = min(rank or max(A.shape[0] for A in As), S.numel())
        root = S[:k].sqrt()
        return ((root[:, None] * Vh[:k]).float(), (U[:, :k] * root[None, :]).float())
    raise ValueError(f"method={method!r}; choose one of {METHODS}")


def _error(A: torch.Tensor, B: torch.Tensor, factors) -> tuple[float, float]:
    """(‖B·A − Σ c_i·B_i·A_i‖_F, ‖Σ c_i·B_i·A_i‖_F), via Gram matrices in float64."""
    exact_B = torch.cat([c * B_i.double() for _, B_i, c in factors], 1)
    exact_A = torch.cat([A_i.double() for A_i, _, _ in factors], 0)
    return (delta_fro_norm(torch.cat([A.double(), exact_A], 0), torch.cat([B.double(), -exact_B], 1)),
            delta_fro_norm(exact_A, exact_B))


def combine_adapters(model: nn.Module, names: list[str], weights: list[float] | None = None,
                     method: str = "cat", new_name: str = "combined", *, rank: int | None = None) -> CombineReport:
    """Add adapter `new_name` ≈ Σ weights[i]·ΔW(names[i]) on every layer holding any of `names`.

    weights default to 1 each.  rank: the target rank for "svd" (default: the largest source rank).
    Returns the measured error (see the module docstring); the sources are left unchanged."""
    names = [names] if isinstance(names, str) else list(names)
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    _validate(model, names, weights, method, new_name, rank)
    plan = []
    for path, layer in lora_layers(model).items():
        present = [(layer.adapters[n], w) for n, w in zip(names, weights) if n in layer.adapters]
        if not present:
            continue
        ranks = {a.r for a, _ in present}
        if method == "linear" and len(ranks) > 1:
            raise ValueError(f"method='linear' needs equal ranks, but {path} has ranks {sorted(ranks)}; "
                             f"use 'cat' (exact) or 'svd' (choose the rank)")
        plan.append((path, layer, [(a.lora_A.detach(), a.lora_B.detach(), w * a.scaling) for a, w in present],
                     present[0][0]))
    ranks, errors, err2, norm2 = {}, {}, 0.0, 0.0
    try:
        for path, layer, factors, first in plan:
            A, B = combine_factors(factors, method, rank)
            dtype = first.lora_A.dtype
            new = LoRAAdapter.from_factors(A.to(dtype), B.to(dtype), A.shape[0], lora_dropout=first.lora_dropout,
                                           requires_grad=first.lora_A.requires_grad)
            layer.attach(new_name, new, active=False)  # the model computes what it did before
            err, norm = _error(new.lora_A.detach(), new.lora_B.detach(), factors)
            ranks[path], errors[path] = A.shape[0], (err / norm if norm > 0 else float(err > 0))
            err2, norm2 = err2 + err ** 2, norm2 + norm ** 2
    except BaseException:  # leave no half-built adapter behind
        for _, layer, _, _ in plan:
            layer.remove_adapter(new_name)
        raise
    overall = math.sqrt(err2 / norm2) if norm2 > 0 else float(err2 > 0)
    return CombineReport(new_name, method, ranks, errors, overall)


def _validate(model, names, weights, method, new_name, rank) -> None:
    if not names:
        raise ValueError(f"name at least one adapter to combine; the model has {list_adapters(model)}")
    check_adapter_names(model, names)
    known = list_adapters(model)
    if len(weights) != len(names):
        raise ValueError(f"got {len(weights)} weights for {len(names)} adapters; pass one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}")
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {METHODS}")
    if rank is not None and (method != "svd" or isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank={rank!r}: a positive integer, and only for method='svd' "
                         f"('cat' sums the ranks, 'linear' keeps them)")
    if not isinstance(new_name, str) or not new_name or "." in new_name or new_name in known:
        raise ValueError(f"new_name={new_name!r} must be a new adapter name without dots; the model has {known}")
