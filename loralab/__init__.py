"""loralab: LoRA for PyTorch — build, train, merge, inspect, quantize, serve adapters.

    y = W0·x + (α/r)·B·A·dropout(x)      W0 frozen, A: (r, in) Kaiming-uniform, B: (out, r) zeros
"""

from .config import LoraConfig
from .inject import (add_lora, delete_adapter, disable_lora, find_targets, list_adapters, set_adapter,
                     trainable_report)
from .layer import LoRAAdapter, LoRAEmbedding, LoRALinear, delta_weight
from .merge import merge, merge_and_unload, unmerge
from .files import LoadReport, load_adapter, save_adapter
from .combine import CombineReport, combine_adapters
from .dataset import TokenizedData, read_records, tokenize
from .trainer import History, TrainConfig, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "LoRALinear", "LoRAEmbedding", "LoRAAdapter", "add_lora", "trainable_report", "merge",
    "unmerge", "merge_and_unload", "disable_lora", "set_adapter", "delete_adapter", "list_adapters",
    "find_targets", "delta_weight",
    "save_adapter", "load_adapter", "LoadReport", "combine_adapters", "CombineReport",
    "train", "TrainConfig", "History", "evaluate", "read_records", "tokenize", "TokenizedData",
]
