"""Attach LoRA adapters to any nn.Module, freeze the rest, and report what trains.

Target matching follows PEFT exactly, so the same `target_modules` select the same layers:
  * a string is a regex that must match the whole module path (`re.fullmatch`);
  * a list entry matches a path exactly or as a dotted suffix ("q_proj" matches "model.layers.0.self_attn.q_proj");
  * "all-linear" takes every nn.Linear and GPT-2 Conv1D except the output head.
Nothing matching is an error that lists the candidate modules, never a silent no-op.

add_lora plans every replacement before touching the model, so a bad config leaves the model unchanged.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

from torch import nn

from .config import LoraConfig
from .layer import LoRAEmbedding, LoRALinear, is_conv1d, module_dims, warn_if_rank_too_large

__all__ = ["add_lora", "find_targets", "base_view_modules", "lora_layers", "trainable_report", "TrainableReport",
           "disable_lora", "set_adapter", "delete_adapter", "list_adapters", "mark_only_lora_trainable",
           "check_new_adapter_name", "wrap_module", "set_module"]

SUPPORTED = "nn.Linear, nn.Embedding, transformers Conv1D (GPT-2), or a quantized linear base"
_DEFAULT_LAYER_NAMES = ("layers", "h", "layer", "blocks", "block")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module path: LoRA layer} for every LoRA layer in the model."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module) or hasattr(module, "dense_weight")


def _matches(spec, path: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


def _layer_index(path: str, layers_pattern) -> int | None:
    names = (layers_pattern,) if isinstance(layers_pattern, str) else (layers_pattern or _DEFAULT_LAYER_NAMES)
    for name in names:
        found = re.search(rf"(?:^|\.){re.escape(name)}\.(\d+)(?:\.|$)", path)
        if found:
            return int(found.group(1))
    return None


def _output_head_paths(model: nn.Module) -> set[str]:
    """The output projection that "all-linear" leaves alone (PEFT does the same)."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for path, module in model.named_modules():
        if (head is not None and module is head) or path.split(".")[-1] == "lm_head":
            heads.add(path)
    return heads


def _candidates(model: nn.Module, limit: int = 40) -> str:
    rows = []
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if path and weight is not None and not any(True for _ in module.children()):
            rows.append(f"  {path}  {type(module).__name__}  {tuple(weight.shape)}")
    more = f"\n  ... and {len(rows) - limit} more" if len(rows) > limit else ""
    return "\n".join(rows[:limit]) + more


def base_view_modules(model: nn.Module):
    """(path, module) as the base model has them: a LoRA layer stands for the module it wraps, and its
    base_layer/adapters are not listed.  The root (path "") is left out."""
    skip_below = None
    for path, module in model.named_modules():
        if skip_below is not None and path.startswith(skip_below):
            continue
        if isinstance(module, LoRALinear):
            skip_below = path + "."
        if path:
            yield path, module


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Module paths that `config` selects, in model order.  Raises ValueError listing candidates if none,
    TypeError if a selected module is of a type LoRA cannot wrap."""
    spec = config.target_modules
    if spec is None:
        raise ValueError("target_modules is not set: name the modules to adapt, e.g. "
                         "target_modules=['q_proj', 'v_proj'] or 'all-linear'. Modules in this model:\n"
                         + _candidates(model))
    all_linear = spec == "all-linear"
    heads = _output_head_paths(model) if all_linear else set()
    saved = config.modules_to_save or ()
    targets = []
    for path, module in base_view_modules(model):
        if all_linear:
            base = module.base_layer if isinstance(module, LoRALinear) else module
            hit = _is_linear_like(base) and path not in heads
        else:
            hit = _matches(spec, path)
        if not hit or _matches(config.exclude_modules, path) or _matches(saved, path):
            continue
        if config.layers_to_transform is not None:
            index = _layer_index(path, config.layers_pattern)
            if index is None or index not in config.layers_to_transform:
                continue
        if not (isinstance(module, (LoRALinear, nn.Embedding)) or _is_linear_like(module)):
            raise TypeError(f"target {path!r} is a {type(module).__name__}, which LoRA cannot wrap; "
                            f"supported: {SUPPORTED}. Narrow target_modules to the layers inside it.")
        targets.append(path)
    if not targets:
        raise ValueError(f"target_modules={spec!r} matched no module (after exclude_modules / "
                         f"layers_to_transform). A string is a regex over the full path; a list entry "
                         f"matches a path or its dotted suffix. Candidates:\n" + _candidates(model))
    return targets


def add_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Inject adapter `adapter_name` into `model` in place (and return it); freeze all but adapters,
    modules_to_save and the biases `config.bias` asks for.  The new adapter becomes active."""
    check_new_adapter_name(model, adapter_name)
    targets = find_targets(model, config)
    plan = []
    for path in targets:  # plan everything first: nothing changes if any check fails
        module = model.get_submodule(path)
        in_f, out_f = module_dims(module)
        r, alpha = config.rank_and_alpha(path)
        if config.init_lora_weights == "pissa" and r > min(in_f, out_f):
            raise ValueError(f"{path}: PiSSA takes the top r={r} singular directions of W0, which has only "
                             f"min(in={in_f}, out={out_f}) = {min(in_f, out_f)}; lower r (rank_pattern) or "
                             f"exclude this module")
        warn_if_rank_too_large(path, r, in_f, out_f)
        plan.append((path, module, r, alpha))
    for path, module, r, alpha in plan:
        layer = module if isinstance(module, LoRALinear) else wrap_module(model, path, module)
        layer.add_adapter(adapter_name, r, alpha, lora_dropout=config.lora_dropout,
                          use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights)
    mark_only_lora_trainable(model, config, adapter_name)
    return model


def check_new_adapter_name(model: nn.Module, adapter_name: str) -> list[str]:
    """The adapters already in the model; raises ValueError if `adapter_name` is taken or malformed."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}")
    existing = list_adapters(model)
    if adapter_name in existing:
        raise ValueError(f"adapter {adapter_name!r} already exists; use another adapter_name or "
                         f"delete_adapter(model, {adapter_name!r}) first")
    return existing


def wrap_module(model: nn.Module, path: str, module: nn.Module) -> LoRALinear:
    """Replace the module at `path` by a LoRA layer around it (no adapter yet) and return that layer."""
    layer = LoRAEmbedding(module) if isinstance(module, nn.Embedding) else LoRALinear(module)
    set_module(model, path, layer)
    return layer


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at dotted `path` inside `model` (replacing what was there)."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def mark_only_lora_trainable(model: nn.Module, config: LoraConfig | None = None,
                             adapter_name: str | None = None) -> None:
    """requires_grad only for adapter A/B, modules_to_save, and the biases config.bias names.
    With `adapter_name`, only that adapter is switched on; other adapters keep their own setting (an adapter
    loaded frozen stays frozen)."""
    bias = config.bias if config else "none"
    saved = (config.modules_to_save or ()) if config else ()
    for name, param in model.named_parameters():
        if ".adapters." not in f".{name}":
            param.requires_grad = False
        elif adapter_name is None or f".adapters.{adapter_name}." in f".{name}":
            param.requires_grad = True
    layers = lora_layers(model)
    for path, module in model.named_modules():
        if path and _matches(saved, path):
            module.requires_grad_(True)
        if bias == "all" or (bias == "lora_only" and path in layers):
            base = module.base_layer if path in layers else module
            if getattr(base, "bias", None) is not None:
                base.bias.requires_grad = True


@dataclass(frozen=True)
class TrainableReport:
    """Trainable vs all parameters; str() is PEFT's one-line format."""
    trainable: int
    total: int
    per_module: list = field(default_factory=list, repr=False)  # [(path, type, trainable, total)]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} "
                f"|| trainable%: {self.percent:.4f}")

    def table(self) -> str:
        """Per-module breakdown (modules that own trainable parameters)."""
        lines = [f"{'module':<60} {'type':<14} {'trainable':>12} {'total':>12}"]
        lines += [f"{p:<60} {t:<14} {tr:>12,} {to:>12,}" for p, t, tr, to in self.per_module if tr]
        return "\n".join(lines + [str(self)])

    def to_dict(self) -> dict:
        return {"trainable_params": self.trainable, "total_params": self.total,
                "trainable_percent": self.percent}


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count parameters (shared ones once).  total includes the adapters, as PEFT's does."""
    seen, trainable, total, rows = set(), 0, 0, []
    for path, module in model.named_modules():
        m_train = m_total = 0
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            m_total += param.numel()
            m_train += param.numel() if param.requires_grad else 0
        if m_total:
            rows.append((path, type(module).__name__, m_train, m_total))
        trainable, total = trainable + m_train, total + m_total
    return TrainableReport(trainable, total, rows)


def list_adapters(model: nn.Module) -> list[str]:
    """Adapter names present in the model, in order of creation."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the active adapter(s) on every layer that has them (others go inactive)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    known = list_adapters(model)
    missing = [n for n in names if n not in known]
    if missing:
        raise KeyError(f"no adapter named {missing}; the model has {known}")
    for layer in lora_layers(model).values():
        layer.set_active(tuple(n for n in names if n in layer.adapters))


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere (unmerging it first if it was merged)."""
    if name not in list_adapters(model):
        raise KeyError(f"no adapter named {name!r}; the model has {list_adapters(model)}")
    layers = lora_layers(model).values()
    if any(name in layer.adapters and layer.adapters[name].merged for layer in layers):
        raise RuntimeError(f"adapter {name!r} is merged; call unmerge(model) before deleting it")
    for layer in layers:
        layer.remove_adapter(name)


@contextlib.contextmanager
def disable_lora(model: nn.Module):
    """Inside the block the model computes exactly its base outputs.  Adapters must be unmerged
    (a merged delta lives inside W0 and cannot be switched off exactly)."""
    layers = lora_layers(model)
    merged = [p for p, l in layers.items() if any(a.merged for a in l.adapters.values())]
    if merged:
        raise RuntimeError(f"{len(merged)} layers have merged adapters (e.g. {merged[0]}); "
                           f"call unmerge(model) before disable_lora")
    before = {p: l.disabled for p, l in layers.items()}
    try:
        for layer in layers.values():
            layer.disabled = True
        yield model
    finally:
        for p, layer in layers.items():
            layer.disabled = before[p]
