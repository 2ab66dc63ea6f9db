"""Target matching (PEFT's rules), freezing, reports, adapter selection, error paths on real HF models."""

import warnings

import pytest
import torch
from torch import nn

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from loralab import (LoraConfig, LoRAEmbedding, add_lora, delete_adapter, disable_lora, find_targets,
                     list_adapters, set_adapter, trainable_report)
from loralab.inject import lora_layers

LLAMA_7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_llama_all_seven_projections(ids):
    model = tiny_llama()
    base_out = model(ids).logits
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_7))
    layers = lora_layers(model)
    assert len(layers) == 7 * 2
    assert {p.split(".")[-1] for p in layers} == set(LLAMA_7)
    assert torch.equal(model(ids).logits, base_out)
    expected = 0
    for layer in layers.values():
        expected += 4 * (layer.in_features + layer.out_features)
    assert trainable_report(model).trainable == expected


def test_bert_query_key_value_dense(ids):
    model = tiny_bert()
    add_lora(model, LoraConfig(r=2, target_modules=["query", "key", "value", "dense"]))
    names = {p.split(".")[-1] for p in lora_layers(model)}
    assert names == {"query", "key", "value", "dense"}
    assert "pooler.dense" in lora_layers(model)  # suffix match takes the pooler's dense too, as PEFT does
    model(ids)


def test_gpt2_conv1d_layers(ids):
    model = tiny_gpt2()
    base_out = model(ids).logits
    add_lora(model, LoraConfig(r=4, target_modules=["c_attn", "c_proj"]))
    layers = lora_layers(model)
    assert len(layers) == 2 * 3  # attn.c_attn, attn.c_proj, mlp.c_proj per block
    assert all(l.fan_in_fan_out for l in layers.values())
    c_attn = layers["transformer.h.0.attn.c_attn"]
    assert (c_attn.in_features, c_attn.out_features) == (32, 96)
    assert torch.equal(model(ids).logits, base_out)


def test_all_linear_skips_the_output_head():
    model = tiny_llama()
    targets = find_targets(model, LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in targets
    assert len(targets) == 14


def test_regex_is_a_full_match():
    model = tiny_llama()
    t = find_targets(model, LoraConfig(target_modules=r".*\.layers\.1\.self_attn\.(q|v)_proj"))
    assert t == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(ValueError, match="matched no module"):
        find_targets(model, LoraConfig(target_modules="q_proj"))  # a regex must match the whole path


def test_list_entries_match_exactly_or_as_dotted_suffix():
    model = tiny_llama()
    t = find_targets(model, LoraConfig(target_modules=["layers.0.self_attn.q_proj", "down_proj"]))
    assert t == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError):
        find_targets(model, LoraConfig(target_modules=["proj"]))  # not a dotted suffix


def test_exclude_and_layers_to_transform():
    model = tiny_llama()
    t = find_targets(model, LoraConfig(target_modules=LLAMA_7, exclude_modules=["k_proj", "mlp.up_proj"],
                                       layers_to_transform=[1]))
    assert t == [f"model.layers.1.{m}" for m in ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj",
                                                 "mlp.gate_proj", "mlp.down_proj"]]


def test_rank_and_alpha_pattern_are_applied_per_module():
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                               rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 2}))
    layers = lora_layers(model)
    assert layers["model.layers.0.self_attn.v_proj"].adapters["default"].r == 2
    assert layers["model.layers.0.self_attn.q_proj"].adapters["default"].scaling == 2.0
    assert layers["model.layers.1.self_attn.q_proj"].adapters["default"].scaling == 0.5


def test_no_match_lists_candidates_with_types_and_shapes():
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError) as err:
        add_lora(model, LoraConfig(target_modules=["query"]))
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj  Linear  (32, 32)" in msg
    assert _same_state(before, _state(model)) and not lora_layers(model)


def test_unsupported_module_type_is_a_type_error_and_model_unchanged():
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(TypeError, match="LlamaRMSNorm.*supported"):
        add_lora(model, LoraConfig(target_modules=["q_proj", "input_layernorm"]))
    assert not lora_layers(model) and _same_state(before, _state(model))


def test_missing_target_modules_says_how_to_fix():
    with pytest.raises(ValueError, match="target_modules is not set"):
        add_lora(tiny_llama(), LoraConfig())


def test_duplicate_adapter_name_is_refused_and_model_unchanged():
    model = tiny_llama()
    add_lora(model, LoraConfig(target_modules=["q_proj"]))
    before = _state(model)
    with pytest.raises(ValueError, match="already exists"):
        add_lora(model, LoraConfig(target_modules=["v_proj"]))
    assert _same_state(before, _state(model))


def test_rank_above_min_dim_warns_with_module_name():
    model = nn.Sequential(nn.Linear(16, 3))
    with pytest.warns(UserWarning, match=r"^0: r=8 exceeds min\(in=16, out=3\)"):
        add_lora(model, LoraConfig(r=8, target_modules=["0"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        add_lora(nn.Sequential(nn.Linear(16, 8)), LoraConfig(r=8, target_modules=["0"]))


def test_freezing_and_report_string():
    model = nn.Sequential(nn.Linear(4096, 4096, bias=False))
    add_lora(model, LoraConfig(r=8, target_modules=["0"]))
    report = trainable_report(model)
    assert str(report) == "trainable params: 65,536 || all params: 16,842,752 || trainable%: 0.3891"
    assert not model[0].base_layer.weight.requires_grad
    rows = report.table().splitlines()
    assert rows[1].split()[:4] == ["0.adapters.default", "LoRAAdapter", "65,536", "65,536"] and len(rows) == 3
    assert [row[2] for row in report.per_module if row[2]] == [65_536]


def test_bias_and_modules_to_save_are_trainable_when_asked():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    add_lora(model, LoraConfig(r=2, target_modules=["0"], bias="lora_only", modules_to_save=["3"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.base_layer.bias", "0.adapters.default.lora_A", "0.adapters.default.lora_B",
                         "3.modules_to_save.default.weight", "3.modules_to_save.default.bias"}
    assert not model[3].original_module.weight.requires_grad  # the base's own head stays frozen
    model2 = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    add_lora(model2, LoraConfig(r=2, target_modules=["0"], bias="all"))
    assert model2[1].bias.requires_grad and not model2[1].weight.requires_grad


def test_embedding_target():
    model = tiny_llama()
    add_lora(model, LoraConfig(r=2, target_modules=["embed_tokens"]))
    assert isinstance(model.model.embed_tokens, LoRAEmbedding)


def test_disable_lora_gives_base_outputs_exactly(ids):
    model = tiny_llama()
    base_out = model(ids).logits
    add_lora(model, LoraConfig(r=4, target_modules=LLAMA_7))
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.adapters["default"].lora_B)
    assert not torch.allclose(model(ids).logits, base_out)
    with disable_lora(model):
        assert torch.equal(model(ids).logits, base_out)
    assert not torch.allclose(model(ids).logits, base_out)


def test_many_adapters_select_and_delete(ids):
    model = tiny_llama()
    base_out = model(ids).logits
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    add_lora(model, LoraConfig(r=3, target_modules=["q_proj", "v_proj"]), adapter_name="b")
    assert list_adapters(model) == ["a", "b"]
    for layer in lora_layers(model).values():
        for adapter in layer.adapters.values():
            nn.init.normal_(adapter.lora_B)
    set_adapter(model, "a")
    out_a = model(ids).logits
    set_adapter(model, "b")
    out_b = model(ids).logits
    assert not torch.allclose(out_a, out_b)
    with pytest.raises(KeyError, match="no adapter named"):
        set_adapter(model, "c")
    delete_adapter(model, "b")
    assert list_adapters(model) == ["a"]
    set_adapter(model, "a")
    torch.testing.assert_close(model(ids).logits, out_a)
    delete_adapter(model, "a")
    torch.testing.assert_close(model(ids).logits, base_out)


def test_pissa_rank_above_the_layer_is_refused_before_anything_changes():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 3))
    before = _state(model)
    with pytest.raises(ValueError, match="PiSSA.*r=4"):
        add_lora(model, LoraConfig(r=4, target_modules=["0", "1"], init_lora_weights="pissa"))
    assert not lora_layers(model) and _same_state(before, _state(model))


def test_a_frozen_adapter_stays_frozen_when_another_is_added():
    model = tiny_llama()
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    for layer in lora_layers(model).values():
        layer.adapters["a"].requires_grad_(False)
    add_lora(model, LoraConfig(r=2, target_modules=["v_proj"]), adapter_name="b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n for n in trainable)


def test_all_linear_does_not_put_a_second_adapter_on_an_adapted_embedding():
    model = tiny_llama()
    add_lora(model, LoraConfig(r=2, target_modules=["embed_tokens"]), adapter_name="emb")
    add_lora(model, LoraConfig(r=2, target_modules="all-linear"), adapter_name="lin")
    assert list(model.model.embed_tokens.adapters) == ["emb"]
    assert "lin" in model.model.layers[0].self_attn.q_proj.adapters
