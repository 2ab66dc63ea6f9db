"""Training files: read JSONL / CSV records, check them, tokenize them, pad them into batches.

Two tasks, each with its record shapes:

    classify     {"text": str, "label": str|int}         one label per example, loss on the label
    causal-lm    {"text": str}                            next-token loss on every token
                 {"prompt": str, "completion": str}       next-token loss on the completion tokens only
                 {"messages": [{"role", "content"}, ...]} the tokenizer's chat template; loss on the
                                                          assistant turns only (see chat.py)

A causal-lm tokenizer must have an end-of-sequence token (appended to each text / completion, and what a
chat turn without a template ends with): without one, tokenize() is an error saying how to set it.

A tokenized example is a dict of plain lists: {"input_ids": [T], "labels": int (classify) or [T] (causal-lm,
-100 where no loss is taken)}.  `TokenizedData.collate` pads a list of them into tensors:

    input_ids (B, T)  attention_mask (B, T)  labels (B,) or (B, T)   (right padding; labels pad with -100)

Examples may also carry any other key holding a tensor (or number) of one fixed shape; those are stacked,
so a plain nn.Module taking e.g. `x` (B, D) trains the same way.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .chat import chat_example, check_messages, has_chat_template

__all__ = ["TASKS", "IGNORE_INDEX", "read_records", "check_records", "label_names", "tokenize",
           "TokenizedData", "split_records"]

TASKS = ("classify", "causal-lm")
IGNORE_INDEX = -100          # cross-entropy skips these targets (PyTorch's and transformers' convention)
FORMATS = (".jsonl", ".json", ".csv")


def read_records(path: str | Path) -> list[dict]:
    """Records from a .jsonl (one JSON object per line; blank lines skipped) or .csv (header row) file.
    Each record remembers its line number under "_line" for later error messages."""
    path = Path(path)
    if not path.is_file():
        hint = "it is a directory; pass a file inside it" if path.is_dir() else "check the path"
        raise FileNotFoundError(f"data file {str(path)!r} not found ({hint}); expected {' or '.join(FORMATS)}")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unknown data format {suffix!r}; use one of {FORMATS} "
                         f"(JSONL: one JSON object per line; CSV: a header row naming the columns)")
    records = _read_csv(path) if suffix == ".csv" else _read_jsonl(path)
    if not records:
        raise ValueError(f"{path}: the dataset is empty (no records); add at least one example")
    return records


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: malformed JSON ({e.msg} at column {e.colno}); "
                                 f"each line must be one JSON object such as "
                                 f'{{"text": "...", "label": "..."}}') from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got "
                                 f"{type(record).__name__} ({line.strip()[:60]})")
            records.append({**record, "_line": number})
    return records


def _read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            return []
        # line numbers count the header as line 1
        return [{**{k: v for k, v in row.items() if k is not None}, "_line": reader.line_num}
                for row in reader if any((v or "").strip() for v in row.values() if isinstance(v, str))]


def check_records(records: Sequence[dict], task: str, source: str = "data") -> str:
    """Check every record has the fields `task` needs; returns the causal-lm form ("text" or
    "prompt-completion", or "label" for classify).  Errors name the line and the fields found."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; choose one of {TASKS}")
    if not records:
        raise ValueError(f"{source}: the dataset is empty (no records); add at least one example")
    if task == "classify":
        need, form = ("text", "label"), "label"
    else:
        form = "messages" if "messages" in records[0] else "prompt-completion" if "prompt" in records[0] else "text"
        need = {"messages": ("messages",), "prompt-completion": ("prompt", "completion"), "text": ("text",)}[form]
    for record in records:
        missing = [k for k in need if k not in record or record[k] is None]
        if missing:
            fields = sorted(k for k in record if k != "_line")
            raise ValueError(f"{source}, line {record.get('_line', '?')}: missing field(s) {missing} for task "
                             f"{task!r} (found {fields}); every record of this file needs {list(need)}")
        if form == "messages":
            check_messages(record, source)
            continue
        bad = [k for k in need if k != "label" and not isinstance(record[k], str)]
        if bad:
            raise ValueError(f"{source}, line {record.get('_line', '?')}: field {bad[0]!r} must be a string, "
                             f"got {type(record[bad[0]]).__name__}")
    return form


def label_names(records: Sequence[dict]) -> tuple[str, ...]:
    """The class names of a classify dataset, sorted (numbers sort numerically), as strings."""
    names = {str(r["label"]) for r in records}
    numeric = all(n.lstrip("-").isdigit() for n in names)
    return tuple(sorted(names, key=int if numeric else str))


def split_records(records: Sequence[dict], fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held_out): a seeded random `fraction` of the records held out (at least one each)."""
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    n_out = min(max(1, round(fraction * len(records))), len(records) - 1)
    if n_out < 1:
        raise ValueError(f"cannot hold out examples from a dataset of {len(records)}; pass --eval-data")
    held = set(order[:n_out])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


# ---- tokenizing -----------------------------------------------------------------------------------------
def tokenize(records: Sequence[dict], tokenizer, task: str, *, labels: Sequence[str] | None = None,
             max_length: int = 512, source: str = "data") -> "TokenizedData":
    """Token ids (and targets) for each record.  Sequences longer than max_length are truncated, with one
    warning per call.  For classify, `labels` fixes the class order (default: label_names(records)); a label
    outside it is an error naming the line."""
    form = check_records(records, task, source)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    if task == "classify":
        labels = tuple(labels) if labels is not None else label_names(records)
        index = {name: i for i, name in enumerate(labels)}
        examples, cut = _tokenize_classify(records, tokenizer, index, max_length, source)
    else:
        _check_eos(tokenizer)
        if form == "messages" and not has_chat_template(tokenizer):
            warnings.warn(f"{source}: the tokenizer has no chat template; the conversations are rendered as "
                          f"'role: content' lines, each assistant reply ending with {tokenizer.eos_token!r} "
                          f"(loralab.chat.FALLBACK_TEMPLATE)", stacklevel=2)
        examples, cut = _tokenize_causal(records, tokenizer, form, max_length, source)
    if cut:
        warnings.warn(f"{source}: {cut} of {len(records)} examples are longer than max_length={max_length} "
                      f"tokens and were truncated (the model sees only their first {max_length} tokens)",
                      stacklevel=2)
    return TokenizedData(examples, pad_token_id=int(pad), labels=tuple(labels) if labels else None)


def _tokenize_classify(records, tokenizer, index: dict, max_length: int, source: str):
    examples, cut = [], 0
    for record in records:
        name = str(record["label"])
        if name not in index:
            raise ValueError(f"{source}, line {record.get('_line', '?')}: unknown label {name!r}; "
                             f"the labels are {list(index)} (those of the training data)")
        ids = tokenizer(record["text"], truncation=False)["input_ids"]
        if len(ids) > max_length:
            cut += 1
            closing = ids[-1:] if ids[-1] in tokenizer.all_special_ids else []  # keep [SEP] / </s>
            ids = ids[:max_length - len(closing)] + closing
        examples.append({"input_ids": ids, "labels": index[name]})
    return examples, cut


def _check_eos(tokenizer) -> None:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no end-of-sequence token, so a causal LM "
                         f"trained with it would never learn to stop. Set one: add \"eos_token\": \"</s>\" (the "
                         f"model's own end token) to tokenizer_config.json in the model directory, or from Python "
                         f"tokenizer.eos_token = \"</s>\" (tokenizer.add_special_tokens({{\"eos_token\": ...}}) if "
                         f"the token is new: then resize the model's embeddings)")


def _tokenize_causal(records, tokenizer, form: str, max_length: int, source: str = "data"):
    eos = tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    examples, cut = [], 0
    for record in records:
        if form == "messages":
            ids, targets = chat_example(tokenizer, record["messages"], f"{source}, line {record.get('_line', '?')}")
            if len(ids) > max_length:
                cut += 1
                ids, targets = ids[:max_length], targets[:max_length]
            examples.append({"input_ids": ids, "labels": targets})
            continue
        if form == "text":
            prompt, completion = [], _ids(tokenizer, record["text"])
        else:
            prompt = _ids(tokenizer, record["prompt"])
            completion = _ids(tokenizer, record["completion"])
        completion = completion + ([eos] if eos is not None else [])
        ids = bos + prompt + completion
        targets = [IGNORE_INDEX] * (len(bos) + len(prompt)) + completion  # loss on the completion only
        if len(ids) > max_length:
            cut += 1
            ids, targets = ids[:max_length], targets[:max_length]
        examples.append({"input_ids": ids, "labels": targets})
    return examples, cut


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- batches --------------------------------------------------------------------------------------------
@dataclass
class TokenizedData:
    """A list of tokenized examples plus what batching needs: the pad id and (classify) the class names."""
    examples: list
    pad_token_id: int = 0
    labels: tuple | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Pad examples[indices] into a batch: variable-length lists are right-padded (input_ids with the
        pad id, labels with -100, attention_mask 1 on real tokens); fixed-shape values are stacked."""
        rows = [self.examples[i] for i in indices]
        batch = {}
        for key in rows[0]:
            values = [row[key] for row in rows]
            if isinstance(values[0], (list, tuple)):
                fill = IGNORE_INDEX if key == "labels" else (self.pad_token_id if key == "input_ids" else 0)
                batch[key] = _pad(values, fill)
                if key == "input_ids" and "attention_mask" not in rows[0]:
                    batch["attention_mask"] = _pad([[1] * len(v) for v in values], 0)
            else:
                batch[key] = torch.stack([torch.as_tensor(v) for v in values])
        return batch


def _pad(rows: list, fill: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out
