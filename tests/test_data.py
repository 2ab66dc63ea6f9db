"""loralab.dataset: reading JSONL/CSV, the errors users hit, tokenizing both tasks, padding batches."""

import json
import warnings

import pytest
import torch

from loralab.dataset import (IGNORE_INDEX, TokenizedData, check_records, label_names, read_records, split_records,
                             tokenize)


class CharTokenizer:
    """A stand-in tokenizer: one id per character, [CLS]=1 ... [SEP]=2 around the text, pad 0, eos 3."""
    pad_token_id, eos_token_id, bos_token_id = 0, 3, None
    all_special_ids = [0, 1, 2, 3]

    def __call__(self, text, add_special_tokens=True, truncation=False):
        ids = [10 + (ord(c) % 90) for c in text]
        return {"input_ids": [1] + ids + [2] if add_special_tokens else ids}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reads_jsonl_and_csv(tmp_path):
    rows = [{"text": "a b", "label": "x"}, {"text": "c, d", "label": "y"}]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('text,label\na b,x\n"c, d",y\n')
    for path in (jsonl, csv_path):
        records = read_records(path)
        assert [(r["text"], r["label"]) for r in records] == [("a b", "x"), ("c, d", "y")]
        assert [r["_line"] for r in records] == ([1, 2] if path == jsonl else [2, 3])


@pytest.mark.parametrize("content, fragment", [
    ('{"text": "ok", "label": 1}\n{"text": "broken", label: 2}\n', "line 2: malformed JSON"),
    ('{"text": "ok", "label": 1}\n\n["a", "list"]\n', "line 3: expected a JSON object"),
    ("", "empty"),
    ("\n\n", "empty"),
])
def test_bad_jsonl_errors_name_the_line(tmp_path, content, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=fragment):
        read_records(path)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(ValueError, match="unknown data format '.txt'"):
        read_records(tmp_path / "d.txt")


def test_missing_field_names_line_and_fields(tmp_path):
    records = read_records(write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"txt": "b", "label": 1}]))
    with pytest.raises(ValueError, match=r"line 2: missing field\(s\) \['text'\].*found \['label', 'txt'\]"):
        check_records(records, "classify", "d.jsonl")
    with pytest.raises(ValueError, match="task='regress' is not supported"):
        check_records(records, "regress")
    assert check_records([{"prompt": "p", "completion": "c"}], "causal-lm") == "prompt-completion"
    assert check_records([{"text": "t"}], "causal-lm") == "text"


def test_labels_sorted_and_unknown_label_is_an_error():
    assert label_names([{"label": 10}, {"label": 2}, {"label": 2}]) == ("2", "10")
    assert label_names([{"label": "b"}, {"label": "a"}]) == ("a", "b")
    data = tokenize([{"text": "hi", "label": "b", "_line": 1}], CharTokenizer(), "classify", labels=("a", "b"))
    assert data.examples[0]["labels"] == 1 and data.labels == ("a", "b")
    with pytest.raises(ValueError, match=r"line 7: unknown label 'c'; the labels are \['a', 'b'\]"):
        tokenize([{"text": "hi", "label": "c", "_line": 7}], CharTokenizer(), "classify", labels=("a", "b"))


def test_truncation_warns_once_and_keeps_the_closing_token():
    records = [{"text": "x" * 50, "label": "a"} for _ in range(5)] + [{"text": "short", "label": "a"}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = tokenize(records, CharTokenizer(), "classify", max_length=8)
    assert len(caught) == 1 and "5 of 6 examples are longer than max_length=8" in str(caught[0].message)
    assert all(len(e["input_ids"]) <= 8 for e in data.examples)
    assert data.examples[0]["input_ids"][-1] == 2  # [SEP] survives truncation


def test_prompt_completion_loss_only_on_completion():
    data = tokenize([{"prompt": "ab", "completion": "cd"}], CharTokenizer(), "causal-lm")
    ex = data.examples[0]
    assert len(ex["input_ids"]) == 5  # a b c d eos (no special tokens around causal text)
    assert ex["labels"] == [IGNORE_INDEX, IGNORE_INDEX] + ex["input_ids"][2:]
    assert ex["input_ids"][-1] == 3
    full = tokenize([{"text": "abc"}], CharTokenizer(), "causal-lm").examples[0]
    assert full["labels"] == full["input_ids"]


def test_collate_pads_right_with_mask_and_ignore_index():
    data = TokenizedData([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                         pad_token_id=0)
    batch = data.collate([0, 1])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    plain = TokenizedData([{"x": torch.ones(3), "labels": 1}, {"x": torch.zeros(3), "labels": 0}]).collate([0, 1])
    assert plain["x"].shape == (2, 3) and plain["labels"].tolist() == [1, 0]


def test_split_is_seeded_and_disjoint():
    records = [{"text": str(i), "label": "a"} for i in range(20)]
    train, held = split_records(records, 0.1, seed=3)
    assert len(held) == 2 and len(train) == 18
    assert {r["text"] for r in train}.isdisjoint(r["text"] for r in held)
    assert split_records(records, 0.1, seed=3)[1] == held


def test_bundled_dataset_is_well_formed():
    from loralab.train_job import BUNDLED_EVAL, BUNDLED_TRAIN
    train, held = read_records(BUNDLED_TRAIN), read_records(BUNDLED_EVAL)
    check_records(train, "classify"), check_records(held, "classify")
    assert len(train) >= 300 and len(held) >= 100
    assert label_names(train) == label_names(held) == ("Cairo", "Lisbon", "Oslo", "Tokyo")
    assert not {r["text"] for r in train} & {r["text"] for r in held}  # training never sees held-out text
    # every sentence names two of the cities, so which one is the destination is the whole task
    for r in train + held:
        assert sum(city in r["text"] for city in label_names(train)) == 2, r

