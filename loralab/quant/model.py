"""Quantize a whole model's linear layers to NF4, in place, and measure what that saves.

    every nn.Linear W (out, in)  ->  NF4Linear (4-bit codes + block constants; bias kept, frozen)

except the layers named in `skip` (a name matches a module path exactly or as a dotted suffix, so "lm_head"
matches "model.lm_head"), the model's output head (`get_output_embeddings()`, when the model has one), a layer
whose weight is shared with another module (tied: quantizing one copy would untie them), and the out_proj of
nn.MultiheadAttention (which reads `.weight` directly).  Every layer is quantized before any is replaced, so an
error (a NaN weight, a bad argument) leaves the model as it was; the peak memory is the dense model plus the codes
(about 1/7 of the fp32 weights).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_write
from .linear import NF4Linear

__all__ = ["quantize_model", "model_footprint", "save_quantized", "load_quantized", "dequantize_model"]

QUANT_KEY = "loralab.nf4"   # safetensors metadata: {module path: {blocksize, double_quant, compute_dtype, bias}}


def model_footprint(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each tensor counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def quantize_model(model: nn.Module, *, skip=("lm_head",), blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None) -> dict:
    """Replace the model's nn.Linear layers by NF4Linear in place (see the module docstring for what is left
    dense) and return a report:
        layers_quantized  [module paths]          layers_skipped  {module path: reason}
        params_quantized  weights' parameter count
        weight_bytes_before / weight_bytes_after   bytes of those weights (dense vs codes + constants)
        bits_per_parameter                        weight_bytes_after · 8 / params_quantized
        footprint_before / footprint_after        model_footprint(model) before and after
    compute_dtype: the layers' compute dtype (default: each weight's own dtype)."""
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    footprint_before = model_footprint(model)
    plan, skipped = _plan(model, skip)
    if not plan:
        raise ValueError(f"quantize_model found no nn.Linear to quantize (skipped: {skipped or 'none found'}); "
                         f"check `skip` and that the model has nn.Linear layers")
    layers = {}
    for name, (parent, child) in plan.items():
        try:
            layers[name] = NF4Linear.from_linear(getattr(parent, child), blocksize=blocksize,
                                                 double_quant=double_quant, compute_dtype=compute_dtype)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name}: {e} (the model was not changed)") from e
    params = before = after = 0
    for name, (parent, child) in plan.items():
        weight = getattr(parent, child).weight
        params += weight.numel()
        before += weight.numel() * weight.element_size()
        after += layers[name].nbytes()
        setattr(parent, child, layers[name])
    return {"quant_type": "nf4", "blocksize": blocksize, "double_quant": double_quant,
            "layers_quantized": list(plan), "layers_skipped": skipped, "params_quantized": params,
            "weight_bytes_before": before, "weight_bytes_after": after, "bits_per_parameter": after * 8 / params,
            "footprint_before": footprint_before, "footprint_after": model_footprint(model)}


def _plan(model: nn.Module, skip: tuple[str, ...]) -> tuple[dict, dict[str, str]]:
    """({path: (parent, attribute)} to quantize, {path: reason} left dense)."""
    head = _output_head(model)
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    plan, skipped = {}, {}
    for parent_name, parent in model.named_modules():
        for child, module in parent.named_children():
            if not isinstance(module, nn.Linear):
                continue
            name = f"{parent_name}.{child}" if parent_name else child
            if name in plan or name in skipped:
                continue
            reason = _skip_reason(name, module, parent, skip, head, owners)
            if reason:
                skipped[name] = reason
            else:
                plan[name] = (parent, child)
    return plan, skipped


def _skip_reason(name, module, parent, skip, head, owners) -> str | None:
    if any(name == s or name.endswith("." + s) for s in skip):
        return "in skip"
    if module is head:
        return "output head"
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads its weight directly"
    if module.weight.device.type == "meta":
        return "weight on the meta device (not loaded)"
    sharers = [o for o in owners.get(id(module.weight), []) if o != f"{name}.weight"]
    if sharers:
        return f"weight shared with {sharers[0]}"
    return None


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        return get()
    except (NotImplementedError, AttributeError):
        return None


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the whole (quantized) model to one safetensors file: the 4-bit codes and their constants as uint8 /
    float32 tensors, the rest as it is, and which modules are NF4Linear (with their settings) in the metadata.
    No pickle; the file is renamed into place complete."""
    from safetensors.torch import save_model
    layers = {name: {"blocksize": m.blocksize, "double_quant": m.double_quant, "bias": m.bias is not None,
                     "compute_dtype": str(m.compute_dtype).removeprefix("torch.")}
              for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    if not layers:
        raise ValueError("the model holds no NF4Linear layer; quantize it first (quantize_model) or save it with "
                         "save_pretrained / safetensors as it is")
    meta = {QUANT_KEY: json.dumps(layers, separators=(",", ":"))}
    return atomic_write(path, lambda tmp: save_model(model, tmp, metadata=meta))


def load_quantized(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load a file written by save_quantized into `model` (the same architecture, dense, e.g. freshly built
    from its config): the modules the file names become NF4Linear, then every tensor is loaded (strict).
    Returns the quantization settings per module."""
    from safetensors import safe_open
    from safetensors.torch import load_model
    with safe_open(path, framework="pt") as f:
        layers = json.loads((f.metadata() or {}).get(QUANT_KEY, "null") or "null")
    if not layers:
        raise ValueError(f"{path}: not written by save_quantized (no {QUANT_KEY!r} metadata)")
    for name, cfg in layers.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        dense = getattr(owner, child, None)
        if not isinstance(dense, (nn.Linear, NF4Linear)):
            raise ValueError(f"{path} quantizes {name}, which this model does not have as a Linear "
                             f"({type(dense).__name__}); load it into the architecture it was saved from")
        setattr(owner, child, NF4Linear(dense.in_features, dense.out_features, cfg["bias"],
                                        blocksize=cfg["blocksize"], double_quant=cfg["double_quant"],
                                        compute_dtype=getattr(torch, cfg["compute_dtype"]),
                                        device=next(dense.buffers(), next(dense.parameters())).device))
    missing, unexpected = load_model(model, path, strict=True)
    return layers


def dequantize_model(model: nn.Module) -> list[str]:
    """Replace every NF4Linear by an nn.Linear holding its dequantized weight (in its compute dtype), in place;
    returns their paths."""
    done = []
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.to_linear())
            done.append(name)
    return done
