"""Attach LoRA adapters to any nn.Module, freeze the rest, and report what trains.

Target matching follows PEFT exactly, so the same `target_modules` select the same layers:
  * a string is a regex that must match the whole module path (`re.fullmatch`);
  * a list entry matches a path exactly or as a dotted suffix ("q_proj" matches "model.layers.0.self_attn.q_proj");
  * "all-linear" takes every nn.Linear and GPT-2 Conv1D except the output head (`get_output_embeddings()`);
  * layers_to_transform keeps suffix matches whose layer index is listed: the first number after
    `layers_pattern.` (or, without a pattern, after the first "name." segment), as PEFT reads it; an exact
    path in the list is taken whatever its layer, and a regex target cannot be combined with it;
  * a module inside one of modules_to_save is never a LoRA target (it is trained in full instead).
Nothing matching is an error that lists the candidate modules, never a silent no-op.

add_lora plans every replacement before touching the model, so a bad config leaves the model unchanged.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

from torch import nn

from .config import LoraConfig
from .base import SUPPORTED_BASES as SUPPORTED, FrozenBase, is_conv1d, module_dims
from .layer import LoRAEmbedding, LoRALinear, embed_scale, warn_if_rank_too_large
from .saved import SavedModule, find_saved, inside_saved, saved_modules

__all__ = ["add_lora", "find_targets", "base_view_modules", "lora_layers", "trainable_report", "TrainableReport",
           "disable_lora", "set_adapter", "delete_adapter", "list_adapters", "mark_only_lora_trainable",
           "check_new_adapter_name", "wrap_module", "set_module", "active_adapters", "wrap_saved",
           "check_adapter_names", "check_unmerged", "merged_layers"]

_INIT_NAMES = {"pissa": "PiSSA", "olora": "OLoRA"}


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module path: LoRA layer} for every LoRA layer in the model."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def _is_linear_like(module: nn.Module) -> bool:
    """What "all-linear" takes: nn.Linear, GPT-2's Conv1D, or a quantized linear base (a FrozenBase)."""
    return isinstance(module, (nn.Linear, FrozenBase)) or is_conv1d(module)


def _matches(spec, path: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


def _layer_index(path: str, layers_pattern) -> int | None:
    """The layer number of `path` as PEFT reads it: the first number after one of `layers_pattern` (each a
    regex, tried in order), or without a pattern the first "<name>.<number>." after the first segment.
    "encoder.block.0.layer.1.DenseReluDense.wi" is layer 0."""
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        patterns = (layers_pattern,) if isinstance(layers_pattern, str) else layers_pattern
        found = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", path))), None)
    return int(found["idx"]) if found else None


def _output_head_paths(model: nn.Module) -> set[str]:
    """The output projection that "all-linear" leaves alone (`get_output_embeddings()`, as PEFT does)."""
    get_out = getattr(model, "get_output_embeddings", None)
    try:
        head = get_out() if callable(get_out) else None
    except (NotImplementedError, AttributeError):
        head = None
    return {path for path, module in model.named_modules() if head is not None and module is head}


def _candidates(model: nn.Module, limit: int = 40) -> str:
    """The short names a target list can use (the last part of each adaptable path: query, key, value, dense),
    then the full paths of the modules that hold a weight."""
    rows, short = [], {"linear": {}, "embedding": {}}
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if path and weight is not None and not any(True for _ in module.children()):
            rows.append(f"  {path}  {type(module).__name__}  {tuple(weight.shape)}")
        kind = "linear" if _is_linear_like(module) else "embedding" if isinstance(module, nn.Embedding) else None
        if path and kind:
            short[kind].setdefault(path.rsplit(".", 1)[-1], None)
    names = "; ".join(f"{kind} layers: {', '.join(found)}" for kind, found in short.items() if found)
    more = f"\n  ... and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"short names in this model ({names})\nfull paths:\n" + "\n".join(rows[:limit]) + more


def base_view_modules(model: nn.Module):
    """(path, module) as the base model has them: a LoRA layer or a module to save stands for the module it
    wraps, and its internals (base_layer, adapters, copies) are not listed.  The root (path "") is left out."""
    skip_below = None
    for path, module in model.named_modules():
        if skip_below is not None and path.startswith(skip_below):
            continue
        if isinstance(module, (LoRALinear, SavedModule)):
            skip_below = path + "."
        if path:
            yield path, module


def _selected(config: LoraConfig, path: str, heads: set[str]) -> bool:
    """Whether `config` puts a LoRA adapter on the module at `path` (PEFT's rule, in PEFT's order)."""
    if _matches(config.exclude_modules, path) or inside_saved(path, config.saved_names()):
        return False
    spec = config.target_modules
    if isinstance(spec, str):
        return path not in heads if spec == "all-linear" else re.fullmatch(spec, path) is not None
    if path in spec:
        return True  # an exact path is taken whatever layers_to_transform says (PEFT's rule)
    if not any(path.endswith("." + name) for name in spec):
        return False
    if config.layers_to_transform is None:
        return True
    return _layer_index(path, config.layers_pattern) in config.layers_to_transform


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
    targets = []
    for path, module in base_view_modules(model):
        if all_linear:
            base = module.base_layer if isinstance(module, LoRALinear) else module
            if not _is_linear_like(base):
                continue
        if not _selected(config, path, heads):
            continue
        if isinstance(module, SavedModule):
            raise TypeError(f"target {path!r} is trained in full for adapter(s) {list(module.modules_to_save)} "
                            f"(modules_to_save), so it cannot also take a LoRA adapter; leave it out of "
                            f"target_modules")
        if not (isinstance(module, (LoRALinear, nn.Embedding)) or _is_linear_like(module)):
            raise TypeError(f"target {path!r} is a {type(module).__name__}, which LoRA cannot wrap; "
                            f"supported: {SUPPORTED}. Narrow target_modules to the layers inside it.")
        if isinstance(module, nn.Embedding):
            embed_scale(module)  # refuses an embedding whose scale is not a scalar
        targets.append(path)
    if not targets:
        raise ValueError(f"target_modules={spec!r} matched no module (after exclude_modules / "
                         f"layers_to_transform / modules_to_save). A string is a regex over the full path; a list "
                         f"entry matches a path or its dotted suffix, such as one of the " + _candidates(model))
    return targets


def find_saved_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules `config` trains in full (modules_to_save, and the heads its task_type adds).
    Refuses a module to save that holds LoRA layers, or one nested in another module to save."""
    names = config.saved_names()
    if not names:
        return []
    found = find_saved([p for p, _ in base_view_modules(model)], names)
    for path in found:
        module = model.get_submodule(path)
        inner = [p for p, m in module.named_modules() if isinstance(m, LoRALinear)]
        if inner:
            raise ValueError(f"modules_to_save selects {path!r}, which holds LoRA layers ({path}.{inner[0]}...) of "
                             f"adapters {list_adapters(module)}; a module trained in full cannot contain adapters. "
                             f"Save a different module, or delete those adapters first.")
        outer = [p for p in found if p != path and path.startswith(p + ".")]
        if outer:
            raise ValueError(f"modules_to_save selects both {outer[0]!r} and {path!r} inside it; name only one")
    if config.modules_to_save and not find_saved(found, config.modules_to_save):
        raise ValueError(f"modules_to_save={list(config.modules_to_save)} matches no module (a name matches the "
                         f"end of a module path). Candidates:\n" + _candidates(model))
    return found


def add_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default", *,
             quantize: str | None = None) -> nn.Module:
    """Inject adapter `adapter_name` into `model` in place (and return it) and make it the active adapter.

    Everything else is frozen: the base, other adapters (which stay in the model, inactive) and the modules
    the config does not train; modules_to_save get a trainable copy of their own for this adapter, and the
    biases `config.bias` names train.  The model remembers both, so save_adapter saves them.
    quantize="nf4": QLoRA — first store every nn.Linear of the base but the output head in NF4
    (quant.quantize_model, double quantization, blocks of 64), then add the adapter on top in full precision."""
    check_new_adapter_name(model, adapter_name)
    if quantize is not None:
        if quantize != "nf4":
            raise ValueError(f"quantize={quantize!r}: loralab quantizes to 'nf4' (or pass None)")
        find_targets(model, config)  # a bad config is refused before anything is quantized
        from .quant import quantize_model
        quantize_model(model, skip=tuple(config.saved_names()))
    targets = find_targets(model, config)
    saved = find_saved_targets(model, config)
    plan = []
    for path in targets:  # plan everything first: nothing changes if any check fails
        module = model.get_submodule(path)
        in_f, out_f = module_dims(module)
        r, alpha = config.rank_and_alpha(path)
        if config.init_lora_weights in ("pissa", "olora") and r > min(in_f, out_f) \
                and not isinstance(module, (nn.Embedding, LoRAEmbedding)):
            raise ValueError(f"{path}: {_INIT_NAMES[config.init_lora_weights]} takes the top r={r} directions of W0, which has "
                             f"only min(in={in_f}, out={out_f}) = {min(in_f, out_f)}; lower r (rank_pattern) or "
                             f"exclude this module")
        warn_if_rank_too_large(path, r, in_f, out_f)
        plan.append((path, module, r, alpha))
    for path, module, r, alpha in plan:
        layer = module if isinstance(module, LoRALinear) else wrap_module(model, path, module)
        layer.add_adapter(adapter_name, r, alpha, lora_dropout=config.lora_dropout,
                          use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
                          bias_mode=config.bias)
    for path in saved:
        wrap_saved(model, path).add_copy(adapter_name)
    set_adapter(model, adapter_name)
    mark_only_lora_trainable(model, config, adapter_name)
    from .routing import accept_adapter_names  # model(..., adapter_names=[...]) routes rows (PEFT's spelling)
    return accept_adapter_names(model)


def wrap_saved(model: nn.Module, path: str) -> SavedModule:
    """The SavedModule at `path`, wrapping the module there first if needed."""
    module = model.get_submodule(path)
    if not isinstance(module, SavedModule):
        module = SavedModule(module).train(module.training)
        set_module(model, path, module)
    return module


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
    """Replace the module at `path` by a LoRA layer around it (no adapter yet) and return that layer.
    The layer takes the module's train/eval mode, so a model in eval() stays in eval."""
    layer = LoRAEmbedding(module) if isinstance(module, nn.Embedding) else LoRALinear(module)
    set_module(model, path, layer.train(module.training))
    return layer


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at dotted `path` inside `model` (replacing what was there)."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def mark_only_lora_trainable(model: nn.Module, config: LoraConfig | None = None,
                             adapter_name: str | None = None) -> None:
    """requires_grad only for adapter A/B, copies in modules to save, and the biases config.bias names.
    With `adapter_name`, only that adapter (its A/B and its copies) trains; every other adapter is frozen."""
    bias = config.bias if config else "none"
    for name, param in model.named_parameters():
        key = f".{name}"
        own = (f".adapters.{adapter_name}." in key or f".modules_to_save.{adapter_name}." in key) \
            if adapter_name is not None else (".adapters." in key or ".modules_to_save." in key)
        param.requires_grad = own
    if bias == "none":
        return
    for _, module in base_view_modules(model):  # LoRA layers stand for their base; copies train whole already
        if isinstance(module, SavedModule):
            continue
        lora = isinstance(module, LoRALinear) and (adapter_name is None or adapter_name in module.adapters)
        base = module.base_layer if isinstance(module, LoRALinear) else module
        if (bias == "all" or lora) and isinstance(getattr(base, "bias", None), nn.Parameter):
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


def list_adapters(model: nn.Module, modules=None) -> list[str]:
    """Adapter names present in the model, in order of creation (`modules`: the model's modules when the
    caller has already walked them)."""
    names: dict[str, None] = {}
    for module in model.modules() if modules is None else modules:
        if isinstance(module, LoRALinear):
            names.update(dict.fromkeys(module.adapters))
        elif isinstance(module, SavedModule):
            names.update(dict.fromkeys(module.modules_to_save))
    return list(names)


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters that compute the model's output now, in order of creation."""
    active = {n for layer in lora_layers(model).values() for n in layer.active}
    active |= {m.active for m in saved_modules(model).values() if m.active is not None}
    return [n for n in list_adapters(model) if n in active]


def check_adapter_names(model: nn.Module, names) -> tuple[str, ...]:
    """`names` (one or a list) as a tuple; KeyError naming the unknown ones and the adapters the model has."""
    names = (names,) if isinstance(names, str) else tuple(names)
    known = list_adapters(model)
    missing = [n for n in dict.fromkeys(names) if n not in known]
    if missing:
        raise KeyError(f"no adapter named {missing[0]!r}" + (f" (nor {missing[1:]})" if len(missing) > 1 else "")
                       + f"; the model has {known}")
    return names


def merged_layers(model: nn.Module, adapter: str | None = None) -> list[str]:
    """Paths of the LoRA layers holding a merged adapter (or holding adapter `adapter` merged)."""
    return [p for p, l in lora_layers(model).items()
            if any(a.merged for n, a in l.adapters.items() if adapter in (None, n))]


def check_unmerged(model: nn.Module, what: str, *, adapter: str | None = None, paths=None) -> None:
    """RuntimeError if an adapter (`adapter`, on the layers at `paths`) is merged: a merged ΔW lives inside
    W0, where `what` cannot see it."""
    merged = [p for p in merged_layers(model, adapter) if paths is None or p in paths]
    if merged:
        raise RuntimeError(f"{len(merged)} layers hold a merged adapter (e.g. {merged[0]}); call unmerge(model) "
                           f"before {what}")


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the active adapter(s) on every layer that has them (others go inactive).  Several
    adapters are summed; each module to save runs the copy of the one named adapter that has one."""
    names = check_adapter_names(model, names)
    saved = saved_modules(model)
    for path, module in saved.items():
        holders = [n for n in names if n in module.modules_to_save]
        if len(holders) > 1:
            raise ValueError(f"adapters {holders} each train their own copy of {path} (modules_to_save); only one "
                             f"copy can compute the output, so they cannot be active together")
    for layer in lora_layers(model).values():
        layer.set_active(tuple(n for n in names if n in layer.adapters))
    for module in saved.values():
        module.active = next((n for n in names if n in module.modules_to_save), None)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere (its A/B and its copies of modules to save)."""
    check_adapter_names(model, name)
    check_unmerged(model, f"deleting adapter {name!r}", adapter=name)
    for layer in lora_layers(model).values():
        layer.remove_adapter(name)
    for path, module in saved_modules(model).items():
        module.remove_copy(name)
        if not module.modules_to_save:  # no adapter trains it any more: the plain module again
            set_module(model, path, module.original_module)


@contextlib.contextmanager
def disable_lora(model: nn.Module):
    """Inside the block the model computes exactly its base outputs (modules to save run their originals).
    Adapters must be unmerged (a merged delta lives inside W0 and cannot be switched off exactly)."""
    check_unmerged(model, "disable_lora")
    switches = list(lora_layers(model).values()) + list(saved_modules(model).values())
    before = [m.disabled for m in switches]
    try:
        for module in switches:
            module.disabled = True
        yield model
    finally:
        for module, was in zip(switches, before):
            module.disabled = was
