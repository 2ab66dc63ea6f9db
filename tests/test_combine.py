"""combine_adapters: cat is exact, svd is the best rank-k approximation, linear is PEFT's factor sum; every
reported error equals the error measured on dense matrices."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_llama
from loralab import LoraConfig, add_lora, combine_adapters, list_adapters, set_adapter
from loralab.combine import combine_factors
from loralab.inject import lora_layers


def _model():
    """Adapters a (r=4, q/v) and b (r=2, rsLoRA, v/o): they overlap on v_proj only."""
    model = tiny_llama()
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    add_lora(model, LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=["v_proj", "o_proj"],
                               init_lora_weights=False), "b")
    return model


def _dense(layer, name):
    return layer.adapters[name].delta_weight().double() if name in layer.adapters else 0


def _dense_errors(model, names, weights, new):
    """Relative Frobenius error per module and overall, from dense (out, in) matrices in float64."""
    per, num, den = {}, 0.0, 0.0
    for path, layer in lora_layers(model).items():
        if new not in layer.adapters:
            continue
        exact = sum(w * _dense(layer, n) for n, w in zip(names, weights))
        err = (_dense(layer, new) - exact).norm().item()
        per[path] = err / exact.norm().item()
        num, den = num + err ** 2, den + exact.norm().item() ** 2
    return per, math.sqrt(num / den)


@pytest.mark.parametrize("method, kwargs", [("cat", {}), ("svd", {}), ("svd", {"rank": 1}), ("svd", {"rank": 6})])
def test_reported_error_matches_dense_measurement(method, kwargs):
    model = _model()
    names, weights = ["a", "b"], [0.7, -1.5]
    report = combine_adapters(model, names, weights, method, "new", **kwargs)
    per, overall = _dense_errors(model, names, weights, "new")
    assert set(report.errors) == set(per) == {p for p, l in lora_layers(model).items()
                                               if {"a", "b"} & set(l.adapters)}
    for path in per:
        assert report.errors[path] == pytest.approx(per[path], abs=1e-6)
    assert report.error == pytest.approx(overall, abs=1e-6)


def test_cat_is_exact_and_ranks_add(ids):
    model = _model()
    set_adapter(model, ["a", "b"])
    with torch.no_grad():
        both = model(ids).logits
    report = combine_adapters(model, ["a", "b"], None, "cat", "ab")
    assert report.error < 1e-6
    assert report.ranks["model.layers.0.self_attn.v_proj"] == 6 and report.ranks["model.layers.0.self_attn.q_proj"] == 4
    set_adapter(model, "ab")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, both, atol=1e-5, rtol=0)


def test_svd_error_is_the_eckart_young_optimum():
    model = _model()
    report = combine_adapters(model, ["a", "b"], [1.0, 2.0], "svd", "k2", rank=2)
    layer = lora_layers(model)["model.layers.1.self_attn.v_proj"]
    exact = _dense(layer, "a") + 2 * _dense(layer, "b")
    s = torch.linalg.svdvals(exact)
    optimum = (s[2:].square().sum().sqrt() / s.square().sum().sqrt()).item()
    assert report.errors["model.layers.1.self_attn.v_proj"] == pytest.approx(optimum, rel=1e-4)
    assert 0.01 < optimum < 1  # truncation loses something here
    assert set(report.ranks.values()) == {2}


def test_svd_with_full_rank_is_exact_and_default_rank_is_the_largest_source():
    model = _model()
    assert combine_adapters(model, ["a", "b"], None, "svd", "full", rank=6).error < 1e-5
    report = combine_adapters(model, ["a", "b"], None, "svd", "default")
    assert report.ranks["model.layers.0.self_attn.v_proj"] == 4 and report.ranks["model.layers.0.self_attn.o_proj"] == 2


def test_linear_is_exact_for_one_adapter_and_lossy_for_two():
    model = _model()
    assert combine_adapters(model, ["a"], [-2.0], "linear", "solo").error < 1e-6
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False), "c")
    report = combine_adapters(model, ["a", "c"], [0.5, 0.5], "linear", "avg")
    assert report.error > 0.1  # the cross terms B_a·A_c and B_c·A_a


def test_linear_refuses_different_ranks():
    model = _model()
    with pytest.raises(ValueError, match=r"equal ranks.*v_proj has ranks \[2, 4\].*'cat'"):
        combine_adapters(model, ["a", "b"], None, "linear", "x")
    assert list_adapters(model) == ["a", "b"]


def test_new_adapter_is_inactive_and_sources_unchanged(ids):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = model(ids).logits
    combine_adapters(model, ["a", "b"], [1.0, 1.0], "svd", "new", rank=3)
    assert sorted(list_adapters(model)) == ["a", "b", "new"]
    assert all("new" not in layer.active for layer in lora_layers(model).values())
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, out)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(names=["a", "zz"]), KeyError, "no adapter named 'zz'"),
    (dict(names=[]), ValueError, "at least one adapter"),
    (dict(weights=[1.0]), ValueError, "1 weights for 2 adapters"),
    (dict(weights=[1.0, float("nan")]), ValueError, "finite"),
    (dict(method="ties"), ValueError, "choose one of"),
    (dict(method="cat", rank=2), ValueError, "only for method='svd'"),
    (dict(rank=0), ValueError, "positive integer"),
    (dict(new_name="a"), ValueError, "new adapter name"),
])
def test_bad_arguments_are_refused_before_any_change(kwargs, error, match):
    model = _model()
    args = dict(names=["a", "b"], weights=[1.0, 1.0], method="svd", new_name="new") | kwargs
    with pytest.raises(error, match=match):
        combine_adapters(model, args.pop("names"), args.pop("weights"), args.pop("method"), args.pop("new_name"),
                         **args)
    assert list_adapters(model) == ["a", "b"]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2 ** 16), st.integers(1, 4), st.lists(st.floats(-3, 3).filter(lambda w: abs(w) > 0.05),
                                                             min_size=1, max_size=3))
def test_factor_methods_against_dense_reference(seed, r, weights):
    g = torch.Generator().manual_seed(seed)
    factors = [(torch.randn(r, 12, generator=g), torch.randn(9, r, generator=g), w) for w in weights]
    exact = sum(c * B.double() @ A.double() for A, B, c in factors)
    A, B = combine_factors(factors, "cat")
    assert torch.allclose(B.double() @ A.double(), exact, atol=1e-4)
    errors = {}
    for method in ("linear", "svd"):
        A, B = combine_factors(factors, method, rank=r)
        assert A.shape == (r, 12) and B.shape == (9, r)
        errors[method] = ((B.double() @ A.double()) - exact).norm().item()
    assert errors["svd"] <= errors["linear"] + 1e-4 * exact.norm().item()  # Eckart–Young: best rank r


def test_a_failure_half_way_leaves_no_combined_adapter_and_keeps_the_error(monkeypatch):
    import loralab.combine as combine_module
    model = _model()
    real, calls = combine_module.combine_factors, []

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(combine_module, "combine_factors", fail_on_third)
    with pytest.raises(RuntimeError, match="boom"):
        combine_module.combine_adapters(model, ["a", "b"], [0.5, 0.5], method="cat", new_name="ab")
    assert "ab" not in list_adapters(model)
