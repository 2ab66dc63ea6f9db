"""Which modules of a model can take an adapter, and what each choice costs.

A LoRA adapter on a module with weight W0 (out, in) trains A (r, in) and B (out, r):

    trainable = r·(in + out)   per module          (an nn.Embedding (num, dim): r·(num + dim))

so a choice of target_modules costs Σ r·(in_i + out_i) over the modules it selects.  Selection is loralab's
own (`find_targets`, PEFT's rule: a string is a regex full-matched on the path, a list entry matches a path
exactly or as a dotted suffix, "all-linear" is every Linear / Conv1D except the output head).

The model is built on the meta device from its config alone (`with torch.device("meta"):
Class.from_config(config)`): every module and shape is real, no weight is allocated or read, and nothing
is downloaded.  A 7B config builds in about a second.

Each module in a transformer block gets a role from its place in the block, used by the presets and by
the activation model in estimate.py:
    mlp_out   the module with the widest input (the intermediate size f): down_proj, mlp.c_proj, output.dense
    mlp_in    modules before it mapping hidden -> f (or -> 2f when gate and up are fused): gate_proj, up_proj
    attn_out  the last module before the first mlp_in: o_proj, attn.c_proj, attention.output.dense
    attn_in   the modules before that: q/k/v_proj, c_attn, query/key/value
Modules outside the numbered blocks (embeddings, the output head, a pooler) have role "other".
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .config import LoraConfig
from .inject import find_targets
from .layer import is_conv1d, module_dims

__all__ = ["Candidate", "ModelShape", "model_shape", "llama_like_shape", "meta_model_from_config",
           "select", "adapter_params", "presets", "targets_report", "ROLES"]

ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_out", "other")
_BLOCK = re.compile(r"^(.*?\.\d+)\.(.+)$")          # "model.layers.3" + "self_attn.q_proj"


@dataclass(frozen=True)
class Candidate:
    """One module that can take an adapter.  in_features/out_features as module_dims gives them."""
    path: str
    kind: str                  # Linear, Conv1D, Embedding, ...
    in_features: int
    out_features: int
    layer: int | None          # index of its numbered block, None outside the blocks
    role: str                  # one of ROLES
    is_head: bool = False      # the output head, which all-linear leaves out

    @property
    def relative(self) -> str:
        """The path inside its block ("self_attn.q_proj"), or the whole path outside the blocks."""
        found = _BLOCK.match(self.path)
        return found.group(2) if found and self.layer is not None else self.path

    @property
    def pattern(self) -> str:
        """The path with the block index as '*': "model.layers.*.self_attn.q_proj"."""
        found = _BLOCK.match(self.path)
        if not found or self.layer is None:
            return self.path
        return found.group(1).rpartition(".")[0] + ".*." + found.group(2)


@dataclass(frozen=True)
class ModelShape:
    """What the memory arithmetic needs to know about an architecture (sizes in parameters)."""
    source: str                # where it came from: a config path or "Llama-style layout for 7e9 parameters"
    architecture: str
    total_params: int
    hidden: int
    layers: int
    heads: int
    kv_hidden: int             # key/value width: kv_heads · head_dim (= hidden without grouped-query attention)
    intermediate: int          # MLP width f
    vocab: int                 # 0 when the model has no output head over a vocabulary
    gated_mlp: bool            # SwiGLU-style gate · up (three f-wide tensors) vs a plain activation
    rms_norm: bool             # RMSNorm (upcast to fp32) vs LayerNorm
    rope: bool                 # rotary position embeddings (cos/sin tables kept for backward)
    embedding_params: int      # nn.Embedding weights (never quantized)
    head_params: int           # output head weight when not tied to the embeddings (kept in 16 bits)
    quantizable_params: int    # weights of Linear / Conv1D modules other than the head: what NF4 takes
    candidates: tuple = ()     # Candidate per adaptable module, in model order

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# ---- building a model without weights ---------------------------------------------------------------------
def _load_config(path: str | os.PathLike):
    """A transformers config from a model directory or a config.json file (local only)."""
    import transformers
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no config.json here; pass a transformers model directory or its "
                                f"config.json file")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if "model_type" not in raw:
        raise ValueError(f"{file}: no 'model_type' key, so the architecture is unknown; add e.g. "
                         f"\"model_type\": \"llama\"")
    try:
        return transformers.AutoConfig.for_model(**raw)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None


def meta_model_from_config(config) -> nn.Module:
    """The model `config` describes, on the meta device: real modules and shapes, no storage.  The class is
    config.architectures[0] when transformers has it, else AutoModelForCausalLM, else AutoModel."""
    import transformers
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    with torch.device("meta"):
        if cls is not None:
            return cls(config)
        for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
            try:
                return auto.from_config(config)
            except ValueError:
                continue
    raise ValueError(f"transformers {transformers.__version__} has no model class for model_type "
                     f"{config.model_type!r}; upgrade transformers or pass --params instead")


def _config_sizes(config) -> dict:
    def need(*names):
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        raise ValueError(f"config of model_type {config.model_type!r} has none of {names}; only text "
                         f"transformers with these sizes are supported (pass --params otherwise)")
    hidden, heads = need("hidden_size", "d_model", "n_embd"), need("num_attention_heads", "n_head")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return dict(hidden=hidden, heads=heads, kv_hidden=kv_heads * head_dim,
                layers=need("num_hidden_layers", "n_layer", "num_layers"), vocab=getattr(config, "vocab_size", 0))


def model_shape(path: str | os.PathLike) -> tuple[ModelShape, nn.Module]:
    """The shape of the model at `path` (a directory or config.json) and the meta-device model itself."""
    config = _load_config(path)
    model = meta_model_from_config(config)
    sizes = _config_sizes(config)
    return shape_of(model, source=str(path), **sizes), model


# ---- reading the structure --------------------------------------------------------------------------------
def _head_modules(model: nn.Module) -> set[int]:
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    return {id(head)} if head is not None else set()


def _layer_of(path: str) -> int | None:
    found = _BLOCK.match(path)
    return int(found.group(1).rpartition(".")[2]) if found else None


def _assign_roles(block: list[Candidate], hidden: int) -> list[Candidate]:
    """Roles inside one block, from module order and widths (see the module docstring)."""
    linear = [c for c in block if c.kind != "Embedding"]
    if len(linear) < 3:
        return block
    down = max(range(len(linear)), key=lambda i: linear[i].in_features)
    f = linear[down].in_features
    ups = [i for i in range(down) if linear[i].in_features == hidden and linear[i].out_features in (f, 2 * f)]
    if f <= hidden or not ups or ups[0] < 2:
        return block
    roles = {linear[down].path: "mlp_out", linear[ups[0] - 1].path: "attn_out"}
    roles.update({linear[i].path: "mlp_in" for i in ups})
    roles.update({linear[i].path: "attn_in" for i in range(ups[0] - 1)})
    return [replace(c, role=roles.get(c.path, "other")) for c in block]


def _count(model: nn.Module) -> tuple[int, int, int, int]:
    """(all parameters, embedding weights, untied output-head weight, quantizable Linear/Conv1D weights);
    a parameter shared by two modules is counted once."""
    head_ids = _head_modules(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    total = sum(p.numel() for p in model.parameters())   # shared (tied) parameters are listed once
    embed = head = quantizable = 0
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Embedding):
            embed += weight.numel()
        elif isinstance(module, nn.Linear) or is_conv1d(module):
            if id(module) in head_ids or path.split(".")[-1] == "lm_head":
                head += 0 if id(weight) in embeddings else weight.numel()
            else:
                quantizable += weight.numel()
    return total, embed, head, quantizable


def candidates(model: nn.Module, hidden: int) -> tuple[Candidate, ...]:
    """Every Linear / Conv1D / Embedding module, in model order, with its role."""
    head_ids = _head_modules(model)
    found = []
    for path, module in model.named_modules():
        if path and (isinstance(module, (nn.Linear, nn.Embedding)) or is_conv1d(module)):
            in_f, out_f = module_dims(module)
            is_head = id(module) in head_ids or path.split(".")[-1] == "lm_head"
            found.append(Candidate(path, type(module).__name__, in_f, out_f, _layer_of(path), "other", is_head))
    blocks: dict[str, list[Candidate]] = {}   # insertion order = model order (blocks are contiguous)
    for c in found:
        blocks.setdefault(_BLOCK.match(c.path).group(1) if c.layer is not None else c.path, []).append(c)
    return tuple(c for block in blocks.values() for c in _assign_roles(block, hidden))


def _is_gated(cands: tuple[Candidate, ...]) -> bool:
    """Two MLP input projections in a block (gate and up), or one fused one of width 2f."""
    ups = [c for c in cands if c.role == "mlp_in"]
    if not ups:
        return False
    first = [c for c in ups if c.layer == ups[0].layer]
    f = next(c.in_features for c in cands if c.role == "mlp_out")
    return len(first) >= 2 or first[0].out_features == 2 * f


def shape_of(model: nn.Module, *, source: str, hidden: int, heads: int, kv_hidden: int, layers: int,
             vocab: int) -> ModelShape:
    """Walk `model` (any device, meta included) and fill a ModelShape."""
    total, embed, head, quantizable = _count(model)
    cands = candidates(model, hidden)
    names = [(path.rsplit(".", 1)[-1].lower(), type(m).__name__) for path, m in model.named_modules()]
    f_sizes = [c.in_features for c in cands if c.role == "mlp_out"]
    has_head = any(c.is_head for c in cands)
    return ModelShape(source=source, architecture=type(model).__name__,
                      total_params=total, hidden=hidden, layers=layers,
                      heads=heads, kv_hidden=kv_hidden, intermediate=f_sizes[0] if f_sizes else 4 * hidden,
                      vocab=vocab if has_head else 0, gated_mlp=_is_gated(cands),
                      rms_norm=any(kind.endswith("RMSNorm") for _, kind in names),
                      rope=any("rotary" in name for name, _ in names), embedding_params=embed, head_params=head,
                      quantizable_params=quantizable, candidates=cands)


# ---- a Llama-style layout for a bare parameter count -----------------------------------------------------
class LlamaStyleRMSNorm(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden))


class _LlamaLayout(nn.Module):
    def get_output_embeddings(self) -> nn.Module:  # the head "all-linear" leaves out, as on the real model
        return self.lm_head


def _llama_layout(hidden: int, layers: int, intermediate: int, vocab: int) -> nn.Module:
    """Module tree with LlamaForCausalLM's names and shapes (meta device; nothing to run)."""
    def block():
        b = nn.Module()
        b.input_layernorm, b.post_attention_layernorm = LlamaStyleRMSNorm(hidden), LlamaStyleRMSNorm(hidden)
        b.self_attn, b.mlp = nn.Module(), nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(b.self_attn, name, nn.Linear(hidden, hidden, bias=False))
        b.mlp.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        b.mlp.up_proj = nn.Linear(hidden, intermediate, bias=False)
        b.mlp.down_proj = nn.Linear(intermediate, hidden, bias=False)
        return b
    with torch.device("meta"):
        root = _LlamaLayout()
        root.model = nn.Module()
        root.model.embed_tokens = nn.Embedding(vocab, hidden)
        root.model.layers = nn.ModuleList(block() for _ in range(layers))
        root.model.norm, root.model.rotary_emb = LlamaStyleRMSNorm(hidden), nn.Module()
        root.lm_head = nn.Linear(hidden, vocab, bias=False)
    return root


def _llama_sizes(hidden: int) -> tuple[int, int]:
    """(layers, intermediate) of the Llama-style layout: hidden/128 layers, 8h/3 rounded up to 256."""
    return hidden // 128, -(-8 * hidden // 3 // 256) * 256


def llama_like_shape(params: int, vocab: int = 32000) -> tuple[ModelShape, nn.Module]:
    """A Llama-style layout for a bare count: head dim 128, hidden/128 layers and heads, SwiGLU width 8h/3
    rounded up to 256, vocab 32000, untied head; hidden is the multiple of 256 whose count,
    L·(4h² + 3hf + 2h) + 2Vh + h, is nearest `params` (7e9 -> Llama-7B's 4096/32/11008, 13e9 -> Llama-13B's
    5120/40/13824).  total_params is `params` itself, of which all but the layout's embeddings, head and
    norms are quantizable; the layout gives the widths for adapters and activations."""
    def count(h):
        layers, f = _llama_sizes(h)
        return layers * (4 * h * h + 3 * h * f + 2 * h) + 2 * vocab * h + h
    hidden = min(range(256, 65536 + 1, 256), key=lambda h: abs(count(h) - params))
    layers, f = _llama_sizes(hidden)
    model = _llama_layout(hidden, layers, f, vocab)
    source = (f"Llama-style layout for {params:.3g} parameters (hidden {hidden}, {layers} layers, MLP {f}, "
              f"{hidden // 128} heads, vocab {vocab})")
    shape = shape_of(model, source=source, hidden=hidden, heads=hidden // 128, kv_hidden=hidden, layers=layers,
                     vocab=vocab)
    kept_16bit = shape.total_params - shape.quantizable_params     # embeddings, head and norms of the layout
    return replace(shape, architecture="LlamaForCausalLM (layout)", total_params=int(params),
                   quantizable_params=max(0, int(params) - kept_16bit)), model


# ---- choices of target_modules and what they cost ---------------------------------------------------------
def select(model: nn.Module, shape: ModelShape, target_modules) -> tuple[Candidate, ...]:
    """The candidates `target_modules` selects, by loralab's own matching (find_targets)."""
    by_path = {c.path: c for c in shape.candidates}
    paths = find_targets(model, LoraConfig(target_modules=target_modules))
    return tuple(by_path[p] for p in paths if p in by_path)


def adapter_params(selected, r: int) -> int:
    """Σ r·(in + out): the A (r, in) and B (out, r) of every selected module."""
    return sum(r * (c.in_features + c.out_features) for c in selected)


def _groups(shape: ModelShape) -> dict[str, list[Candidate]]:
    groups: dict[str, list[Candidate]] = {}
    for c in shape.candidates:
        groups.setdefault(c.pattern, []).append(c)
    return groups


def target_name(group: list[Candidate], shape: ModelShape) -> str:
    """The shortest dotted suffix that selects exactly this group as a target_modules list entry, or a
    regex (full-matched on the path) when no suffix does (BERT's output.dense is also in attention.output.dense)."""
    paths = {c.path for c in group}
    parts = group[0].relative.split(".")
    for k in range(1, len(parts) + 1):
        suffix = ".".join(parts[-k:])
        if {c.path for c in shape.candidates if c.path == suffix or c.path.endswith("." + suffix)} == paths:
            return suffix
    return re.escape(group[0].pattern).replace(r"\*", r"\d+")


def presets(shape: ModelShape) -> list[tuple[str, object]]:
    """[(preset name, target_modules)] for q,v / q,k,v,o / all-linear, in this architecture's names.
    A fused q/k/v projection (GPT-2's c_attn) stands for q,v as well: it cannot be split."""
    by_role: dict[str, list[str]] = {}
    for group in _groups(shape).values():
        by_role.setdefault(group[0].role, []).append(target_name(group, shape))
    attn_in, attn_out = by_role.get("attn_in", []), by_role.get("attn_out", [])
    found = []
    qv = [n for n in attn_in if n.rsplit(".", 1)[-1].lower()[:1] in ("q", "v")] if len(attn_in) > 1 else attn_in
    if qv:
        found.append(("q,v", qv))
    if attn_in and attn_out:
        found.append(("q,k,v,o", attn_in + attn_out))
    found.append(("all-linear", "all-linear"))
    return [(name, _as_spec(names)) for name, names in found]


def _as_spec(names):
    """A list of names, or one regex when some of them are regexes (a list entry is never a regex)."""
    if names == "all-linear" or not any("\\" in n for n in names):
        return names
    return "|".join(f"(?:{n})" if "\\" in n else rf"(?:.*\.)?{re.escape(n)}" for n in names)


def targets_report(model: nn.Module, shape: ModelShape, r: int) -> dict:
    """Candidate modules grouped by their place in the block, what all-linear takes, and the presets."""
    all_linear = select(model, shape, "all-linear")
    in_all_linear = {c.path for c in all_linear}
    groups = []
    for pattern, group in _groups(shape).items():
        c = group[0]
        groups.append({"pattern": pattern, "target_name": target_name(group, shape), "count": len(group),
                       "type": c.kind, "in_features": c.in_features, "out_features": c.out_features,
                       "role": c.role, "lora_params": adapter_params(group, r), "is_head": c.is_head,
                       "in_all_linear": c.path in in_all_linear})
    rows = []
    for name, spec in presets(shape):
        chosen = select(model, shape, spec)
        n = adapter_params(chosen, r)
        rows.append({"preset": name, "target_modules": spec, "modules": len(chosen), "trainable_params": n,
                     "percent_of_model": 100.0 * n / shape.total_params})
    return {"model": shape.source, "architecture": shape.architecture, "total_params": shape.total_params,
            "r": r, "groups": groups, "presets": rows,
            "all_linear": {"modules": len(all_linear), "trainable_params": adapter_params(all_linear, r),
                           "names": [g["target_name"] for g in groups if g["in_all_linear"]]}}


def targets_text(report: dict) -> list[str]:
    """The human-readable table of targets_report."""
    r = report["r"]
    lines = [f"{report['model']}: {report['architecture']}, {report['total_params']:,} parameters "
             f"(built on the meta device; no weights read)", "",
             f"modules that can take an adapter (LoRA params at r={r}: r·(in + out) per module)",
             f"  {'target name':<28} {'count':>5}  {'type':<10} {'in -> out':<16} {'LoRA params':>13}  module"]
    for g in report["groups"]:
        note = "" if g["in_all_linear"] else "  (output head: not in all-linear)" if g["is_head"] \
            else "  (not in all-linear)"
        lines.append(f"  {g['target_name']:<28} {g['count']:>5}  {g['type']:<10} "
                     f"{str(g['in_features']) + ' -> ' + str(g['out_features']):<16} {g['lora_params']:>13,}  "
                     f"{g['pattern']}{note}")
    al = report["all_linear"]
    lines += ["", f"all-linear takes {al['modules']} modules: {', '.join(al['names'])}", "",
              f"presets at r={r} (% of the model's {report['total_params']:,} parameters)",
              f"  {'preset':<11} {'modules':>7} {'trainable':>13} {'%':>8}  target_modules"]
    for p in report["presets"]:
        spec = p["target_modules"] if isinstance(p["target_modules"], str) else ",".join(p["target_modules"])
        lines.append(f"  {p['preset']:<11} {p['modules']:>7} {p['trainable_params']:>13,} "
                     f"{p['percent_of_model']:>7.4f}%  {spec}")
    return lines
