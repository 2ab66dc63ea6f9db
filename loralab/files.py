"""Adapter files in PEFT's format: save_adapter / load_adapter, strict checks, base-model fingerprint.

A directory holds two files, exactly as PEFT writes them:

    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight   (r, in)
                                base_model.model.<module path>.lora_B.weight   (out, r)
                                base_model.model.<embedding path>.lora_embedding_A   (r, num_embeddings)
                                base_model.model.<embedding path>.lora_embedding_B   (dim, r)
                                base_model.model.<module path>.<param>   full tensors of modules_to_save
                                                                         (and trained biases)
    adapter_config.json         PEFT's LoraConfig fields: peft_type "LORA", r, lora_alpha, target_modules, ...

The safetensors metadata also carries a fingerprint of the base model (per adapted module: the shape and
dtype of the base weight and 16 strided samples of it).  PEFT ignores metadata; load_adapter compares the
samples (to one bf16 rounding, so a bf16/fp16 copy of the same base still matches) and refuses a different base.

Loading is strict and transactional: every tensor is read and checked (shape, dtype, NaN/Inf, that
it names a module the config targets, that every targeted module gets its A and B) before the model is
touched, and any failure after that point rolls the model back, so a failed load leaves it as it was.
Pickle files (.bin/.pt) are refused unless allow_pickle=True, and then read with weights_only=True.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_write
from .config import BIAS_CHOICES, LoraConfig, config_from_peft
from .inject import (active_adapters, base_view_modules, check_new_adapter_name, find_saved_targets, find_targets,
                     list_adapters, lora_layers, set_adapter, set_module, wrap_module, wrap_saved)
from .layer import LoRAAdapter, LoRAEmbedding, LoRALinear, adapter_dtype, is_conv1d, module_dims
from .saved import SavedModule, inside_saved, saved_modules

__all__ = ["save_adapter", "load_adapter", "LoadReport", "config_from_peft", "base_fingerprint",
           "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt")
PREFIX = "base_model.model."
FINGERPRINT_KEY = "loralab.fingerprint"
SCALING_KEY = "loralab.scaling"  # the config fields that set each module's r and α, as saved with the weights
_SCALING_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")
SAMPLES = 16
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<name>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


# ---- adapter_config.json ---------------------------------------------------------------------------------
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


# ---- fingerprint ----------------------------------------------------------------------------------------
def _base_weight(module: nn.Module) -> torch.Tensor:
    base = module.base_layer if isinstance(module, LoRALinear) else module
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight
    return base.dense_weight()  # a quantized base: compare what it computes with


def base_fingerprint(module: nn.Module) -> dict:
    """{"shape", "dtype", "sample"}: SAMPLES evenly strided elements of the base weight (no full pass).
    When an init rewrote W0 (PiSSA / OLoRA), the samples are those of the original W0 it came from."""
    w = _base_weight(module).detach()
    flat = w.reshape(-1)
    n = flat.numel()
    k = min(SAMPLES, n)
    idx = torch.tensor([i * (n - 1) // max(k - 1, 1) for i in range(k)], device=w.device)
    sample = flat[idx].float()
    for a in (module.adapters.values() if isinstance(module, LoRALinear) else ()):
        if a.init_A is not None:  # + scaling·(B0·A0)[i, j] at the sampled (out, in) positions, in storage order
            rows, cols = (idx // w.shape[1], idx % w.shape[1])
            out_i, in_j = (cols, rows) if module.fan_in_fan_out else (rows, cols)
            sample = sample + a.scaling * (a.init_B.float()[out_i] * a.init_A.float().T[in_j]).sum(-1)
    return {"shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch."), "sample": sample.tolist()}


def _fingerprint_differs(saved: dict, now: dict) -> str | None:
    """Why two fingerprints differ, or None.  Samples agree within one bf16 rounding (2^-7 relative), so the
    same base held in fp32, bf16 or fp16 matches, while a fine-tuned or different base does not."""
    if list(saved.get("shape", [])) != now["shape"]:
        return f"shape {tuple(saved.get('shape', []))} vs {tuple(now['shape'])}"
    a, b = saved.get("sample", []), now["sample"]
    if len(a) != len(b) or any(not abs(x - y) <= 2 ** -7 * max(abs(x), abs(y)) + 1e-6 for x, y in zip(a, b)):
        return "weights differ"
    return None


# ---- save -----------------------------------------------------------------------------------------------
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
    if not layers:
        raise KeyError(f"no adapter named {adapter_name!r} to save; the model has {list_adapters(model)}")
    merged = [p for p, l in layers.items() if any(a.merged for a in l.adapters.values())]
    if merged:
        raise RuntimeError(f"{len(merged)} of the adapted base layers hold a merged adapter (e.g. {merged[0]}); "
                           f"call unmerge(model) first so the saved fingerprint describes the unmodified base")
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
                SCALING_KEY: json.dumps({k: config[k] for k in _SCALING_FIELDS}, sort_keys=True)}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(directory / CONFIG_NAME,
                  lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
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


# ---- load -----------------------------------------------------------------------------------------------
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

    def to_dict(self) -> dict:
        return {"adapter_name": self.adapter_name, "path": self.path, "modules": self.modules,
                "tensors": self.tensors, "extra_tensors": self.extra_tensors, "fingerprint": self.fingerprint,
                "active": self.active}


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
    directory = Path(directory)
    config, notes = _read_config(directory)
    targets = find_targets(model, config)
    modules = dict(model.named_modules())
    device = next(modules[targets[0]].parameters(), torch.empty(0)).device  # read straight onto the model's device
    source, tensors, metadata = _read_weights(directory, allow_pickle, device)
    plan = _plan(model, modules, config, targets, tensors)
    problems = _describe(plan, strict)
    if problems:
        raise ValueError(f"cannot load {source} (the model was not changed):\n{problems}\nFix: load it onto the "
                         f"base model it was trained for" + ("" if plan.misshaped or not strict else
                                                              ", or pass strict=False to skip these keys"))
    _check_same_save(config, metadata, source)  # after the shape report, which names the keys
    for note in notes + ([f"skipping: {x}" for x in plan.missing + plan.unexpected] if not strict else []):
        warnings.warn(note, stacklevel=2)
    fingerprint = _check_fingerprint(modules, targets, metadata, check_fingerprint, source)
    before = active_adapters(model)
    _apply(model, modules, config, adapter_name, targets, plan, trainable)
    activate = not before if activate is None else activate
    set_adapter(model, [adapter_name] if activate else before)
    return LoadReport(adapter_name, str(source), len(plan.factors), len(tensors),
                      len(plan.extras) + sum(len(v) for v in plan.saved.values()), fingerprint, config, activate)


def _read_config(directory: Path) -> tuple[LoraConfig, list[str]]:
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such adapter directory")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return config_from_peft(raw, str(path))


def _read_weights(directory: Path, allow_pickle: bool, device) -> tuple[Path, dict, dict]:
    """(file, {key: tensor}, safetensors metadata).  Never unpickles unless allow_pickle (then weights_only)."""
    path = directory / WEIGHTS_NAME
    if path.is_file():
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                return path, {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except Exception as e:  # SafetensorError, OSError: a truncated or corrupt file
            raise ValueError(f"{path}: cannot be read as safetensors ({e}); the file is truncated or "
                             f"corrupt, save or download it again") from None
    pickles = [directory / n for n in PICKLE_NAMES if (directory / n).is_file()]
    if not pickles:
        listing = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME}; the directory holds {listing}")
    path = pickles[0]
    if not allow_pickle:
        raise ValueError(f"{path}: refusing to read a pickle file, since unpickling can run arbitrary code "
                         f"stored in it. Convert it to {WEIGHTS_NAME} with a tool you trust, or pass "
                         f"allow_pickle=True to read it with torch.load(weights_only=True) (tensors only).")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: torch.load(weights_only=True) refused or failed ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path}: expected a dict of name -> tensor, got {type(state).__name__}")
    return path, state, {}


def _plan(model: nn.Module, modules: dict, config: LoraConfig, targets: list[str], tensors: dict) -> _Plan:
    saved_paths = find_saved_targets(model, config)
    plan = _Plan({}, [], [], [], [], {p: {} for p in saved_paths})
    found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # path -> {"A"/"B": (key, tensor)}
    floats = {k: v for k, v in tensors.items() if v.dtype in _FLOAT_DTYPES}
    plan.misshaped += [f"{k}: dtype {v.dtype}; adapter tensors must be float16/bfloat16/float32/float64"
                       for k, v in tensors.items() if k not in floats]
    plan.misshaped += [f"{k}: holds NaN/Inf (the adapter diverged or the file is corrupt)"
                       for k in _non_finite(floats)]
    for key, value in tensors.items():
        rel = key.removeprefix(PREFIX)
        owner = next((p for p in saved_paths if rel.startswith(p + ".")), None)
        if owner is not None:
            _plan_saved(plan, modules[owner], owner, key, rel[len(owner) + 1:], value)
            continue
        match = _FACTOR.match(rel)
        if match is None:
            _plan_extra(plan, model, modules, config, targets, key, value)
            continue
        path, name = match["module"], match["name"]
        if path not in targets:
            why = "not targeted by adapter_config.json" if path in modules else "no such module in the model"
            plan.unexpected.append(f"{key}: {why}")
            continue
        want = ("lora_embedding_A", "lora_embedding_B") if _is_embedding(modules[path]) else \
            ("lora_A.weight", "lora_B.weight")
        if name not in want:
            plan.misshaped.append(f"{key}: {type(modules[path]).__name__} at {path} takes {want[0]} / {want[1]}")
            continue
        found.setdefault(path, {})["A" if name == want[0] else "B"] = (key, value)
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


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Keys of the tensors holding NaN/Inf.  One fused norm per tensor first (finite unless a NaN/Inf is
    present or huge values overflow it); the elementwise check runs only if some norm is not finite."""
    keys = [k for k, v in tensors.items() if v.numel()]
    if not keys:
        return []
    norms = torch._foreach_norm([tensors[k] for k in keys])
    if torch.isfinite(torch.stack([n.float() for n in norms])).all():
        return []
    return [k for k in keys if not torch.isfinite(tensors[k]).all()]


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


def _check_same_save(config: LoraConfig, metadata: dict, source) -> None:
    """The two files are renamed into place one after the other; if a save was cut off between the renames,
    the weights and the config come from different saves.  Refuse when the fields that set the scaling differ."""
    saved = json.loads(metadata.get(SCALING_KEY) or "{}")
    differ = [k for k, v in saved.items() if v != getattr(config, k)]
    if differ:
        raise ValueError(f"{source}: {CONFIG_NAME} has {', '.join(f'{k}={getattr(config, k)!r}' for k in differ)} "
                         f"but the weights were saved with {', '.join(f'{k}={saved[k]!r}' for k in differ)}: the two "
                         f"files come from different saves (an interrupted save?). Save the adapter again, or put "
                         f"back the {CONFIG_NAME} written with these weights.")


def _check_fingerprint(modules: dict, targets: list[str], metadata: dict, check: bool, source) -> str:
    text = metadata.get(FINGERPRINT_KEY)
    if text is None:
        return "absent"
    if not check:
        return "skipped"
    try:
        saved = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: metadata {FINGERPRINT_KEY!r} is not valid JSON ({e})") from None
    checked = [p for p in targets if p in saved]
    diffs = [(p, why) for p in checked
             if (why := _fingerprint_differs(saved[p], base_fingerprint(modules[p])))]
    if diffs:
        raise ValueError(f"{source}: the base model differs from the one the adapter was saved against in "
                         f"{len(diffs)} of {len(checked)} adapted modules (e.g. {diffs[0][0]}: {diffs[0][1]}). "
                         f"Load the base model it was trained on (with no adapter merged into it), or pass "
                         f"check_fingerprint=False if you know the bases are compatible.")
    return "matched"


def _apply(model: nn.Module, modules: dict, config: LoraConfig, name: str, targets: list[str], plan: _Plan,
           trainable: bool) -> None:
    """Inject and fill the adapter; on any exception undo everything and re-raise."""
    replay = config.init_lora_weights in ("pissa", "olora")  # PEFT replays these on load: W0 becomes a residual
    base_backup = [(w, w.detach().clone()) for w in (_base_weight(modules[p]) for p in targets)] if replay else []
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
            for tensor, old in reversed(extra_backup + base_backup):
                with contextlib.suppress(Exception):  # restore all the others even if one write fails again
                    tensor.copy_(old)
        raise
    if trainable:
        for _, tensor, _ in plan.extras:
            if isinstance(tensor, nn.Parameter):
                tensor.requires_grad_(True)


def _add_loaded(layer: LoRALinear, name: str, config: LoraConfig, path: str, factors, trainable: bool) -> None:
    """Adapter `name` on `layer` holding the loaded factors (used as they are when the dtype already fits)."""
    r, alpha = config.rank_and_alpha(path)
    dropout = 0.0 if isinstance(layer, LoRAEmbedding) else config.lora_dropout
    replay = config.init_lora_weights in ("pissa", "olora") and not isinstance(layer, LoRAEmbedding)
    if factors is None or replay:  # init (PiSSA / OLoRA rewrite W0), then overwrite A and B
        adapter = layer.add_adapter(name, r, alpha, lora_dropout=dropout, use_rslora=config.use_rslora,
                                    init_lora_weights=config.init_lora_weights, bias_mode=config.bias)
        if factors is not None:
            with torch.no_grad():
                adapter.lora_A.copy_(factors[0])
                adapter.lora_B.copy_(factors[1])
        adapter.requires_grad_(trainable)
        return
    base = _base_weight(layer)  # each layer's adapter lives where its base does (models may span devices)
    A, B = (t.to(device=base.device, dtype=adapter_dtype(base.dtype)) for t in factors)
    adapter = LoRAAdapter.from_factors(A, B, alpha, lora_dropout=dropout, use_rslora=config.use_rslora,
                                       requires_grad=trainable)
    adapter.bias_mode = config.bias
    layer.attach(name, adapter)
