"""How an adapter's factors start: pure functions returning (A (r, in), B (out, r)).

    True (default)   A Kaiming-uniform (nn.Linear's own init, a = √5), B = 0      ΔW = 0: the model starts as the base
    "gaussian"       A ~ N(0, 1/r), B = 0                                         ΔW = 0
    False            A and B both Kaiming-uniform                                 not an identity start
    "orthogonal"     A's rows, B's columns on the two halves of one random r×r   ΔW = B·A = 0 with both non-zero
                     orthogonal basis, / 10 (r even)
    "pissa"          W0 = U·S·Vᵀ:  A = √(S_r/s)·V_rᵀ, B = U_r·√(S_r/s)            W0 is then replaced by
    "olora"          W0 = Q·R:     A = R[:r],  B = Q[:, :r]                     W0 - s·B·A (the residual), so the
                                                                                output is unchanged at init
PiSSA: Meng et al. 2024, arXiv:2404.02948.  OLoRA: Büyükakyüz 2024, arXiv:2406.01775.  The formulas are PEFT's,
so a PEFT file saved with these inits replays exactly.  Embeddings (PEFT's convention): A = 0, B ~ N(0, 1)
for every init but False (both N(0, 1)).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["init_factors", "rewrites_base", "REWRITING_INITS"]

REWRITING_INITS = ("pissa", "olora")


def rewrites_base(init) -> bool:
    """Whether the init replaces W0 by a residual (and must keep its initial factors)."""
    return init in REWRITING_INITS


def init_factors(init, r: int, in_features: int, out_features: int, scaling: float, *, W: torch.Tensor | None = None,
                 embedding: bool = False, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) for `init`.  W: the dense base weight (out, in), needed by "pissa" / "olora"."""
    A = torch.empty(r, in_features, device=device, dtype=dtype)
    B = torch.zeros(out_features, r, device=device, dtype=dtype)
    with torch.no_grad():
        if embedding:
            (nn.init.normal_ if init is False else nn.init.zeros_)(A)
            nn.init.normal_(B)
        elif init is True or init is False:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            if init is False:
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
        elif init == "orthogonal":
            A, B = _orthogonal(r, in_features, out_features)
        elif init == "pissa":
            A, B = _pissa(W.float(), r, scaling)
        elif init == "olora":
            Q, R = torch.linalg.qr(W.float())                    # (out, k), (k, in)
            A, B = R[:r], Q[:, :r]
        else:
            raise ValueError(f"init_lora_weights={init!r} is not supported")
    return A.to(device=device, dtype=dtype).contiguous(), B.to(device=device, dtype=dtype).contiguous()


def _orthogonal(r: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    if r % 2:
        raise ValueError(f"init_lora_weights='orthogonal' needs an even r, got r={r}")
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    A = torch.randn(in_features, r // 2).mm(Q[0::2]).T / 10.0          # (r, in)
    B = torch.randn(r // 2, out_features).T.mm(Q[1::2]) / 10.0        # (out, r)
    return A, B


def _pissa(W: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)            # W: (out, in)
    root = (S[:r] / scaling).sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root[None, :]
