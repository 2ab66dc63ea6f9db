"""Cross-entropy of a linear output head, computed chunk by chunk: never the whole (N, V) logits.

For hidden states h: (N, H), an output head W: (V, H) (bias b: (V,)) and targets t: (N,),

    z_i    = W·h_i + b                                   logits of row i, (V,)
    loss   = Σ_i  lse(z_i) − z_i[t_i]                    lse(z) = log Σ_v exp(z_v)      ("sum")
    ∂loss/∂z_i = softmax(z_i) − onehot(t_i)  =: g_i
    ∂loss/∂h_i = g_i·W      ∂loss/∂W = Σ_i g_iᵀ h_i      ∂loss/∂b = Σ_i g_i

The rows are taken `chunk_size` at a time; for each chunk the logits (chunk, V), their log-softmax, the loss
and g are computed in two reused buffers, and g is turned at once into the chunk's rows of ∂loss/∂h (and
added into ∂loss/∂W, ∂loss/∂b when the head trains).  So the forward pass already does the backward's work
and keeps only ∂loss/∂h (N, H); backward scales it by the incoming gradient.  Peak extra memory is two
(chunk, V) buffers instead of the (N, V) logits, their log-softmax and their gradient.  Rows whose target is
`ignore_index` are dropped before the projection, so prompt and padding tokens cost nothing.  With a frozen
head (LoRA) ∂loss/∂W is never formed.  The idea is the "fused linear cross-entropy" of Liger-Kernel
(Hsu et al. 2024, arXiv:2410.10989) and Unsloth.

Dtypes.  The matmuls run in the compute dtype: the autocast dtype when autocast is on for the device (as
`lm_head(h)` would under the same autocast), otherwise the inputs' dtype (hidden, weight and bias must then
agree, as for F.linear).  Each chunk's logits are cast to float32 (float64 for float64 inputs) before the
log-softmax; the loss, the softmax and g are in that dtype; g is cast to the compute dtype for the
gradient matmuls; ∂W and ∂b are accumulated in float32.  Gradients come back in each input's own dtype and
the loss is float32 (float64 for float64 inputs), as F.cross_entropy(logits.float()) gives.

`causal_lm_loss_sum` applies this to a transformers causal LM: it runs the model's body for the last hidden
state, without the head, and returns None whenever it cannot be sure the model's logits are exactly
`lm_head(hidden)` (then use the logits path).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .routing import ROW_HOOKS
from .saved import SavedModule

__all__ = ["linear_cross_entropy", "causal_lm_loss_sum", "chunk_rows", "PLAIN_HEAD_MODELS"]

IGNORE_INDEX = -100
CHUNK_BYTES = 32 * 2 ** 20   # one chunk's float32 logits: 32 MiB, 262 rows at V = 32000 (bench/bench_loss.py)
MIN_CHUNK_ROWS = 64          # below this the matmuls stream the whole of W for too few rows


def chunk_rows(vocab_size: int) -> int:
    """Default rows per chunk: the chunk's float32 logits take about CHUNK_BYTES, at least MIN_CHUNK_ROWS."""
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * vocab_size))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: torch.Tensor | None = None, chunk_size: int | None = None,
                         ignore_index: int = IGNORE_INDEX, reduction: str = "sum") -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T + bias, targets) without materialising the logits.

    hidden: (N, H), weight: (V, H), bias: (V,) or None, targets: (N,) integer class ids or ignore_index.
    reduction "sum" or "mean" (over the rows not ignored).  When every target is ignored the loss is 0 and
    every gradient 0 for both reductions (F.cross_entropy's "mean" gives NaN there).
    chunk_size: at most this many rows per chunk (the rows are split evenly); None picks chunk_rows(V).
    Returns a 0-dim float32 tensor (float64 for float64 inputs), differentiable w.r.t. hidden, weight and
    bias (once: no double backward).  Host syncs: one (count and range of the targets), two if rows are dropped."""
    _check(hidden, weight, targets, bias, chunk_size, reduction)
    chunk = chunk_size or chunk_rows(weight.shape[0])
    targets = targets.long()
    keep = targets != ignore_index
    kept = torch.where(keep, targets, 0)
    n, low, high = torch.stack([keep.sum(), kept.min(), kept.max()]).tolist() if targets.numel() else (0, 0, 0)
    if low < 0 or high >= weight.shape[0]:
        raise ValueError(f"targets must be class ids in [0, {weight.shape[0]}) or ignore_index={ignore_index}; "
                         f"got values in [{low}, {high}]")
    if n < targets.shape[0]:                 # drop ignored rows before projecting them
        rows = keep.nonzero().squeeze(1)
        hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)
    if n:
        chunk = math.ceil(n / math.ceil(n / chunk))   # equal chunks, no small last one
    scale = 1.0 / n if reduction == "mean" and n else 1.0
    compute = _compute_dtype(hidden, weight, bias)
    tensors = (hidden, weight, bias)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
        return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, scale, compute)
    with torch.autocast(hidden.device.type, enabled=False):
        return _chunked(hidden, weight, bias, targets, chunk, scale, compute, (False, False, False))[0]


def _check(hidden, weight, targets, bias, chunk_size, reduction) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, H) and weight (V, H) with the same H; got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)} (flatten (B, T, H) to (B*T, H))")
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be integer class ids of shape ({hidden.shape[0]},) (one per hidden row); "
                         f"got {targets.dtype} of shape {tuple(targets.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight; got {tuple(bias.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive number of rows or None (automatic); got {chunk_size!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r} is not supported; use 'sum' or 'mean'")


def _compute_dtype(hidden, weight, bias) -> torch.dtype:
    """The matmul dtype: the autocast dtype if autocast is on (and applies to these floats), else the inputs'."""
    device = hidden.device.type
    floats = (torch.float32, torch.float16, torch.bfloat16)
    if torch.is_autocast_enabled(device) and hidden.dtype in floats and weight.dtype in floats:
        return torch.get_autocast_dtype(device)
    dtypes = {hidden.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1 or not hidden.dtype.is_floating_point:
        raise TypeError(f"hidden ({hidden.dtype}), weight ({weight.dtype})" +
                        (f" and bias ({bias.dtype})" if bias is not None else "") +
                        " must share one floating dtype outside autocast; cast them, or run under torch.autocast")
    return hidden.dtype


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """forward computes the loss and the gradients; backward only scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, scale, compute):
        with torch.autocast(hidden.device.type, enabled=False):
            loss, *grads = _chunked(hidden, weight, bias, targets, chunk, scale, compute, ctx.needs_input_grad[:3])
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        scaled = [None if g is None else g * grad_output.to(g.dtype) for g in ctx.saved_tensors]
        return *scaled, None, None, None, None


def _chunked(hidden, weight, bias, targets, chunk, scale, compute, needs):
    """(loss, ∂loss/∂hidden, ∂loss/∂weight, ∂loss/∂bias); a gradient is None unless `needs` asks for it."""
    need_h, need_w, need_b = needs
    n, V = hidden.shape[0], weight.shape[0]
    acc = torch.float64 if compute == torch.float64 else torch.float32
    h, W = hidden.to(compute), weight.to(compute)                       # (N, H), (V, H): cast once, not per chunk
    b = bias.to(compute) if bias is not None else None
    rows = min(chunk, max(n, 1))
    z = torch.empty(rows, V, dtype=compute, device=h.device)            # logits of one chunk
    # their log-softmax, then softmax - onehot: in z itself when the dtypes agree on CPU (its log_softmax kernel
    # reads a whole row before writing it, and the result is bit-equal: tests/test_loss.py), one (rows, V)
    # buffer less (32 MiB at the default chunk)
    same = compute == acc and h.device.type == "cpu"
    g = z if same else torch.empty(rows, V, dtype=acc, device=h.device)
    grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=h.device) if need_h else None
    grad_w = torch.zeros(V, W.shape[1], dtype=acc, device=h.device) if need_w else None
    grad_b = torch.zeros(V, dtype=acc, device=h.device) if need_b else None
    loss = torch.zeros((), dtype=acc, device=h.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        hc, tc = h[start:stop], targets[start:stop, None]               # (c, H), (c, 1)
        zc, gc = z[:stop - start], g[:stop - start]                     # (c, V)
        if b is None:
            torch.mm(hc, W.T, out=zc)
        else:
            torch.addmm(b, hc, W.T, out=zc)
        torch.log_softmax(zc, dim=1, dtype=acc, out=gc)
        loss -= gc.gather(1, tc).sum()                                  # Σ lse(z) - z[t]
        if not (need_h or need_w or need_b):
            continue
        gc.exp_().scatter_add_(1, tc, torch.full_like(tc, -1, dtype=acc))   # softmax - onehot
        gm = gc if compute == acc else gc.to(compute)
        if need_h:
            if grad_h.dtype == compute:
                torch.mm(gm, W, out=grad_h[start:stop])
            else:
                grad_h[start:stop] = gm @ W
        if need_w:
            if compute == acc:
                grad_w.addmm_(gm.T, hc)
            else:
                grad_w += (gm.T @ hc).to(acc)
        if need_b:
            grad_b += gc.sum(0)
    if scale != 1.0:
        loss *= scale
        for grad in (grad_h, grad_w, grad_b):
            if grad is not None:
                grad.mul_(scale)
    return (loss, grad_h, None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))


# ---- causal language models ------------------------------------------------------------------------------

# transformers classes whose forward is `hidden = <body>(...).last_hidden_state; logits = <head>(hidden[:, keep])`
# with nothing between (no soft-capping, no logit scale).  class name -> (path of the body, name of the head).
# tests/test_loss.py builds each from a tiny config and checks the loss against the logits path.
PLAIN_HEAD_MODELS = {
    "LlamaForCausalLM": ("model", "lm_head"),
    "MistralForCausalLM": ("model", "lm_head"),
    "Qwen2ForCausalLM": ("model", "lm_head"),
    "Qwen3ForCausalLM": ("model", "lm_head"),
    "PhiForCausalLM": ("model", "lm_head"),
    "Phi3ForCausalLM": ("model", "lm_head"),
    "GemmaForCausalLM": ("model", "lm_head"),
    "Starcoder2ForCausalLM": ("model", "lm_head"),
    "OlmoForCausalLM": ("model", "lm_head"),
    "Olmo2ForCausalLM": ("model", "lm_head"),
    "StableLmForCausalLM": ("model", "lm_head"),
    "SmolLM3ForCausalLM": ("model", "lm_head"),
    "GPT2LMHeadModel": ("transformer", "lm_head"),
    "GPTBigCodeForCausalLM": ("transformer", "lm_head"),
    "GPTNeoXForCausalLM": ("gpt_neox", "lm_head"),
    "OPTForCausalLM": ("model.decoder", "lm_head"),
}
# config fields that change the logits after the head (Gemma2/3, Cohere, Granite, ...): any set -> no fused path
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
# inputs the full model consumes itself rather than passing to the body
_HEAD_LEVEL_INPUTS = ("labels", "logits_to_keep", "past_key_values", "cache")


def causal_lm_loss_sum(model: nn.Module, inputs: dict, labels: torch.Tensor,
                       chunk_size: int | None = None) -> tuple[torch.Tensor, int] | None:
    """(Σ cross-entropy over the targets, number of targets) of a transformers causal LM, or None.

    inputs: the model's keyword arguments (input_ids / inputs_embeds, attention_mask, ...) without labels;
    labels: (B, T) with IGNORE_INDEX on positions without a target; position t predicts labels[:, t + 1].
    Equals F.cross_entropy(model(**inputs).logits[:, :-1], labels[:, 1:], reduction="sum") with its
    gradients, but runs only the model's body (use_cache=False) and the chunked loss on the target rows.
    None when that equality is not certain: the class is not in PLAIN_HEAD_MODELS (exactly, with its own
    forward), a config field transforms the logits, the head is not a plain nn.Linear (LoRA-wrapped,
    quantized, sharded), hooks sit on the model or the head, or inputs holds cache/labels arguments.
    Unwrap DDP (model.module) before calling."""
    found = _plain_head(model, inputs)
    if found is None:
        return None
    body, head = found
    out = body(**inputs, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]    # (B, T, H)
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not match the model's hidden states "
                         f"{tuple(hidden.shape[:2])}; pass labels of shape (batch, sequence)")
    targets = labels[:, 1:].to(hidden.device)                          # (B, T-1): position t predicts t+1
    keep = targets != IGNORE_INDEX
    targets = targets[keep]                                            # (n,)
    loss = linear_cross_entropy(hidden[:, :-1][keep], head.weight, targets, bias=head.bias,
                                chunk_size=chunk_size, reduction="sum")
    return loss, targets.shape[0]


def _plain_head(model: nn.Module, inputs: dict) -> tuple[nn.Module, nn.Linear] | None:
    """(body, head) when model's logits are exactly head(body(...)[0]); None otherwise."""
    cls = type(model)
    if cls.__name__ not in PLAIN_HEAD_MODELS or not cls.__module__.startswith("transformers."):
        return None
    import transformers
    if getattr(transformers, cls.__name__, None) is not cls or cls.forward.__module__ != cls.__module__:
        return None                                   # a subclass, or a forward patched in by another library
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if any(getattr(c, key, None) is not None for c in (model.config, config) for key in _LOGIT_TRANSFORMS):
        return None
    if any(key in inputs for key in _HEAD_LEVEL_INPUTS) or "adapter_names" in inputs:
        return None                                   # (adapter_names: the model's own call routes the rows)
    body_path, head_name = PLAIN_HEAD_MODELS[cls.__name__]
    body, head = model.get_submodule(body_path), getattr(model, head_name, None)
    if isinstance(head, SavedModule) and head.rows is None and not _hooked(head):
        head = head.in_use()                          # a head trained in full: the copy that computes the output
    if type(head) is not nn.Linear or type(head.weight.data) is not torch.Tensor \
            or not head.weight.dtype.is_floating_point:
        return None                                   # LoRA-wrapped, quantized or sharded head
    if _hooked(model) or _hooked(head) or nn.modules.module._global_forward_hooks \
            or nn.modules.module._global_forward_pre_hooks:
        return None                                   # the full call would run code we would skip
    return body, head


def _hooked(module: nn.Module) -> bool:
    """Hooks other than routing's adapter_names pair (which does nothing in a call without adapter_names), or
    a forward patched onto the instance."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return any(h not in ROW_HOOKS for h in hooks) or "forward" in module.__dict__
