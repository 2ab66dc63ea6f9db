"""A ReLU MLP classifier in NumPy, plain or LoRA-wrapped, with hand-written backprop.

    h₀ = x,   hᵢ = relu(layerᵢ(hᵢ₋₁)) for i < L,   logits = layer_L(h_{L-1})
    layerᵢ(h) = h·Wᵢᵀ + bᵢ                          plain (Wᵢ, bᵢ trainable)
    layerᵢ(h) = h·Wᵢᵀ + bᵢ + s·(h·Aᵢᵀ)·Bᵢᵀ          LoRA  (Aᵢ, Bᵢ trainable; Wᵢ, bᵢ frozen)

    loss = mean over the batch of −log softmax(logits)[y];   ∂loss/∂logits = (softmax − onehot(y)) / N

Parameters live in flat dicts keyed by layer number: the base {"W1", "b1", "W2", ...} with Wᵢ (out, in) and
bᵢ (out,), the adapter {"A1", "B1", ...} with Aᵢ (r, in) and Bᵢ (out, r).  `mlp_backward` returns gradients for
exactly the trainable tensors of each layer (Wᵢ, bᵢ for a plain layer; Aᵢ, Bᵢ for a LoRA layer), so what an
optimizer built over those dicts trains is what gets counted.

Base init: He-normal weights, Wᵢ ~ N(0, 2/in), zero biases (He et al. 2015, arXiv:1502.01852).
"""

from __future__ import annotations

import numpy as np

from .lora import init_lora, linear_backward, linear_forward, lora_backward, lora_forward

__all__ = ["init_mlp", "init_mlp_lora", "mlp_forward", "mlp_backward", "cross_entropy", "predict", "count_params",
           "n_layers"]

Params = dict[str, np.ndarray]


def init_mlp(sizes: tuple[int, ...], rng: np.random.Generator) -> Params:
    """Base parameters for layer sizes, e.g. (2, 64, 64, 3): W1 (64, 2), b1 (64,), ..., W3 (3, 64), b3 (3,)."""
    if len(sizes) < 2 or any(int(n) <= 0 for n in sizes):
        raise ValueError(f"sizes={sizes}: need at least an input and an output size, all positive")
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        params[f"W{i}"] = rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)
        params[f"b{i}"] = np.zeros(n_out)
    return params


def n_layers(params: Params) -> int:
    return sum(1 for name in params if name.startswith("W"))


def init_mlp_lora(params: Params, r: int, rng: np.random.Generator, layers: tuple[int, ...] | None = None) -> Params:
    """Adapter parameters {"A<i>", "B<i>"} for the given layer numbers (default: every layer), B = 0."""
    layers = tuple(range(1, n_layers(params) + 1)) if layers is None else tuple(layers)
    unknown = [i for i in layers if f"W{i}" not in params]
    if unknown:
        raise ValueError(f"layers {unknown} do not exist; this MLP has layers 1..{n_layers(params)}")
    lora = {}
    for i in layers:
        n_out, n_in = params[f"W{i}"].shape
        lora[f"A{i}"], lora[f"B{i}"] = init_lora(n_in, n_out, r, rng)
    return lora


def mlp_forward(x: np.ndarray, params: Params, lora: Params | None = None,
                scaling: float = 1.0) -> tuple[np.ndarray, list]:
    """x (N, in) -> logits (N, classes), cache.  Layers with an adapter in `lora` run as LoRA layers."""
    lora = lora or {}
    cache, h = [], x
    L = n_layers(params)
    for i in range(1, L + 1):
        W, b = params[f"W{i}"], params[f"b{i}"]
        if f"A{i}" in lora:
            out, c = lora_forward(h, W, b, lora[f"A{i}"], lora[f"B{i}"], scaling)
        else:
            out, c = linear_forward(h, W, b)
        relu_mask = out > 0 if i < L else None    # (N, out); the last layer gives logits, no ReLU
        cache.append((i, f"A{i}" in lora, c, relu_mask))
        h = out * relu_mask if i < L else out
    return h, cache


def mlp_backward(dlogits: np.ndarray, cache: list) -> Params:
    """Gradients from dlogits (N, classes) for the trainable tensors: Wᵢ, bᵢ of plain layers, Aᵢ, Bᵢ of LoRA
    layers (their Wᵢ, bᵢ are frozen and get none)."""
    grads, dout = {}, dlogits
    for i, is_lora, c, relu_mask in reversed(cache):
        if relu_mask is not None:
            dout = dout * relu_mask               # relu'(z) = 1 where z > 0
        if is_lora:
            g = lora_backward(dout, c)
            grads[f"A{i}"], grads[f"B{i}"] = g["A"], g["B"]
        else:
            g = linear_backward(dout, c)
            grads[f"W{i}"], grads[f"b{i}"] = g["W"], g["b"]
        dout = g["x"]
    return grads


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of logits (N, C) against integer labels y (N,); returns (loss, ∂loss/∂logits (N, C))."""
    z = logits - logits.max(axis=1, keepdims=True)    # shift for a stable exp; softmax is unchanged
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = len(y)
    loss = -log_p[np.arange(n), y].mean()
    dlogits = np.exp(log_p)
    dlogits[np.arange(n), y] -= 1.0
    return float(loss), dlogits / n


def predict(x: np.ndarray, params: Params, lora: Params | None = None, scaling: float = 1.0) -> np.ndarray:
    """Class predictions (N,) for x (N, in)."""
    return mlp_forward(x, params, lora, scaling)[0].argmax(axis=1)


def count_params(params: Params) -> int:
    return int(sum(p.size for p in params.values()))
