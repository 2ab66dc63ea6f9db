"""LoRA layers: a frozen base layer plus one or more low-rank adapters.

    y = W0·x + Σ_active (α/r)·B·A·dropout(x)          A: (r, in)   B: (out, r)

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), arXiv:2106.09685.
rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732) uses α/√r so the update's size does not shrink as r grows.

Init: A Kaiming-uniform, B = 0, so ΔW = 0 and the wrapped model starts exactly as the base (for an
Embedding, A = 0 and B ~ N(0, 1): the lookup goes through A first, PEFT's convention).

`LoRALinear` wraps (composition, not subclassing) any base that maps (..., in) -> (..., out) and stores a
dense weight: `nn.Linear` (weight (out, in)), GPT-2's `Conv1D` (weight (in, out), "fan_in_fan_out"), or a
quantized base exposing `dense_weight()` / `in_features` / `out_features`. `LoRAEmbedding` does the same for
`nn.Embedding` (weight (num_embeddings, dim), i.e. stored as (in, out)).

Each adapter's whole state (A, B, rank, alpha, dropout, merged flag) is one `LoRAAdapter`; a layer holds
them in `adapters` (an nn.ModuleDict) and names the active ones in `active`.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRAAdapter", "LoRALinear", "LoRAEmbedding", "delta_weight", "lora_scaling", "is_conv1d", "module_dims",
           "adapter_dtype"]


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """α/r, or α/√r for rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = scaling · B @ A, computed in float32.  A: (r, in), B: (out, r) -> (out, in)."""
    return (B.float() @ A.float()) * scaling


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters under a half-precision (or quantized) base are kept in float32: their updates are too small
    for bf16/fp16; otherwise they share the base dtype."""
    if base_dtype in (torch.float16, torch.bfloat16) or not base_dtype.is_floating_point:
        return torch.float32
    return base_dtype


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style transformers Conv1D: y = x @ W + b with W stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


class LoRAAdapter(nn.Module):
    """One adapter: A (r, in), B (out, r), scaling, dropout probability and whether it is merged.

    bias_mode: which biases train along with it ("none" / "all" / "lora_only"), so saving it needs no repeat.
    An init that rewrites W0 (PiSSA, OLoRA: W0 <- W0 - scaling·B0·A0) keeps its initial factors in the
    non-persistent buffers init_A / init_B: the trained update relative to the original W0 is then
    scaling·(B·A - B0·A0), which is what a file for other tools must hold."""

    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float, *,
                 lora_dropout: float = 0.0, use_rslora: bool = False, device=None, dtype=None,
                 factors: tuple[torch.Tensor, torch.Tensor] | None = None, bias_mode: str = "none"):
        super().__init__()
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.lora_dropout = float(lora_dropout)
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.merged = False
        self.bias_mode = bias_mode
        self.register_buffer("init_A", None, persistent=False)  # (r, in), only after a W0-rewriting init
        self.register_buffer("init_B", None, persistent=False)  # (out, r)
        if factors is None:
            A = torch.empty(r, in_features, device=device, dtype=dtype)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear's own init, as in the paper's code
            factors = (A, torch.zeros(out_features, r, device=device, dtype=dtype))
        self.lora_A = nn.Parameter(factors[0])
        self.lora_B = nn.Parameter(factors[1])

    @classmethod
    def from_factors(cls, lora_A: torch.Tensor, lora_B: torch.Tensor, lora_alpha: float, *,
                     lora_dropout: float = 0.0, use_rslora: bool = False,
                     requires_grad: bool = True) -> "LoRAAdapter":
        """An adapter around existing A (r, in) and B (out, r), used as they are (no init, no copy):
        loading a file this way skips the random init that would be overwritten anyway."""
        adapter = cls(lora_A.shape[1], lora_B.shape[0], lora_A.shape[0], lora_alpha, lora_dropout=lora_dropout,
                      use_rslora=use_rslora, factors=(lora_A, lora_B))
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

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if isinstance(base_layer, LoRALinear):
            raise TypeError("base_layer is already a LoRA layer; add a second adapter with add_adapter()")
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.disabled = False
        self.fan_in_fan_out = is_conv1d(base_layer) or isinstance(base_layer, nn.Embedding)
        self.in_features, self.out_features = module_dims(base_layer)

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
        """Create adapter `name` and make it active.  dtype defaults to float32 under a half-precision
        base (adapter updates are too small for bf16/fp16) and to the base dtype otherwise."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer; pick another adapter_name")
        weight = self.dense_weight()
        adapter = LoRAAdapter(self.in_features, self.out_features, r, lora_alpha, lora_dropout=lora_dropout,
                              use_rslora=use_rslora, device=weight.device, dtype=dtype or adapter_dtype(weight.dtype),
                              bias_mode=bias_mode)
        self._init_adapter(adapter, init_lora_weights)
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

    def _init_adapter(self, adapter: LoRAAdapter, init) -> None:
        with torch.no_grad():
            if init is True:
                return  # Kaiming-uniform A, zero B (done in LoRAAdapter)
            if init == "gaussian":
                nn.init.normal_(adapter.lora_A, std=1.0 / adapter.r)
            elif init is False:  # both random: the model no longer starts as the base (PEFT's meaning)
                nn.init.kaiming_uniform_(adapter.lora_B, a=math.sqrt(5))
            elif init == "orthogonal":
                self._init_orthogonal(adapter)
            elif init in ("pissa", "olora"):
                (self._init_pissa if init == "pissa" else self._init_olora)(adapter)
                self.set_dense_weight(self.dense_weight().float() - adapter.delta_weight())
                adapter.keep_init()
            else:
                raise ValueError(f"init_lora_weights={init!r} is not supported")

    def _init_pissa(self, adapter: LoRAAdapter) -> None:
        """PiSSA (Meng et al. 2024, arXiv:2404.02948): A, B from the top-r singular triplets of W0 (and W0
        replaced by the residual), so the output is unchanged at init but training starts on W0's principal
        directions."""
        U, S, Vh = torch.linalg.svd(self.dense_weight().float(), full_matrices=False)   # W0: (out, in)
        r = adapter.r
        root = (S[:r] / adapter.scaling).sqrt()
        adapter.lora_A.copy_((root[:, None] * Vh[:r]).to(adapter.lora_A.dtype))  # (r, in)
        adapter.lora_B.copy_((U[:, :r] * root[None, :]).to(adapter.lora_B.dtype))  # (out, r)

    def _init_olora(self, adapter: LoRAAdapter) -> None:
        """OLoRA (Büyükakyüz 2024, arXiv:2406.01775): W0 = Q·R, B = Q[:, :r], A = R[:r] (and W0 replaced by
        W0 - scaling·B·A), as PEFT computes it."""
        Q, R = torch.linalg.qr(self.dense_weight().float())       # (out, k), (k, in)
        adapter.lora_A.copy_(R[:adapter.r].to(adapter.lora_A.dtype))
        adapter.lora_B.copy_(Q[:, :adapter.r].to(adapter.lora_B.dtype))

    def _init_orthogonal(self, adapter: LoRAAdapter) -> None:
        """PEFT's "orthogonal" init: A's rows and B's columns drawn on the two halves of one random orthogonal
        r×r basis (r even), scaled by 1/10, so B·A = 0 at init while both factors are non-zero."""
        r = adapter.r
        if r % 2:
            raise ValueError(f"init_lora_weights='orthogonal' needs an even r, got r={r}")
        Q, _ = torch.linalg.qr(torch.randn(r, r))
        A = torch.randn(self.in_features, r // 2).mm(Q[0::2]).T / 10.0                # (r, in)
        B = torch.randn(r // 2, self.out_features).T.mm(Q[1::2]) / 10.0              # (out, r)
        adapter.lora_A.copy_(A.to(adapter.lora_A))
        adapter.lora_B.copy_(B.to(adapter.lora_B))

    def set_active(self, names: tuple[str, ...]) -> None:
        missing = [n for n in names if n not in self.adapters]
        if missing:
            raise KeyError(f"no adapter named {missing} on this layer; it has {list(self.adapters)}")
        self.active = tuple(names)

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.disabled:
            return out
        # Without autograd the base output is ours alone (unless a hook on the base saw it), so the adapter
        # is accumulated into it in place instead of into a new (..., out) buffer.
        inplace = not torch.is_grad_enabled() and not self.base_layer._forward_hooks
        for name in self.active:
            adapter = self.adapters[name]
            if adapter.merged:
                continue
            out = _add_lora(out, x, adapter, self.training, inplace)
        return out

    # ---- the base weight, always seen as (out, in) -----------------------------------------------------
    def dense_weight(self) -> torch.Tensor:
        """The base weight as (out, in) (a view for Linear/Conv1D; dequantized for quantized bases)."""
        base = self.base_layer
        if hasattr(base, "dense_weight"):
            return base.dense_weight()
        return base.weight.T if self.fan_in_fan_out else base.weight

    def set_dense_weight(self, W: torch.Tensor) -> None:
        """Write W (out, in), cast to the base's dtype; refuses NaN/Inf."""
        if not torch.isfinite(W).all():
            raise ValueError("refusing to write NaN/Inf into the base weight (the adapter holds non-finite values)")
        base = self.base_layer
        if hasattr(base, "set_dense_weight"):
            base.set_dense_weight(W)
            return
        with torch.no_grad():
            base.weight.copy_((W.T if self.fan_in_fan_out else W).to(base.weight.dtype))

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


def _add_lora(out: torch.Tensor, x: torch.Tensor, adapter: LoRAAdapter, training: bool,
              inplace: bool = False) -> torch.Tensor:
    """out + scaling · (dropout(x) @ A.T) @ B.T, with the scale applied on the narrow (…, r) tensor and the
    final add fused into the matmul (addmm) — this is the per-token cost of an unmerged adapter."""
    A, B = adapter.lora_A, adapter.lora_B
    if x.dtype != A.dtype and not torch.is_autocast_enabled(x.device.type):  # autocast casts inside F.linear
        x = x.to(A.dtype)
    scale = adapter.scaling
    if adapter.lora_dropout and training:
        keep, kept = _keep_mask(x, adapter.lora_dropout)
        x = torch.where(keep, x, 0.0)   # dropout's 1/(1-p) rescale rides on the narrow (..., r) product below
        scale = scale / kept
    h = F.linear(x, A) * scale                                             # (..., r)
    if out.dtype == h.dtype == B.dtype and out.dim() >= 2 and out.is_contiguous():  # (autocast casts only F.linear)
        out2d, h2d = out.view(-1, out.shape[-1]), h.reshape(-1, h.shape[-1])
        if inplace:
            return out2d.addmm_(h2d, B.T).view(out.shape)
        return torch.addmm(out2d, h2d, B.T).view(out.shape)
    return out + F.linear(h, B).to(out.dtype)


def _keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """Dropout's keep mask for x, i.i.d. Bernoulli(1 - p) (bool, x's shape), and the keep probability.

    Drawn as 16-bit uniform integers, four from each 64-bit word of the global generator: about a third of
    the cost of F.dropout, whose bernoulli_ draws a float per element.  p is rounded to a multiple of 2^-16
    (|error| <= 7.7e-6) and the keep probability returned is the exact one, so E[x·keep / kept] = x."""
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)  # all 64 bits
    lanes = words.view(torch.int16)[:n].view(x.shape)                      # uniform on [-2^15, 2^15)
    cut = min(round(p * 65536), 65535)                                     # drop a lane when below cut - 2^15
    return lanes >= cut - 32768, 1.0 - cut / 65536


class LoRAEmbedding(LoRALinear):
    """LoRA on nn.Embedding: ids (...) -> (..., dim).  A: (r, num_embeddings), B: (dim, r).

    Dropout is not applied (the input is ids).  An embedding that scales its own lookup (Gemma's, BART's
    `embed_scale`) scales the adapter's term the same way, so unmerged == merged == PEFT."""

    def add_adapter(self, name, r, lora_alpha, *, lora_dropout=0.0, use_rslora=False,
                    init_lora_weights=True, dtype=None, bias_mode="none"):
        adapter = super().add_adapter(name, r, lora_alpha, lora_dropout=0.0, use_rslora=use_rslora,
                                      init_lora_weights=True, dtype=dtype, bias_mode=bias_mode)
        with torch.no_grad():  # PEFT's embedding inits: A = 0, B ~ N(0, 1) (a lookup into A starts at zero)
            if init_lora_weights is False:   # ... or both N(0, 1): not an identity start
                nn.init.normal_(adapter.lora_A)
            else:
                nn.init.zeros_(adapter.lora_A)
            nn.init.normal_(adapter.lora_B)
        return adapter

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(ids)
        if self.disabled:
            return out
        base = self.base_layer
        scale = embed_scale(base)
        for name in self.active:
            adapter = self.adapters[name]
            if adapter.merged:
                continue
            h = F.embedding(ids, adapter.lora_A.T, base.padding_idx, base.max_norm, base.norm_type,
                            base.scale_grad_by_freq, base.sparse)          # (..., r)
            term = F.linear(h, adapter.lora_B) * adapter.scaling            # (..., dim)
            if scale is not None:
                term = term * scale.to(term.dtype)
            out = out + term.to(out.dtype)
        return out


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


def module_dims(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer (or of a LoRA layer: its base's)."""
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    if is_conv1d(base):
        return base.weight.shape[0], base.weight.shape[1]
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return base.in_features, base.out_features
    raise TypeError(f"cannot wrap {type(base).__name__}: it has no in_features/out_features")


def warn_if_rank_too_large(path: str, r: int, in_features: int, out_features: int) -> None:
    if r > min(in_features, out_features):
        warnings.warn(f"{path}: r={r} exceeds min(in={in_features}, out={out_features}) = "
                      f"{min(in_features, out_features)}; ΔW cannot have rank above that, so the extra "
                      f"rank is wasted parameters", stacklevel=3)
