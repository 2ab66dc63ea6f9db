"""A trained adapter directory: everything needed to use the adapter, with nothing else from its run.

    adapter_model.safetensors, adapter_config.json   the adapter in PEFT's format (save.py)
    tokenizer files                                  tokenizer.save_pretrained: the tokenizer it was trained with
    loralab.json                                     {"format", "task", "labels", "id2label", "label2id",
                                                      "num_labels", "base_model", "max_length", ...}

The labels live in their own file because adapter_config.json is PEFT's LoraConfig: loralab warns about
fields it does not know there, and other tools may refuse them.  With these files a classifier loads in
PEFT as

    base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=info["num_labels"],
                                                              id2label=..., label2id=...)
    model = PeftModel.from_pretrained(base, ADAPTER_DIR)

The directory is written under a temporary name and renamed into place (atomic.py): a crash never leaves a
half-written adapter where a complete one was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from torch import nn

from .atomic import atomic_directory, atomic_write_text
from .save import save_adapter

__all__ = ["save_trained_adapter", "read_adapter_info", "INFO_NAME", "TASK_OF_PEFT_TYPE"]

INFO_NAME = "loralab.json"
FORMAT = 1
TASK_OF_PEFT_TYPE = {"SEQ_CLS": "classify", "CAUSAL_LM": "causal-lm"}


def save_trained_adapter(model: nn.Module, directory: str | os.PathLike, *, task: str, tokenizer=None,
                         labels: Sequence[str] | None = None, base_model: str | None = None,
                         extra: dict | None = None, **save_kwargs) -> Path:
    """Write the adapter (save_adapter(model, ..., **save_kwargs)), the tokenizer and loralab.json (task,
    labels in class-index order, base model, `extra` run facts) to `directory`, replacing it atomically."""
    labels = [str(n) for n in labels] if labels else []
    info = {"format": FORMAT, "task": task, "labels": labels, "num_labels": len(labels) or None,
            "id2label": {str(i): n for i, n in enumerate(labels)} or None,
            "label2id": {n: i for i, n in enumerate(labels)} or None,
            "base_model": base_model, **(extra or {})}
    with atomic_directory(directory) as tmp:
        save_adapter(model, tmp, base_model_name_or_path=base_model, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        atomic_write_text(tmp / INFO_NAME, json.dumps(info, indent=1) + "\n")
    return Path(directory)


def read_adapter_info(directory: str | os.PathLike) -> dict:
    """loralab.json of an adapter directory.  A directory without one (PEFT's own save) gets what its
    adapter_config.json says: the task from task_type, no labels."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {str(directory)!r} not found; pass the directory "
                                f"`loralab train` wrote (<out>/adapter)")
    path = directory / INFO_NAME
    if path.is_file():
        info = json.loads(path.read_text())
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise ValueError(f"{path}: not a loralab.json of format {FORMAT}; re-save the adapter with "
                             f"`loralab train`")
        return info
    config = directory / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{directory}: no adapter_config.json; pass an adapter directory")
    task = TASK_OF_PEFT_TYPE.get(json.loads(config.read_text()).get("task_type"))
    return {"format": FORMAT, "task": task, "labels": [], "num_labels": None, "base_model": None}
