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

from .inject import check_adapter_names, lora_layers, set_module
from .saved import saved_modules

__all__ = ["merge", "unmerge", "merge_and_unload", "untie_adapted_weights"]


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


def merge_and_unload(model: nn.Module, adapter_names: str | list[str] | None = None) -> nn.Module:
    """Merge (active or named adapters) and put the plain base layers back: no LoRA module remains, and each
    module to save is replaced by the active adapter's copy.  Adapters not merged are dropped.  Returns the
    model (changed in place)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; nothing to merge and unload")
    names = _known_names(model, adapter_names)
    plan = {path: tuple(layer.active if names is None else [n for n in names if n in layer.adapters])
            for path, layer in layers.items()}
    for path, todo in plan.items():
        _check_finite(path, layers[path], todo)
        _check_dense(path, layers[path], todo)
    untie_adapted_weights(model)
    for path, layer in layers.items():
        layer.merge(plan[path])  # skips adapters already merged
    for path, layer in layers.items():
        set_module(model, path, layer.base_layer)
    for path, module in saved_modules(model).items():  # a module to save: the active adapter's copy stays
        set_module(model, path, module.in_use())
    return model


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
