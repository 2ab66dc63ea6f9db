"""Activation memory of one training step of a transformer: what autograd keeps for backward.

Counted tensor by tensor as PyTorch keeps them for a Llama-style block (RMSNorm upcast to fp32, SwiGLU MLP,
rotary embeddings, SDPA / flash attention, no dropout), bytes per token per block, p = bytes per activation
element (2 for bf16/fp16, 4 for fp32), h hidden, h_kv key/value width, f MLP width, a heads:

    norms       2·(4h + 4)         each RMSNorm keeps its input in fp32 and 1/rms      (LayerNorm: p·h + 8)
                + 2·p·h            full fine-tuning only: the normalised input, for the norm weight's grad
    attention   p·(2h + 2h_kv) + 4a    q, k, v, the output (also o_proj's input), fp32 logsumexp
    MLP         3·p·f              gate, up and silu(gate)                    (plain GELU MLP: p·f)
    linear inputs, full fine-tuning: p·(2h + f)  the q/k/v input, the gate/up input, down_proj's input
    adapters, per adapted module, with a = bytes of the adapter path (4: loralab keeps adapters in fp32
    and casts x up; p under torch.autocast, as `loralab train --bf16` runs):
                a·r                A·x, for B's grad
                a·in               x cast to the adapter's dtype, for A's grad: one copy per module
                                   when a != p; when a == p x is the base's own tensor, already kept except
                                   down_proj's f-wide input and the q/k/v and gate/up inputs (p·h each, once)
                (a + 1)·in         with lora_dropout > 0 when a != p or under autocast: the dropped copy
                                   and a one-byte mask (when a == p without autocast loralab keeps x itself,
                                   as without dropout, and the one-byte mask: 1·in)
    under autocast also the 16-bit copies of A and B, p·r·(in + out) per module (not per token)

A frozen Linear keeps nothing for its own weight, so LoRA keeps less than full fine-tuning except for the
adapter terms.  Outside the blocks, per token: the final norm (as above), 4V for the fp32 log-probabilities
of the loss, 8 for the labels (and 8 for the token ids and p·h for the head's input when everything trains),
plus 2·seq·head_dim·p for the rotary cos/sin tables.  The first block's input norm keeps nothing under LoRA
(its input, the frozen embedding output, needs no grad), and more generally a block keeps nothing that
comes before its first adapter when no earlier block has one.  tests/test_activations.py checks `saved`
against the bytes autograd really keeps (saved-tensor hooks) for a small Llama, in fp32 and bf16.

The peak adds what exists only at the start of backward: the logits returned by the model (p·V per token)
and the fp32 gradient of the log-probabilities (4V).  With gradient checkpointing (non-reentrant, per
block) each block keeps only its input (p·h per token) and one block is recomputed during backward, so
the peak adds that block's tensors once.

That is a standard step, `model(input_ids, labels=...).loss` (as with PEFT or the Hugging Face Trainer).
`loralab train` keeps less (`loss="chunked"`, `fused_mlp=True`), and these terms change:
    loss        no log-probabilities, labels or logits: the chunked loss (loss.py) keeps ∂loss/∂h of the
                target positions, p·h each, and their one-byte mask: batch·(seq − 1)·(p·h + 1) in all; while
                it runs, one chunk's logits and their fp32 log-softmax, rows·V·(p + 4) (+ rows·V·p for the
                16-bit copy of the gradient when p < 4; on CPU in fp32 one buffer serves both, so rows·V·4),
                in place of the (T, V) logits and their gradient
    MLP         2·p·f: gate and up only (fused.py; not under gradient checkpointing), and down_proj's adapter
                no longer keeps its f-wide input when a == p (recomputed from gate and up in backward)
tests/test_activations.py checks these too, on loralab's own step.

Other architectures (GPT-2, BERT) use the same terms with LayerNorm and a plain MLP; their dropout masks
and the attention probabilities of eager / math attention (a·seq per token) are not counted, so read those
figures as lower bounds.  Temporaries inside one op (e.g. the fp32 logits copy) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Activations", "activation_memory", "block_bytes_per_token", "LOSSES"]

LOSS_BYTES = 4   # the fp32 loss scalar


@dataclass(frozen=True)
class Activations:
    tokens: int                 # batch · seq
    per_token_per_block: int    # bytes one block keeps per token without checkpointing (largest block)
    terms: dict                 # that figure's parts: norms, attention, mlp, linear_inputs, adapters
    saved: int                  # everything kept for backward when the forward pass ends
    at_backward: int            # logits returned + fp32 grad of the log-probabilities (chunked: one chunk's)
    recompute: int              # gradient checkpointing: one block's tensors, recomputed in backward
    text: tuple = ()            # the arithmetic, one line per step
    loss: str = "logits"        # the loss counted: "chunked" only where the model has an output head
    fused_mlp: bool = False     # whether the fused SwiGLU MLP was counted (never under checkpointing)

    @property
    def total(self) -> int:
        return self.saved + self.at_backward + self.recompute

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "per_token_per_block": self.per_token_per_block, "terms": dict(self.terms),
                "saved": self.saved, "at_backward": self.at_backward, "recompute": self.recompute,
                "total": self.total}


def _norm_input(shape, p: int) -> int:
    return 4 * shape.hidden + 4 if shape.rms_norm else p * shape.hidden + 8


def _adapter_terms(mods, shape, p: int, r: int, dropout: float, a: int, fused_mlp: bool = False,
                   masks: bool = False) -> int:
    """Bytes per token that adapters on `mods` (one block, or the modules outside the blocks) keep, with the
    adapter path computing in `a` bytes (4: loralab's fp32 path; p: under autocast); fused_mlp: down_proj's
    input is recomputed in backward (fused.py); masks: each keeps its one-byte dropout mask beside x
    (functional._DroppedLoRA; `dropout` is then 0 for the rest)."""
    total = sum(m.in_features for m in mods if m.kind != "Embedding") if masks else 0
    for m in mods:
        total += a * r                    # A·x, for B's grad
        if m.kind == "Embedding":
            continue                      # the lookup keeps the token ids (counted once) and A's rows
        if dropout > 0:
            total += (a + 1) * m.in_features          # the dropped copy and a one-byte mask
        elif a != p or m.role == "other":
            total += a * m.in_features                # x cast to the adapter's dtype: one copy per module
        elif m.role == "mlp_out" and not fused_mlp:
            total += p * m.in_features    # the f-wide product, otherwise not kept by a frozen down_proj
    if dropout == 0 and a == p:           # x is the base's own tensor: q/k/v and gate/up share theirs
        roles = {m.role for m in mods}
        total += p * shape.hidden * (("attn_in" in roles) + ("mlp_in" in roles))
    return total


def block_bytes_per_token(shape, p: int, *, full: bool, adapted=(), r: int = 0, lora_dropout: float = 0.0,
                          adapter_bytes: int = 4, fused_mlp: bool = False, masks: bool = False) -> dict:
    """The terms of one block, bytes per token: norms, attention, mlp, linear_inputs, adapters."""
    h, kv, f = shape.hidden, shape.kv_hidden, shape.intermediate
    fused_mlp = fused_mlp and shape.gated_mlp
    return {"norms": 2 * _norm_input(shape, p) + (2 * p * h if full and shape.rms_norm else 0),
            "attention": p * (2 * h + 2 * kv) + 4 * shape.heads,
            "mlp": p * ((2 if fused_mlp else 3) * f if shape.gated_mlp else f),
            "linear_inputs": p * (2 * h + f) if full else 0,
            "adapters": _adapter_terms(adapted, shape, p, r, lora_dropout, adapter_bytes, fused_mlp, masks)}


_ORDER = ("attn_in", "attn_out", "mlp_in", "mlp_out")


def _first_block(terms: dict, mods, shape, p: int, dropout: float, a: int, fused_mlp: bool = False) -> dict:
    """Under LoRA, nothing before the first adapted module needs a gradient, so the first adapted block
    keeps nothing of what comes before it (its input norm, attention when q/k/v are not adapted, ...)."""
    roles = {m.role for m in mods}
    first = next((role for role in _ORDER if role in roles), None)
    norm = _norm_input(shape, p)
    out = dict(terms, norms=terms["norms"] - norm)
    if first in ("mlp_in", "mlp_out"):
        out["norms"] -= norm
    if first in ("attn_out", "mlp_in", "mlp_out"):
        out["attention"] = 0
        if a == p and dropout == 0 and "attn_out" in roles:
            out["adapters"] += p * shape.hidden      # o_proj's input is no longer kept by attention
    if first == "mlp_out":
        out["mlp"] = 0
        if fused_mlp and shape.gated_mlp and a == p and dropout == 0:
            out["adapters"] += p * shape.intermediate   # no gradient reaches the product: it is kept as is
    if dropout > 0:                                     # no mask where the input needs no gradient
        out["adapters"] -= sum(m.in_features for m in _first_role(mods))
    return out


def _first_role(mods) -> list:
    """The modules of the first block role present in `mods`: their input needs no gradient when they sit in
    the first adapted block (it comes straight from frozen layers)."""
    first = next((role for role in _ORDER if role in {m.role for m in mods}), None)
    return [m for m in mods if m.role == first and m.kind != "Embedding"]


def _start(shape, full: bool, by_layer: dict) -> int | None:
    """The first block whose tensors need gradients: 0 when everything trains or an embedding carries an
    adapter, else the first block with an adapter (None when no block has one)."""
    if full or any(m.kind == "Embedding" for m in by_layer.get(None, ())):
        return 0
    return next((i for i in range(shape.layers) if by_layer.get(i)), None)


def _kept(blocks: list[dict], shape, start, first_is_partial: bool, by_layer: dict, p: int, dropout: float,
          a: int, fused_mlp: bool) -> list[int]:
    """Bytes per token each block keeps: nothing before `start`, part of the block at `start` under LoRA."""
    kept = []
    for i, terms in enumerate(blocks):
        if start is None or i < start:
            terms = {}
        elif i == start and first_is_partial:
            terms = _first_block(terms, by_layer[i], shape, p, dropout, a, fused_mlp)
        kept.append(sum(terms.values()))
    return kept


def _outside(shape, p: int, full: bool, grads_in_blocks: bool, outside_adapters: int, chunked: bool) -> int:
    """Bytes per token kept outside the blocks: final norm, labels, fp32 log-probs (and ids, head input); with
    the chunked loss not the labels and log-probs (counted per target position instead: `activation_memory`)."""
    if not shape.vocab:
        return outside_adapters + (8 if full else 0)
    final_norm = _norm_input(shape, p) + (p * shape.hidden if full and shape.rms_norm else 0)
    return ((final_norm if grads_in_blocks else 0) + (0 if chunked else 8 + 4 * shape.vocab)
            + (8 + p * shape.hidden if full else 0) + outside_adapters)


def _rope_kept(shape, start, first_is_partial: bool, by_layer: dict) -> bool:
    """The cos/sin tables are kept when some block's q or k needs a gradient: a block after the first
    adapted one (its input carries gradient), or a q/k adapter (not v alone) in the first adapted one."""
    if start is None:
        return False
    return (not first_is_partial or start < shape.layers - 1
            or any(m.role == "attn_in" and not m.path.rsplit(".", 1)[-1].startswith("v") for m in by_layer[start]))


def _autocast_copies(by_layer: dict, start, first_is_partial: bool, a: int, r: int) -> dict:
    """{block (None outside): bytes of autocast's 16-bit copies of A and B kept for backward}; A's copy is
    not kept where x needs no gradient."""
    copies = {i: a * r * sum(m.in_features + m.out_features for m in mods) for i, mods in by_layer.items()}
    if first_is_partial:
        copies[start] -= a * r * sum(m.in_features for m in _first_role(by_layer[start]))
    return copies


LOSSES = ("logits", "chunked")


def _loss_text(chunked: bool, targets: int, p: int, h: int) -> str:
    return f" + {targets:,} targets × ({p}·{h} + 1) B of the chunked loss" if chunked else ""


def activation_memory(shape, *, batch: int, seq: int, act_bytes: int, full: bool = False, adapted=(), r: int = 0,
                      lora_dropout: float = 0.0, gradient_checkpointing: bool = False, autocast: bool = False,
                      loss: str = "logits", loss_chunk_rows: int = 0, fused_mlp: bool = False) -> Activations:
    """Activation bytes of a training step.  `adapted`: the Candidates carrying adapters (LoRA), each of
    rank r; `full`: every weight trains instead (full fine-tuning); `autocast`: the step runs under
    torch.autocast in act_bytes, so the adapter path computes in 16 bits too (loralab train --bf16).
    loss "logits": the model returns the (T, V) logits and the loss is taken from them (a standard step);
    "chunked": from the last hidden state, `loss_chunk_rows` rows at a time (loss.py, as `loralab train`
    runs causal LMs).  fused_mlp: SwiGLU MLPs keep gate and up only (fused.py; off under checkpointing)."""
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}: choose one of {', '.join(LOSSES)}")
    p, T, h, V = act_bytes, batch * seq, shape.hidden, shape.vocab
    chunked = loss == "chunked" and bool(V)
    if chunked and loss_chunk_rows <= 0:
        raise ValueError("the chunked loss needs loss_chunk_rows, the rows of one chunk (loss.chunk_rows(V))")
    fused_mlp = fused_mlp and not gradient_checkpointing
    a = p if autocast else 4
    masks = bool(lora_dropout) and a == p and not autocast
    if masks:
        lora_dropout = 0.0          # functional._DroppedLoRA: of the dropout only the masks are kept
    by_layer: dict = {}
    for m in adapted:
        by_layer.setdefault(m.layer, []).append(m)
    start = _start(shape, full, by_layer)
    partial = start is not None and not full and bool(by_layer.get(start))   # LoRA: gradients begin inside it
    blocks = [block_bytes_per_token(shape, p, full=full, adapted=by_layer.get(i, ()), r=r, lora_dropout=lora_dropout,
                                    adapter_bytes=a, fused_mlp=fused_mlp, masks=masks) for i in range(shape.layers)]
    kept = _kept(blocks, shape, start, partial, by_layer, p, lora_dropout, a, fused_mlp)
    widest = max(range(shape.layers), key=lambda i: sum(blocks[i].values()))
    per_block = sum(blocks[widest].values())
    rest = _outside(shape, p, full, start is not None,
                    _adapter_terms(by_layer.get(None, ()), shape, p, r, lora_dropout, a, masks=masks), chunked)
    targets = batch * (seq - 1)
    # the chunked loss: ∂loss/∂h of every target position and their mask, in place of a fp32 loss scalar
    loss_kept = targets * (p * h + 1) if chunked else LOSS_BYTES
    if not full and any(m.kind == "Embedding" for m in adapted):
        rest += 8                                       # the token ids, for the embedding adapter's backward
    copies = _autocast_copies(by_layer, start, partial, a, r) if autocast and a < 4 else {}
    rope = 2 * seq * shape.head_dim * p if shape.rope and _rope_kept(shape, start, partial, by_layer) else 0
    lines = ["per token, the widest block: " + " + ".join(f"{k} {v:,}" for k, v in blocks[widest].items())
             + f" = {per_block:,} B"]
    if gradient_checkpointing:
        saved = shape.layers * T * p * h + T * rest + copies.get(None, 0) + loss_kept
        recompute = T * per_block + copies.get(widest, 0)
        lines.append(f"checkpointing keeps each block's input: {shape.layers} × {T:,} tokens × {p}·{h} B "
                     f"+ {T:,} × {rest:,} B outside the blocks" + _loss_text(chunked, targets, p, h)
                     + f" = {saved:,} B; one block recomputed in backward: {T:,} × {per_block:,} B = {recompute:,} B")
    else:
        saved, recompute = T * (sum(kept) + rest) + rope + sum(copies.values()) + loss_kept, 0
        lines.append(f"{T:,} tokens × ({sum(kept):,} B in {shape.layers} blocks + {rest:,} B outside them)"
                     + (f" + {rope:,} B rope tables" if rope else "")
                     + (f" + {sum(copies.values()):,} B autocast copies of A and B" if copies else "")
                     + _loss_text(chunked, targets, p, h)
                     + f" = {saved:,} B")
    if chunked:
        rows = min(loss_chunk_rows, targets)
        per_row = p + 4 + (p if p < 4 else 0)
        at_backward = rows * V * per_row
        lines.append(f"while the chunked loss runs: one chunk's logits and log-softmax, {rows:,} rows × {V:,} × "
                     f"{per_row} B = {at_backward:,} B (no (tokens, vocab) logits)")
    else:
        at_backward = T * V * (p + 4)
        if V:
            lines.append(f"at the start of backward: the logits and the grad of the log-probs, {T:,} × {V:,} × "
                         f"({p} + 4) B = {at_backward:,} B")
    return Activations(T, per_block, blocks[widest], saved, at_backward, recompute, tuple(lines),
                       "chunked" if chunked else "logits", fused_mlp and shape.gated_mlp)
