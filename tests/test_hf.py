"""loralab.hf: the one offline loader of a saved model, and `loralab merge` end to end: a local model
directory + an adapter directory -> a merged model directory that transformers loads and that computes what
the unmerged adapter computed."""

import json
import re
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from loralab import LoraConfig, add_lora, save_adapter
from loralab.cli import main
from loralab.hf import load_local_model, merge_model_dir
from loralab.inject import lora_layers


def _dirs(tmp_path, build=tiny_llama, targets="all-linear", base_seed=0):
    """base/ (save_pretrained + a tokenizer file) and adapter/; returns the adapted in-memory model."""
    base = build(base_seed)
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    model = build(0)
    torch.manual_seed(1)
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    save_adapter(model, tmp_path / "adapter")
    return model


def _merge(tmp_path, *extra):
    return main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize("build, targets, untied", [
    (tiny_llama, "all-linear", []),
    (tiny_gpt2, ["c_attn", "wte"], ["lm_head.weight"]),  # GPT-2 ties lm_head to wte: merging must untie it
])
def test_merge_writes_a_model_with_the_adapted_outputs(build, targets, untied, tmp_path, capsys, ids):
    adapted = _dirs(tmp_path, build, targets)
    assert _merge(tmp_path, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["max_abs_diff"] < 1e-5 and result["untied"] == untied
    assert result["adapter_modules"] == len(lora_layers(adapted)) and result["fingerprint"] == "matched"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    assert not lora_layers(merged)
    with torch.no_grad():
        expected = adapted(ids).logits
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=0)
        assert (build(0)(ids).logits - expected).abs().max() > 1e-2  # the merge changed the model
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]  # no temp dirs left


def test_human_output_and_existing_output_directory(tmp_path, capsys):
    _dirs(tmp_path)
    assert _merge(tmp_path) == 0
    assert "max |unmerged - merged| output difference" in capsys.readouterr().out
    stamp = (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns
    assert _merge(tmp_path) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns == stamp
    assert _merge(tmp_path, "--overwrite") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]


def test_fingerprint_mismatch_fails_unless_disabled(tmp_path, capsys):
    _dirs(tmp_path, base_seed=1)  # the adapter was saved against seed 0, base/ holds seed 1
    assert _merge(tmp_path, "--json") == 2
    assert "differs from the one the adapter was saved against" in json.loads(capsys.readouterr().out)["error"]
    assert not (tmp_path / "out").exists()
    assert _merge(tmp_path, "--json", "--no-fingerprint-check") == 0
    assert json.loads(capsys.readouterr().out)["fingerprint"] == "skipped"


def test_failed_save_leaves_no_output(tmp_path, monkeypatch):
    _dirs(tmp_path)

    def crash(self, directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        merge_model_dir(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


# ---- the one loader of a saved model ----------------------------------------------------------------------
def _saved(tmp_path, build, name):
    build(0).save_pretrained(tmp_path / name)
    return tmp_path / name


def test_the_task_picks_the_class_and_weights_come_from_the_directory(tmp_path, ids):
    from transformers import BertForSequenceClassification, BertModel, LlamaForCausalLM
    llama, bert = _saved(tmp_path, tiny_llama, "llama"), _saved(tmp_path, tiny_bert, "bert")
    for task in (None, "causal-lm"):
        model = load_local_model(llama, task)
        assert type(model) is LlamaForCausalLM and not model.training
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, tiny_llama(0)(ids).logits, rtol=0, atol=0)
    assert type(load_local_model(bert)) is BertModel
    clf = load_local_model(bert, "classify", ["no", "yes", "maybe"])
    assert type(clf) is BertForSequenceClassification and clf.classifier.out_features == 3
    assert clf.config.id2label == {0: "no", 1: "yes", 2: "maybe"} and clf.config.label2id["maybe"] == 2
    embeddings = clf.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(embeddings, tiny_bert(0).embeddings.word_embeddings.weight, rtol=0, atol=0)
    assert load_local_model(bert, "classify", 5).classifier.out_features == 5   # a count: the size of a saved head


def test_a_new_head_is_quiet_but_other_missing_weights_are_named(tmp_path):
    bert = _saved(tmp_path, tiny_bert, "bert")
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # the classification head is new on purpose: no warning
        load_local_model(bert, "classify", ["a", "b"])
    with pytest.warns(UserWarning, match=r"weights of the model are not in the directory and start random \(cls\."):
        load_local_model(bert, "causal-lm")         # BERT's language-model head was never saved


@pytest.mark.parametrize("call, error, fragment", [
    (lambda d: load_local_model(d / "nothing-here"), FileNotFoundError, "no config.json; pass a local directory "
                                                                        "written by save_pretrained"),
    (lambda d: load_local_model("bert-base-uncased"), FileNotFoundError, "loralab never downloads models"),
    (lambda d: load_local_model(d / "llama", "translate"), ValueError, "task='translate' is not supported"),
    (lambda d: load_local_model(d / "llama", None, ["a"]), ValueError, "labels are for task='classify'"),
    (lambda d: load_local_model(d / "llama", tokenizer=True), FileNotFoundError, "no usable tokenizer files"),
])
def test_loader_errors_say_what_to_pass(tmp_path, call, error, fragment):
    _saved(tmp_path, tiny_llama, "llama")
    with pytest.raises(error, match=re.escape(fragment)):
        call(tmp_path)


def test_with_its_tokenizer_the_pad_id_reaches_the_model_config(tmp_path):
    import shutil
    from loralab.train_job import bundled_model_dir
    llama = _saved(tmp_path, tiny_llama, "llama")
    assert load_local_model(llama).config.pad_token_id is None
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled_model_dir() / name, llama / name)   # MiniLM's tokenizer, which has a pad token
    model, tokenizer = load_local_model(llama, "causal-lm", tokenizer=True)
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id == 0
