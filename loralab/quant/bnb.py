"""A model quantized with bitsandbytes as a frozen base: `Linear4bit` (NF4 / FP4) and `Linear8bitLt`.

bitsandbytes layers subclass nn.Linear but store their weight packed (uint8 / int8 with its scales), so a LoRA
layer reaches them through this FrozenBase view: calling the layer is bitsandbytes' own forward, and
dense_weight() dequantizes with bitsandbytes' functions (4-bit: `dequantize_4bit` with the layer's quant_state;
8-bit: W = CB · SCB / 127 per output row).  Device and dtype come from the stored tensors and the compute
dtype, so nothing is dequantized to learn them; writing a dense weight back is refused (it would requantize).
bitsandbytes is imported only when such a layer is met.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["BnbBase", "is_bnb_layer"]

_KINDS = {"Linear4bit": "nf4", "Linear8bitLt": "int8", "LinearNF4": "nf4", "LinearFP4": "fp4"}


def is_bnb_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes") and any(
        cls.__name__ in _KINDS for cls in type(module).__mro__)


class BnbBase:
    """FrozenBase view of a bitsandbytes quantized linear layer."""

    fan_in_fan_out = False

    def __init__(self, module: nn.Module):
        self.module = module
        self.in_features, self.out_features = module.in_features, module.out_features
        kind = next(cls.__name__ for cls in type(module).__mro__ if cls.__name__ in _KINDS)
        state = getattr(module.weight, "quant_state", None)
        self.quant_type = getattr(state, "quant_type", None) or _KINDS[kind]
        self.eight_bit = kind == "Linear8bitLt"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def dense_weight(self) -> torch.Tensor:
        """(out, in) in the compute dtype, dequantized by bitsandbytes."""
        weight = self.module.weight
        if self.eight_bit:
            scb = getattr(weight, "SCB", None)
            if scb is None:
                scb = getattr(getattr(self.module, "state", None), "SCB", None)
            if scb is None:  # not quantized yet (has_fp16_weights, or before .to(device))
                return weight.data.float()
            return weight.data.float() * scb.float()[:, None] / 127.0
        import bitsandbytes.functional as bnbf
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks a 4-bit weight for its CPU kernel at the first eval forward; undo that on
            # a copy of the state (its own inverse, which its state_dict saving also uses)
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return bnbf.dequantize_4bit(data, state).to(self.dtype)

    def set_dense_weight(self, W: torch.Tensor) -> None:
        raise ValueError(f"this base is a bitsandbytes {type(self.module).__name__} ({self.quant_type}): writing "
                         f"W0 + ΔW into it would requantize and lose most of the update. Keep the adapter "
                         f"unmerged, or merge_and_unload(model, dequantize=True) for a dense model.")

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    @property
    def dtype(self) -> torch.dtype:
        compute = getattr(self.module, "compute_dtype", None)
        if compute is not None:
            return compute
        state = getattr(self.module.weight, "quant_state", None)
        return getattr(state, "dtype", None) or (self.module.bias.dtype if self.module.bias is not None
                                                  else torch.float32)
