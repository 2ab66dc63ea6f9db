"""QLoRA: a 4-bit NF4 base under full-precision adapters — add, train, save, load across precisions, merge
(dequantized or explicitly requantized), save the quantized model; and bitsandbytes-quantized models as bases."""

import pytest
import torch

from conftest import tiny_llama
from loralab import LoraConfig, add_lora, load_adapter, merge, merge_and_unload, save_adapter
from loralab.inject import lora_layers, set_module
from loralab.merging import requantize_and_unload
from loralab.quant import (NF4Linear, dequantize_nf4, load_quantized, model_footprint, quantize_model,
                           save_quantized)


def _wide_llama(seed=0):  # bitsandbytes' CPU 4-bit kernel needs in_features >= its block size (64)
    return tiny_llama(seed, hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _train(model, ids, steps=5):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[:, :-1].reshape(-1, 101),
                                                 ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


def test_add_lora_with_nf4_trains_adapters_on_a_4_bit_base(ids):
    model = tiny_llama()
    before = model_footprint(model)
    add_lora(model, LoraConfig(r=4, target_modules="all-linear"), quantize="nf4")
    bases = [l.base_layer for l in lora_layers(model).values()]
    assert len(bases) == 14 and all(isinstance(b, NF4Linear) for b in bases)
    assert type(model.lm_head) is torch.nn.Linear  # the output head stays dense
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert model_footprint(model) < before
    _, losses = _train(model, ids)
    assert losses[-1] < losses[0]


def test_adapters_move_between_the_4_bit_and_the_full_precision_base(tmp_path, ids):
    qlora = add_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), quantize="nf4")
    qlora, _ = _train(qlora, ids)
    save_adapter(qlora, tmp_path / "q")
    dense = tiny_llama()
    with pytest.warns(UserWarning, match=r"nf4 -> full-precision"):
        report = load_adapter(dense, tmp_path / "q")
    assert report.fingerprint == "matched" and "differ by up to" in report.notes[0]
    gap = (_logits(dense, ids) - _logits(qlora, ids)).abs().max()
    assert 0 < gap < 0.5 * _logits(qlora, ids).abs().max()  # the NF4 rounding of the base, and nothing else
    back = add_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), "other", quantize="nf4")
    with pytest.warns(UserWarning, match=r"full-precision -> nf4"):  # and the reverse
        save_adapter(add_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])), tmp_path / "d")
        load_adapter(back, tmp_path / "d")


def test_merging_into_4_bits_is_refused_and_dequantized_merge_is_exact(ids):
    model = add_lora(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
                     quantize="nf4")
    expected = _logits(model, ids)
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    target = dequantize_nf4(layer.base_layer.weight_packed, layer.base_layer.state) + \
        layer.adapters["default"].delta_weight()
    with pytest.raises(ValueError, match="merging would requantize"):
        merge(model)
    merge_and_unload(model, dequantize=True)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())  # a dense model
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, target, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(model, ids), expected, rtol=0, atol=1e-5)


def test_the_explicit_requantize_path_reports_what_it_loses(ids):
    model = add_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
                     quantize="nf4")
    expected = _logits(model, ids)
    report = requantize_and_unload(model)
    assert set(report["layers"]) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    assert 0 < report["max_weight_rel_fro"] < 0.3 and 0 < report["max_output_rel_error"] < 0.3
    assert isinstance(model.model.layers[0].self_attn.q_proj, NF4Linear) and not lora_layers(model)
    got = _logits(model, ids)
    assert 0 < (got - expected).abs().max() < 0.5 * expected.abs().max()


def test_a_quantized_model_saves_and_loads_with_safetensors(tmp_path, ids):
    model = tiny_llama()
    quantize_model(model)
    save_quantized(model, tmp_path / "q.safetensors")
    fresh = tiny_llama(seed=7)  # the same architecture, other weights
    layers = load_quantized(fresh, tmp_path / "q.safetensors")
    assert len(layers) == 14 and isinstance(fresh.model.layers[1].mlp.down_proj, NF4Linear)
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))
    assert not (tmp_path / "q.safetensors").read_bytes().startswith(b"\x80")  # not a pickle


@pytest.mark.parametrize("bits", [4, 8])
def test_a_model_quantized_with_bitsandbytes_is_a_base_too(bits, tmp_path):
    import bitsandbytes as bnb  # a test dependency (pyproject [test]); its NF4 runs on CPU
    model = _wide_llama()
    for path, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and path != "lm_head":
            q = (bnb.nn.Linear8bitLt(m.in_features, m.out_features, bias=False, has_fp16_weights=False) if bits == 8
                 else bnb.nn.Linear4bit(m.in_features, m.out_features, bias=False, compute_dtype=torch.float32,
                                        quant_type="nf4"))
            q.load_state_dict(m.state_dict())
            set_module(model, path, q.to("cpu"))
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(1))
    add_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    model, losses = _train(model, ids, steps=3)
    assert losses[-1] < losses[0]
    out = _logits(model, ids)
    save_adapter(model, tmp_path / "a")   # used to fail: 'Linear4bit' object has no attribute 'dense_weight'
    dense = _wide_llama()
    with pytest.warns(UserWarning, match="another precision"):
        load_adapter(dense, tmp_path / "a")
    assert (_logits(dense, ids) - out).abs().max() < 0.5 * out.abs().max()
    merge_and_unload(model, dequantize=True)
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())
    assert (_logits(model, ids) - out).abs().max() < 0.05 * out.abs().max()  # bitsandbytes' own matmul rounding
