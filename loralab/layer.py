"""LoRA layers: a frozen base layer plus one or more low-rank adapters (thin shells over functional.py).

    y = base(x) + Σ_active scaling·B·A·dropout(x)          A: (r, in)   B: (out, r)

The base is reached only through the FrozenBase protocol (base.py): calling it, and reading / writing its
weight as dense (out, in) for merging.  So nn.Linear, GPT-2's Conv1D, nn.Embedding and quantized bases all
plug in without this file knowing how their weight is stored.  `base_layer` is the wrapped module itself
(PEFT's name, so state_dict keys are PEFT's); `base` is its FrozenBase view.

Each adapter's whole state (A, B, rank, alpha, dropout, merged flag) is one `LoRAAdapter`; a layer holds
them in `adapters` (an nn.ModuleDict) and names the active ones in `active`.  Inside `adapter_rows`
(routing.py), `rows` holds a per-row plan and every row of the batch uses its own adapter.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import functional as LF
from .base import frozen_base, is_conv1d, module_dims
from .functional import adapter_dtype, delta_weight, lora_scaling
from .inits import init_factors, rewrites_base

__all__ = ["LoRAAdapter", "LoRALinear", "LoRAEmbedding", "delta_weight", "lora_scaling", "is_conv1d", "module_dims",
           "adapter_dtype", "embed_scale"]


class LoRAAdapter(nn.Module):
    """One adapter: A (r, in), B (out, r), scaling, dropout probability and whether it is merged.

    bias_mode: which biases train along with it ("none" / "all" / "lora_only"), so saving it needs no repeat.
    An init that rewrites W0 (PiSSA, OLoRA: W0 <- W0 - scaling·B0·A0) keeps its initial factors in the
    non-persistent buffers init_A / init_B: the trained update relative to the original W0 is then
    scaling·(B·A - B0·A0), which is what a file for other tools must hold."""

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor, lora_alpha: float, *, lora_dropout: float = 0.0,
                 use_rslora: bool = False, bias_mode: str = "none"):
        super().__init__()
        self.r, self.lora_alpha, self.use_rslora = lora_A.shape[0], lora_alpha, use_rslora
        self.lora_dropout = float(lora_dropout)
        self.scaling = lora_scaling(self.r, lora_alpha, use_rslora)
        self.merged = False
        self.bias_mode = bias_mode
        self.lora_A = nn.Parameter(lora_A)   # (r, in)
        self.lora_B = nn.Parameter(lora_B)   # (out, r)
        self.register_buffer("init_A", None, persistent=False)  # (r, in), only after a W0-rewriting init
        self.register_buffer("init_B", None, persistent=False)  # (out, r)

    @classmethod
    def from_factors(cls, lora_A: torch.Tensor, lora_B: torch.Tensor, lora_alpha: float, *,
                     lora_dropout: float = 0.0, use_rslora: bool = False,
                     requires_grad: bool = True) -> "LoRAAdapter":
        """An adapter around existing A (r, in) and B (out, r), used as they are (no init, no copy)."""
        adapter = cls(lora_A, lora_B, lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)
        return adapter.requires_grad_(requires_grad)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in float32, (out, in)."""
        return delta_weight(self.lora_A, self.lora_B, self.scaling)

    def keep_init(self) -> None:
        """Record the current A, B as the init that was subtracted from W0 (PiSSA / OLoRA)."""
        self.init_A = self.lora_A.detach().clone()
        self.init_B = self.lora_B.detach().clone()

    def update_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r', in), B (out, r')) with scaling·B·A = this adapter's change of the *original* W0:
        A, B themselves, or for an init that rewrote W0, the rank-2r [A; A0], [B, -B0]
        (scaling·(B·A - B0·A0), PEFT's own conversion)."""
        A, B = self.lora_A.detach(), self.lora_B.detach()
        if self.init_A is None:
            return A, B
        return torch.cat([A, self.init_A.to(A)], 0), torch.cat([B, -self.init_B.to(B)], 1)

    def extra_repr(self) -> str:
        out, r = self.lora_B.shape
        return (f"in={self.lora_A.shape[1]}, out={out}, r={r}, lora_alpha={self.lora_alpha}, "
                f"scaling={self.scaling:.4g}, dropout={self.lora_dropout}, merged={self.merged}")


class LoRALinear(nn.Module):
    """A frozen base layer (Linear / Conv1D / quantized) plus low-rank adapters.

    forward: x (..., in) -> (..., out).  The LoRA path runs in the adapter dtype (fp32 under a half
    precision base by default) and its result is cast back to the base output's dtype."""

    embedding = False

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if isinstance(base_layer, LoRALinear):
            raise TypeError("base_layer is already a LoRA layer; add a second adapter with add_adapter()")
        self.base_layer = base_layer
        # the FrozenBase view, kept out of the module tree (it may be base_layer itself: no second registration)
        self.__dict__["base"] = frozen_base(base_layer)
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.disabled = False
        self.rows = None  # a routing.RowPlan inside adapter_rows
        self.in_features, self.out_features = self.base.in_features, self.base.out_features
        self.fan_in_fan_out = getattr(self.base, "fan_in_fan_out", False)

    def __getattr__(self, name: str):
        """Attributes the wrapper does not have are the wrapped layer's (`.weight`, `.bias`, `.nf`, ...): models
        read them (T5 reads `self.wo.weight.dtype`), and PEFT answers them the same way."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # ---- adapters --------------------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, lora_alpha: float, *, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: bool | str = True, dtype=None,
                    bias_mode: str = "none") -> LoRAAdapter:
        """Create adapter `name` (initialised as init_lora_weights says, see inits.py) and make it active.
        dtype defaults to float32 under a half-precision or quantized base and to the base dtype otherwise."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer; pick another adapter_name")
        scaling = lora_scaling(r, lora_alpha, use_rslora)
        rewrite = rewrites_base(init_lora_weights) and not self.embedding
        A, B = init_factors(init_lora_weights, r, self.in_features, self.out_features, scaling,
                            W=self.base.dense_weight() if rewrite else None, embedding=self.embedding,
                            device=self.base.device, dtype=dtype or adapter_dtype(self.base.dtype))
        adapter = LoRAAdapter(A, B, lora_alpha, lora_dropout=0.0 if self.embedding else lora_dropout,
                              use_rslora=use_rslora, bias_mode=bias_mode)
        if rewrite:  # W0 <- W0 - scaling·B0·A0: the output is unchanged at init
            self.set_dense_weight(self.base.dense_weight().float() - adapter.delta_weight())
            adapter.keep_init()
        return self.attach(name, adapter)

    def attach(self, name: str, adapter: LoRAAdapter, active: bool = True) -> LoRAAdapter:
        """Add an existing adapter under `name` (active unless active=False)."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer; pick another adapter_name")
        self.adapters[name] = adapter.train(self.training)  # a new adapter follows the layer's train/eval mode
        if active:
            self.active = self.active + (name,)
        return adapter

    def remove_adapter(self, name: str) -> None:
        """Drop adapter `name` from this layer (no-op if absent).  A merged adapter must be unmerged first."""
        if name not in self.adapters:
            return
        if self.adapters[name].merged:
            raise RuntimeError(f"adapter {name!r} is merged; call unmerge(model) before removing it")
        del self.adapters[name]
        self.active = tuple(n for n in self.active if n != name)

    def set_active(self, names: tuple[str, ...]) -> None:
        missing = [n for n in names if n not in self.adapters]
        if missing:
            raise KeyError(f"no adapter named {missing} on this layer; it has {list(self.adapters)}")
        self.active = tuple(names)

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            return self.rows.forward(self, x)
        out = self.base(x)
        if self.disabled:
            return out
        # The base output is ours alone unless a hook on the base saw it or (with autograd) the base reads it
        # in backward, so the adapter is accumulated into it in place instead of into a new (..., out) buffer;
        # in training too where the base says its output is fresh: a new buffer per projection there was left
        # by the allocator as a hole among the saved activations (peak memory, bench/bench_train.py).
        inplace = not self.base_layer._forward_hooks and \
            (not torch.is_grad_enabled() or getattr(self.base, "fresh_output", False) is True)
        for name in self.active:
            adapter = self.adapters[name]
            if not adapter.merged:
                out = self.add_term(out, x, adapter, inplace)
        return out

    def add_term(self, out: torch.Tensor, x: torch.Tensor, a: LoRAAdapter, inplace: bool) -> torch.Tensor:
        """out + this adapter's term (functional.add_lora_linear)."""
        return LF.add_lora_linear(out, x, a.lora_A, a.lora_B, a.scaling, dropout=a.lora_dropout,
                                  training=self.training, inplace=inplace)

    def rows_term(self, x: torch.Tensor, A_bank, B_bank, scalings, idx, dropout: float) -> torch.Tensor:
        """The adapter terms of a batch whose row i uses adapter idx[i] (functional.lora_linear_rows)."""
        return LF.lora_linear_rows(x, A_bank, B_bank, scalings, idx, dropout=dropout, training=self.training)

    def replace_base(self, module: nn.Module) -> None:
        """Swap the frozen base for another of the same shape (e.g. its dequantized copy)."""
        base = frozen_base(module)
        if (base.in_features, base.out_features) != (self.in_features, self.out_features):
            raise ValueError(f"the new base maps {base.in_features} -> {base.out_features}, this layer "
                             f"{self.in_features} -> {self.out_features}")
        self.base_layer = module
        self.__dict__["base"] = base
        self.fan_in_fan_out = getattr(base, "fan_in_fan_out", False)

    # ---- the base weight, always seen as (out, in) -----------------------------------------------------
    def dense_weight(self) -> torch.Tensor:
        """The base weight as (out, in) (a view for dense bases; dequantized for quantized ones)."""
        return self.base.dense_weight()

    def set_dense_weight(self, W: torch.Tensor) -> None:
        """Write W (out, in), cast to the base's dtype; refuses NaN/Inf."""
        if not torch.isfinite(W).all():
            raise ValueError("refusing to write NaN/Inf into the base weight (the adapter holds non-finite values)")
        self.base.set_dense_weight(W)

    # ---- merge -----------------------------------------------------------------------------------------
    def merge(self, names: tuple[str, ...] | None = None) -> None:
        """W0 <- W0 + ΔW for each named (default: active) adapter, in float32, cast back."""
        names = self.active if names is None else names
        todo = [n for n in names if not self.adapters[n].merged]
        if not todo:
            return
        W = self.dense_weight().float()
        for n in todo:
            W = W + self.adapters[n].delta_weight().to(W.device)
        self.set_dense_weight(W)
        for n in todo:
            self.adapters[n].merged = True

    def unmerge(self) -> None:
        """W0 <- W0 - ΔW for every merged adapter."""
        merged = [n for n, a in self.adapters.items() if a.merged]
        if not merged:
            return
        W = self.dense_weight().float()
        for n in merged:
            W = W - self.adapters[n].delta_weight().to(W.device)
        self.set_dense_weight(W)
        for n in merged:
            self.adapters[n].merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, active={list(self.active)}, disabled={self.disabled}"


class LoRAEmbedding(LoRALinear):
    """LoRA on nn.Embedding: ids (...) -> (..., dim).  A: (r, num_embeddings), B: (dim, r).

    Dropout is not applied (the input is ids).  An embedding that scales its own lookup (Gemma's, BART's
    `embed_scale`) scales the adapter's term the same way, so unmerged == merged == PEFT."""

    embedding = True

    def _lookup(self) -> dict:
        e = self.base_layer
        return dict(embed_scale=embed_scale(e), padding_idx=e.padding_idx, max_norm=e.max_norm,
                    norm_type=e.norm_type, scale_grad_by_freq=e.scale_grad_by_freq, sparse=e.sparse)

    def add_term(self, out, ids, a, inplace):
        return out + LF.lora_embedding(ids, a.lora_A, a.lora_B, a.scaling, **self._lookup()).to(out.dtype)

    def rows_term(self, ids, A_bank, B_bank, scalings, idx, dropout):
        return LF.lora_embedding_rows(ids, A_bank, B_bank, scalings, idx, **self._lookup())


def embed_scale(embedding: nn.Module) -> torch.Tensor | None:
    """The scalar an embedding module multiplies its lookup by in its own forward (`embed_scale`, as in
    Gemma's and BART's scaled embeddings), or None.  A non-scalar embed_scale is refused: what it does to the
    lookup cannot be known, so adapting this module would give an unknown answer."""
    value = getattr(embedding, "embed_scale", None)
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return torch.tensor(float(value), device=embedding.weight.device)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.reshape(())
    raise TypeError(f"{type(embedding).__name__}.embed_scale has shape {tuple(getattr(value, 'shape', ()))}; "
                    f"loralab adapts embeddings whose forward multiplies the lookup by a scalar only. Leave this "
                    f"embedding out of target_modules.")


def warn_if_rank_too_large(path: str, r: int, in_features: int, out_features: int) -> None:
    if r > min(in_features, out_features):
        warnings.warn(f"{path}: r={r} exceeds min(in={in_features}, out={out_features}) = "
                      f"{min(in_features, out_features)}; ΔW cannot have rank above that, so the extra "
                      f"rank is wasted parameters", stacklevel=3)
