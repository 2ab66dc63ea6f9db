"""A fingerprint of the base weights an adapter was saved against, so it is not loaded onto another base.

Per adapted module: the stored weight's shape and dtype, its quantization (if any) and 64 evenly strided
samples of it (no full pass over the weight; files from before hold 16, and are compared on as many).  Compared on load:

  * both dense: the samples agree within one bf16 rounding (2^-7 relative), so the same base held in fp32,
    bf16 or fp16 matches while a fine-tuned or different base does not;
  * either quantized (an adapter trained on a 4-bit base loaded onto its full-precision base, or the
    reverse): the samples agree within ‖a − b‖ / ‖a‖ ≤ 0.5 (NF4 rounds a normal weight with ~10% relative
    RMS error, a uniform one with ~20%; an unrelated base differs by ~140%), and a note says the outputs
    differ by that rounding.

An init that rewrote W0 (PiSSA, OLoRA) is fingerprinted as the original W0 it came from, which is the base its
saved (converted) adapter applies to.
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from .adapter_file import FINGERPRINT_KEY
from .base import frozen_base
from .layer import LoRALinear

__all__ = ["base_fingerprint", "fingerprint_difference", "check_fingerprint", "SAMPLES"]

SAMPLES = 64
QUANTIZED_TOLERANCE = 0.5


def base_fingerprint(layer: nn.Module, samples: int = SAMPLES) -> dict:
    """{"shape", "dtype", "sample"[, "quant_type"]} of the base weight of a LoRA layer (or of a plain layer)."""
    lora = isinstance(layer, LoRALinear)
    base = layer.base if lora else frozen_base(layer)
    fan_in_fan_out = getattr(base, "fan_in_fan_out", False)
    dense = base.dense_weight().detach()                    # (out, in): a view, or a dequantized copy
    w = dense.T if fan_in_fan_out else dense                 # in storage order
    flat = w.reshape(-1)
    n = flat.numel()
    k = min(samples, n)
    idx = torch.tensor([i * (n - 1) // max(k - 1, 1) for i in range(k)], device=w.device)
    sample = flat[idx].float()
    for a in (layer.adapters.values() if lora else ()):
        if a.init_A is not None:  # + scaling·(B0·A0)[i, j] at the sampled (out, in) positions
            rows, cols = idx // w.shape[1], idx % w.shape[1]
            out_i, in_j = (cols, rows) if fan_in_fan_out else (rows, cols)
            sample = sample + a.scaling * (a.init_B.float()[out_i] * a.init_A.float().T[in_j]).sum(-1)
    record = {"shape": list(w.shape), "dtype": str(base.dtype).removeprefix("torch."), "sample": sample.tolist()}
    if base.quant_type is not None:
        record["quant_type"] = base.quant_type
    return record


def fingerprint_difference(saved: dict, now: dict) -> tuple[str | None, float | None]:
    """(why the two bases differ, or None; for a quantized side, the relative difference of the samples)."""
    if list(saved.get("shape", [])) != now["shape"]:
        return f"shape {tuple(saved.get('shape', []))} vs {tuple(now['shape'])}", None
    a, b = saved.get("sample", []), now["sample"]
    if len(a) != len(b):
        return "weights differ", None
    quant = saved.get("quant_type") or now.get("quant_type")
    if quant is None:
        same = all(abs(x - y) <= 2 ** -7 * max(abs(x), abs(y)) + 1e-6 for x, y in zip(a, b))
        return (None if same else "weights differ"), None
    scale = max(math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b)), 1e-12)
    rel = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b))) / scale
    if rel > QUANTIZED_TOLERANCE:
        return f"weights differ by {rel:.0%}, more than {quant} rounding explains", rel
    return None, rel


def check_fingerprint(layers: dict, metadata: dict, check: bool, source) -> tuple[str, list[str]]:
    """("matched" | "absent" | "skipped", notes) for the modules `layers` {path: LoRA layer or base layer};
    ValueError naming how many modules differ and the fix."""
    text = metadata.get(FINGERPRINT_KEY)
    if text is None:
        return "absent", []
    if not check:
        return "skipped", []
    try:
        saved = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: metadata {FINGERPRINT_KEY!r} is not valid JSON ({e})") from None
    checked = [p for p in layers if p in saved]
    now = {p: base_fingerprint(layers[p], len(saved[p].get("sample", ())) or SAMPLES) for p in checked}
    found = {p: fingerprint_difference(saved[p], now[p]) for p in checked}
    diffs = [(p, why) for p, (why, _) in found.items() if why]
    if diffs:
        raise ValueError(f"{source}: the base model differs from the one the adapter was saved against in "
                         f"{len(diffs)} of {len(checked)} adapted modules (e.g. {diffs[0][0]}: {diffs[0][1]}). "
                         f"Load the base model it was trained on (with no adapter merged into it), or pass "
                         f"check_fingerprint=False if you know the bases are compatible.")
    rounded = {p: rel for p, (_, rel) in found.items() if rel is not None}
    if not rounded:
        return "matched", []
    kinds = {f"{saved[p].get('quant_type') or 'full-precision'} -> {now[p].get('quant_type') or 'full-precision'}"
             for p in rounded}
    return "matched", [f"the adapter was saved against another precision of this base ({', '.join(sorted(kinds))}) "
                       f"in {len(rounded)} modules; their weights differ by up to {max(rounded.values()):.1%} "
                       f"(rounding), so outputs differ a little from those the adapter was trained with"]
