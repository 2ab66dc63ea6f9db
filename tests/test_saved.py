"""Modules trained in full (modules_to_save): a copy per adapter, tied weights left alone, heads switched with
the adapter, checked against PEFT."""

import peft
import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from loralab import LoraConfig, add_lora, delete_adapter, disable_lora, load_adapter, save_adapter, set_adapter
from loralab.inject import active_adapters, list_adapters
from loralab.merging import merge_and_unload
from loralab.saved import SavedModule


def _classifier(seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=64, num_labels=3, pad_token_id=0)).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_training_a_tied_head_leaves_the_input_embedding_alone(ids):
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as GPT-2 is
    wte = model.transformer.wte.weight.detach().clone()
    add_lora(model, LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    model.train()
    model(input_ids=ids).logits.square().mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    assert torch.equal(model.transformer.wte.weight, wte)           # the embedding did not train
    assert torch.equal(model.lm_head.original_module.weight, wte)   # nor did the base's own head
    assert not torch.equal(model.lm_head.modules_to_save["default"].weight, wte)  # the copy did


def test_each_adapter_has_its_own_head_and_set_adapter_switches_heads_as_peft_does(tmp_path, ids):
    ours = _classifier()
    for name, seed in (("a", 1), ("b", 2)):
        add_lora(ours, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["score"]), name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in ours.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g))
        save_adapter(ours, tmp_path / name, name)
    assert list(ours.score.modules_to_save) == ["a", "b"]
    theirs = peft.PeftModel.from_pretrained(_classifier(), tmp_path / "a", adapter_name="a").eval()
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    outs = {}
    for name in ("a", "b"):
        set_adapter(ours, name)
        theirs.set_adapter(name)
        outs[name] = _logits(ours, ids)
        torch.testing.assert_close(outs[name], _logits(theirs, ids), atol=1e-5, rtol=0)
    assert (outs["a"] - outs["b"]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="cannot be active together"):
        set_adapter(ours, ["a", "b"])
    with disable_lora(ours):
        torch.testing.assert_close(_logits(ours, ids), _logits(_classifier(), ids), atol=0, rtol=0)
    delete_adapter(ours, "a")
    set_adapter(ours, "b")
    torch.testing.assert_close(_logits(ours, ids), outs["b"], atol=0, rtol=0)
    delete_adapter(ours, "b")
    assert not isinstance(ours.score, SavedModule)  # no adapter trains it: the plain head again


def test_merge_and_unload_keeps_the_active_copy(ids):
    model = add_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.add_(0.5)
    before = _logits(model, ids)
    merge_and_unload(model)
    assert type(model.lm_head) is torch.nn.Linear
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=0)


def test_loading_a_second_adapter_does_not_activate_it_unless_asked(tmp_path, ids):
    for name, seed in (("a", 1), ("b", 2)):
        model = add_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), name)
        save_adapter(model, tmp_path / name, name)
    only_a = tiny_llama()
    load_adapter(only_a, tmp_path / "a", "a")
    ours = tiny_llama()
    assert load_adapter(ours, tmp_path / "a", "a").active
    report = load_adapter(ours, tmp_path / "b", "b")
    assert not report.active and active_adapters(ours) == ["a"] and list_adapters(ours) == ["a", "b"]
    torch.testing.assert_close(_logits(ours, ids), _logits(only_a, ids), atol=0, rtol=0)  # no silent sum
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a").eval()
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), atol=1e-5, rtol=0)  # PEFT's rule
    load_adapter(ours, tmp_path / "b", "c", activate=True)
    assert active_adapters(ours) == ["c"]


def test_a_module_to_save_cannot_hold_adapters_or_be_a_target():
    model = add_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), "a")
    with pytest.raises(ValueError, match="holds LoRA layers"):
        add_lora(model, LoraConfig(r=2, target_modules=["up_proj"], modules_to_save=["self_attn"]), "b")
    add_lora(model, LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]), "c")
    with pytest.raises(TypeError, match="trained in full"):
        add_lora(model, LoraConfig(r=2, target_modules=["lm_head"]), "d")
    with pytest.raises(ValueError, match="matches no module"):
        add_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["nothing_here"]))
