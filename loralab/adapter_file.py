"""Adapter files in PEFT's format: the two files, their key names, and reading them without a model.

A directory holds two files, exactly as PEFT writes them:

    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight   (r, in)
                                base_model.model.<module path>.lora_B.weight   (out, r)
                                base_model.model.<embedding path>.lora_embedding_A   (r, num_embeddings)
                                base_model.model.<embedding path>.lora_embedding_B   (dim, r)
                                base_model.model.<module path>.<param>   full tensors of modules_to_save
                                                                         (and trained biases)
    adapter_config.json         PEFT's LoraConfig fields: peft_type "LORA", r, lora_alpha, target_modules, ...

loralab adds two entries to the safetensors metadata (PEFT ignores metadata): `loralab.fingerprint`, samples of
the base weights the adapter was saved against (fingerprint.py), and `loralab.scaling`, the config fields that
set each module's scaling, so a config from another save is refused instead of silently rescaling the adapter.

`read_adapter(dir)` reads and checks a directory with no model: a valid config (fields that would change the
math refused by name), safetensors (pickle refused unless asked, then weights_only), float tensors without
NaN/Inf, config and weights from the same save.  `adapter_factors` turns it into {module: (A, B, scaling)}.
Writing goes through atomic.py, each file renamed into place complete.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch

from .config import LoraConfig, config_from_peft
from .functional import lora_scaling

__all__ = ["read_adapter", "adapter_factors", "read_factors", "check_same_save", "factor_key", "parse_factor_key", "WEIGHTS_NAME", "CONFIG_NAME",
           "PREFIX", "FINGERPRINT_KEY", "SCALING_KEY", "SCALING_FIELDS", "PICKLE_NAMES"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt")
PREFIX = "base_model.model."
FINGERPRINT_KEY = "loralab.fingerprint"
SCALING_KEY = "loralab.scaling"  # the config fields that set each module's r and α, as saved with the weights
SCALING_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<name>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")
_NAMES = {False: ("lora_A.weight", "lora_B.weight"), True: ("lora_embedding_A", "lora_embedding_B")}


def factor_key(path: str, which: str, embedding: bool) -> str:
    """The file key of factor `which` ("A" / "B") of the module at `path`."""
    return f"{PREFIX}{path}.{_NAMES[embedding]['AB'.index(which)]}"


def parse_factor_key(key: str) -> tuple[str, str, bool] | None:
    """(module path, "A" / "B", embedding?) for a factor key, None for any other tensor."""
    match = _FACTOR.match(key.removeprefix(PREFIX))
    if match is None:
        return None
    name = match["name"]
    return match["module"], "A" if name in ("lora_A.weight", "lora_embedding_A") else "B", name.startswith("lora_emb")


def read_adapter(directory: str | os.PathLike, *, allow_pickle: bool = False, device: str | torch.device = "cpu",
                 same_save: bool = True, allow_nonfinite: bool = False) -> tuple[LoraConfig, dict, dict]:
    """(config, {file key: tensor}, safetensors metadata) of an adapter directory; no model needed.

    Raises FileNotFoundError / ValueError naming the problem and the fix: a missing or invalid config, PEFT
    options loralab cannot reproduce, a pickle file (unless allow_pickle), a corrupt file, non-float tensors,
    NaN/Inf, or weights and config from different saves (same_save=False leaves that check to the caller:
    check_same_save).  allow_nonfinite=True reads NaN/Inf tensors too (to diagnose them, never to load them).
    Harmless unknown config fields are warned about."""
    directory = Path(directory)
    config, notes = _read_config(directory)
    source, tensors, metadata = _read_weights(directory, allow_pickle, device)
    bad = [f"{k}: dtype {v.dtype}; adapter tensors must be float16/bfloat16/float32/float64"
           for k, v in tensors.items() if v.dtype not in FLOAT_DTYPES]
    if not allow_nonfinite:
        bad += [f"{k}: holds NaN/Inf (the adapter diverged or the file is corrupt)"
                for k in _non_finite({k: v for k, v in tensors.items() if v.dtype in FLOAT_DTYPES})]
    if bad:
        more = f"\n    ... and {len(bad) - 12} more" if len(bad) > 12 else ""
        raise ValueError(f"cannot load {source}: {len(bad)} invalid tensors\n    " + "\n    ".join(bad[:12]) + more)
    if same_save:
        check_same_save(config, metadata, source)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return config, tensors, {**metadata, "source": str(source)}


def adapter_factors(config: LoraConfig, tensors: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module path: (A (r, in), B (out, r), scaling)} from a file's tensors, each module's r and α from the
    config (rank_pattern / alpha_pattern included).  Refuses an A without its B and ranks the config does not
    give."""
    pairs: dict[str, dict] = {}
    for key, value in tensors.items():
        parsed = parse_factor_key(key)
        if parsed is not None:
            pairs.setdefault(parsed[0], {})[parsed[1]] = value
    out, bad = {}, []
    for path, got in pairs.items():
        r, alpha = config.rank_and_alpha(path)
        if set(got) != {"A", "B"}:
            bad.append(f"{path}: only lora_{''.join(got)} in the file")
        elif got["A"].shape[0] != r or got["B"].shape[1] != r:
            bad.append(f"{path}: A {tuple(got['A'].shape)}, B {tuple(got['B'].shape)}, but the config gives r={r}")
        else:
            out[path] = (got["A"], got["B"], lora_scaling(r, alpha, config.use_rslora))
    if bad:
        raise ValueError("the adapter's factors do not fit its config: " + "; ".join(bad[:6]))
    return out


def read_factors(directory: str | os.PathLike, *,
                 allow_nonfinite: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module path: (A, B, scaling)} of an adapter directory (read_adapter + adapter_factors); ValueError
    when it holds no LoRA factors at all."""
    config, tensors, metadata = read_adapter(directory, allow_nonfinite=allow_nonfinite)
    factors = adapter_factors(config, tensors)
    if not factors:
        raise ValueError(f"{metadata['source']} holds no lora_A / lora_B tensors; it is not a LoRA adapter")
    return factors


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


def check_same_save(config: LoraConfig, metadata: dict, source) -> None:
    """The two files are renamed into place one after the other; if a save was cut off between the renames,
    the weights and the config come from different saves.  Refuse when the fields that set the scaling differ."""
    saved = json.loads(metadata.get(SCALING_KEY) or "{}")
    differ = [k for k, v in saved.items() if v != getattr(config, k)]
    if differ:
        raise ValueError(f"{source}: {CONFIG_NAME} has {', '.join(f'{k}={getattr(config, k)!r}' for k in differ)} "
                         f"but the weights were saved with {', '.join(f'{k}={saved[k]!r}' for k in differ)}: the two "
                         f"files come from different saves (an interrupted save?). Save the adapter again, or put "
                         f"back the {CONFIG_NAME} written with these weights.")
