"""NF4Linear: a frozen linear layer whose weight is kept in 4 bits (QLoRA's base layer).

    y      = x · Ŵᵀ + b          x: (..., in)   Ŵ = dequantize_nf4(codes): (out, in)   b: (out,)   y: (..., out)
    ∂L/∂x  = ∂L/∂y · Ŵ          Ŵ is dequantized again in backward; the codes get no gradient (frozen)
    ∂L/∂b  = Σ_batch ∂L/∂y      only if the bias is unfrozen (it is frozen by default)

The dense Ŵ lives only inside forward and inside backward: nothing of size out·in is saved for backward, so
activation memory does not grow with the base weights (QLoRA's point).  The codes and their state are buffers
(state_dict and safetensors see them); the bias is a frozen Parameter in the compute dtype.

The compute dtype (default: the original weight's) is what Ŵ is dequantized to and what forward computes in;
`.to(torch.bfloat16)` / `.half()` change it, and `.to(device)` moves the codes, but no cast ever touches the
codes or their float32 constants.

Frozen-base protocol (what LoRA layers use): in_features, out_features, forward, dense_weight(),
set_dense_weight() (refused: writing a merged weight would requantize it), requantize_() (the explicit path,
which reports the error it introduces), device, dtype, quant_type, bits_per_parameter(), nbytes(), to_linear().
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .nf4 import dequantize_nf4, dynamic_map, quantize_nf4
from .state import DTYPES, NESTED_BLOCKSIZE, NF4State, check_blocksize

__all__ = ["NF4Linear"]

_STATE = ("absmax", "offset", "nested_absmax", "nested_code")   # NF4State fields kept as weight_<name> buffers
_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class _NF4LinearFunction(torch.autograd.Function):
    """y = x Ŵᵀ + b with Ŵ dequantized in forward and again in backward; saves only the codes and state."""

    @staticmethod
    def forward(ctx, x, packed, state: NF4State, bias):
        weight = dequantize_nf4(packed, state, dtype=x.dtype)                   # (out, in), dropped on return
        names = list(state.tensors())
        ctx.save_for_backward(packed, *state.tensors().values())              # codes: out·in/2 bytes
        ctx.state_names, ctx.state, ctx.has_bias = names, state, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        packed, *tensors = ctx.saved_tensors                                    # version-checked
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            state = dataclasses.replace(ctx.state, **dict(zip(ctx.state_names, tensors)))
            grad_x = grad @ dequantize_nf4(packed, state, dtype=grad.dtype)    # (..., out) @ (out, in)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


class NF4Linear(nn.Module):
    """A frozen linear layer with an NF4 weight.  Build it from a dense layer with `NF4Linear.from_linear`;
    the constructor makes an all-zero layer of the right structure (to load a state_dict into)."""

    quant_type = "nf4"
    fresh_output = True          # forward returns a new tensor; backward reads only the codes

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"NF4Linear.{name} must be a positive int, got {value!r}")
        check_blocksize(blocksize)
        if compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {[str(d) for d in _COMPUTE_DTYPES]}, got {compute_dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant, self.compute_dtype = blocksize, bool(double_quant), compute_dtype
        n = in_features * out_features
        blocks = -(-n // blocksize)
        self.register_buffer("weight_packed", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("weight_absmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("weight_offset", torch.zeros((), device=device))
            self.register_buffer("weight_nested_absmax",
                                 torch.zeros(-(-blocks // NESTED_BLOCKSIZE), device=device))
            self.register_buffer("weight_nested_code", dynamic_map().to(device))
        else:
            self.register_buffer("weight_absmax", torch.zeros(blocks, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        """Quantize `linear`'s weight (out, in); keep its bias (frozen) in the compute dtype (default: the
        weight's dtype).  The dense weight is not kept."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear.from_linear takes an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, blocksize=blocksize,
                    double_quant=double_quant, compute_dtype=compute_dtype or weight.dtype, device="meta")
        weight = weight.detach() if weight.dtype in DTYPES else weight.detach().float()   # float64 -> float32
        packed, state = quantize_nf4(weight, blocksize, double_quant)
        layer._set_codes(packed, state)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(layer.compute_dtype, copy=True), requires_grad=False)
        return layer.train(linear.training)

    # ---- the stored weight -------------------------------------------------------------------------------------
    @property
    def state(self) -> NF4State:
        """The weight's NF4State, made of this layer's buffers (no copy)."""
        tensors = {name: getattr(self, f"weight_{name}") for name in _STATE if hasattr(self, f"weight_{name}")}
        dtype = self.compute_dtype if self.compute_dtype in DTYPES else torch.float32   # NF4State: bnb's dtypes
        return NF4State((self.out_features, self.in_features), dtype, self.blocksize, **tensors)

    def _set_codes(self, packed: torch.Tensor, state: NF4State) -> None:
        self.weight_packed = packed
        for name, tensor in state.tensors().items():
            setattr(self, f"weight_{name}", tensor)

    @property
    def device(self) -> torch.device:
        return self.weight_packed.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (what dense_weight() returns and forward computes in)."""
        return self.compute_dtype

    def dense_weight(self) -> torch.Tensor:
        """A dequantized copy of the weight (out, in) in the compute dtype."""
        return dequantize_nf4(self.weight_packed, self.state, dtype=self.compute_dtype)

    def set_dense_weight(self, W: torch.Tensor) -> None:
        raise ValueError(
            "NF4Linear will not take a dense weight: writing it would requantize it to 4 bits, and a merged LoRA "
            "update (small next to the quantization step) would be mostly lost. Use "
            "merge_and_unload(model, dequantize=True) for a dense model, or call layer.requantize_(W) "
            "explicitly, which reports the error it introduces.")

    def requantize_(self, W: torch.Tensor) -> dict:
        """Quantize W (out, in) into this layer, replacing its codes, and return what that did:
        weight_max_abs / weight_rel_fro   max |Ŵ_new - W| and ‖Ŵ_new - W‖_F / ‖W‖_F   (the quantization error)
        update_rel_fro                    ‖W - Ŵ_old‖_F / ‖Ŵ_old‖_F                   (the change asked for)
        error_vs_update                   ‖Ŵ_new - W‖_F / ‖W - Ŵ_old‖_F  (> 1: the error is larger than the
                                          change; None if W equals the old weight)
        codes_changed                     fraction of the 4-bit codes that changed"""
        shape = (self.out_features, self.in_features)
        if not isinstance(W, torch.Tensor) or tuple(W.shape) != shape or not W.dtype.is_floating_point:
            got = f"{W.dtype} {tuple(W.shape)}" if isinstance(W, torch.Tensor) else type(W).__name__
            raise ValueError(f"requantize_ takes a floating-point weight of shape {shape}, got {got}")
        with torch.no_grad():
            W = W.detach().to(self.device, torch.float32)
            old = dequantize_nf4(self.weight_packed, self.state, dtype=torch.float32)
            packed, state = quantize_nf4(W, self.blocksize, self.double_quant)
            new = dequantize_nf4(packed, state, dtype=torch.float32)
            err, update = (new - W).norm().item(), (W - old).norm().item()
            report = {"weight_max_abs": (new - W).abs().max().item(),
                      "weight_rel_fro": err / max(W.norm().item(), torch.finfo(torch.float32).tiny),
                      "update_rel_fro": update / max(old.norm().item(), torch.finfo(torch.float32).tiny),
                      "error_vs_update": err / update if update > 0 else None,
                      "codes_changed": _codes_changed(self.weight_packed, packed, W.numel())}
            self.weight_packed.copy_(packed)
            for name, tensor in state.tensors().items():
                getattr(self, f"weight_{name}").copy_(tensor)
        return report

    def nbytes(self) -> int:
        """Bytes of the stored weight: packed codes + every state tensor (the bias is not counted)."""
        return self.weight_packed.numel() + self.state.nbytes()

    def bits_per_parameter(self) -> float:
        """nbytes() · 8 / (out · in): everything stored for the weight, the 256-entry nested code included.
        Blocksize 64: 4 + 32/64 = 4.5 without double quantization; with it 4 + 8/64 + 32/(64·256) ≈ 4.127 plus
        (4 + 1024)·8 / (out · in) for the offset and the code (≈ 4.1274 at 4096 × 4096)."""
        return self.nbytes() * 8 / (self.in_features * self.out_features)

    def to_linear(self) -> nn.Linear:
        """An nn.Linear holding a dense copy of the dequantized weight (and the bias), frozen like this layer."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta",
                           dtype=self.compute_dtype)
        linear.weight = nn.Parameter(self.dense_weight(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return linear.train(self.training)

    # ---- compute -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out), computed in the compute dtype and returned in x's dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"NF4Linear expects inputs (..., {self.in_features}), got {tuple(x.shape)}")
        # 2-D through the Function, reshaped outside it: a view made inside a custom Function may not be written
        # in place later, and a LoRA layer adds its term into this output in place (fresh_output)
        y = _NF4LinearFunction.apply(x.to(self.compute_dtype).reshape(-1, self.in_features), self.weight_packed,
                                     self.state, self.bias)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _apply(self, fn, recurse=True):
        """Casts (.half(), .to(bf16)) set the compute dtype; moves move the codes; nothing recasts the codes."""
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.device))
        kept = {name: buf for name, buf in self._buffers.items() if name.startswith("weight_")}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            if self._buffers[name].dtype != old.dtype:
                self._buffers[name] = old.to(self._buffers[name].device)
        if probe.dtype in _COMPUTE_DTYPES:
            self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}")


def _codes_changed(old: torch.Tensor, new: torch.Tensor, n: int) -> float:
    diff = old ^ new                                                             # (ceil(n/2),) uint8
    changed = ((diff >> 4) != 0).sum() + ((diff & 15) != 0).sum()
    return changed.item() / n
