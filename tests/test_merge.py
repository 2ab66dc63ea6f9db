"""merge / unmerge / merge_and_unload on real models; guards against double merge and NaN."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from conftest import tiny_gpt2, tiny_llama
from loralab import LoraConfig, LoRALinear, add_lora, disable_lora, merge, merge_and_unload, unmerge
from loralab.inject import lora_layers


def _randomize(model, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for a in layer.adapters.values():
                a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * std)


@pytest.mark.parametrize("build, targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])])
def test_merge_unmerge_and_unload_on_models(build, targets, ids):
    model = build()
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    _randomize(model)
    W0 = {k: v.clone() for k, v in model.state_dict().items() if "base_layer.weight" in k}
    with torch.no_grad():
        unmerged = model(ids).logits
        merge(model)
        torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
        unmerge(model)
    for k, v in W0.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6)
    merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert not any("lora" in k or "adapters" in k for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_double_merge_is_refused_and_weights_untouched():
    model = tiny_llama()
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    _randomize(model)
    merge(model)
    W = model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with pytest.raises(RuntimeError, match="already merged"):
        merge(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, W)
    unmerge(model)
    with pytest.raises(RuntimeError, match="nothing to unmerge"):
        unmerge(model)


def test_nan_adapter_is_never_merged():
    model = tiny_llama()
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.adapters["default"].lora_B.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj holds NaN/Inf"):
        merge(model)
    for k, v in model.state_dict().items():
        if "base_layer" in k:
            assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="NaN"):
        merge_and_unload(model)
    assert lora_layers(model)


def test_disable_lora_refuses_merged_adapters():
    model = tiny_llama()
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with disable_lora(model):
            pass


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merge_is_within_one_rounding(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).to(dtype)
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    _randomize(model, std=0.1)
    layer = model[0]
    exact = layer.base_layer.weight.float() + layer.adapters["default"].delta_weight()
    merge(model)
    assert layer.base_layer.weight.dtype == dtype
    torch.testing.assert_close(layer.base_layer.weight.float(), exact.to(dtype).float(), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="half-precision"):
        unmerge(model)


def test_merge_selected_adapters_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    add_lora(model, LoraConfig(r=2, target_modules=["0"]), adapter_name="a")
    add_lora(model, LoraConfig(r=2, target_modules=["0"]), adapter_name="b")
    _randomize(model)
    W0 = model[0].base_layer.weight.clone()
    merge(model, "b")
    delta_b = model[0].adapters["b"].delta_weight()
    torch.testing.assert_close(model[0].base_layer.weight, W0 + delta_b)
    assert model[0].adapters["b"].merged and not model[0].adapters["a"].merged
    with pytest.raises(KeyError):
        merge(model, "zzz")


@settings(max_examples=15, deadline=None)
@given(r=st.integers(1, 8), alpha=st.sampled_from([1.0, 8.0, 32.0]), seed=st.integers(0, 1000),
       dims=st.tuples(st.integers(2, 24), st.integers(2, 24), st.integers(2, 24)))
def test_property_merge_and_unload_preserves_function(r, alpha, seed, dims):
    torch.manual_seed(seed)
    a, b, c = dims
    model = nn.Sequential(nn.Linear(a, b), nn.Tanh(), nn.Linear(b, c))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        add_lora(model, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear"))
    _randomize(model, std=0.3, seed=seed)
    x = torch.randn(4, a)
    with torch.no_grad():
        y = model(x)
        merge_and_unload(model)
        y2 = model(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert ((y2 - y).abs().max() / y.abs().max().clamp_min(1)).item() <= 1e-5


def test_unknown_adapter_names_are_refused_and_nothing_changes(ids):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    _randomize(model)
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(KeyError, match="typo"):
        merge(model, ["default", "typo"])
    with pytest.raises(KeyError, match="typo"):
        merge_and_unload(model, "typo")
    assert lora_layers(model) and not any(a.merged for l in lora_layers(model).values() for a in l.adapters.values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
