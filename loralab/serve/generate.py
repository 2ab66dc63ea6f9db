"""One forward for many requests: left-padded generation with a KV cache, and classification, rows routed by adapter.

Causal LM, a batch of prompts of different lengths (row i through adapter names[i], None: the base):

    input_ids      (B, L)  each prompt right-aligned, pad tokens on the left
    attention_mask (B, L)  0 on the padding, so no real token attends to it
    position_ids   (B, L)  cumsum(mask) - 1: every prompt's first real token is at position 0

so each row's logits are those of its prompt alone (up to float summation order).  Decoding feeds one token
per row per step with the transformers cache (past_key_values), the mask grown by one column and each row's
position + 1.  Rows are sorted by adapter first, so the LoRA layers take the grouped (SGMV) path, and put
back in request order at the end.  Each row samples with its own torch.Generator seeded by the request, so a
request's answer does not depend on the batch it was served in.

Sampling (per row): temperature 0 is greedy (argmax); otherwise softmax(logits / temperature) restricted to
the smallest set of top tokens whose probability reaches top_p (nucleus sampling, Holtzman et al. 2019).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..routing import adapter_rows

__all__ = ["Sampling", "generate_rows", "classify_rows", "next_tokens"]


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens: max_tokens new tokens, temperature (0: greedy), top_p, seed."""
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def generator(self) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()   # a fresh random seed
            return g
        return g.manual_seed(self.seed)


def next_tokens(logits: torch.Tensor, sampling: Sequence[Sampling], generators: Sequence) -> list[int]:
    """One token per row.  logits: (B, vocab)."""
    out = []
    for row, s, g in zip(logits.float(), sampling, generators):
        if s.temperature == 0:
            out.append(int(row.argmax()))
            continue
        probs = torch.softmax(row / s.temperature, -1)
        if s.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < s.top_p   # the top tokens until top_p is reached
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        out.append(int(torch.multinomial(probs, 1, generator=g)))
    return out


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def _order(names: Sequence[str | None]) -> list[int]:
    """Row order grouping each adapter's rows together (stable)."""
    first = {n: i for i, n in reversed(list(enumerate(names)))}
    return sorted(range(len(names)), key=lambda i: first[names[i]])


def generate_rows(model: nn.Module, prompts: Sequence[Sequence[int]], names: Sequence[str | None],
                  sampling: Sequence[Sampling], *, pad_id: int = 0, eos_id=None) -> list[tuple[list[int], str]]:
    """[(new tokens, finish reason "stop" | "length")] for each prompt, row i through adapter names[i]."""
    order = _order(names)
    prompts, names, sampling = [prompts[i] for i in order], [names[i] for i in order], [sampling[i] for i in order]
    eos = set() if eos_id is None else set(eos_id if isinstance(eos_id, (list, tuple)) else [eos_id])
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = [s.generator() for s in sampling]
    tokens: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    reasons = ["length"] * len(prompts)
    past, extra = None, _cache_kwargs(model)
    with torch.inference_mode(), adapter_rows(model, names):
        for step in range(max(s.max_tokens for s in sampling)):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        **{extra["cache"]: past}, **extra["keep"])
            past = getattr(out, extra["cache"])
            chosen = next_tokens(out.logits[:, -1], sampling, generators)
            for i, t in enumerate(chosen):
                if done[i]:
                    continue
                tokens[i].append(t)
                if t in eos:
                    done[i], reasons[i] = True, "stop"
                elif len(tokens[i]) >= sampling[i].max_tokens:
                    done[i] = True
            if all(done):
                break
            ids = torch.tensor(chosen, dtype=torch.long, device=device)[:, None]
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], 1)
            positions = positions[:, -1:] + 1
    results = [None] * len(order)
    for row, i in enumerate(order):
        results[i] = (tokens[row], reasons[row])
    return results


def _cache_kwargs(model: nn.Module) -> dict:
    """The forward's name for the KV cache (transformers 5: `cache`; before: `past_key_values`), and
    logits_to_keep=1 (only the last position's logits are needed) when the model takes it."""
    params = inspect.signature(type(model).forward).parameters
    return {"cache": "cache" if "cache" in params else "past_key_values",
            "keep": {"logits_to_keep": 1} if "logits_to_keep" in params else {}}


def classify_rows(model: nn.Module, inputs: Sequence[Sequence[int]], names: Sequence[str | None]) -> list[torch.Tensor]:
    """Logits (num_labels,) for each input, row i through adapter names[i].  Inputs of one length share a
    forward (no padding, so any pooling the model does — last token, first token, mean — is exact)."""
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for i, x in enumerate(inputs):
        by_length.setdefault(len(x), []).append(i)
    results: list = [None] * len(inputs)
    with torch.inference_mode():
        for rows in by_length.values():
            rows = [rows[j] for j in _order([names[i] for i in rows])]
            ids = torch.tensor([inputs[i] for i in rows], dtype=torch.long, device=device)
            with adapter_rows(model, [names[i] for i in rows]):
                logits = model(input_ids=ids).logits.float().cpu()
            for j, i in enumerate(rows):
                results[i] = logits[j]
    return results
