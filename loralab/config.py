"""LoraConfig: which modules get an adapter, and with which rank, alpha and init.

Field names and meanings follow HuggingFace PEFT's `LoraConfig`, so a PEFT user can pass the same values:

    r                  rank of the update ΔW = (lora_alpha / r) · B · A, A: (r, in), B: (out, r)
    lora_alpha         scale numerator; scaling = lora_alpha / r  (or lora_alpha / √r with use_rslora)
    lora_dropout       dropout applied to the adapter's input only (the base path never sees it)
    target_modules     list of names (exact module path or dotted suffix), one regex string (full match
                       on the module path), or "all-linear" (every Linear / GPT-2 Conv1D but the output head)
    exclude_modules    same forms as target_modules; matching modules are skipped
    layers_to_transform / layers_pattern   restrict to these layer indices (the number after `layers_pattern`)
    rank_pattern / alpha_pattern           {regex matched as a suffix of the module path: r or alpha}
    init_lora_weights  True: A Kaiming-uniform, B = 0 (model starts exactly as pretrained);
                       "gaussian": A ~ N(0, 1/r), B = 0;  "pissa": A, B from the top-r SVD of W0 and
                       W0 replaced by its residual;  "olora": A, B from a QR of W0, W0 replaced likewise;
                       "orthogonal": A, B non-zero on two halves of an orthogonal basis (B·A = 0);
                       False: A and B both random (not an identity start)
    bias               "none" (biases stay frozen), "all" (every bias trains), "lora_only" (biases of
                       adapted layers train)
    modules_to_save    extra modules (e.g. a classifier head) trained in full and saved with the adapter;
                       a name matches the end of a module path (PEFT's rule), each adapter gets its own copy
    task_type          PEFT's task types; "SEQ_CLS" / "TOKEN_CLS" add the heads "classifier" and "score" to
                       modules_to_save, "QUESTION_ANS" adds "qa_outputs" (what PEFT does); the others change nothing
    fan_in_fan_out     PEFT's flag for bases stored as (in, out); loralab detects this per layer
                       (GPT-2 Conv1D, Embedding), so it is accepted for compatibility only
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = ["LoraConfig", "config_from_peft", "INIT_CHOICES", "BIAS_CHOICES", "TASK_TYPES"]

INIT_CHOICES = (True, False, "gaussian", "pissa", "olora", "orthogonal")
BIAS_CHOICES = ("none", "all", "lora_only")
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",), "CAUSAL_LM": (), "SEQ_2_SEQ_LM": (), "FEATURE_EXTRACTION": ()}
TASK_TYPES = tuple(TASK_HEADS)


def _as_names(field_name: str, value):
    """Normalise a target/exclude spec: None, one regex string, or a tuple of names."""
    if value is None or isinstance(value, str):
        if isinstance(value, str):
            _check_regex(field_name, value)
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        names = tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad:
            raise ValueError(f"{field_name} must hold non-empty module names, got {bad!r}")
        return names
    raise TypeError(
        f"{field_name} must be a list of module names, a regex string or 'all-linear', "
        f"got {type(value).__name__}: {value!r}"
    )


def _check_regex(field_name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{field_name}={pattern!r} is not a valid regular expression ({e})") from None


def _check_positive(field_name: str, value, kind=(int, float)) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        raise ValueError(f"{field_name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8                                 # rank of A (r, in) and B (out, r)
    lora_alpha: float = 8                      # scaling = lora_alpha / r
    lora_dropout: float = 0.0                  # on the adapter input only
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_rslora: bool = False                   # scaling = lora_alpha / sqrt(r)
    init_lora_weights: bool | str = True
    bias: str = "none"
    modules_to_save: Sequence[str] | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer (the adapter rank), got {self.r!r}; try r=8")
        _check_positive("lora_alpha", self.lora_alpha)
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}; try 0.05")
        init = self.init_lora_weights
        if init not in INIT_CHOICES or (isinstance(init, int) and not isinstance(init, bool)):
            why = _INIT_REFUSALS.get(init) or ("the randomized-SVD PiSSA is not reproducible; use 'pissa' (exact SVD)"
                                               if isinstance(init, str) and init.startswith("pissa_niter") else None)
            raise ValueError(f"init_lora_weights={init!r} is not supported" + (f" ({why})" if why else "")
                             + f"; choose one of {INIT_CHOICES}")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias={self.bias!r} is not supported; choose one of {BIAS_CHOICES}")
        task = getattr(self.task_type, "value", self.task_type)  # peft.TaskType is a str enum
        if task is not None and task not in TASK_HEADS:
            raise ValueError(f"task_type={self.task_type!r} is not one of {TASK_TYPES} (or None)")
        object.__setattr__(self, "task_type", task)
        object.__setattr__(self, "target_modules", _as_names("target_modules", self.target_modules))
        object.__setattr__(self, "exclude_modules", _as_names("exclude_modules", self.exclude_modules))
        object.__setattr__(self, "layers_pattern", _as_names("layers_pattern", self.layers_pattern))
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
            object.__setattr__(self, "modules_to_save", _as_names("modules_to_save", self.modules_to_save))
        ltt = self.layers_to_transform
        if ltt is not None:
            ltt = (ltt,) if isinstance(ltt, int) else tuple(ltt)
            if not ltt or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ltt):
                raise ValueError(f"layers_to_transform must be layer indices >= 0, got {self.layers_to_transform!r}")
            object.__setattr__(self, "layers_to_transform", ltt)
            if isinstance(self.target_modules, str):
                raise ValueError(f"layers_to_transform={list(ltt)} cannot be combined with target_modules="
                                 f"{self.target_modules!r} (a regex or 'all-linear'; PEFT refuses the same): give "
                                 f"target_modules as a list of names, or put the layer numbers into the regex")
        for name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            pattern = dict(getattr(self, name) or {})
            for key, value in pattern.items():
                _check_regex(f"{name} key", key)
                _check_positive(f"{name}[{key!r}]", value, kind)
            object.__setattr__(self, name, pattern)

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        """The (r, lora_alpha) for one module: rank_pattern / alpha_pattern override the defaults.

        A pattern key matches when it matches a dotted suffix of the path (PEFT's rule), e.g. key
        "q_proj" or r"layers\\.0\\.self_attn\\.q_proj" both match "model.layers.0.self_attn.q_proj"."""
        return (_pattern_value(self.rank_pattern, module_path, self.r),
                _pattern_value(self.alpha_pattern, module_path, self.lora_alpha))

    def saved_names(self) -> tuple[str, ...]:
        """The module names trained in full: modules_to_save plus the heads task_type adds."""
        names = tuple(self.modules_to_save or ())
        return names + tuple(h for h in TASK_HEADS.get(self.task_type, ()) if h not in names)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (tuples become lists)."""
        out = {}
        for key in self.__dataclass_fields__:
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        return out


_dataclass_init = LoraConfig.__init__


def _init_with_refusals(self, *args, **kwargs):
    """LoraConfig(...) refuses PEFT options it cannot reproduce by name (as loading a file does), ignores
    PEFT options that change no output, and names the valid fields for a typo."""
    for name in list(kwargs):
        if name in _UNSUPPORTED and kwargs[name] not in (None, False, [], {}):
            raise ValueError(f"{name}={kwargs[name]!r} is not supported: {_UNSUPPORTED[name]}, and loralab computes "
                             f"plain LoRA only. Leave {name} unset, or use PEFT for this adapter.")
        if name in _UNSUPPORTED or name in _NO_MATH:
            kwargs.pop(name)
        elif name not in LoraConfig.__dataclass_fields__:
            import difflib
            close = difflib.get_close_matches(name, LoraConfig.__dataclass_fields__, n=1)
            raise ValueError(f"LoraConfig has no field {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; fields: {', '.join(LoraConfig.__dataclass_fields__)}")
    _dataclass_init(self, *args, **kwargs)


LoraConfig.__init__ = _init_with_refusals


def _pattern_value(pattern: Mapping, module_path: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


# ---- PEFT's adapter_config.json -> LoraConfig ------------------------------------------------------------
# adapter_config.json fields, by what loralab does with them.
_HONOURED = {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
             "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora", "bias", "modules_to_save",
             "init_lora_weights", "fan_in_fan_out", "task_type"}
_NO_MATH = {"peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
            "peft_version", "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config",
            "lora_ga_config", "runtime_config", "ensure_weight_tying", "velora_config"}
_UNSUPPORTED = {  # field: why it changes the math (it is refused unless it has PEFT's default value)
    "use_dora": "DoRA rescales each output column by a learned magnitude vector",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "layer_replication": "layer_replication duplicates decoder layers",
    "target_parameters": "target_parameters adapts raw nn.Parameters (MoE experts), not modules",
    "trainable_token_indices": "trainable_token_indices trains single rows of the embedding",
    "alora_invocation_tokens": "aLoRA applies the adapter only after its invocation tokens",
    "use_qalora": "QALoRA pools the input in groups before lora_A",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "arrow_config": "Arrow routes each token between several adapters",
    "megatron_config": "Megatron parallel layers are not supported",
    "kasa_config": "KaSA inserts a learned diagonal between lora_A and lora_B and truncates W0",
    "monteclora_config": "MonteCLoRA samples the adapter",
}
# Inits that only set A and B (which a file overwrites), inits that also rewrite W0 (replayed exactly when a
# file is loaded, as PEFT does), and inits refused by name when building a config.
_AB_ONLY_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
_REPLAYED_INITS = ("pissa", "olora")
_INIT_REFUSALS = {
    "eva": "EVA initialises A from activations on your data (PEFT's initialize_lora_eva_weights)",
    "mica": "MiCA initialises B from the minor singular vectors of W0 and freezes it",
    "corda": "CorDA needs activation covariances of your data and rewrites W0",
    "loftq": "LoftQ alternates quantization and SVD of W0 and rewrites it",
    "lora_ga": "LoRA-GA initialises from gradients on your data",
}


def config_from_peft(raw: dict, source: str = "adapter_config.json") -> tuple[LoraConfig, list[str]]:
    """LoraConfig from PEFT's adapter_config.json contents, plus warnings for fields ignored as harmless.
    Raises ValueError naming the field when a field would change the math in a way loralab cannot reproduce."""
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{source}: peft_type={raw.get('peft_type')!r}; loralab loads LoRA adapters only")
    for name, why in _UNSUPPORTED.items():
        if raw.get(name) not in (None, False, [], {}):
            raise ValueError(f"{source}: {name}={raw[name]!r} is not supported ({why}); loading it as plain "
                             f"LoRA would give different outputs. Use PEFT for this adapter.")
    init = raw.get("init_lora_weights", True)
    if init not in _AB_ONLY_INITS and init not in _REPLAYED_INITS:
        raise ValueError(f"{source}: init_lora_weights={init!r} rewrites the base weights when PEFT loads the "
                         f"adapter, which loralab cannot reproduce exactly. Convert it to plain LoRA with PEFT "
                         f"(save_pretrained(..., path_initial_model_for_weight_conversion=...)), or set it to "
                         f"true if the base you load onto already is the converted residual model.")
    unknown = sorted(set(raw) - _HONOURED - _NO_MATH - set(_UNSUPPORTED))
    notes = [f"{source}: field {k!r} is unknown to loralab and ignored" for k in unknown]
    kwargs = {k: raw[k] for k in _HONOURED if raw.get(k) is not None}
    kwargs["init_lora_weights"] = init if init in _REPLAYED_INITS else True  # A, B come from the file anyway
    try:
        return LoraConfig(**kwargs), notes
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None
