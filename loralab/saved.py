"""Modules trained in full next to the adapters (PEFT's `modules_to_save`), one copy per adapter.

A classifier head or an output layer that must change completely (a new head has no pretrained weights
for a low-rank update to adjust) is trained in full.  `SavedModule` wraps it:

    original_module            the module as the base model has it: frozen, never written
    modules_to_save[name]      adapter `name`'s own copy, trained and saved with that adapter

Only the active adapter's copy computes the output (the original when no adapter with a copy is active, or
inside `disable_lora`), so two adapters that each carry a head never share or sum it, and an output head
tied to the input embedding (GPT-2, Gemma, `tie_word_embeddings=True`) is copied instead of trained through
the embedding it shares a tensor with.  The state_dict keys are PEFT's
(`<path>.original_module.weight`, `<path>.modules_to_save.<name>.weight`).

Which modules: PEFT's rule, a module whose path ends with one of the names (plain string suffix).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["SavedModule", "saved_modules", "find_saved", "inside_saved"]


class SavedModule(nn.Module):
    """A module trained in full: a frozen original and one trainable copy per adapter."""

    def __init__(self, original: nn.Module):
        super().__init__()
        if isinstance(original, SavedModule):
            raise TypeError("this module is already wrapped as a module to save; add a copy with add_copy()")
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None     # the adapter whose copy computes the output
        self.disabled = False              # disable_lora: the original computes the output
        self.rows: list | None = None      # adapter_rows: one adapter name (or None) per row of the batch

    def add_copy(self, name: str, *, trainable: bool = True) -> nn.Module:
        """Adapter `name`'s copy of the original (a deep copy: it shares no tensor with anything)."""
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        module = copy.deepcopy(self.original_module).train(self.original_module.training)
        self.modules_to_save[name] = module.requires_grad_(trainable)
        return module

    def remove_copy(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active == name:
            self.active = None

    def in_use(self) -> nn.Module:
        """The module that computes the output now."""
        if self.disabled or self.active is None:
            return self.original_module
        return self.modules_to_save[self.active]

    def forward(self, x, *args, **kwargs):
        if self.rows is None:
            return self.in_use()(x, *args, **kwargs)
        return self._forward_rows(x, *args, **kwargs)

    def _forward_rows(self, x, *args, **kwargs):
        """adapter_rows: each group of rows through its adapter's copy (the original for rows of adapters
        without one), stitched back in row order."""
        if x.shape[0] != len(self.rows):
            raise ValueError(f"a module to save got a batch of {x.shape[0]} rows under adapter_rows for "
                             f"{len(self.rows)} rows; routing follows the first dimension of its input")
        groups: dict = {}
        for i, name in enumerate(self.rows):
            use = name if (name in self.modules_to_save and not self.disabled) else None
            groups.setdefault(use, []).append(i)
        outs = {}
        for name, rows in groups.items():
            module = self.original_module if name is None else self.modules_to_save[name]
            for i, y in zip(rows, module(x[rows], *args, **kwargs)):
                outs[i] = y
        return torch.stack([outs[i] for i in range(len(self.rows))])

    def __getattr__(self, name: str):
        """Attributes the wrapper does not have are those of the module in use (`.weight` of a saved embedding,
        as PEFT answers them)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.in_use(), name)

    def extra_repr(self) -> str:
        return f"copies={list(self.modules_to_save)}, active={self.active}, disabled={self.disabled}"


def saved_modules(model: nn.Module) -> dict[str, SavedModule]:
    """{module path: SavedModule} for every module trained in full in the model."""
    return {path: m for path, m in model.named_modules() if isinstance(m, SavedModule)}


def find_saved(paths, names) -> list[str]:
    """The paths PEFT wraps for `modules_to_save=names`: those ending with one of the names."""
    return [p for p in paths if any(p.endswith(n) for n in names or ())]


def inside_saved(path: str, names) -> bool:
    """PEFT's rule for keeping LoRA off modules to save: `path` is one of them or inside one (the names
    are regular expressions matched on whole dotted segments)."""
    import re
    return any(re.match(rf"(^|.*\.){n}($|\..*)", path) for n in names or ())
