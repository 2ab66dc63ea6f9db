"""One adapter directory in PEFT's format, read with safetensors and NumPy for the explorer.

    adapter_model.safetensors   base_model.model.<path>.lora_A.weight  (r, in)   lora_B.weight  (out, r)
                                base_model.model.<path>.lora_embedding_A (r, num_embeddings)
                                base_model.model.<path>.lora_embedding_B (dim, r)
    adapter_config.json         r, lora_alpha, use_rslora, rank_pattern, alpha_pattern, ...

Each adapted module's update is ΔW = scaling·B·A with (r, α) = the config's values for that module
(rank_pattern / alpha_pattern override r / lora_alpha) and scaling = α/r, or α/√r with use_rslora.
For an embedding, B·A is (dim, num_embeddings), the transpose of the rows it adds to the table.

Only the directory given here is read.  The tensor index (names and shapes) is read up front; a module's two
factors are read when its update is asked for.  Pickle files are not read, since unpickling can run code.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import config_from_peft
from ..files import CONFIG_NAME, WEIGHTS_NAME
from ..layer import lora_scaling

__all__ = ["AdapterLayer", "AdapterDir"]

_PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<name>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


@dataclass(frozen=True)
class AdapterLayer:
    """One adapted module: the keys of its factors, its shape (m, n) = (rows of B, columns of A) and scaling."""
    path: str
    key_A: str
    key_B: str
    shape: tuple[int, int]
    r: int
    lora_alpha: float
    scaling: float

    def __post_init__(self):
        if self.r <= 0 or min(self.shape) <= 0 or not self.scaling > 0:
            raise ValueError(f"{self.path}: r={self.r}, shape={self.shape}, scaling={self.scaling} must be positive")


class AdapterDir:
    """The adapted modules of one adapter directory, by module path."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).resolve()
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{directory}: no such adapter directory")
        self.weights = self.directory / WEIGHTS_NAME
        config_path = self.directory / CONFIG_NAME
        for needed in (config_path, self.weights):
            if not needed.is_file():
                listing = sorted(p.name for p in self.directory.iterdir())
                raise FileNotFoundError(f"{needed} is missing (the directory holds {listing}); an adapter "
                                        f"directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        try:
            raw = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
        self.config, _ = config_from_peft(raw, str(config_path))
        self.layers = self._index()

    def _index(self) -> dict[str, AdapterLayer]:
        shapes = self._shapes()
        factors: dict[str, dict[str, str]] = {}
        for key in shapes:
            match = _FACTOR.match(key)
            if match:
                which = "A" if match["name"] in ("lora_A.weight", "lora_embedding_A") else "B"
                factors.setdefault(match["module"], {})[which] = key
        layers = {}
        for module, keys in factors.items():
            if set(keys) != {"A", "B"}:
                raise ValueError(f"{self.weights}: module {module} has only lora_{''.join(keys)}; "
                                 f"every adapted module needs both lora_A and lora_B")
            path = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
            (r_a, n), (m, r_b) = shapes[keys["A"]], shapes[keys["B"]]
            r, alpha = self.config.rank_and_alpha(path)
            if not r == r_a == r_b:
                raise ValueError(f"{self.weights}: {path} has lora_A {shapes[keys['A']]} and lora_B "
                                 f"{shapes[keys['B']]}, but {CONFIG_NAME} gives it r={r}; the config belongs "
                                 f"to another save")
            scaling = lora_scaling(r, alpha, self.config.use_rslora)
            layers[path] = AdapterLayer(path, keys["A"], keys["B"], (m, n), r, float(alpha), scaling)
        if not layers:
            raise ValueError(f"{self.weights}: no lora_A / lora_B tensors found; is this a LoRA adapter?")
        return dict(sorted(layers.items()))

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        from safetensors import safe_open
        try:
            with safe_open(self.weights, framework="numpy") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # SafetensorError, OSError: a truncated or corrupt file
            raise ValueError(f"{self.weights}: cannot be read as safetensors ({e}); save it again") from None
        bad = [k for k, s in shapes.items() if _FACTOR.match(k) and len(s) != 2]
        if bad:
            raise ValueError(f"{self.weights}: factors must be 2-D matrices, but {bad[0]} has shape {shapes[bad[0]]}")
        return shapes

    def factors(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """(A (r, n), B (m, r)) of one module as float32 arrays."""
        layer = self.layers[path]
        return _read(self.weights, layer.key_A), _read(self.weights, layer.key_B)


def _read(file: Path, key: str) -> np.ndarray:
    """One tensor as float32; bf16 (which NumPy has no dtype for) goes through torch."""
    from safetensors import safe_open
    with safe_open(file, framework="numpy") as f:
        if f.get_slice(key).get_dtype() != "BF16":
            return np.asarray(f.get_tensor(key), dtype=np.float32)
    with safe_open(file, framework="pt") as f:
        return f.get_tensor(key).float().numpy()
