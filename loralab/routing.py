"""Per-row adapters: one batch in which every row names its own adapter (or none).

    with adapter_rows(model, ["a", None, "b", "a"]):     # one name per row of the batch (dim 0)
        out = model(input_ids=ids)                        # row 0 through adapter a, row 1 the base alone, ...

    model(input_ids=ids, adapter_names=["a", None, "b", "a"])   # PEFT's spelling (accept_adapter_names)
    model.generate(input_ids=ids, adapter_names=[...])          # the same rows through every decoding step

equals running each row alone with set_adapter(model, name) (or disable_lora for None), up to float
summation order, and gradients flow to every adapter used (one batch can train several adapters).  Each LoRA
layer picks one of two paths per forward:

  grouped rows (each adapter's rows contiguous, e.g. sorted by adapter): SGMV-style, one pair of matmuls
      per segment with that adapter's own factors (functional.add_lora_linear_segments) -- with autograd
      (no bank is stacked or gathered, so nothing of that size is kept for backward), and without it for
      up to INFERENCE_SEGMENTS segments;
  otherwise: BGMV-style, the adapters stacked into a zero-padded bank (exact) and gathered per row, one
      batched matmul per factor (functional.lora_linear_rows).

Bank cache: when no gradient is needed (inference), the bank of *all* of a layer's adapters is stacked once
and reused by every batch, whatever adapters it names; it is keyed on each factor's identity, storage and
`_version` (bumped by every in-place write: an optimizer step, load_state_dict, copy_), so loading, deleting
or updating an adapter rebuilds it.  With gradients the bank of the adapters used is stacked on every
forward, so an optimizer step inside the block is seen and autograd reaches each factor.  Modules to save run
each row through that adapter's own copy.  A layer without the adapter a row names computes the base alone
for that row, as that adapter alone would.

Why inference prefers the bank beyond two segments: on CPU, each segment costs three small kernels per
layer, and the gathered bank costs the same three kernels whatever the number of adapters; measured on the
reference model (bench/bench_serve.py), 4 segments of 2 rows took up to 1.9x the single-adapter forward on a
loaded machine, the cached bank about 1.0x.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from . import functional as LF
from .inject import check_adapter_names, check_unmerged, list_adapters
from .layer import LoRALinear
from .saved import SavedModule

__all__ = ["adapter_rows", "RowPlan", "forward_with_adapters", "accept_adapter_names", "layer_bank"]

INFERENCE_SEGMENTS = 2   # without autograd, grouped rows in more segments than this take the cached bank


def _bank_key(adapters) -> tuple:
    """What the cached bank depends on: each factor's identity, storage and version, and each scaling.  Read
    from the modules' dicts directly (not through nn.Module attribute lookup): it runs for every layer of every
    routed forward, over all of the layer's adapters."""
    key = []
    for a in adapters:
        params = a._parameters
        A, B = params["lora_A"], params["lora_B"]
        key += (id(A), A.data_ptr(), A._version, id(B), B.data_ptr(), B._version, a.__dict__["scaling"])
    return tuple(key)


def layer_bank(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(A_bank (n, r_max, in), B_bank (n, out, r_max), scalings (n,), {name: slot}) of all of the layer's
    adapters, without autograd, cached on the layer until a factor is replaced or written in place."""
    adapters = list(layer.adapters.values())
    key = _bank_key(adapters)
    cached = layer.__dict__.get("_row_bank")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            A_bank, B_bank = LF.stack_factors([(a.lora_A, a.lora_B) for a in adapters])
            scalings = torch.tensor([a.scaling for a in adapters], dtype=A_bank.dtype, device=A_bank.device)
        cached = (key, A_bank, B_bank, scalings, {n: i for i, n in enumerate(layer.adapters)})
        layer.__dict__["_row_bank"] = cached
    return cached[1:]


class RowPlan:
    """One LoRA layer's routing: the adapters its rows use, each row's slot (-1: none), and the segments when
    the rows are grouped by adapter."""

    def __init__(self, layer, names: Sequence[str | None], shared: dict | None = None):
        """shared: a dict that the plans of one batch share, so that layers routed alike (the same adapters in
        the same order, the usual case) make their index tensors and segments once."""
        self.names = list(names)
        used = [n for n in dict.fromkeys(names) if n is not None and n in layer.adapters]
        self.used = used
        self.adapters = [layer.adapters[n] for n in used]
        shared = {} if shared is None else shared
        device = layer.base.device
        key = ("plan", tuple(used), device)
        if key not in shared:
            slot = {n: i for i, n in enumerate(used)}
            slots = [slot.get(n, -1) for n in names]
            shared[key] = (torch.tensor(slots, dtype=torch.long, device=device), LF.row_segments(slots))
        self.idx, segments = shared[key]
        self.segments = None if layer.embedding else segments
        self._shared = shared
        self._bank_rows = None  # (bank key, idx into the layer's whole bank, its safe slots, its row scales)
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
        grad = torch.is_grad_enabled() and (x.requires_grad or any(
            a.lora_A.requires_grad or a.lora_B.requires_grad for a in self.adapters))
        if self.segments is not None and (grad or len(self.segments) <= INFERENCE_SEGMENTS):  # SGMV
            inplace = not grad and not layer.base_layer._forward_hooks
            return LF.add_lora_linear_segments(out, x, [(a.lora_A, a.lora_B) for a in self.adapters],
                                               [a.scaling for a in self.adapters], self.segments,
                                               dropout=self.dropout, training=layer.training, inplace=inplace)
        if grad:  # the bank of the adapters used, stacked now so that autograd reaches the factors
            A_bank, B_bank = LF.stack_factors([(a.lora_A, a.lora_B) for a in self.adapters])
            scalings = torch.tensor([a.scaling for a in self.adapters], dtype=A_bank.dtype, device=A_bank.device)
            idx = self.idx
        else:
            A_bank, B_bank, scalings, slot = layer_bank(layer)
            idx, safe, scale = self._whole_bank_rows(layer, slot, scalings)
            if (not layer.embedding and not (layer.training and self.dropout)
                    and not layer.base_layer._forward_hooks and out.is_contiguous()
                    and out.dtype == A_bank.dtype and not torch.is_autocast_enabled(x.device.type)):
                return LF.lora_linear_rows_scaled(x, A_bank, B_bank, safe, scale, out=out)   # in place
        term = layer.rows_term(x, A_bank, B_bank, scalings, idx, self.dropout)
        return out + term.to(out.dtype)

    def _whole_bank_rows(self, layer, slot: dict, scalings: torch.Tensor):
        """(idx into the layer's whole bank, its clamped slots, each row's scale), made once per bank: every
        op saved here is one of a few per layer that the routed forward costs beyond the single-adapter one."""
        key = layer.__dict__["_row_bank"][0]
        if self._bank_rows is None or self._bank_rows[0] != key:
            values = tuple(a.scaling for a in layer.adapters.values())     # the bank's scalings, as floats
            shared_key = ("bank", tuple(slot), tuple(self.used), values, scalings.dtype, scalings.device)
            if shared_key not in self._shared:
                slots = [slot[n] if n in self.used else -1 for n in self.names]
                idx = torch.tensor(slots, dtype=torch.long, device=self.idx.device)
                safe, scale = LF._row_scales(scalings, idx)
                groups = _equal_groups(slots)
                if groups is not None:  # one group per adapter: its slot and scale once, not per row
                    safe = None if groups == list(range(len(slot))) else safe.new_tensor(groups)
                    scale = scalings if safe is None else scalings[safe]
                self._shared[shared_key] = (idx, safe, scale)
            self._bank_rows = (key, *self._shared[shared_key])
        return self._bank_rows[1:]


def _equal_groups(slots: list[int]) -> list[int] | None:
    """The slot of each group when the rows form equal runs of one slot each, every row with an adapter and no
    slot twice (e.g. [3, 3, 0, 0, 5, 5] -> [3, 0, 5]); None otherwise."""
    segments = LF.row_segments(slots)
    if segments is None or sum(e - s for s, e, _ in segments) != len(slots):
        return None
    if len({e - s for s, e, _ in segments}) != 1:
        return None
    return [k for _, _, k in segments]


@contextlib.contextmanager
def adapter_rows(model: nn.Module, names: Sequence[str | None]):
    """Inside the block, row i of every batch uses adapter names[i] (None: no adapter).  The active-adapter
    setting is ignored inside and unchanged after; adapters must be unmerged."""
    names = list(names)
    switches = [m for m in model.modules() if isinstance(m, (LoRALinear, SavedModule))]   # one walk: per batch
    known = set(list_adapters(model, switches))
    if any(n is not None and n not in known for n in names):
        check_adapter_names(model, [n for n in names if n is not None])   # raises, naming them
    if any(a.merged for m in switches if isinstance(m, LoRALinear) for a in m.adapters.values()):
        check_unmerged(model, "adapter_rows")                             # raises, naming a layer
    before = [m.rows for m in switches]
    shared: dict = {}
    try:
        for module in switches:
            module.rows = RowPlan(module, names, shared) if isinstance(module, LoRALinear) else names
        yield model
    finally:
        for module, plan in zip(switches, before):
            module.rows = plan


def forward_with_adapters(model: nn.Module, adapter_names: Sequence[str | None], *args, **inputs):
    """model(*args, **inputs) with row i through adapter adapter_names[i] (None: the base)."""
    with adapter_rows(model, adapter_names):
        return model(*args, **inputs)


# ---- PEFT's spelling: model(..., adapter_names=[...]) and model.generate(..., adapter_names=[...]) ----------
def _pre_hook(module, args, kwargs):
    names = kwargs.pop("adapter_names", None)
    stack = module.__dict__.setdefault("_adapter_rows_stack", [])
    stack.append(None)  # popped by _post_hook, which runs even if entering the block fails
    if names is not None:
        context = adapter_rows(module, names)
        context.__enter__()
        stack[-1] = context
    return args, kwargs


def _post_hook(module, args, kwargs, output):
    stack = module.__dict__.get("_adapter_rows_stack")
    context = stack.pop() if stack else None
    if context is not None:
        context.__exit__(None, None, None)
    return output


class _GenerateWithNames:
    """model.generate with adapter_names=: row i of the prompts (and every sequence decoded from it) through
    adapter_names[i].  An object, not a bound function, so that pickling and deepcopy of the model keep it."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, adapter_names=None, **kwargs):
        model = self.model
        generate = type(model).generate
        if adapter_names is None:
            return generate(model, *args, **kwargs)
        config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        beams = kwargs.get("num_beams", getattr(config, "num_beams", 1) or 1)
        copies = beams if beams > 1 else kwargs.get("num_return_sequences",
                                                    getattr(config, "num_return_sequences", 1) or 1)
        expanded = [n for n in adapter_names for _ in range(copies)]  # generate repeats each prompt row in place
        with adapter_rows(model, expanded):
            return generate(model, *args, **kwargs)


# The hooks accept_adapter_names installs: without adapter_names in a call they do nothing (loss.py skips them).
ROW_HOOKS = (_pre_hook, _post_hook)


def accept_adapter_names(model: nn.Module) -> nn.Module:
    """Let model(..., adapter_names=[...]) (and model.generate(..., adapter_names=[...]) when the model has
    generate) route row i through adapter_names[i], as PEFT's mixed batches do.  Idempotent; returns model."""
    if model.__dict__.get("_accepts_adapter_names"):
        return model
    model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
    if callable(getattr(type(model), "generate", None)):
        model.generate = _GenerateWithNames(model)
    model.__dict__["_accepts_adapter_names"] = True
    return model
