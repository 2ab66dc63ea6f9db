"""Local transformers model directories: load one offline, merge an adapter into it, save the result.

Used by `loralab merge`.  Nothing is downloaded (HF_HUB_OFFLINE=1, local_files_only=True); the model class
comes from config.json's `architectures`.  The merged directory is written next to its destination under a
temporary name and renamed into place, so an interrupted merge never leaves a partial model at OUT_DIR.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from .atomic import atomic_directory
from .load import load_adapter
from .merging import merge_and_unload, untie_adapted_weights

__all__ = ["load_local_model", "merge_model_dir", "probe_output"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")
_WRITTEN_BY_SAVE = ("config.json", "generation_config.json")


def load_local_model(model_dir: str | os.PathLike) -> nn.Module:
    """The model in `model_dir` (config.json + weights), class from config.architectures, in its saved dtype."""
    import transformers
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; pass a directory written by save_pretrained")
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else transformers.AutoModel
    if cls is None:
        raise ValueError(f"{model_dir}/config.json names architecture {archs[0]!r}, which this transformers "
                         f"{transformers.__version__} does not provide; upgrade transformers")
    return cls.from_pretrained(model_dir, local_files_only=True, dtype="auto").eval()


def probe_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's main output for token ids (logits, or the last hidden state), in float32, without autograd."""
    with torch.no_grad():
        out = model(input_ids=ids)
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name).float()
    return out[0].float()


def merge_model_dir(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    *, overwrite: bool = False, check_fingerprint: bool = True, probe_tokens: int = 16,
                    seed: int = 0, say=None) -> dict:
    """Load `model_dir`, load the adapter, merge it into the base weights, save to `out_dir`.

    Also runs a probe batch (2 × probe_tokens random token ids) through the model before and after merging
    and reports the largest absolute output difference.  Tokenizer and other non-weight files of
    `model_dir` are copied along.  Returns a JSON-ready dict."""
    say = say or (lambda *a: None)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out} already exists and is not empty; choose another output directory or "
                         f"pass overwrite=True (--overwrite)")
    say(f"loading {model_dir}")
    model = load_local_model(model_dir)
    vocab = model.get_input_embeddings().num_embeddings
    report = load_adapter(model, adapter_dir, check_fingerprint=check_fingerprint)
    say(f"loaded adapter {adapter_dir}: {report.modules} modules, fingerprint {report.fingerprint}")
    ids = torch.randint(0, vocab, (2, probe_tokens), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(next(model.parameters()).device)
    before = probe_output(model, ids)
    untied = untie_adapted_weights(model)
    if untied:
        say(f"untied {', '.join(untied)} from the adapted weights they shared, so merging changes only the "
            f"adapted layers")
    merge_and_unload(model)
    diff = (before - probe_output(model, ids)).abs().max().item()
    say(f"max |unmerged - merged| output difference on the probe batch: {diff:.3e} "
        f"(output scale {before.abs().max().item():.3e})")
    _save_atomic(model, Path(model_dir), out)
    say(f"wrote {out}")
    return {"out": str(out), "model_class": type(model).__name__, "adapter_modules": report.modules,
            "fingerprint": report.fingerprint, "untied": untied, "dtype": str(next(model.parameters()).dtype),
            "probe_shape": list(ids.shape), "max_abs_diff": diff}


def _save_atomic(model: nn.Module, model_dir: Path, out: Path) -> None:
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        for f in model_dir.iterdir():  # tokenizer, chat template, ...: everything that is not weights
            if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name not in _WRITTEN_BY_SAVE:
                shutil.copy2(f, tmp / f.name)
