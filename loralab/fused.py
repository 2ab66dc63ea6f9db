"""SwiGLU MLPs in training with less kept for backward (train() switches it on for the duration of a run).

A Llama-style MLP computes, for x: (..., H), g = gate(x), u = up(x): (..., I),

    p = silu(g) · u          y = down(p)

Autograd keeps g (for silu's backward), silu(g) and u (for the product), and down's adapter keeps p: four
(..., I) tensors per layer.  Here the product is one autograd function that keeps g and u only and computes
silu(g) again in backward, and p, wherever down's backward asks for it, is recomputed from the g and u kept
anyway (a saved-tensor hook: torch.autograd.graph.saved_tensors_hooks).  Two of the four tensors are gone: on
the reference model (8 x 128 tokens, I = 1408) 88 MB less kept and a peak about 55 MB lower
(bench/bench_train.py), for two elementwise passes per layer in backward.  The values are the same bits:
silu(g) · u computed again, silu's backward by aten.silu_backward as autograd's own (tests/test_fused.py checks
losses and gradients on every listed class).

Only the transformers classes listed, whose forward is exactly `down(act(gate(x)) * up(x))` with act SiLU,
unhooked and not already patched, are switched; under gradient checkpointing nothing is (its own saved-tensor
hooks must see every tensor).
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SWIGLU_MLPS", "swiglu_mlps", "fused_swiglu"]

# transformers classes whose forward is `self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))`
SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
_SILU = ("SiLUActivation", "SiLU")


class _SwiGLU(torch.autograd.Function):
    """silu(g) · u, keeping g and u (not silu(g)) for backward.  g, u: (..., I) -> (..., I)."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g).mul_(u)          # in place: one (..., I) buffer, not two (the same bits)

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        grad_g = torch.ops.aten.silu_backward(grad * u, g) if ctx.needs_input_grad[0] else None
        grad_u = grad * F.silu(g) if ctx.needs_input_grad[1] else None
        return grad_g, grad_u


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    g, u = self.gate_proj(x), self.up_proj(x)
    p = _SwiGLU.apply(g, u)
    if not (torch.is_grad_enabled() and p.requires_grad):
        return self.down_proj(p)

    def pack(t):  # p itself (or a view of all of it) as a note to recompute it from g and u
        if t.data_ptr() == p.data_ptr() and t.numel() == p.numel() and t.dtype == p.dtype and t.is_contiguous():
            return g, u, t.shape
        return t

    def unpack(saved):
        if isinstance(saved, tuple):
            g_, u_, shape = saved
            return F.silu(g_).mul_(u_).view(shape)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return self.down_proj(p)


def swiglu_mlps(model: nn.Module) -> list[nn.Module]:
    """The MLP modules of `model` that fused_swiglu switches (see the module docstring)."""
    found = []
    for m in model.modules():
        cls = type(m)
        if (cls.__name__ in SWIGLU_MLPS and cls.__module__.startswith("transformers.")
                and type(getattr(m, "act_fn", None)).__name__ in _SILU
                and all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj"))
                and "forward" not in m.__dict__ and not m._forward_hooks and not m._forward_pre_hooks):
            found.append(m)
    return found


@contextlib.contextmanager
def fused_swiglu(model: nn.Module, enabled: bool = True):
    """Inside the block the listed SwiGLU MLPs of `model` keep less for backward (module docstring); the
    modules are restored on exit.  Nothing changes when disabled or under gradient checkpointing."""
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())  # HF's flag
    patched = swiglu_mlps(model) if enabled and not checkpointing else []
    for m in patched:
        m.forward = types.MethodType(_forward, m)
    try:
        yield patched
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
