"""LoRALinear / LoRAEmbedding: init, forward against an explicit formula, scaling, dtypes, property tests."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from loralab import LoRAEmbedding, LoRALinear, delta_weight


def _layer(in_f=12, out_f=10, r=4, alpha=8.0, bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(in_f, out_f, bias=bias))
    layer.add_adapter("default", r, alpha, **kw)
    return layer


def _randomize_B(layer, name="default", seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        B = layer.adapters[name].lora_B
        B.copy_(torch.randn(B.shape, generator=g).to(B.dtype))


def test_b_is_zero_at_init_and_output_equals_base_exactly():
    layer = _layer()
    assert torch.count_nonzero(layer.adapters["default"].lora_B) == 0
    assert torch.count_nonzero(layer.adapters["default"].lora_A) > 0
    x = torch.randn(3, 5, 12)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_a_is_kaiming_uniform_bounded():
    layer = _layer(in_f=400, r=8)
    bound = 1 / math.sqrt(400)  # kaiming_uniform with a=sqrt(5) on fan_in=400
    A = layer.adapters["default"].lora_A
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound


def test_forward_matches_formula():
    layer = _layer(r=3, alpha=6.0)
    _randomize_B(layer)
    a = layer.adapters["default"]
    x = torch.randn(4, 12)
    W0, b = layer.base_layer.weight, layer.base_layer.bias
    expected = x @ W0.T + b + (6.0 / 3) * (x @ a.lora_A.T) @ a.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_parameter_count_is_r_times_in_plus_out():
    layer = LoRALinear(nn.Linear(4096, 4096, bias=False))
    layer.add_adapter("default", 8, 16)
    n = sum(p.numel() for p in layer.adapters.parameters())
    assert n == 8 * (4096 + 4096) == 65_536
    assert 4096 * 4096 // n == 256


def test_doubling_alpha_doubles_the_delta():
    l1, l2 = _layer(alpha=4.0, seed=3), _layer(alpha=8.0, seed=3)
    _randomize_B(l1), _randomize_B(l2)
    x = torch.randn(6, 12)
    d1 = l1(x) - l1.base_layer(x)
    d2 = l2(x) - l2.base_layer(x)
    torch.testing.assert_close(d2, 2 * d1, rtol=1e-5, atol=1e-6)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    layer = _layer(r=16, alpha=8.0, use_rslora=True)
    assert layer.adapters["default"].scaling == pytest.approx(8.0 / 4.0)
    assert _layer(r=16, alpha=8.0).adapters["default"].scaling == pytest.approx(0.5)


def test_dropout_only_in_training_and_only_on_the_adapter_path():
    layer = _layer(lora_dropout=0.5)
    _randomize_B(layer)
    x = torch.randn(64, 12)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    y1 = layer(x)
    torch.manual_seed(1)
    y2 = layer(x)
    assert not torch.allclose(y1, y2)
    with torch.no_grad():  # with B = 0 dropout cannot touch the output: it never reaches the base path
        layer.adapters["default"].lora_B.zero_()
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_gradients_reach_a_and_b_and_match_autograd_of_formula():
    layer = _layer(r=2, alpha=4.0)
    _randomize_B(layer)
    a = layer.adapters["default"]
    x = torch.randn(5, 12)
    layer(x).pow(2).sum().backward()
    A, B = a.lora_A.detach().clone().requires_grad_(), a.lora_B.detach().clone().requires_grad_()
    ref = layer.base_layer(x).detach() + 2.0 * (x @ A.T) @ B.T
    ref.pow(2).sum().backward()
    torch.testing.assert_close(a.lora_A.grad, A.grad)
    torch.testing.assert_close(a.lora_B.grad, B.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_adapters(dtype):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8).to(dtype))
    layer.add_adapter("default", 4, 8)
    a = layer.adapters["default"]
    assert a.lora_A.dtype == torch.float32 and a.lora_B.dtype == torch.float32
    _randomize_B(layer)
    x = torch.randn(3, 16).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    expected = layer.base_layer(x).float() + a.scaling * (x.float() @ a.lora_A.T) @ a.lora_B.T
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)


def test_conv1d_base_is_handled_as_fan_in_fan_out():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(10, 12)  # nf=out=10, nx=in=12; weight stored (in, out)
    layer = LoRALinear(conv)
    layer.add_adapter("default", 3, 3)
    _randomize_B(layer)
    a = layer.adapters["default"]
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (12, 10)
    x = torch.randn(2, 12)
    expected = x @ conv.weight + conv.bias + (x @ a.lora_A.T) @ a.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    W_before = conv.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(conv.weight, W_before + delta_weight(a.lora_A, a.lora_B, a.scaling).T)


def test_embedding_starts_as_base_and_matches_formula():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 6, padding_idx=0)
    layer = LoRAEmbedding(emb)
    layer.add_adapter("default", 3, 6)
    ids = torch.tensor([[0, 3, 7], [19, 2, 2]])
    assert torch.equal(layer(ids), emb(ids))  # A = 0 at init
    a = layer.adapters["default"]
    with torch.no_grad():
        a.lora_A.normal_()
    expected = emb(ids) + 2.0 * a.lora_A.T[ids] @ a.lora_B.T
    torch.testing.assert_close(layer(ids), expected)
    out = layer(ids)
    layer.merge()
    torch.testing.assert_close(layer(ids), out, rtol=1e-5, atol=1e-5)


def test_pissa_init_keeps_outputs_and_puts_principal_directions_in_the_adapter():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    x = torch.randn(4, 16)
    before = base(x).detach()
    W = base.weight.detach().clone()
    layer = LoRALinear(base)
    layer.add_adapter("default", 4, 4, init_lora_weights="pissa")
    torch.testing.assert_close(layer(x), before, rtol=1e-4, atol=1e-5)
    S = torch.linalg.svdvals(W)
    assert torch.linalg.svdvals(layer.adapters["default"].delta_weight().detach())[:4].tolist() == pytest.approx(S[:4].tolist(), rel=1e-4)


def test_gaussian_init_and_false_init():
    g = _layer(r=4, init_lora_weights="gaussian", in_f=300)
    assert torch.count_nonzero(g.adapters["default"].lora_B) == 0
    assert g.adapters["default"].lora_A.std().item() == pytest.approx(0.25, rel=0.1)
    f = _layer(init_lora_weights=False)
    assert torch.count_nonzero(f.adapters["default"].lora_B) > 0  # not an identity start


def test_double_add_of_same_name_is_refused():
    layer = _layer()
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default", 2, 2)


@settings(max_examples=25, deadline=None)
@given(in_f=st.integers(1, 40), out_f=st.integers(1, 40), r=st.integers(1, 12),
       alpha=st.floats(0.5, 64), batch=st.integers(1, 5), seed=st.integers(0, 10_000),
       rslora=st.booleans(), conv=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_property_merged_equals_unmerged_and_unmerge_restores(in_f, out_f, r, alpha, batch, seed, rslora, conv,
                                                              dtype):
    torch.manual_seed(seed)
    if conv:
        from transformers.pytorch_utils import Conv1D
        base = Conv1D(out_f, in_f)
        nn.init.normal_(base.weight, std=0.2)
    else:
        base = nn.Linear(in_f, out_f)
    base = base.to(dtype)
    layer = LoRALinear(base)
    with pytest.warns(UserWarning) if r > min(in_f, out_f) else _nullcontext():
        from loralab.layer import warn_if_rank_too_large
        warn_if_rank_too_large("m", r, in_f, out_f)
    layer.add_adapter("default", r, alpha, use_rslora=rslora)
    _randomize_B(layer, seed=seed + 1)
    x = torch.randn(batch, in_f).to(dtype)
    W0 = layer.dense_weight().detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
    # fp32: exact up to float rounding; half precision: one rounding of the merged weight (and of the output)
    tol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (6e-2, 1.6e-2), torch.float16: (8e-3, 2e-3)}[dtype]
    scale = unmerged.float().abs().max().clamp_min(1.0)
    assert ((merged.float() - unmerged.float()).abs().max() / scale) <= tol[0]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # half-precision unmerge warns that it is lossy; that is the point
        layer.unmerge()
    W1 = layer.dense_weight().float()
    size = max(W0.float().abs().max().item(), layer.adapters["default"].delta_weight().abs().max().item(), 1.0)
    assert (W1 - W0.float()).abs().max().item() / size <= tol[1]  # rounding of W0 + ΔW, relative to its size


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_no_grad_forward_equals_grad_forward_and_leaves_hooked_outputs_alone():
    layer = _layer()
    _randomize_B(layer)
    x = torch.randn(3, 4, 12)
    with_grad = layer(x).detach()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), with_grad, rtol=0, atol=0)
    seen = []
    layer.base_layer.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(seen[0], layer.base_layer(x))  # what the hook kept is the base output
    torch.testing.assert_close(out, with_grad, rtol=0, atol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_adds_into_a_fresh_base_output_in_place_and_leaves_hooked_outputs_alone(dropout):
    """In training an nn.Linear base's output (which its backward never reads) takes the adapter term in
    place; with a hook on the base, which may keep that output, a new buffer is made.  Same output and
    gradients either way."""
    def run(hooked: bool):
        torch.manual_seed(5)
        layer = LoRALinear(nn.Linear(12, 10))
        layer.add_adapter("default", r=4, lora_alpha=8.0, lora_dropout=dropout)
        _randomize_B(layer)
        layer.train()
        made, seen = [], []
        plain_forward = layer.base_layer.forward
        layer.base_layer.forward = lambda t: made.append(plain_forward(t)) or made[-1]
        if hooked:
            layer.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()) or None)
            layer.base_layer.register_forward_hook(lambda m, i, o: seen.append(o) or None)
        x = torch.randn(3, 4, 12, requires_grad=True)
        y = layer(x)
        y.pow(2).sum().backward()
        if hooked:
            torch.testing.assert_close(seen[1], seen[0], rtol=0, atol=0)       # the hook's tensor: untouched
        a = layer.adapters["default"]
        return y.untyped_storage().data_ptr() == made[0].untyped_storage().data_ptr(), \
            [t.detach() for t in (y, x.grad, a.lora_A.grad, a.lora_B.grad, layer.base_layer.bias.grad)]

    (shared, got), (hooked_shared, ref) = run(False), run(True)
    assert shared and not hooked_shared
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_under_autocast_the_adapter_path_follows_autocast_and_stays_close_to_fp32():
    layer = _layer(in_f=64, out_f=32, r=8)
    _randomize_B(layer)
    x = torch.randn(4, 64)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=3e-2, atol=3e-2)


def test_attach_and_remove_adapter():
    layer = _layer()
    extra = layer.adapters["default"]
    with pytest.raises(ValueError, match="already exists"):
        layer.attach("default", extra)
    layer.attach("other", LoRALinear(nn.Linear(12, 10)).add_adapter("x", 2, 2), active=False)
    assert layer.active == ("default",) and list(layer.adapters) == ["default", "other"]
    layer.remove_adapter("default")
    assert layer.active == () and list(layer.adapters) == ["other"]


def test_an_embedding_that_scales_its_lookup_scales_the_adapter_too():
    class Scaled(nn.Embedding):  # Gemma's / BART's scaled embedding: forward multiplies by embed_scale
        def __init__(self):
            super().__init__(20, 6)
            self.embed_scale = 2.5

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale

    torch.manual_seed(0)
    layer = LoRAEmbedding(Scaled())
    layer.add_adapter("default", 3, 6)
    a = layer.adapters["default"]
    with torch.no_grad():
        a.lora_A.normal_()
    ids = torch.tensor([[1, 3, 7], [19, 2, 2]])
    expected = layer.base_layer(ids) + 2.5 * 2.0 * a.lora_A.T[ids] @ a.lora_B.T
    torch.testing.assert_close(layer(ids), expected)
    out = layer(ids)
    layer.merge()
    torch.testing.assert_close(layer(ids), out, rtol=1e-5, atol=1e-5)  # merged == unmerged
    bad = nn.Embedding(20, 6)
    bad.embed_scale = torch.ones(6)
    bad_layer = LoRAEmbedding(bad)
    bad_layer.add_adapter("default", 2, 2)
    with pytest.raises(TypeError, match="embed_scale has shape"):
        bad_layer(ids)


def test_a_lora_layer_answers_the_wrapped_layers_attributes():
    base = nn.Linear(12, 10)
    layer = LoRALinear(base)
    layer.add_adapter("default", 2, 2)
    assert layer.weight is base.weight and layer.bias is base.bias and layer.in_features == 12
    emb = LoRAEmbedding(nn.Embedding(20, 6, padding_idx=0))
    assert emb.weight.shape == (20, 6) and emb.padding_idx == 0 and emb.num_embeddings == 20
    with pytest.raises(AttributeError):
        layer.no_such_attribute


def test_new_adapters_follow_the_layers_mode():
    layer = LoRALinear(nn.Linear(12, 10)).eval()
    layer.add_adapter("default", 2, 2, lora_dropout=0.5)
    assert not layer.training and not layer.adapters["default"].training
    _randomize_B(layer)
    x = torch.randn(4, 12)
    assert torch.equal(layer(x), layer(x))  # no dropout in eval


@pytest.mark.parametrize("init", ["olora", "orthogonal"])
def test_olora_and_orthogonal_inits(init):
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    x = torch.randn(4, 16)
    before = base(x).detach()
    layer = LoRALinear(base)
    layer.add_adapter("default", 4, 8, init_lora_weights=init)
    a = layer.adapters["default"]
    if init == "olora":  # W0 = Q·R; A = R[:r], B = Q[:, :r]; W0 replaced by W0 - scaling·B·A: same outputs
        torch.testing.assert_close(layer(x), before, rtol=1e-4, atol=1e-5)
        assert torch.allclose(a.lora_B.T @ a.lora_B, torch.eye(4), atol=1e-5)  # orthonormal columns
        assert a.init_A is not None and torch.equal(a.init_A, a.lora_A)
    else:  # A's rows and B's columns on disjoint halves of one orthogonal basis: B·A = 0, A and B non-zero
        torch.testing.assert_close(layer(x), before, rtol=1e-4, atol=1e-5)
        assert a.lora_A.abs().min() > 0 and a.lora_B.abs().max() > 0.01 and a.init_A is None
    with pytest.raises(ValueError, match="even r"):
        LoRALinear(nn.Linear(8, 8)).add_adapter("x", 3, 3, init_lora_weights="orthogonal")


def _tiny_llama_dtype(dtype):
    from conftest import tiny_llama
    return tiny_llama().to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad", [True, False])
def test_autocast_forward_with_and_without_grad_and_merge(dtype, grad, ids):
    from loralab import LoraConfig, add_lora, merge
    model = add_lora(_tiny_llama_dtype(torch.float32), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                  init_lora_weights=False))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=dtype):
        out = model(input_ids=ids).logits
        if grad:
            out.float().square().mean().backward()
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)
    if grad:
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    merge(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        torch.testing.assert_close(model(input_ids=ids).logits.float(), out.detach().float(), rtol=0.1, atol=0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_forward_merge_save_and_load(dtype, ids, tmp_path):
    from loralab import LoraConfig, add_lora, load_adapter, merge, save_adapter
    model = add_lora(_tiny_llama_dtype(dtype), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    model.train()
    model(input_ids=ids).logits.float().square().mean().backward()  # with grad
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits                                  # without grad
    assert out.dtype == dtype
    save_adapter(model, tmp_path)
    fresh = _tiny_llama_dtype(dtype)
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, out)
        merge(fresh)
        torch.testing.assert_close(fresh(input_ids=ids).logits.float(), out.float(), rtol=0.05, atol=0.05)
