"""Local transformers model directories: load one offline, merge an adapter into it, save the result.

`load_local_model` is the one loader of a saved model (used by `loralab train`, `merge` and `inspect`).
Nothing is downloaded (HF_HUB_OFFLINE=1, local_files_only=True).  The class comes from the task:

    None          the class config.json's `architectures` names (the model as it was saved)
    "classify"    AutoModelForSequenceClassification; `labels` gives it a new head of that many classes
    "causal-lm"   AutoModelForCausalLM

The merged directory is written next to its destination under a temporary name and renamed into place, so
an interrupted merge never leaves a partial model at OUT_DIR.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from .atomic import atomic_directory
from .load import load_adapter
from .merging import merge_and_unload, untie_adapted_weights

__all__ = ["load_local_model", "merge_model_dir", "probe_output", "TASK_TYPES", "HEAD_NAMES"]

TASK_TYPES = {"classify": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}   # loralab's task -> PEFT's task_type
HEAD_NAMES = ("classifier", "score")   # the output head of *ForSequenceClassification models
_AUTO_CLASSES = {"classify": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")
_WRITTEN_BY_SAVE = ("config.json", "generation_config.json")


def load_local_model(model_dir: str | os.PathLike, task: str | None = None,
                     labels: Sequence[str] | int | None = None, *, tokenizer: bool = False):
    """The model saved in `model_dir` (config.json + weights, as save_pretrained writes), in eval mode and in
    its saved dtype; with tokenizer=True, (model, tokenizer) and the tokenizer's pad id set on the config.

    task: None, "classify" or "causal-lm" (see the module docstring).  labels (classify only): class names
    (they become id2label) or a count; the head is then new, whatever head the directory holds.  Weights
    the directory lacks, other than a classification head, are named in a warning: they start random."""
    import transformers
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; pass a local directory written by save_pretrained "
                                f"(loralab never downloads models)")
    if task is not None and task not in _AUTO_CLASSES:
        raise ValueError(f"task={task!r} is not supported; choose one of None, {', '.join(map(repr, _AUTO_CLASSES))}")
    if labels is not None and task != "classify":
        raise ValueError(f"labels are for task='classify' (a new classification head), not task={task!r}")
    cls = _model_class(transformers, model_dir, task)
    with _quiet(transformers):  # "newly initialized head": the head is new on purpose, other gaps are warned of
        model, info = cls.from_pretrained(model_dir, local_files_only=True, dtype="auto", output_loading_info=True,
                                          **_head_kwargs(labels))
    _warn_missing(model_dir, info, expected=HEAD_NAMES if task == "classify" else ())
    model.eval()
    if not tokenizer:
        return model
    tok = _tokenizer(transformers, model_dir)
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _model_class(transformers, model_dir: Path, task: str | None):
    if task is not None:
        return getattr(transformers, _AUTO_CLASSES[task])
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else transformers.AutoModel
    if cls is None:
        raise ValueError(f"{model_dir}/config.json names architecture {archs[0]!r}, which this transformers "
                         f"{transformers.__version__} does not provide; upgrade transformers")
    return cls


def _head_kwargs(labels) -> dict:
    if labels is None:
        return {}
    if isinstance(labels, int) and not isinstance(labels, bool):
        return {"num_labels": labels, "ignore_mismatched_sizes": True}
    names = [str(n) for n in labels]
    return {"num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)}, "ignore_mismatched_sizes": True}


@contextlib.contextmanager
def _quiet(transformers):
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()


def _warn_missing(model_dir: Path, info: dict, expected: tuple) -> None:
    missing = sorted(k for k in info.get("missing_keys", ()) if k.split(".")[0] not in expected)
    if missing:
        warnings.warn(f"{model_dir}: {len(missing)} weights of the model are not in the directory and start "
                      f"random ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); check that it "
                      f"holds the model you meant", stacklevel=3)


def _tokenizer(transformers, model_dir: Path):
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{model_dir}: no usable tokenizer files (tokenizer.json / vocab.txt / "
                                f"tokenizer_config.json) next to the model; copy the tokenizer's files there "
                                f"({e})") from None


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
