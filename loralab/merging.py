"""Fold adapters into the base weights and back.

    merge:    W' = W0 + (α/r)·B·A        unmerge:  W0 = W' - (α/r)·B·A

Computed in float32 and cast back to the base dtype (so bf16/fp16 bases lose at most one rounding), and
refusing to write NaN/Inf.  A base weight shared with another module (GPT-2's and Gemma's lm_head is the input
embedding's tensor) is untied first: the other module gets its own copy, so merging changes only what the
adapter changed and merged == unmerged.  Every layer is checked before any weight changes, so an error leaves the model
as it was.  In fp32, unmerge restores W0 to within float rounding; in half precision it cannot be exact,
which is why unmerging a half-precision base warns.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .base import frozen_base
from .inject import check_adapter_names, lora_layers, set_module
from .saved import saved_modules

__all__ = ["merge", "unmerge", "merge_and_unload", "requantize_and_unload", "untie_adapted_weights", "dense_copy"]


def merge(model: nn.Module, adapter_names: str | list[str] | None = None) -> nn.Module:
    """Merge the active adapters (or `adapter_names`) into the base weights, on every LoRA layer."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to merge; call add_lora or load_adapter first")
    names = _known_names(model, adapter_names)
    plan = []
    for path, layer in layers.items():
        todo = tuple(layer.active if names is None else [n for n in names if n in layer.adapters])
        already = [n for n in todo if layer.adapters[n].merged]
        if already:
            raise RuntimeError(f"adapter {already[0]!r} is already merged into {path}; merging twice would "
                               f"add ΔW twice. Call unmerge(model) first.")
        _check_finite(path, layer, todo)
        _check_dense(path, layer, todo)
        plan.append((layer, todo))
    untie_adapted_weights(model)
    for layer, todo in plan:
        layer.merge(todo)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter from its base weight again."""
    layers = lora_layers(model)
    merged = [l for l in layers.values() if any(a.merged for a in l.adapters.values())]
    if not merged:
        raise RuntimeError("no adapter is merged, so there is nothing to unmerge")
    if any(l.base.dtype in (torch.float16, torch.bfloat16) for l in merged):
        warnings.warn("unmerging a half-precision base restores W0 only up to bf16/fp16 rounding", stacklevel=2)
    for layer in merged:
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, adapter_names: str | list[str] | None = None, *,
                     dequantize: bool = False) -> nn.Module:
    """Merge (active or named adapters) and put the plain base layers back: no LoRA module remains, and each
    module to save is replaced by the active adapter's copy.  Adapters not merged are dropped.

    dequantize=True: a quantized base (NF4, bitsandbytes) is first replaced by a dense nn.Linear holding
    dequant(Wq), so the merged weight is dequant(Wq) + scaling·B·A — the base the adapter was trained
    against — and every other quantized layer is dequantized too: the result is a dense model.  Without it,
    a quantized base is refused (merging would requantize and lose the update).  Returns the model
    (changed in place)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; nothing to merge and unload")
    names = _known_names(model, adapter_names)
    plan = {path: tuple(layer.active if names is None else [n for n in names if n in layer.adapters])
            for path, layer in layers.items()}
    for path, todo in plan.items():
        _check_finite(path, layers[path], todo)
        if not dequantize:
            _check_dense(path, layers[path], todo)
    if dequantize:
        for layer in layers.values():
            if layer.base.quant_type is not None:
                layer.replace_base(dense_copy(layer.base_layer, layer.base))
    untie_adapted_weights(model)
    for path, layer in layers.items():
        layer.merge(plan[path])  # skips adapters already merged
    for path, layer in layers.items():
        set_module(model, path, layer.base_layer)
    for path, module in saved_modules(model).items():  # a module to save: the active adapter's copy stays
        set_module(model, path, module.in_use())
    if dequantize:
        for path, module in list(model.named_modules()):
            base = _quantized(module)
            if base is not None:
                set_module(model, path, dense_copy(module, base))
    return model


def dense_copy(module: nn.Module, base=None) -> nn.Linear:
    """An nn.Linear with the dequantized weight of a quantized linear base (in its compute dtype) and its bias."""
    base = base or frozen_base(module)
    bias = getattr(module, "bias", None)
    linear = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device="meta", dtype=base.dtype)
    linear.weight = nn.Parameter(base.dense_weight().detach().to(base.dtype).clone(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(base.dtype).clone(), requires_grad=False)
    return linear.train(module.training)


def _quantized(module: nn.Module):
    """The FrozenBase of a quantized linear layer, or None."""
    try:
        base = frozen_base(module)
    except TypeError:
        return None
    return base if base.quant_type is not None else None


def requantize_and_unload(model: nn.Module, adapter_names: str | list[str] | None = None, *, probe_rows: int = 64,
                          seed: int = 0) -> dict:
    """The explicit path back to a quantized model: each quantized base takes W = dequant(Wq) + scaling·B·A,
    requantized (the base's `requantize_`), and the LoRA layers are removed.  Returns what that cost, measured
    per layer and overall: the weight error ‖Ŵ_new − W‖_F / ‖W‖_F, the error relative to the update
    ‖Ŵ_new − W‖_F / ‖ΔW‖_F (above 1: rounding lost more than the adapter changed), and the output error
    ‖(Ŵ_new − W)·x‖ / ‖W·x‖ on `probe_rows` random inputs x ~ N(0, 1).  Dense bases merge as usual."""
    layers = lora_layers(model)
    names = _known_names(model, adapter_names)
    todo = {p: tuple(l.active if names is None else [n for n in names if n in l.adapters]) for p, l in layers.items()}
    quantized = {p: l for p, l in layers.items() if l.base.quant_type is not None and todo[p]}
    missing = [p for p, l in quantized.items() if not hasattr(l.base, "requantize_")]
    if not quantized or missing:
        raise ValueError(f"requantize_and_unload needs LoRA layers on quantized bases that can requantize "
                         f"({'none found' if not quantized else f'{missing[0]} cannot'}); use merge_and_unload")
    for path in quantized:
        _check_finite(path, layers[path], todo[path])
    gen = torch.Generator().manual_seed(seed)
    per_layer = {}
    for path, layer in quantized.items():
        W_old = layer.base.dense_weight().float()
        delta = sum(layer.adapters[n].delta_weight().to(W_old.device) for n in todo[path])
        W = W_old + delta
        report = layer.base.requantize_(W)
        err = layer.base.dense_weight().float() - W
        x = torch.randn(probe_rows, layer.in_features, generator=gen).to(W.device)
        report["output_rel_error"] = ((x @ err.T).norm() / (x @ W.T).norm().clamp_min(1e-30)).item()
        report["error_vs_delta"] = (err.norm() / delta.norm().clamp_min(1e-30)).item()
        per_layer[path] = report
    untie_adapted_weights(model)
    for path, layer in layers.items():
        if path not in quantized:
            _check_finite(path, layer, todo[path])
            layer.merge(todo[path])  # a dense base (a layer left unquantized) merges as usual
        set_module(model, path, layer.base_layer)
    for path, module in saved_modules(model).items():
        set_module(model, path, module.in_use())
    worst = max(per_layer.values(), key=lambda r: r["output_rel_error"])
    return {"layers": per_layer, "max_output_rel_error": worst["output_rel_error"],
            "max_error_vs_delta": max(r["error_vs_delta"] for r in per_layer.values()),
            "max_weight_rel_fro": max(r["weight_rel_fro"] for r in per_layer.values())}


def untie_adapted_weights(model: nn.Module) -> list[str]:
    """Give every other holder of an adapted base weight its own copy; returns their paths.

    GPT-2 and many small models tie lm_head.weight to the input embedding: merging an embedding adapter
    into the shared tensor would silently change the output head too."""
    owners = {id(layer.base_layer): layer.base_layer for layer in lora_layers(model).values()}
    adapted = {id(p) for m in owners.values() for p in m.parameters(recurse=False)}
    untied = []
    for path, module in model.named_modules():
        if id(module) in owners:
            continue
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) in adapted:
                setattr(module, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
                untied.append(f"{path}.{name}")
    config = getattr(model, "config", None)
    if untied and config is not None:
        get_text = getattr(config, "get_text_config", None)
        for c in {id(c): c for c in (config, get_text() if callable(get_text) else config)}.values():
            c.tie_word_embeddings = False  # or save_pretrained would drop the copy and re-tie on load
    return untied


def _check_finite(path: str, layer, names) -> None:
    for n in names:
        if not all(torch.isfinite(p).all() for p in layer.adapters[n].parameters()):
            raise ValueError(f"adapter {n!r} at {path} holds NaN/Inf; refusing to merge it into the base")


def _check_dense(path: str, layer, names) -> None:
    """Merging into a quantized base would requantize W0 + ΔW, and the rounding would swallow most of ΔW:
    never done silently."""
    if names and layer.base.quant_type is not None:
        raise ValueError(f"{path} has a quantized ({layer.base.quant_type}) base: merging would requantize "
                         f"W0 + ΔW and lose most of the update. Keep the adapter unmerged, or dequantize the base "
                         f"first (merge_and_unload(model, dequantize=True) for NF4).")


def _known_names(model: nn.Module, adapter_names) -> tuple[str, ...] | None:
    """None (the active adapters) or the named ones, every one of which must exist."""
    return None if adapter_names is None else check_adapter_names(model, adapter_names)
