"""load_adapter: put an adapter file (ours or PEFT's) onto a model, strictly and transactionally.

Everything is checked before the model is touched: the file itself (adapter_file.read_adapter), that every
tensor names something the config targets in this model (a LoRA factor, a module to save, a trained bias, an
embedding or head weight PEFT saves), that every targeted module gets its A and B, that every shape fits, and
that the base is the one the adapter was saved against (fingerprint.py).  Any failure after that point rolls
the model back, so a failed load leaves it as it was.  PiSSA / OLoRA files are replayed as PEFT replays them:
W0 becomes the same residual before the factors are loaded.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .adapter_file import PREFIX, check_same_save, parse_factor_key, read_adapter
from .base import frozen_base, module_dims
from .config import LoraConfig
from .fingerprint import check_fingerprint as _fingerprint_check
from .functional import adapter_dtype
from .inits import rewrites_base
from .inject import (active_adapters, check_new_adapter_name, find_saved_targets, find_targets, set_adapter,
                     set_module, wrap_module, wrap_saved)
from .layer import LoRAAdapter, LoRAEmbedding, LoRALinear
from .saved import SavedModule

__all__ = ["load_adapter", "LoadReport"]


@dataclass(frozen=True)
class LoadReport:
    """What load_adapter did.  fingerprint: "matched", "absent" (the file has none, e.g. written by PEFT)
    or "skipped" (check_fingerprint=False)."""
    adapter_name: str
    path: str
    modules: int              # LoRA layers that received A and B
    tensors: int              # tensors read from the file
    extra_tensors: int        # modules_to_save / bias / embedding tensors loaded
    fingerprint: str
    config: LoraConfig
    active: bool = True       # whether the adapter was activated
    notes: tuple = ()         # accepted differences (e.g. a quantized copy of the saved base)

    def to_dict(self) -> dict:
        return {"adapter_name": self.adapter_name, "path": self.path, "modules": self.modules,
                "tensors": self.tensors, "extra_tensors": self.extra_tensors, "fingerprint": self.fingerprint,
                "active": self.active, "notes": list(self.notes)}


@dataclass
class _Plan:
    """Everything load_adapter will write, checked before the model is touched."""
    factors: dict          # module path -> (A (r, in), B (out, r))
    extras: list           # [(key, model tensor, value)]: written in place (biases, embedding weights)
    missing: list
    unexpected: list
    misshaped: list
    saved: dict = None     # module to save path -> {state_dict key: value} for this adapter's own copy


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", *,
                 strict: bool = True, check_fingerprint: bool = True, allow_pickle: bool = False,
                 trainable: bool = False, activate: bool | None = None) -> LoadReport:
    """Load an adapter saved by save_adapter or by PEFT's save_pretrained into `model` as `adapter_name`.

    activate: None (default) activates the new adapter only if no adapter is active yet, so loading never
    silently sums two adapters (PEFT's rule); True makes it the active adapter; False leaves it inactive
    (set_adapter(model, name) later).  Modules to save in the file get a copy of their own for this adapter.
    New layers take the mode (train/eval) of the modules they wrap.  strict=False turns missing/unexpected
    tensors into warnings (shape and value errors always raise).  trainable=False leaves its parameters
    frozen.  On any error the model is left as it was."""
    check_new_adapter_name(model, adapter_name)
    config, tensors, metadata = read_adapter(directory, allow_pickle=allow_pickle, same_save=False)
    source = metadata["source"]
    targets = find_targets(model, config)
    modules = dict(model.named_modules())
    plan = _plan(model, modules, config, targets, tensors)
    problems = _describe(plan, strict)
    if problems:
        raise ValueError(f"cannot load {source} (the model was not changed):\n{problems}\nFix: load it onto the "
                         f"base model it was trained for" + ("" if plan.misshaped or not strict else
                                                              ", or pass strict=False to skip these keys"))
    check_same_save(config, metadata, source)  # after the shape report, which names the keys
    for note in [f"skipping: {x}" for x in plan.missing + plan.unexpected] if not strict else []:
        warnings.warn(note, stacklevel=2)
    fingerprint, notes = _fingerprint_check({p: modules[p] for p in targets}, metadata, check_fingerprint, source)
    for note in notes:
        warnings.warn(f"{source}: {note}", stacklevel=2)
    before = active_adapters(model)
    _apply(model, modules, config, adapter_name, targets, plan, trainable)
    activate = not before if activate is None else activate
    set_adapter(model, [adapter_name] if activate else before)
    from .routing import accept_adapter_names  # model(..., adapter_names=[...]) routes rows (PEFT's spelling)
    accept_adapter_names(model)
    return LoadReport(adapter_name, str(source), len(plan.factors), len(tensors),
                      len(plan.extras) + sum(len(v) for v in plan.saved.values()), fingerprint, config, activate,
                      tuple(notes))


def _plan(model: nn.Module, modules: dict, config: LoraConfig, targets: list[str], tensors: dict) -> _Plan:
    saved_paths = find_saved_targets(model, config)
    plan = _Plan({}, [], [], [], [], {p: {} for p in saved_paths})
    found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # path -> {"A"/"B": (key, tensor)}
    for key, value in tensors.items():
        rel = key.removeprefix(PREFIX)
        owner = next((p for p in saved_paths if rel.startswith(p + ".")), None)
        if owner is not None:
            _plan_saved(plan, modules[owner], owner, key, rel[len(owner) + 1:], value)
            continue
        parsed = parse_factor_key(key)
        if parsed is None:
            _plan_extra(plan, model, modules, config, targets, key, value)
            continue
        path, which, embedding = parsed
        if path not in targets:
            why = "not targeted by adapter_config.json" if path in modules else "no such module in the model"
            plan.unexpected.append(f"{key}: {why}")
            continue
        if embedding != _is_embedding(modules[path]):
            want = "lora_embedding_A / lora_embedding_B" if not embedding else "lora_A.weight / lora_B.weight"
            plan.misshaped.append(f"{key}: {type(modules[path]).__name__} at {path} takes {want}")
            continue
        found.setdefault(path, {})[which] = (key, value)
    for path in targets:
        got = found.get(path, {})
        if len(got) < 2:
            lacking = [n for n, k in zip(("lora_A", "lora_B"), "AB") if k not in got]
            plan.missing.append(f"{path}: no {' / '.join(lacking)} in the file")
            continue
        in_f, out_f = module_dims(modules[path])
        r, _ = config.rank_and_alpha(path)
        for k, want in (("A", (r, in_f)), ("B", (out_f, r))):
            key, value = got[k]
            if tuple(value.shape) != want:
                plan.misshaped.append(f"{key}: file {tuple(value.shape)}, expected {want} (r={r} from the "
                                      f"config, in={in_f}, out={out_f} from the model)")
        plan.factors[path] = (got["A"][1], got["B"][1])
    for path, values in plan.saved.items():
        original = _original(modules[path])
        plan.missing += [f"{PREFIX}{path}.{k}: part of module to save {path}, absent from the file"
                         for k in original.state_dict() if k not in values]
    return plan


def _original(module: nn.Module) -> nn.Module:
    return module.original_module if isinstance(module, SavedModule) else module


def _plan_saved(plan: _Plan, module: nn.Module, path: str, key: str, rest: str, value) -> None:
    """A tensor of a module to save: this adapter's copy (`<path>.<name>`), or one of the two extra keys PEFT
    writes with bias="all": `<path>.original_module.bias` (the original's own bias, written back into it, as
    PEFT does) and `<path>.modules_to_save.bias` (a duplicate of `<path>.bias`, ignored as PEFT ignores it)."""
    original = _original(module)
    state = original.state_dict()
    if rest in state:
        if state[rest].shape != value.shape:
            plan.misshaped.append(f"{key}: file {tuple(value.shape)}, model {tuple(state[rest].shape)}")
        else:
            plan.saved[path][rest] = value
    elif rest.startswith("original_module.") and rest.removeprefix("original_module.") in state:
        tensor = original.get_parameter(rest.removeprefix("original_module."))
        if tensor.shape != value.shape:
            plan.misshaped.append(f"{key}: file {tuple(value.shape)}, model {tuple(tensor.shape)}")
        else:
            plan.extras.append((key, tensor, value))
    elif not (rest.startswith("modules_to_save.") and rest.removeprefix("modules_to_save.") in state):
        plan.unexpected.append(f"{key}: {path} (a module to save) has no tensor {rest!r}")


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, (nn.Embedding, LoRAEmbedding))


def _plan_extra(plan: _Plan, model, modules: dict, config: LoraConfig, targets, key: str, value) -> None:
    """A full tensor PEFT saves next to the factors and writes into the model itself: trained biases
    (bias != "none"), or the weight of a targeted embedding / output head (PEFT's save_embedding_layers,
    e.g. `lm_head.base_layer.weight` when lm_head is a target)."""
    rel = key.removeprefix(PREFIX)
    owner, _, leaf = rel.rpartition(".")
    wrapped = owner.removesuffix(".base_layer")
    embeddings = {id(m) for m in (_call(model, "get_input_embeddings"), _call(model, "get_output_embeddings"))
                  if m is not None}
    module = modules.get(wrapped)
    allowed = ((leaf == "bias" and (config.bias == "all" or (config.bias == "lora_only" and wrapped in targets)))
               or (leaf == "weight" and wrapped in targets and _is_embedding(module))
               or (leaf == "weight" and module is not None and id(module) in embeddings))
    if isinstance(module, LoRALinear):
        module = module.base_layer
    tensor = module._parameters.get(leaf) if module is not None and owner in (wrapped, wrapped + ".base_layer") \
        else None
    if not allowed or not isinstance(tensor, torch.Tensor):
        why = "no such tensor in the model" if not isinstance(tensor, torch.Tensor) else \
            "neither a LoRA factor nor part of modules_to_save / bias in adapter_config.json"
        plan.unexpected.append(f"{key}: {why}")
    elif tensor.shape != value.shape:
        plan.misshaped.append(f"{key}: file {tuple(value.shape)}, model {tuple(tensor.shape)}")
    else:
        plan.extras.append((key, tensor, value))


def _call(model, name):
    fn = getattr(model, name, None)
    try:
        return fn() if callable(fn) else None
    except NotImplementedError:
        return None


def _describe(plan: _Plan, strict: bool, limit: int = 12) -> str:
    groups = [("mis-shaped or invalid", plan.misshaped)]
    if strict:
        groups += [("missing (targeted by the config, absent from the file)", plan.missing),
                   ("unexpected (in the file, not loadable into this model)", plan.unexpected)]
    lines = []
    for title, items in groups:
        if items:
            lines.append(f"  {title}: {len(items)}")
            lines += [f"    {x}" for x in items[:limit]] + ([f"    ... and {len(items) - limit} more"]
                                                          if len(items) > limit else [])
    return "\n".join(lines)


def _apply(model: nn.Module, modules: dict, config: LoraConfig, name: str, targets: list[str], plan: _Plan,
           trainable: bool) -> None:
    """Inject and fill the adapter; on any exception undo everything and re-raise."""
    replay = rewrites_base(config.init_lora_weights)  # PEFT replays these on load: W0 becomes a residual
    bases = [modules[p].base if isinstance(modules[p], LoRALinear) else frozen_base(modules[p]) for p in targets]
    base_backup = [(b, b.dense_weight().detach().clone()) for b in bases] if replay else []
    done, copies, extra_backup = [], [], []
    try:
        for path in targets:
            module = modules[path]
            layer = module if isinstance(module, LoRALinear) else wrap_module(model, path, module)
            done.append((path, module, layer))
            _add_loaded(layer, name, config, path, plan.factors.get(path), trainable)
        for path, values in plan.saved.items():
            wrapper = wrap_saved(model, path)
            copies.append((path, modules[path], wrapper))
            with torch.no_grad():
                wrapper.add_copy(name, trainable=trainable).load_state_dict(values, strict=False)
        with torch.no_grad():
            for _, tensor, value in plan.extras:
                extra_backup.append((tensor, tensor.detach().clone()))
                tensor.copy_(value)
    except BaseException:
        for path, module, wrapper in reversed(copies):
            wrapper.remove_copy(name)
            if wrapper is not module:
                set_module(model, path, module)
        for path, module, layer in reversed(done):
            layer.remove_adapter(name)
            if layer is not module:
                set_module(model, path, module)
        with torch.no_grad():
            for tensor, old in reversed(extra_backup):
                with contextlib.suppress(Exception):  # restore all the others even if one write fails again
                    tensor.copy_(old)
            for base, old in reversed(base_backup):
                with contextlib.suppress(Exception):
                    base.set_dense_weight(old)
        raise
    if trainable:
        for _, tensor, _ in plan.extras:
            if isinstance(tensor, nn.Parameter):
                tensor.requires_grad_(True)


def _add_loaded(layer: LoRALinear, name: str, config: LoraConfig, path: str, factors, trainable: bool) -> None:
    """Adapter `name` on `layer` holding the loaded factors (used as they are when the dtype already fits)."""
    r, alpha = config.rank_and_alpha(path)
    dropout = 0.0 if isinstance(layer, LoRAEmbedding) else config.lora_dropout
    replay = rewrites_base(config.init_lora_weights) and not isinstance(layer, LoRAEmbedding)
    if factors is None or replay:  # init (PiSSA / OLoRA rewrite W0), then overwrite A and B
        adapter = layer.add_adapter(name, r, alpha, lora_dropout=dropout, use_rslora=config.use_rslora,
                                    init_lora_weights=config.init_lora_weights, bias_mode=config.bias)
        if factors is not None:
            with torch.no_grad():
                adapter.lora_A.copy_(factors[0])
                adapter.lora_B.copy_(factors[1])
        adapter.requires_grad_(trainable)
        return
    base = layer.base  # each layer's adapter lives where its base does (models may span devices)
    A, B = (t.to(device=base.device, dtype=adapter_dtype(base.dtype)) for t in factors)
    adapter = LoRAAdapter.from_factors(A, B, alpha, lora_dropout=dropout, use_rslora=config.use_rslora,
                                       requires_grad=trainable)
    adapter.bias_mode = config.bias
    layer.attach(name, adapter)
