"""Use a trained adapter: predictions for a data file (`loralab predict`) and its metrics (`loralab eval`).

Everything comes from the adapter directory `loralab train` wrote (trained_adapter.py): the task, the class
names in index order, the tokenizer and max_length it was trained with, the base model's path (the
default for `model_dir`).  Records are tokenized exactly as training tokenized them (dataset.tokenize).

    classify    {"text"} -> {"label": the argmax class, "probabilities": {class: softmax(logits)}}
                (and "true" when the record has a "label"; then the result has the accuracy too)
    causal-lm   {"prompt"} (or {"text"}) -> {"completion"}: up to max_new_tokens new tokens, greedy when
                temperature == 0, else sampled from softmax(logits / temperature) with torch seeded by `seed`

evaluate_file gives the metrics the training loop reports (trainer.evaluate, the same function): the mean
cross-entropy per target ("loss"), "accuracy" (classify), "perplexity" = exp(loss) (causal-lm).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
from torch import nn

from .dataset import IGNORE_INDEX, TokenizedData, read_records, tokenize
from .trained_adapter import read_adapter_info

__all__ = ["load_trained", "predict_records", "predict_file", "evaluate_file", "evaluate_records"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


def load_trained(adapter_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None, *,
                 check_fingerprint: bool = True) -> tuple[nn.Module, object, dict]:
    """(model with the adapter loaded, in eval mode; tokenizer; loralab.json info) for an adapter directory.
    model_dir: the base model (default: the one the adapter was trained on, from loralab.json)."""
    from .hf import load_local_model
    from .load import load_adapter
    adapter_dir = Path(adapter_dir)
    info = read_adapter_info(adapter_dir)
    task, labels = info.get("task"), info.get("labels") or None
    if task is None:
        raise ValueError(f"{adapter_dir}: the adapter does not say its task (no loralab.json, and task_type is "
                         f"not SEQ_CLS / CAUSAL_LM); pass an adapter directory written by `loralab train`")
    if task == "classify" and not labels:
        raise ValueError(f"{adapter_dir}: no class names (loralab.json 'labels'); pass an adapter directory "
                         f"written by `loralab train`, which records them")
    model_dir = model_dir or info.get("base_model")
    if not model_dir:
        raise ValueError(f"{adapter_dir}: the base model is not recorded; pass --model DIR")
    model = load_local_model(model_dir, task, labels)
    tokenizer = _tokenizer(adapter_dir if any((adapter_dir / f).is_file() for f in _TOKENIZER_FILES)
                           else Path(model_dir))
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    load_adapter(model, adapter_dir, check_fingerprint=check_fingerprint)
    model.eval()
    limit = getattr(model.config, "max_position_embeddings", None) or 10 ** 9
    info = {**info, "max_length": min(info.get("max_length") or 512, limit), "model": str(model_dir)}
    return model, tokenizer, info


def _tokenizer(directory: Path):
    import transformers
    try:
        return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{directory}: no usable tokenizer files; pass an adapter directory written by "
                                f"`loralab train` (it holds the tokenizer) ({e})") from None


def _bar(total: int, desc: str, progress: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="example", file=sys.stderr, disable=not progress, dynamic_ncols=True)


@torch.no_grad()
def predict_records(model: nn.Module, tokenizer, info: dict, records: list[dict], *, batch_size: int = 32,
                    max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
                    progress: bool = False) -> list[dict]:
    """One prediction dict per record (see the module docstring), in order."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    bar = _bar(len(records), "predict", progress)
    try:
        if info["task"] == "classify":
            return _classify(model, tokenizer, info, records, batch_size, bar)
        return _generate(model, tokenizer, records, max_new_tokens, temperature, seed, bar)
    finally:
        if bar is not None:
            bar.close()


def _classify(model, tokenizer, info, records, batch_size, bar) -> list[dict]:
    labels = list(info["labels"])
    # tokenized as training did; a record without a label gets a placeholder, never read
    data = tokenize([r if "label" in r else {**r, "label": labels[0]} for r in records], tokenizer, "classify",
                    labels=labels, max_length=info["max_length"], source="data")
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(data), batch_size):
        rows = range(start, min(start + batch_size, len(data)))
        batch = {k: v.to(device) for k, v in data.collate(rows).items() if k != "labels"}
        probs = torch.softmax(model(**batch).logits.float(), dim=-1).cpu()   # (B, C)
        for i, p in zip(rows, probs):
            record = records[i]
            item = {"line": record.get("_line"), "text": record["text"], "label": labels[int(p.argmax())],
                    "probabilities": {name: float(v) for name, v in zip(labels, p)}}
            if "label" in record:
                item["true"] = str(record["label"])
            out.append(item)
        if bar is not None:
            bar.update(len(rows))
    return out


def _generate(model, tokenizer, records, max_new_tokens, temperature, seed, bar) -> list[dict]:
    device = next(model.parameters()).device
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    eos = tokenizer.eos_token_id
    torch.manual_seed(seed)
    out = []
    for record in records:
        prompt = record.get("prompt", record.get("text"))
        if not isinstance(prompt, str):
            raise ValueError(f"data, line {record.get('_line', '?')}: a causal-lm prediction needs a 'prompt' "
                             f"(or 'text') string; found fields {sorted(k for k in record if k != '_line')}")
        ids = torch.tensor([bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)  # 1, T
        new, past = [], None
        for _ in range(max_new_tokens):     # the prompt once, then one token at a time with the KV cache
            step = model(input_ids=ids, past_key_values=past, use_cache=True)
            logits, past = step.logits[0, -1].float(), step.past_key_values                # (V,)
            token = int(logits.argmax()) if temperature == 0 else \
                int(torch.multinomial(torch.softmax(logits / temperature, -1), 1))
            if token == eos:
                break
            new.append(token)
            ids = torch.tensor([[token]], device=device)
        out.append({"line": record.get("_line"), "prompt": prompt, "completion": tokenizer.decode(new),
                    "tokens": len(new)})
        if bar is not None:
            bar.update(1)
    return out


def predict_file(adapter_dir, data, model_dir=None, *, batch_size: int = 32, max_new_tokens: int = 32,
                 temperature: float = 0.0, seed: int = 0, progress: bool = True, say=print) -> dict:
    """`loralab predict`: predictions for every record of `data` (.jsonl / .csv)."""
    model, tokenizer, info = load_trained(adapter_dir, model_dir)
    records = read_records(data)
    say(f"model: {info['model']}\nadapter: {adapter_dir} (task {info['task']})\ndata: {data} ({len(records)} records)")
    preds = predict_records(model, tokenizer, info, records, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            temperature=temperature, seed=seed, progress=progress)
    result = {"task": info["task"], "model": info["model"], "adapter": str(adapter_dir), "data": str(data),
              "predictions": preds}
    for p in preds:
        if info["task"] == "classify":
            mark = "" if "true" not in p else ("  ok" if p["true"] == p["label"] else f"  (true: {p['true']})")
            say(f"{p['label']:<12} {p['probabilities'][p['label']]:.3f}  {p['text'][:70]}{mark}")
        else:
            say(f"{p['prompt']!r} -> {p['completion']!r}")
    if info["task"] == "classify" and preds and all("true" in p for p in preds):
        result["accuracy"] = sum(p["true"] == p["label"] for p in preds) / len(preds)
        say(f"accuracy {result['accuracy']:.3f} on {len(preds)} labelled records")
    return result


@torch.no_grad()
def evaluate_records(model: nn.Module, tokenizer, info: dict, records: list[dict], *, batch_size: int = 32,
                     progress: bool = False, source: str = "data") -> dict:
    """{"examples", "targets", "loss", "accuracy" | "perplexity"}: trainer.evaluate over the records, batch by
    batch (for the progress bar), the means weighted by each batch's targets."""
    from .trainer import TrainConfig, evaluate
    task = info["task"]
    data = tokenize(records, tokenizer, task, labels=info.get("labels") or None, max_length=info["max_length"],
                    source=source)
    config = TrainConfig(task=task, batch_size=batch_size, progress=False)
    loss = correct = targets = 0.0
    bar = _bar(len(data), "eval", progress)
    for start in range(0, len(data), batch_size):
        part = TokenizedData(data.examples[start:start + batch_size], data.pad_token_id, data.labels)
        n = len(part) if task == "classify" else sum(
            sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in part.examples)
        metrics = evaluate(model, part, config, batch_size=batch_size)
        loss, correct, targets = loss + metrics["loss"] * n, correct + metrics.get("accuracy", 0.0) * n, targets + n
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    out = {"examples": len(data), "targets": int(targets), "loss": loss / max(targets, 1)}
    if task == "classify":
        out["accuracy"] = correct / max(targets, 1)
    else:
        out["perplexity"] = math.exp(min(out["loss"], 700.0))
    return out


def evaluate_file(adapter_dir, data, model_dir=None, *, batch_size: int = 32, progress: bool = True,
                  say=print) -> dict:
    """`loralab eval`: the training metrics of the adapter on a labelled data file."""
    model, tokenizer, info = load_trained(adapter_dir, model_dir)
    records = read_records(data)
    say(f"model: {info['model']}\nadapter: {adapter_dir} (task {info['task']})\ndata: {data} ({len(records)} records)")
    metrics = evaluate_records(model, tokenizer, info, records, batch_size=batch_size, progress=progress,
                               source=str(data))
    say("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return {"task": info["task"], "model": info["model"], "adapter": str(adapter_dir), "data": str(data), **metrics}
