"""Per-row adapters: one batch in which every row names its own adapter (or none).

    with adapter_rows(model, ["a", None, "b", "a"]):     # one name per row of the batch (dim 0)
        out = model(input_ids=ids)                        # row 0 through adapter a, row 1 the base alone, ...

equals running each row alone with set_adapter(model, name) (or disable_lora for None), up to float
summation order, and gradients flow to every adapter used (one batch can train several adapters).  Each LoRA
layer stacks the adapters its rows name into a zero-padded bank and runs functional.lora_linear_rows (one
batched matmul per factor, BGMV-style); modules to save run each row through that adapter's own copy.  A
layer without the adapter a row names computes the base alone for that row, as that adapter alone would.

The plan is built when the block is entered and read on every forward inside it (stacking the factors
each time, so an optimizer step inside the block is seen); outside the block the layers cost nothing extra.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from . import functional as LF
from .inject import check_adapter_names, check_unmerged, lora_layers
from .layer import LoRALinear
from .saved import saved_modules

__all__ = ["adapter_rows", "RowPlan"]


class RowPlan:
    """One LoRA layer's routing: which bank slot each row uses (-1: none) and the adapters in the bank."""

    def __init__(self, layer, names: Sequence[str | None]):
        used = [n for n in dict.fromkeys(names) if n is not None and n in layer.adapters]
        self.adapters = [layer.adapters[n] for n in used]
        slot = {n: i for i, n in enumerate(used)}
        self.idx = torch.tensor([slot.get(n, -1) for n in names], dtype=torch.long, device=layer.base.device)
        dropouts = {a.lora_dropout for a in self.adapters}
        if layer.training and len(dropouts) > 1:
            raise ValueError(f"adapters {used} have different lora_dropout {sorted(dropouts)}; one batch can train "
                             f"them together only with the same dropout")
        self.dropout = dropouts.pop() if dropouts else 0.0

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        out = layer.base(x)
        if layer.disabled or not self.adapters:
            return out
        if x.shape[0] != len(self.idx):
            raise ValueError(f"a LoRA layer got a batch of {x.shape[0]} rows under adapter_rows for {len(self.idx)} "
                             f"rows; routing follows the first dimension of each layer's input")
        A_bank, B_bank = LF.stack_factors([(a.lora_A, a.lora_B) for a in self.adapters])
        scalings = torch.tensor([a.scaling for a in self.adapters], dtype=A_bank.dtype, device=A_bank.device)
        term = layer.rows_term(x, A_bank, B_bank, scalings, self.idx, self.dropout)
        return out + term.to(out.dtype)


@contextlib.contextmanager
def adapter_rows(model: nn.Module, names: Sequence[str | None]):
    """Inside the block, row i of every batch uses adapter names[i] (None: no adapter).  The active-adapter
    setting is ignored inside and unchanged after; adapters must be unmerged."""
    names = list(names)
    check_adapter_names(model, [n for n in names if n is not None])
    check_unmerged(model, "adapter_rows")
    switches = list(lora_layers(model).values()) + list(saved_modules(model).values())
    before = [m.rows for m in switches]
    try:
        for module in switches:
            module.rows = RowPlan(module, names) if isinstance(module, LoRALinear) else names
        yield model
    finally:
        for module, plan in zip(switches, before):
            module.rows = plan
