"""The LoRA math as pure functions: tensors in, tensors out (the layers in layer.py are thin shells over these).

    y = base(x) + scaling · B · A · dropout(x)        A: (r, in)   B: (out, r)   scaling = α/r  (rsLoRA: α/√r)

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), arXiv:2106.09685; rsLoRA:
Kalajdzievski (2023), arXiv:2312.03732.

dtype rules: the adapter term is computed in the adapter's dtype (x is cast to A's dtype; adapters under a
half-precision base are float32) and cast back to the base output's dtype; under torch.autocast, autocast
picks the matmul dtype instead.  The scale and dropout's 1/(1-p) are applied to the narrow (..., r) product.

Several adapters in one batch ("rows"): row i of the batch uses adapter idx[i] of a bank of stacked factors,
or none (idx[i] = -1):

    A_bank (n, r_max, in), B_bank (n, out, r_max)     ranks below r_max are zero-padded, which is exact:
                                                      the padded rows of A and columns of B add 0
    term[i] = scalings[idx[i]] · B_bank[idx[i]] · A_bank[idx[i]] · x[i]       (batched matmuls, BGMV-style)

When the rows are grouped by adapter (each adapter's rows contiguous, e.g. sorted), the batch is a few
segments [start, end) of one adapter each and each segment is two plain matmuls with that adapter's own
factors (no gather, no padding; SGMV-style, `row_segments` + `add_lora_linear_segments`).
"""

from __future__ import annotations

import math
import threading
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["lora_scaling", "delta_weight", "keep_mask", "lora_linear", "add_lora_linear", "lora_embedding",
           "stack_factors", "lora_linear_rows", "lora_embedding_rows", "adapter_dtype", "row_segments",
           "add_lora_linear_segments"]


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """α/r, or α/√r for rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters under a half-precision (or quantized) base are kept in float32: their updates are too small
    for bf16/fp16; otherwise they share the base dtype."""
    if base_dtype in (torch.float16, torch.bfloat16) or not base_dtype.is_floating_point:
        return torch.float32
    return base_dtype


def delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = scaling · B @ A, computed in float32.  A: (r, in), B: (out, r) -> (out, in)."""
    return (B.float() @ A.float()) * scaling


def keep_mask(x: torch.Tensor, p: float, generator: torch.Generator | None = None, *,
              reuse: bool = False, own_mask: bool = False) -> tuple[torch.Tensor, float]:
    """Dropout's keep mask for x, i.i.d. Bernoulli(1 - p) (bool, x's shape), and the keep probability.

    Drawn as 16-bit uniform integers, four from each 64-bit word of the global generator: about a third of
    the cost of F.dropout, whose bernoulli_ draws a float per element.  p is rounded to a multiple of 2^-16
    (|error| <= 7.7e-6) and the keep probability returned is the exact one, so E[x·keep / kept] = x.
    reuse: the words and the mask live in this thread's scratch buffers (`_scratch`), valid until its next
    use; the same mask either way.  own_mask (with reuse): the mask is a tensor of its own, to keep."""
    n = x.numel()
    words = _scratch((n + 3) // 4, torch.int64, x.device) if reuse else \
        torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
    words.random_(-2 ** 63, None, generator=generator)                    # all 64 bits
    lanes = words.view(torch.int16)[:n].view(x.shape)                      # uniform on [-2^15, 2^15)
    cut = min(round(p * 65536), 65535)                                     # drop a lane when below cut - 2^15
    out = _scratch(n, torch.bool, x.device).view(x.shape) if reuse and not own_mask else None
    return torch.ge(lanes, cut - 32768, out=out), 1.0 - cut / 65536


_workspace = threading.local()          # per thread: on CUDA, autograd runs backward in a thread of its own


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of `numel` elements that this thread reuses from call to call (grown when too small).
    For temporaries of the dropout path (words, mask, dropped x): fresh buffers there, one set per projection,
    were left by the allocator as holes among the activations kept for backward and raised the peak memory of
    a training step (bench/bench_train.py)."""
    bufs = _workspace.__dict__.setdefault("bufs", {})
    buf = bufs.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buf = bufs[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _dropped(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x where keep, else 0, as (N, in), in this thread's scratch buffer for x's dtype."""
    out = _scratch(x.numel(), x.dtype, x.device).view(x.shape)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device), out=out).view(-1, x.shape[-1])


def _adapter_input(x: torch.Tensor, dtype: torch.dtype, dropout: float, training: bool,
                   scale) -> tuple[torch.Tensor, float]:
    """x in the adapter's dtype (autocast casts inside F.linear itself), dropped out, and the scale to apply
    to the (..., r) product (dropout's 1/(1-p) included)."""
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        x = x.to(dtype)
    if dropout and training:
        keep, kept = keep_mask(x, dropout)
        x = torch.where(keep, x, 0.0)
        scale = scale / kept
    return x, scale


def lora_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, *, dropout: float = 0.0,
                training: bool = False) -> torch.Tensor:
    """The adapter term scaling · B·A·dropout(x).  x: (..., in), A: (r, in), B: (out, r) -> (..., out) in the
    adapter's dtype (or autocast's)."""
    x, scale = _adapter_input(x, A.dtype, dropout, training, scaling)
    return F.linear(F.linear(x, A) * scale, B)


def add_lora_linear(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, *,
                    dropout: float = 0.0, training: bool = False, inplace: bool = False) -> torch.Tensor:
    """out + scaling · B·A·dropout(x), out: (..., out) the base output.  The final add is fused into the
    matmul (addmm; in place into `out` when `inplace` — only when nothing else holds `out`): this is the
    per-token cost of an unmerged adapter."""
    if dropout and training and torch.is_grad_enabled() and _plain(out, x, A, B):
        return _DroppedLoRA.apply(out, x, A, B, dropout, scaling,
                                  inplace and out.is_contiguous())
    x, scale = _adapter_input(x, A.dtype, dropout, training, scaling)
    h = F.linear(x, A) * scale                                                       # (..., r)
    if out.dtype == h.dtype == B.dtype and out.dim() >= 2 and out.is_contiguous():  # (autocast casts only F.linear)
        out2d, h2d = out.view(-1, out.shape[-1]), h.reshape(-1, h.shape[-1])
        if inplace:
            return out2d.addmm_(h2d, B.T).view(out.shape)
        return torch.addmm(out2d, h2d, B.T).view(out.shape)
    return out + F.linear(h, B).to(out.dtype)


def _plain(out, x, A, B) -> bool:
    """One dtype throughout and no autocast: what _DroppedLoRA handles (anything else takes autograd's path)."""
    return (out.dtype == x.dtype == A.dtype == B.dtype and out.dim() >= 2 and out.shape[:-1] == x.shape[:-1]
            and not torch.is_autocast_enabled(x.device.type))


class _DroppedLoRA(torch.autograd.Function):
    """out + scale · B·A·(x ⊙ keep / kept) in training with dropout, keeping for backward x itself (which
    several projections of one input share) and the one-byte mask, not a dropped copy of x (autograd's path
    keeps x·keep beside x as well).  On the reference model the masks take 37 MB (the step's peak did not
    move: 1,110 MB) and drawing them again in backward instead made a training step about 2% slower (an A/B
    within one process).  Gradients equal autograd's on the dropped-x path (tests/test_train_dropout.py); the
    global generator advances exactly as there."""

    @staticmethod
    def forward(ctx, out, x, A, B, p: float, scaling: float, inplace: bool = False):
        keep, kept = keep_mask(x, p, reuse=True, own_mask=True)
        s = scaling / kept
        h = torch.mm(_dropped(x, keep), A.T).mul_(s)                                 # (N, r), scaled
        ctx.save_for_backward(x, keep, A, B, h)
        ctx.s = s
        if inplace:
            ctx.mark_dirty(out)
            out.view(-1, out.shape[-1]).addmm_(h, B.T)
            return out
        return torch.addmm(out.reshape(-1, out.shape[-1]), h, B.T).view(out.shape)

    @staticmethod
    def backward(ctx, grad):
        x, keep, A, B, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])                                         # (N, out)
        need_out, need_x, need_A, need_B = ctx.needs_input_grad[:4]
        grad_B = g.T @ h if need_B else None                                         # (out, r)
        grad_x = grad_A = None
        if need_x or need_A:
            gh = (g @ B).mul_(ctx.s)                                                 # (N, r)
            if need_A:
                grad_A = gh.T @ _dropped(x, keep)                                    # (r, in)
            if need_x:
                grad_x = torch.where(keep, (gh @ A).view(x.shape), 0.0)
        return grad if need_out else None, grad_x, grad_A, grad_B, None, None, None


def lora_embedding(ids: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, *,
                   embed_scale: torch.Tensor | None = None, padding_idx=None, max_norm=None, norm_type: float = 2.0,
                   scale_grad_by_freq: bool = False, sparse: bool = False) -> torch.Tensor:
    """The adapter term of an embedding: scaling · B·A[:, ids] (· embed_scale, for an embedding that scales its
    own lookup).  ids: (...) -> (..., dim).  A: (r, num_embeddings), B: (dim, r).  No dropout (the input is ids)."""
    h = F.embedding(ids, A.T, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)   # (..., r)
    term = F.linear(h, B) * scaling                                                            # (..., dim)
    return term if embed_scale is None else term * embed_scale.to(term.dtype)


def stack_factors(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(A_i (r_i, in), B_i (out, r_i))] -> A_bank (n, r_max, in), B_bank (n, out, r_max), zero-padded to the
    largest rank (exact: padded rows of A meet padded columns of B).  Differentiable in the factors."""
    r_max = max(A.shape[0] for A, _ in factors)
    As = [F.pad(A, (0, 0, 0, r_max - A.shape[0])) for A, _ in factors]
    Bs = [F.pad(B, (0, r_max - B.shape[1])) for _, B in factors]
    return torch.stack(As), torch.stack(Bs)


def _row_scales(scalings: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bank index per row, clamped so that every row gathers a real slot; scale per row, 0 where idx = -1)."""
    safe = idx.clamp(min=0)
    return safe, torch.where(idx >= 0, scalings[safe], torch.zeros((), dtype=scalings.dtype, device=idx.device))


def lora_linear_rows(x: torch.Tensor, A_bank: torch.Tensor, B_bank: torch.Tensor, scalings: torch.Tensor,
                     idx: torch.Tensor, *, dropout: float = 0.0, training: bool = False,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Row i of the batch through adapter idx[i] (-1: no adapter, a zero term).

    x: (batch, ..., in), A_bank: (n, r_max, in), B_bank: (n, out, r_max), scalings: (n,), idx: (batch,) long
    -> (batch, ..., out) in the bank's dtype (or autocast's).  out (no autograd; contiguous, the bank's
    dtype): the base output, to which the terms are added in place and which is returned."""
    safe, scale = _row_scales(scalings, idx)
    return lora_linear_rows_scaled(x, A_bank, B_bank, safe, scale, dropout=dropout, training=training, out=out)


def lora_linear_rows_scaled(x: torch.Tensor, A_bank: torch.Tensor, B_bank: torch.Tensor, safe: torch.Tensor | None,
                            scale: torch.Tensor, *, dropout: float = 0.0, training: bool = False,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """lora_linear_rows with the slots and scales given, per group of consecutive rows: safe (G,) long, a real
    slot for every group, G dividing the batch (G = batch: one row per group); None: group g is slot g (G = n,
    no gather).  scale (G,), 0 for a group without adapter.  A caller that routes many layers or batches the
    same way computes them once (_row_scales); equal groups (rows sorted by adapter, as a server batches them)
    make fewer, larger matmuls and smaller gathers than one per row."""
    x, drop = _adapter_input(x, A_bank.dtype, dropout, training, 1.0)
    A, B = (A_bank, B_bank) if safe is None else (A_bank[safe], B_bank[safe])    # (G, r_max, in), (G, out, r_max)
    x3 = x.reshape(A.shape[0], -1, x.shape[-1])                                   # (G, rows/G · T, in)
    h = torch.bmm(x3, A.transpose(1, 2))                                          # (G, rows/G · T, r_max)
    h = h * (scale if drop == 1.0 else scale * drop).to(h.dtype)[:, None, None]
    if out is not None:  # accumulate into the base output: no (batch, T, out) term is allocated
        out.view(h.shape[0], h.shape[1], -1).baddbmm_(h, B.transpose(1, 2))
        return out
    return torch.bmm(h, B.transpose(1, 2)).reshape(*x.shape[:-1], B.shape[1])


def lora_embedding_rows(ids: torch.Tensor, A_bank: torch.Tensor, B_bank: torch.Tensor, scalings: torch.Tensor,
                        idx: torch.Tensor, *, embed_scale: torch.Tensor | None = None, padding_idx=None,
                        max_norm=None, scale_grad_by_freq: bool = False, **_) -> torch.Tensor:
    """Row i of a batch of ids through embedding adapter idx[i] (-1: none).

    ids: (batch, ...), A_bank: (n, r_max, num_embeddings), B_bank: (n, dim, r_max) -> (batch, ..., dim)."""
    if max_norm is not None or scale_grad_by_freq:
        raise ValueError("an embedding with max_norm or scale_grad_by_freq cannot route rows to different "
                         "adapters (the lookup renormalises or rescales per batch); run the adapters one at a time")
    safe, scale = _row_scales(scalings, idx)
    flat = ids.reshape(ids.shape[0], -1)                                           # (batch, T)
    h = A_bank[safe[:, None], :, flat]                                             # (batch, T, r_max)
    if padding_idx is not None:  # as F.embedding: the padding id's row takes no gradient
        h = torch.where((flat == padding_idx)[..., None], h.detach(), h)
    h = h * scale.to(h.dtype)[:, None, None]
    term = torch.bmm(h, B_bank[safe].transpose(1, 2)).reshape(*ids.shape, B_bank.shape[1])
    return term if embed_scale is None else term * embed_scale.to(term.dtype)


def row_segments(idx: Sequence[int]) -> list[tuple[int, int, int]] | None:
    """The contiguous runs [(start, end, slot)] of a per-row slot list (rows of slot -1, no adapter, may be
    anywhere and are left out), or None when some adapter's rows are not contiguous (not grouped)."""
    runs, seen = [], set()
    for i, slot in enumerate(idx):
        if runs and runs[-1][2] == slot:
            runs[-1][1] = i + 1
            continue
        if slot in seen and slot >= 0:
            return None
        seen.add(slot)
        runs.append([i, i + 1, slot])
    return [(s, e, slot) for s, e, slot in runs if slot >= 0]


def add_lora_linear_segments(out: torch.Tensor, x: torch.Tensor, factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
                             scalings: Sequence[float], segments: Sequence[tuple[int, int, int]], *,
                             dropout: float = 0.0, training: bool = False, inplace: bool = False) -> torch.Tensor:
    """out + the adapter terms of a batch grouped by adapter: rows start:end through factors[slot] (SGMV-style,
    one pair of matmuls per segment; rows in no segment get no term).

    out: (batch, ..., out) the base output, x: (batch, ..., in), factors[k] = (A (r_k, in), B (out, r_k)),
    scalings[k]: float, segments: [(start, end, slot)] from row_segments.  Differentiable in x and the factors.
    inplace (no autograd): each segment's term is accumulated into its slice of `out`."""
    if inplace and out.is_contiguous():
        for start, end, k in segments:
            A, B = factors[k]
            add_lora_linear(out[start:end], x[start:end], A, B, scalings[k], dropout=dropout, training=training,
                            inplace=True)
        return out
    pieces, at = [], 0
    for start, end, k in segments:
        if start > at:
            pieces.append(out[at:start])
        A, B = factors[k]
        pieces.append(add_lora_linear(out[start:end], x[start:end], A, B, scalings[k], dropout=dropout,
                                      training=training))
        at = end
    if at < out.shape[0]:
        pieces.append(out[at:])
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]
