"""Optimizers over a dict of NumPy arrays, updated in place.

Adam (Kingma & Ba 2014, arXiv:1412.6980), as torch.optim.Adam computes it (no weight decay):

    m ← β₁·m + (1−β₁)·g          v ← β₂·v + (1−β₂)·g²
    m̂ = m / (1−β₁ᵗ)              v̂ = v / (1−β₂ᵗ)
    θ ← θ − lr · m̂ / (√v̂ + ε)

SGD: θ ← θ − lr·g (the plain gradient descent of the write-up this experiment comes from).

An optimizer owns exactly the arrays it was given: `step(grads)` updates those and nothing else, and
refuses if a gradient is missing, so the set of trained tensors is the dict passed in.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Adam", "SGD"]


class SGD:
    def __init__(self, params: dict[str, np.ndarray], lr: float):
        if not lr > 0:
            raise ValueError(f"lr={lr}: the learning rate must be positive")
        self.params, self.lr = params, lr

    def step(self, grads: dict[str, np.ndarray]) -> None:
        for name, p in self.params.items():
            p -= self.lr * _grad(grads, name)


class Adam:
    def __init__(self, params: dict[str, np.ndarray], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        if not lr > 0:
            raise ValueError(f"lr={lr}: the learning rate must be positive")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas={betas}: both must be in [0, 1)")
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = {name: np.zeros_like(p) for name, p in params.items()}
        self.v = {name: np.zeros_like(p) for name, p in params.items()}
        self.t = 0

    def step(self, grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        b1, b2 = self.betas
        for name, p in self.params.items():
            g = _grad(grads, name)
            self.m[name] = b1 * self.m[name] + (1 - b1) * g
            self.v[name] = b2 * self.v[name] + (1 - b2) * g * g
            m_hat = self.m[name] / (1 - b1 ** self.t)
            v_hat = self.v[name] / (1 - b2 ** self.t)
            p -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def _grad(grads: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in grads:
        raise KeyError(f"no gradient for {name!r}; got gradients for {sorted(grads)}")
    return grads[name]
