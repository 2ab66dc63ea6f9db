"""save_adapter: one adapter of a model, written in PEFT's format (adapter_file.py) with its base fingerprint.

What is written: the adapter's factors (an init that rewrote W0 — PiSSA, OLoRA — as the rank-2r plain adapter
relative to the original W0), its own copies of modules to save, the biases its config trains, and an
adapter_config.json whose target_modules / rank_pattern / alpha_pattern select exactly these modules with
exactly these scalings under PEFT's matching rules.  Each file is renamed into place complete (atomic.py).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .adapter_file import CONFIG_NAME, FINGERPRINT_KEY, PREFIX, SCALING_FIELDS, SCALING_KEY, WEIGHTS_NAME
from .atomic import atomic_write, atomic_write_text
from .base import is_conv1d
from .config import BIAS_CHOICES
from .fingerprint import base_fingerprint
from .inject import base_view_modules, check_adapter_names, check_unmerged, lora_layers
from .layer import LoRAEmbedding, LoRALinear
from .saved import SavedModule, inside_saved, saved_modules

__all__ = ["save_adapter"]


def _config_to_peft(model: nn.Module, layers: dict[str, LoRALinear], factors: dict, adapter_name: str,
                    modules_to_save, bias: str, base_model_name_or_path, task_type) -> dict:
    """adapter_config.json for one adapter: per-module rank/alpha differences go to rank_pattern/alpha_pattern
    (keys are escaped full paths, PEFT matches them as a suffix regex), target_modules to the shortest
    name suffixes that select exactly these modules under PEFT's matching rule.  `factors` holds the
    (A, B) written per module, whose rank may differ from the adapter's (PiSSA/OLoRA: 2r, same scaling)."""
    adapters = {p: l.adapters[adapter_name] for p, l in layers.items()}
    rank = {p: factors[p][0].shape[0] for p in layers}
    rslora = {a.use_rslora for a in adapters.values()}
    use_rslora = rslora == {True}
    # a per-module alpha that reproduces each scaling exactly at the rank written, even if rsLoRA was mixed
    alpha = {p: (a.lora_alpha * (rank[p] / a.r if not use_rslora else math.sqrt(rank[p] / a.r))
                 if len(rslora) == 1 else a.scaling * rank[p]) for p, a in adapters.items()}
    r0 = Counter(rank.values()).most_common(1)[0][0]
    alpha0 = Counter(alpha.values()).most_common(1)[0][0]
    dropout = Counter(a.lora_dropout for a in adapters.values()).most_common(1)[0][0]
    saved = list(modules_to_save) if modules_to_save else None
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True,
        "r": r0, "lora_alpha": alpha0, "lora_dropout": dropout, "use_rslora": use_rslora,
        "target_modules": _target_spec(model, set(layers), saved),
        "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {re.escape(p): r for p, r in rank.items() if r != r0},
        "alpha_pattern": {re.escape(p): a for p, a in alpha.items() if a != alpha0},
        "fan_in_fan_out": any(is_conv1d(l.base_layer) for l in layers.values()),
        "bias": bias, "modules_to_save": saved, "init_lora_weights": True,
        "use_dora": False, "lora_bias": False, "layer_replication": None, "megatron_config": None,
        "megatron_core": "megatron.core", "loftq_config": {},
    }


def _target_spec(model: nn.Module, targets: set[str], modules_to_save) -> list[str] | str:
    """Shortest dotted suffixes (PEFT list rule: exact path or '.'+suffix) selecting exactly `targets`;
    a full-match regex over the paths if some path cannot be singled out by a suffix."""
    paths = [p for p, _ in base_view_modules(model) if not inside_saved(p, modules_to_save)]
    cache: dict[str, bool] = {}

    def selects_only_targets(suffix: str) -> bool:
        if suffix not in cache:
            cache[suffix] = all(p in targets for p in paths if p == suffix or p.endswith("." + suffix))
        return cache[suffix]

    chosen: dict[str, None] = {}
    for path in (p for p in paths if p in targets):
        parts = path.split(".")
        suffix = next((".".join(parts[-k:]) for k in range(1, len(parts) + 1)
                       if selects_only_targets(".".join(parts[-k:]))), None)
        if suffix is None:
            return "(" + "|".join(re.escape(p) for p in sorted(targets)) + ")"
        chosen[suffix] = None
    return list(chosen)


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", *,
                 modules_to_save=None, bias: str | None = None, base_model_name_or_path: str | None = None,
                 task_type: str | None = None) -> Path:
    """Write adapter `adapter_name` to `directory` in PEFT's format (loadable by PeftModel.from_pretrained).

    What the adapter trains is saved by default: its copies of modules to save (add_lora's modules_to_save)
    and the biases its config trains (bias).  modules_to_save: extra module names (PEFT's rule) whose full
    weights travel too, e.g. ["lm_head"]; bias: "none" | "all" | "lora_only" overrides the adapter's own.
    An adapter whose init rewrote W0 (PiSSA, OLoRA) is written as the plain rank-2r LoRA adapter
    [A; A0], [B, -B0] (PEFT's conversion), which gives the trained outputs on the *original* base in any tool.
    Each file is written to a temporary name and renamed into place, so an interrupted save never leaves
    a half-written file where a complete one was.  Returns the directory."""
    layers = {p: l for p, l in lora_layers(model).items() if adapter_name in l.adapters}
    copies = {p: m for p, m in saved_modules(model).items() if adapter_name in m.modules_to_save}
    check_adapter_names(model, adapter_name)
    check_unmerged(model, "saving, so that the saved fingerprint describes the unmodified base", paths=layers)
    bias = bias if bias is not None else next(iter(layers.values())).adapters[adapter_name].bias_mode
    if bias not in BIAS_CHOICES:
        raise ValueError(f"bias={bias!r}; choose 'none', 'all' or 'lora_only'")
    extra = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save or ())
    names = list(dict.fromkeys([p.rpartition(".")[2] if p.rpartition(".")[2] and _unique_suffix(model, p)
                                else p for p in copies] + extra))
    factors = {p: l.adapters[adapter_name].update_factors() for p, l in layers.items()}
    tensors = _adapter_tensors(layers, factors, adapter_name)
    tensors.update(_extra_tensors(model, layers, copies, adapter_name, extra, bias))
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = _config_to_peft(model, layers, factors, adapter_name, names, bias, base_model_name_or_path, task_type)
    fingerprint = {p: base_fingerprint(l) for p, l in layers.items()}
    metadata = {"format": "pt", FINGERPRINT_KEY: json.dumps(fingerprint, separators=(",", ":")),
                SCALING_KEY: json.dumps({k: config[k] for k in SCALING_FIELDS}, sort_keys=True)}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def _unique_suffix(model: nn.Module, path: str) -> bool:
    """Whether the last name of `path` selects that module alone under PEFT's modules_to_save rule."""
    last = path.rpartition(".")[2]
    return [p for p, _ in base_view_modules(model) if p.endswith(last)] == [path]


def _adapter_tensors(layers: dict[str, LoRALinear], factors: dict, adapter_name: str) -> dict[str, torch.Tensor]:
    out = {}
    for path, layer in layers.items():
        names = (("lora_embedding_A", "lora_embedding_B") if isinstance(layer, LoRAEmbedding)
                 else ("lora_A.weight", "lora_B.weight"))
        for name, t in zip(names, factors[path]):
            if not torch.isfinite(t).all():
                raise ValueError(f"adapter {adapter_name!r} at {path}: {name} holds NaN/Inf; refusing to save it")
            out[f"{PREFIX}{path}.{name}"] = t.detach().to("cpu").contiguous()
    return out


def _extra_tensors(model: nn.Module, layers, copies: dict[str, SavedModule], adapter_name: str, extra,
                   bias: str) -> dict[str, torch.Tensor]:
    """Full tensors saved next to the factors, under PEFT's keys (clones: safetensors refuses shared memory):
    the adapter's copies of modules to save, modules named in `extra` as they are now, and trained biases."""
    out = {}
    for path, module in copies.items():
        out.update({f"{PREFIX}{path}.{k}": v.detach().to("cpu").clone()
                    for k, v in module.modules_to_save[adapter_name].state_dict().items()})
    for m in extra:
        found = [(p, mod) for p, mod in base_view_modules(model) if p.endswith(m) and p not in copies]
        if not found and not any(p.endswith(m) for p in copies):
            raise ValueError(f"modules_to_save entry {m!r} matches no module in the model")
        for path, module in found:
            module = module.in_use() if isinstance(module, SavedModule) else module
            out.update({f"{PREFIX}{path}.{k}": v.detach().to("cpu").clone()
                        for k, v in module.state_dict().items() if ".adapters." not in f".{k}"})
    if bias != "none":
        for path, module in base_view_modules(model):
            lora = isinstance(module, LoRALinear)
            if isinstance(module, SavedModule) or not (bias == "all" or (lora and path in layers)):
                continue
            param = getattr(module.base_layer if lora else module, "bias", None)
            if isinstance(param, nn.Parameter):
                out[f"{PREFIX}{path}{'.base_layer' if lora else ''}.bias"] = param.detach().to("cpu").clone()
    return out
