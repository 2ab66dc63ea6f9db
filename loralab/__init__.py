"""loralab: LoRA for PyTorch — build, train, merge, inspect, quantize, serve adapters.

    y = W0·x + (α/r)·B·A·dropout(x)      W0 frozen, A: (r, in) Kaiming-uniform, B: (out, r) zeros

Names are imported on first use (PEP 562), so `import loralab.reference` needs no torch and `import loralab.layer`
loads no training, file or CLI code.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "config": ["LoraConfig"],
    "layer": ["LoRALinear", "LoRAEmbedding", "LoRAAdapter"],
    "functional": ["delta_weight"],
    "base": ["FrozenBase"],
    "inject": ["add_lora", "trainable_report", "disable_lora", "set_adapter", "delete_adapter", "list_adapters",
               "active_adapters", "find_targets"],
    "routing": ["adapter_rows", "forward_with_adapters", "accept_adapter_names"],
    "merging": ["merge", "unmerge", "merge_and_unload"],
    "adapter_file": ["read_adapter"],
    "save": ["save_adapter"],
    "load": ["load_adapter", "LoadReport"],
    "combine": ["combine_adapters", "CombineReport"],
    "dataset": ["read_records", "tokenize", "TokenizedData"],
    "trainer": ["train", "TrainConfig", "History", "evaluate"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'loralab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
