"""The frozen base under a LoRA layer: the one interface LoRA needs from the layer it wraps.

A LoRA layer computes  y = base(x) + scaling·B·A·x  and, to merge or analyse, reads and writes the base
weight as a dense (out, in) matrix.  That is all it asks of its base, written down as the `FrozenBase`
protocol.  `DenseBase` implements it for the layers a model brings (nn.Linear: weight (out, in); GPT-2's
Conv1D: weight (in, out); nn.Embedding: weight (num_embeddings, dim), i.e. (in, out)); a quantized base (NF4,
int8, ...) implements it itself, so the LoRA layer never needs to know how the weight is stored:

    in_features, out_features      the base maps (..., in) -> (..., out)
    quant_type                     None for a dense base, else a name ("nf4", "int8", ...)
    __call__(x)                    the base's output (for a module: calling it, so its hooks run)
    dense_weight()                 (out, in): a view of a dense weight, a dequantized copy of a quantized one
    set_dense_weight(W)            write W (out, in); a quantized base refuses (a silent requantization would
                                   lose the update) unless it offers an explicit path
    device, dtype                  where it computes and in which dtype, without dequantizing anything
    fresh_output (optional)        True when __call__'s output is a new tensor its backward never reads and
                                   not a view made inside a custom autograd Function (the LoRA layer may then
                                   add its term into it in place, in training too)

`frozen_base(module)` returns the module itself when it implements the protocol, a DenseBase view otherwise,
and refuses anything else by name.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["FrozenBase", "DenseBase", "frozen_base", "is_conv1d", "module_dims", "SUPPORTED_BASES"]

SUPPORTED_BASES = "nn.Linear, nn.Embedding, transformers Conv1D (GPT-2), or a quantized base (FrozenBase)"


@runtime_checkable
class FrozenBase(Protocol):
    """What a LoRA layer needs from the frozen layer it wraps (see the module docstring)."""

    in_features: int
    out_features: int
    quant_type: str | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def dense_weight(self) -> torch.Tensor: ...

    def set_dense_weight(self, W: torch.Tensor) -> None: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style transformers Conv1D: y = x @ W + b with W stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


class DenseBase:
    """FrozenBase view of a dense nn.Linear / Conv1D / nn.Embedding (not a module: the wrapped module stays
    where it is in the model, under the same state_dict keys)."""

    quant_type = None

    def __init__(self, module: nn.Module):
        self.module = module
        self.fresh_output = type(module) is nn.Linear   # F.linear keeps x and W for backward, not its output
        self.fan_in_fan_out = is_conv1d(module) or isinstance(module, nn.Embedding)  # stored (in, out)
        w = module.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else \
            (w.shape[1], w.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def dense_weight(self) -> torch.Tensor:
        """(out, in), a view of the stored weight."""
        w = self.module.weight
        return w.T if self.fan_in_fan_out else w

    def set_dense_weight(self, W: torch.Tensor) -> None:
        w = self.module.weight
        with torch.no_grad():
            w.copy_((W.T if self.fan_in_fan_out else W).to(w.dtype))

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.weight.dtype


def frozen_base(module: nn.Module) -> FrozenBase:
    """The FrozenBase of `module`: itself if it implements the protocol, a DenseBase view of a dense
    Linear / Conv1D / Embedding; TypeError for anything else."""
    if isinstance(module, FrozenBase):
        return module
    if type(module).__module__.startswith("bitsandbytes"):
        from .quant.bnb import BnbBase, is_bnb_layer
        if is_bnb_layer(module):
            return BnbBase(module)
    if isinstance(module, (nn.Linear, nn.Embedding)) or is_conv1d(module):
        if not module.weight.is_floating_point():  # e.g. a bitsandbytes layer subclassing nn.Linear
            raise TypeError(f"{type(module).__name__} stores its weight as {module.weight.dtype}, not as a dense "
                            f"float matrix; supported are {SUPPORTED_BASES}")
        return DenseBase(module)
    raise TypeError(f"cannot put a LoRA adapter on {type(module).__name__}: supported are {SUPPORTED_BASES}")


def module_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer (or of a LoRA layer: its base's)."""
    base = getattr(module, "base", None)
    if isinstance(base, FrozenBase):  # a LoRA layer
        return base.in_features, base.out_features
    base = frozen_base(module)
    return base.in_features, base.out_features
