"""One adapter directory in PEFT's format, read with safetensors and NumPy for the explorer.

    adapter_model.safetensors   base_model.model.<path>.lora_A.weight  (r, in)   lora_B.weight  (out, r)
                                base_model.model.<path>.lora_embedding_A (r, num_embeddings)
                                base_model.model.<path>.lora_embedding_B (dim, r)
    adapter_config.json         r, lora_alpha, use_rslora, rank_pattern, alpha_pattern, ...

Each adapted module's update is ΔW = scaling·B·A with (r, α) = the config's values for that module
(rank_pattern / alpha_pattern override r / lora_alpha) and scaling = α/r, or α/√r with use_rslora.
For an embedding, B·A is (dim, num_embeddings), the transpose of the rows it adds to the table.

Only the directory given here is read (adapter_file.read_factors: the same checks as loading it; pickle files
are not read, since unpickling can run code).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..adapter_file import adapter_factors, read_adapter

__all__ = ["AdapterLayer", "AdapterDir"]


@dataclass(frozen=True)
class AdapterLayer:
    """One adapted module: its shape (m, n) = (rows of B, columns of A), rank, alpha and scaling."""
    path: str
    shape: tuple[int, int]
    r: int
    lora_alpha: float
    scaling: float


class AdapterDir:
    """The adapted modules of one adapter directory, by module path (read and checked as loading it is:
    adapter_file.read_adapter)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).resolve()
        self.config, tensors, metadata = read_adapter(self.directory)
        self._factors = dict(sorted(adapter_factors(self.config, tensors).items()))
        if not self._factors:
            raise ValueError(f"{metadata['source']}: no lora_A / lora_B tensors found; is this a LoRA adapter?")
        self.layers = {p: AdapterLayer(p, (B.shape[0], A.shape[1]), A.shape[0],
                                       float(self.config.rank_and_alpha(p)[1]), float(s))
                       for p, (A, B, s) in self._factors.items()}

    def factors(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """(A (r, n), B (m, r)) of one module as float32 arrays."""
        A, B, _ = self._factors[path]
        return A.float().numpy(), B.float().numpy()
