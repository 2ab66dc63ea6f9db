"""A linear layer and a LoRA linear layer in NumPy, with hand-written backward passes.

    linear:  y = x·Wᵀ + b                                 x: (N, in)  W: (out, in)  b: (out,)
    LoRA:    y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ,   s = α/r        A: (r, in)  B: (out, r)   W, b frozen

Backward of the LoRA layer, with h = x·Aᵀ (N, r) and dy = ∂L/∂y (N, out):

    ∂L/∂B = s·dyᵀ·h            (out, r)
    ∂L/∂h = s·dy·B             (N, r)
    ∂L/∂A = (∂L/∂h)ᵀ·x         (r, in)
    ∂L/∂x = dy·W + (∂L/∂h)·A   (N, in)

W and b are frozen, so their gradients are not computed: that is what makes LoRA cheap to train.

The style follows llm.c's `doc/layernorm/layernorm.py`: `forward` returns `(out, cache)` and
`backward(dout, cache)` returns the gradients, so each layer is checked on its own against finite
differences and autograd (tests/test_reference.py).  Names and shapes match `loralab.layer`
(`lora_A` (r, in), `lora_B` (out, r), `scaling`), so the PyTorch layer is checked against this one.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), arXiv:2106.09685.
"""

from __future__ import annotations

import numpy as np

__all__ = ["linear_forward", "linear_backward", "lora_forward", "lora_backward", "init_lora", "lora_scaling"]


def lora_scaling(r: int, lora_alpha: float) -> float:
    """s = α/r (the paper's scaling; `loralab.layer.lora_scaling` without rsLoRA)."""
    return lora_alpha / r


def linear_forward(x: np.ndarray, W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, tuple]:
    """y = x·Wᵀ + b.   x (N, in), W (out, in), b (out,) -> y (N, out), cache."""
    return x @ W.T + b, (x, W)


def linear_backward(dout: np.ndarray, cache: tuple) -> dict[str, np.ndarray]:
    """Gradients {"x": (N, in), "W": (out, in), "b": (out,)} from dout (N, out)."""
    x, W = cache
    return {"x": dout @ W, "W": dout.T @ x, "b": dout.sum(axis=0)}


def lora_forward(x: np.ndarray, W: np.ndarray, b: np.ndarray, A: np.ndarray, B: np.ndarray,
                 scaling: float) -> tuple[np.ndarray, tuple]:
    """y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ.   x (N, in), W (out, in), b (out,), A (r, in), B (out, r) -> y (N, out).

    The low-rank path goes through the narrow h = x·Aᵀ (N, r); B·A (out, in) is never formed."""
    h = x @ A.T                                   # (N, r)
    out = x @ W.T + b + scaling * (h @ B.T)       # (N, out)
    return out, (x, W, A, B, h, scaling)


def lora_backward(dout: np.ndarray, cache: tuple) -> dict[str, np.ndarray]:
    """Gradients {"x": (N, in), "A": (r, in), "B": (out, r)} from dout (N, out).  W, b are frozen."""
    x, W, A, B, h, scaling = cache
    dB = scaling * (dout.T @ h)                   # (out, r)
    dh = scaling * (dout @ B)                     # (N, r)
    dA = dh.T @ x                                 # (r, in)
    dx = dout @ W + dh @ A                        # (N, in)
    return {"x": dx, "A": dA, "B": dB}


def init_lora(in_features: int, out_features: int, r: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A (r, in) ~ U(-1/√in, 1/√in) (what Kaiming-uniform with a=√5 gives, as in `loralab.layer`), B (out, r) = 0,
    so B·A = 0 and the adapted layer starts exactly as the base."""
    if r <= 0:
        raise ValueError(f"r={r}: the LoRA rank must be a positive integer")
    bound = 1.0 / np.sqrt(in_features)
    return rng.uniform(-bound, bound, size=(r, in_features)), np.zeros((out_features, r))
