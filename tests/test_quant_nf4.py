"""NF4: bytes and constants equal to bitsandbytes', the quantizer's math (property tests), NF4Linear against a dense
reference with autograd, files, and quantize_model on a tiny Llama."""

import bitsandbytes.functional as bnb
import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import tiny_llama
from loralab.quant import NF4Linear, NF4State, dequantize_nf4, model_footprint, quantize_model, quantize_nf4
from loralab.quant import nf4 as nf4_module
from loralab.quant import parallel
from loralab.quant.nf4 import NF4_LEVELS, dynamic_map

LEVELS = torch.tensor(NF4_LEVELS)
MAX_HALF_GAP = float((LEVELS[1:] - LEVELS[:-1]).max()) / 2      # 0.1385: between 0.723 and 1.0


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    """bitsandbytes dequantizes odd widths through torch.compile; eager gives the same values, without compiling
    for every shape."""
    set_stance = getattr(torch.compiler, "set_stance", None)                   # torch >= 2.6
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


def _bnb(w, blocksize=64, double_quant=False):
    packed, state = bnb.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    # bitsandbytes' CPU kernel indexes the constants per row when the width is a multiple of 16 but not of the
    # blocksize (e.g. (3, 80)), which disagrees with its own quantizer; the flat view is dequantized correctly.
    flat = bnb.QuantState(absmax=state.absmax, shape=torch.Size([w.numel()]), dtype=w.dtype, blocksize=blocksize,
                          code=state.code, quant_type="nf4", offset=state.offset, state2=state.state2)
    return packed.reshape(-1), state, bnb.dequantize_4bit(packed, flat).reshape(w.shape)


def _weight(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 3).to(dtype)  # uneven block scales


# ---- bit equality with bitsandbytes ----------------------------------------------------------------------------

@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 64), (40, 48), (3, 80), (7, 33), (130,), (1,), (100, 257)])
def test_bytes_constants_and_values_equal_bitsandbytes(shape, dtype, double_quant):
    w = _weight(shape, dtype)
    packed, state = quantize_nf4(w, 64, double_quant)
    ref_packed, ref, ref_values = _bnb(w, 64, double_quant)
    assert packed.dtype == torch.uint8 and torch.equal(packed, ref_packed)
    assert state.absmax.dtype == ref.absmax.dtype and torch.equal(state.absmax, ref.absmax)
    if double_quant:
        assert torch.equal(state.offset, ref.offset)
        assert torch.equal(state.nested_absmax, ref.state2.absmax)
        assert torch.equal(state.nested_code, ref.state2.code)
        scales = bnb.dequantize_blockwise(ref.absmax, ref.state2) + ref.offset
        assert torch.equal(state.block_absmax(), scales)
        assert torch.equal(nf4_module._block_absmax(state, nf4_module._tables(state.device)), scales)
    values = dequantize_nf4(packed, state)
    assert values.shape == w.shape and values.dtype == dtype
    assert torch.equal(values, ref_values)


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_other_blocksizes_equal_bitsandbytes(blocksize):
    w = _weight((33, 130), seed=3)
    for double_quant in (False, True):
        packed, state = quantize_nf4(w, blocksize, double_quant)
        ref_packed, ref, ref_values = _bnb(w, blocksize, double_quant)
        assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref.absmax)
        assert torch.equal(dequantize_nf4(packed, state), ref_values)


def test_unmodified_bitsandbytes_dequantize_agrees_on_block_aligned_rows():
    w = _weight((16, 128), torch.bfloat16)
    packed, state = quantize_nf4(w, double_quant=True)
    ref_packed, ref = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(dequantize_nf4(packed, state), bnb.dequantize_4bit(ref_packed, ref))


def test_edge_values_equal_bitsandbytes():
    """Values exactly on the midpoints (ties go to the lower level), ±absmax, zero blocks, one-sign blocks,
    a short zero tail (its absmax is clamped to 1e-38) and an all-zero tensor with double quantization."""
    mids = (LEVELS[:-1] + LEVELS[1:]) / 2
    on_mid = torch.cat([mids, -mids, torch.tensor([1.0, -1.0])])                  # absmax 1: s == the value
    near = torch.cat([torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
    blocks = [torch.cat([on_mid, near, torch.zeros(64 * 2 - 62)]).reshape(2, 64) * 3.0,
              torch.zeros(1, 64), -torch.rand(1, 64) - 0.5, torch.full((1, 64), 0.25)]
    w = torch.cat([b.reshape(-1) for b in blocks] + [torch.zeros(5)])
    for x in (w, torch.zeros(4, 64), torch.zeros(7)):
        for double_quant in (False, True):
            packed, state = quantize_nf4(x, 64, double_quant)
            ref_packed, ref, ref_values = _bnb(x, 64, double_quant)
            assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref.absmax)
            assert torch.equal(dequantize_nf4(packed, state), ref_values)


@pytest.mark.parametrize("threads, slice_size", [(1, 256), (2, 256), (3, 256), (2, 1 << 22)])
def test_slices_and_threads_do_not_change_the_result(monkeypatch, threads, slice_size):
    w = _weight((50, 77), torch.bfloat16, seed=5)
    ref_packed, ref, ref_values = _bnb(w, 64, True)
    monkeypatch.setattr(parallel, "SLICE", slice_size)                        # 4 blocks per op, or all at once
    monkeypatch.setattr(parallel, "MIN_PART", 512)                            # threads even for this size
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    packed, state = quantize_nf4(w, double_quant=True)
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref.absmax)
    assert torch.equal(dequantize_nf4(packed, state), ref_values)
    with pytest.raises(ValueError, match="element 3001"):                      # NaN in the second part
        quantize_nf4(torch.cat([w.reshape(-1)[:3001], torch.tensor([float("nan")] * 63, dtype=w.dtype)]))
    if threads > 1:                                                             # errors come back from threads
        def work(lo, hi):
            if lo > 0:
                raise KeyError("part 2")
        with pytest.raises(KeyError, match="part 2"):
            parallel.run_split(work, 4096, 64, torch.device("cpu"))
    with torch.inference_mode():                                                # per-thread modes are carried over
        assert torch.equal(dequantize_nf4(packed, state), ref_values)


def test_the_accelerator_path_gives_the_same_bytes(monkeypatch):
    """Large ops in the calling thread (what CUDA runs), checked here on CPU."""
    w = _weight((50, 77), torch.bfloat16, seed=6)
    ref_packed, ref, ref_values = _bnb(w, 64, True)
    values32 = dequantize_nf4(*quantize_nf4(w, double_quant=True), torch.float32)
    monkeypatch.setattr(parallel, "on_cpu", lambda device: False)
    monkeypatch.setattr(parallel, "ACCELERATOR_STEP", 1024)                  # several steps and a rest
    packed, state = quantize_nf4(w, double_quant=True)
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref.absmax)
    assert torch.equal(dequantize_nf4(packed, state), ref_values)
    assert torch.equal(dequantize_nf4(packed, state, torch.float32), values32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_whole_tensor_and_split_dequantization_give_bitsandbytes_values(monkeypatch, dtype):
    """Up to nf4._WHOLE values a CPU dequantization is three whole-tensor ops, beyond it the split path; both
    give bitsandbytes' values (the split path forced here on a small tensor, several parts and a rest)."""
    w = _weight((96, 700), dtype, seed=9)
    ref_packed, ref, ref_values = _bnb(w, 64, True)
    packed, state = quantize_nf4(w, double_quant=True)
    whole = dequantize_nf4(packed, state)
    monkeypatch.setattr(nf4_module, "_WHOLE", 0)
    monkeypatch.setattr(parallel, "MIN_PART", 1 << 12)
    split = dequantize_nf4(packed, state)
    assert torch.equal(whole, ref_values) and torch.equal(split, ref_values)


def test_a_large_output_asks_for_huge_pages_inside_its_own_buffer(monkeypatch):
    calls = []
    monkeypatch.setattr(parallel, "_madvise", lambda addr, size, advice: calls.append((addr, size, advice)) or 0)
    w = _weight((1024, 2048), torch.float32, seed=8)                       # 8 MiB of fp32 output
    packed, state = quantize_nf4(w)
    out = dequantize_nf4(packed, state)
    assert torch.equal(out, _bnb(w, 64, False)[2])
    (addr, size, advice), = calls
    begin, end = out.data_ptr(), out.data_ptr() + out.numel() * 4
    assert advice == 14 and addr % parallel.HUGE_PAGE == 0 and size % parallel.HUGE_PAGE == 0
    assert begin <= addr and addr + size <= end and size >= end - begin - 2 * parallel.HUGE_PAGE
    calls.clear()
    dequantize_nf4(*quantize_nf4(w[:100]))                                   # small: left alone
    assert calls == []


def test_codebooks_are_bitsandbytes_and_the_paper():
    assert torch.equal(LEVELS, bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bnb.create_dynamic_map())
    # QLoRA's construction: quantiles of N(0, 1) at offset 0.9677, 8 above zero, 7 below, an exact 0, scaled to 1
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    pos = normal.icdf(torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64)[:-1])
    paper = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    torch.testing.assert_close(LEVELS.double(), paper / paper.max(), rtol=0, atol=1e-6)


# ---- the math ---------------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 700), seed=st.integers(0, 2 ** 16), scale=st.floats(1e-6, 1e4),
       double_quant=st.booleans())
def test_error_is_at_most_half_the_largest_gap_times_the_block_absmax(n, seed, scale, double_quant):
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    packed, state = quantize_nf4(w, 64, double_quant)
    absmax = state.block_absmax().repeat_interleave(64)[:n]
    true_absmax = torch.cat([b.abs().max().expand(b.numel()) for b in w.split(64)])
    err = (dequantize_nf4(packed, state) - w).abs()
    # with double quantization the block scale itself is off by |absmax - true absmax|, at most 1x more
    bound = MAX_HALF_GAP * true_absmax * (1 + 1e-5) + (absmax - true_absmax).abs()
    assert bool((err <= bound).all())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 700), seed=st.integers(0, 2 ** 16), double_quant=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_quantizing_a_dequantized_tensor_gives_the_same_codes(n, seed, double_quant, dtype):
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    packed, state = quantize_nf4(w, 64, double_quant)
    again, state2 = quantize_nf4(dequantize_nf4(packed, state), 64, double_quant)
    assert torch.equal(again, packed)
    if not double_quant and dtype == torch.float32:
        assert torch.equal(state2.absmax, state.absmax)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 16), n_blocks=st.integers(1, 6))
def test_dequantized_values_are_exactly_the_nf4_levels_times_absmax(seed, n_blocks):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n_blocks, 64, generator=g) * 2 - 1
    w[:, 0] = 1.0                                                               # absmax 1 in every block
    values = dequantize_nf4(*quantize_nf4(w))
    assert set(values.unique().tolist()) <= set(NF4_LEVELS)


def test_every_level_comes_back_exactly():
    w = LEVELS.repeat(4) * 2.5                                                  # absmax 2.5, all 16 codes
    packed, _ = quantize_nf4(w)
    assert torch.stack([packed >> 4, packed & 15], 1).reshape(-1).tolist() == list(range(16)) * 4
    assert torch.equal(dequantize_nf4(packed, quantize_nf4(w)[1]), w)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.floats(-1, 1, width=32),
                          st.sampled_from(((LEVELS[:-1] + LEVELS[1:]) / 2).tolist()),
                          st.integers(0, 14).flatmap(lambda i: st.integers(-3, 3).map(
                              lambda k: _ulps(float((LEVELS[i] + LEVELS[i + 1]) / 2), k)))),
                min_size=1, max_size=200))
def test_codes_are_the_count_of_midpoints_below_the_scaled_value(values):
    """Against a brute-force reference: q = #{m_j < s} with s = w · (1/absmax), near and on the midpoints."""
    w = torch.tensor(values + [1.0], dtype=torch.float32)                       # absmax 1 -> s = w exactly
    w = torch.cat([w, torch.zeros(-w.numel() % 64)])
    packed, _ = quantize_nf4(w)
    codes = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)
    mids = (LEVELS[:-1] + LEVELS[1:]) / 2
    assert torch.equal(codes.long(), (w[:, None] > mids[None, :]).sum(1))


def _ulps(x: float, k: int) -> float:
    t = torch.tensor(x, dtype=torch.float32)
    step = torch.tensor(2.0 if k > 0 else -2.0)
    for _ in range(abs(k)):
        t = torch.nextafter(t, step)
    return float(t)


def test_strided_inputs_are_quantized_like_contiguous_ones():
    w = _weight((96, 70), seed=8)
    for view in (w.T, w[:, ::2], w[1:, :65]):
        packed, state = quantize_nf4(view, double_quant=True)
        ref_packed, ref = quantize_nf4(view.contiguous(), double_quant=True)
        assert state.shape == tuple(view.shape) and torch.equal(packed, ref_packed)
        assert torch.equal(dequantize_nf4(packed, state), dequantize_nf4(ref_packed, ref))


def test_nibble_order_and_padding():
    w = torch.tensor([-1.0, 1.0, 0.0])                                           # codes 0, 15, 7 (+ pad 7)
    packed, state = quantize_nf4(w)
    assert packed.tolist() == [0x0F, 0x77] and state.absmax.tolist() == [1.0]


def test_state_round_trips_through_plain_tensors_and_json():
    import json
    packed, state = quantize_nf4(_weight((20, 70), torch.bfloat16), double_quant=True)
    tensors, meta = state.to_tensors()
    again = NF4State.from_tensors(dict(tensors), json.loads(json.dumps(meta)))
    assert again.dtype == torch.bfloat16 and again.shape == (20, 70) and again.double_quant
    assert torch.equal(dequantize_nf4(packed, again), dequantize_nf4(packed, state))
    with pytest.raises(ValueError, match="missing"):
        NF4State.from_tensors({"absmax": tensors["absmax"]}, meta)
    with pytest.raises(ValueError, match="absmax"):
        NF4State((20, 70), torch.float32, 64, torch.zeros(3))


@pytest.mark.parametrize("bad, error, match", [
    (torch.arange(64), TypeError, "int64"),
    (torch.randn(64, dtype=torch.float64), TypeError, "float64"),
    (torch.zeros(0, 64), ValueError, "empty"),
    (torch.tensor([1.0, float("nan")] * 32), ValueError, "NaN/Inf: element 1"),
    (torch.tensor([1.0, float("inf")] * 40), ValueError, "NaN/Inf"),
    ([1.0, 2.0], TypeError, "torch.Tensor"),
])
def test_bad_inputs_are_refused(bad, error, match):
    with pytest.raises(error, match=match):
        quantize_nf4(bad)


@pytest.mark.parametrize("blocksize", [63, 0, True, "64", 8192])
def test_bad_blocksize_is_refused(blocksize):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize_nf4(torch.randn(64), blocksize)


def test_dequantize_checks_its_arguments():
    packed, state = quantize_nf4(torch.randn(10, 10))
    with pytest.raises(ValueError, match="50 elements"):
        dequantize_nf4(packed[:-1], state)
    with pytest.raises(TypeError, match="NF4State"):
        dequantize_nf4(packed, {"absmax": state.absmax})
    with pytest.raises(TypeError, match="floating-point"):
        dequantize_nf4(packed, state, dtype=torch.int32)
    assert dequantize_nf4(packed, state, dtype=torch.float64).dtype == torch.float64


# ---- NF4Linear --------------------------------------------------------------------------------------------------

def _nf4_linear(in_f=48, out_f=40, bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    return NF4Linear.from_linear(nn.Linear(in_f, out_f, bias=bias), **kw)


def _dense_reference(layer, x, grad):
    """Autograd through F.linear on the dequantized weight."""
    x = x.detach().clone().requires_grad_(True)
    bias = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(layer.bias.requires_grad)
    y = nn.functional.linear(x, layer.dense_weight(), bias)
    y.backward(grad)
    return y, x.grad, None if bias is None else bias.grad


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_equal_autograd_on_the_dense_weight(double_quant, compute_dtype):
    layer = _nf4_linear(double_quant=double_quant, compute_dtype=compute_dtype)
    x = torch.randn(3, 5, 48, dtype=compute_dtype, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref_y, ref_grad_x, _ = _dense_reference(layer, x, grad)
    assert y.shape == (3, 5, 40) and y.dtype == compute_dtype
    assert torch.equal(y, ref_y)
    torch.testing.assert_close(x.grad, ref_grad_x, rtol=1e-6, atol=1e-6)
    assert layer.bias.grad is None and not any(p.requires_grad for p in layer.parameters())


def test_inference_mode_and_no_grad_give_the_same_output():
    layer = _nf4_linear(in_f=256, out_f=512)                                   # large enough to split in threads
    x = torch.randn(3, 256)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), y)
    with torch.inference_mode():
        assert torch.equal(layer(x), y)


def test_an_unfrozen_bias_gets_its_gradient():
    layer = _nf4_linear()
    layer.bias.requires_grad_(True)
    x = torch.randn(6, 48)
    grad = torch.randn(6, 40)
    layer(x).backward(grad)
    _, _, ref_bias_grad = _dense_reference(layer, x, grad)
    torch.testing.assert_close(layer.bias.grad, ref_bias_grad)


def test_nothing_weight_sized_is_saved_for_backward():
    layer = _nf4_linear(in_f=64, out_f=96, bias=True)
    saved = []
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert saved and max(saved) < 64 * 96                                       # the codes: 64·96/2 bytes
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_requantizing_between_forward_and_backward_is_detected():
    layer = _nf4_linear()
    y = layer(torch.randn(2, 48, requires_grad=True))
    layer.requantize_(layer.dense_weight() * 2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_set_dense_weight_refuses_and_requantize_reports_the_error():
    layer = _nf4_linear(in_f=64, out_f=32)
    W = layer.dense_weight()
    with pytest.raises(ValueError, match="requantize"):
        layer.set_dense_weight(W + 1e-3)
    assert torch.equal(layer.dense_weight(), W)
    target = W + 0.05 * torch.randn_like(W)
    report = layer.requantize_(target)
    new = layer.dense_weight()
    assert report["weight_max_abs"] == pytest.approx((new - target).abs().max().item())
    assert report["weight_rel_fro"] == pytest.approx(((new - target).norm() / target.norm()).item())
    assert report["update_rel_fro"] == pytest.approx(((target - W).norm() / W.norm()).item(), rel=1e-5)
    assert 0 < report["codes_changed"] < 1 and report["error_vs_update"] > 0
    assert torch.equal(new, dequantize_nf4(*quantize_nf4(target, double_quant=True)))
    assert layer.requantize_(new)["error_vs_update"] is None                    # nothing asked to change
    with pytest.raises(ValueError, match=r"\(32, 64\)"):
        layer.requantize_(W.T)


def test_state_dict_round_trips_through_safetensors(tmp_path):
    layer = _nf4_linear(in_f=70, out_f=30, compute_dtype=torch.bfloat16)
    save_file(layer.state_dict(), tmp_path / "layer.safetensors")
    fresh = NF4Linear(70, 30, bias=True, blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)
    fresh.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    x = torch.randn(4, 70, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), layer(x))
    assert set(layer.state_dict()) == {"weight_packed", "weight_absmax", "weight_offset", "weight_nested_absmax",
                                       "weight_nested_code", "bias"}


def test_bits_per_parameter_and_nbytes():
    for double_quant, bits in ((True, 4 + 8 / 64 + 32 / (64 * 256) + (4 + 1024) * 8 / 4096 ** 2), (False, 4.5)):
        big = NF4Linear(4096, 4096, bias=False, double_quant=double_quant, device="meta")   # no memory used
        assert big.bits_per_parameter() == pytest.approx(bits, rel=1e-12)
        assert big.bits_per_parameter() <= (4.13 if double_quant else 4.5)
    small = _nf4_linear(in_f=64, out_f=32, bias=True, double_quant=False)
    assert small.nbytes() == 64 * 32 // 2 + 32 * 4                              # codes + one float per block


def test_protocol_properties_do_not_dequantize(monkeypatch):
    layer = _nf4_linear(compute_dtype=torch.bfloat16)
    import loralab.quant.linear as linear_module
    monkeypatch.setattr(linear_module, "dequantize_nf4", lambda *a, **k: pytest.fail("dequantized"))
    assert layer.device == torch.device("cpu") and layer.dtype == torch.bfloat16
    assert (layer.in_features, layer.out_features, layer.quant_type) == (48, 40, "nf4")
    assert layer.nbytes() > 0 and layer.bits_per_parameter() > 4


def test_to_linear_and_casts_keep_the_codes():
    layer = _nf4_linear(double_quant=True)
    x = torch.randn(3, 48)
    dense = layer.to_linear()
    assert isinstance(dense, nn.Linear) and torch.equal(dense.weight, layer.dense_weight())
    torch.testing.assert_close(dense(x), layer(x))
    absmax = layer.weight_nested_absmax.clone()
    layer.to(torch.bfloat16)
    assert layer.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.weight_nested_absmax.dtype == torch.float32 and torch.equal(layer.weight_nested_absmax, absmax)
    assert layer(x).dtype == torch.float32                                      # returned in the input's dtype
    layer.to("meta")
    assert layer.device.type == "meta" and layer.weight_packed.device.type == "meta"


def test_layer_errors():
    with pytest.raises(TypeError, match="nn.Linear"):
        NF4Linear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="in_features"):
        NF4Linear(0, 3)
    with pytest.raises(ValueError, match=r"\(\.\.\., 48\)"):
        _nf4_linear()(torch.randn(2, 47))


# ---- whole models -----------------------------------------------------------------------------------------------

def test_quantize_model_on_a_tiny_llama(ids):
    model = tiny_llama()
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits
    before = model_footprint(model)
    report = quantize_model(model)
    assert report["layers_skipped"] == {"lm_head": "in skip"} and isinstance(model.lm_head, nn.Linear)
    assert len(report["layers_quantized"]) == 14                                 # 7 projections x 2 layers
    assert all(isinstance(model.get_submodule(n), NF4Linear) for n in report["layers_quantized"])
    assert report["footprint_before"] == before and report["footprint_after"] == model_footprint(model)
    saved = report["weight_bytes_before"] - report["weight_bytes_after"]
    assert saved > 0 and report["footprint_before"] - report["footprint_after"] == saved
    assert report["bits_per_parameter"] == pytest.approx(report["weight_bytes_after"] * 8 / report["params_quantized"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        rel = ((logits - dense_logits).norm() / dense_logits.norm()).item()
        assert 0 < rel < 0.2                                                     # 4-bit weights: close, not equal
        for name in report["layers_quantized"]:                                  # exactly the dequantized model
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, model.get_submodule(name).to_linear())
        torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_quantize_model_skips_the_output_head_and_tied_weights():
    model = tiny_llama(tie_word_embeddings=True)
    report = quantize_model(model, skip=())
    assert report["layers_skipped"] == {"lm_head": "output head"}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    seq = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(4, 2))
    seq[2].weight = seq[0].weight                                               # tied: left dense, both
    report = quantize_model(seq, skip="4")
    assert report["layers_quantized"] == ["3"] and report["layers_skipped"] == {
        "0": "weight shared with 2.weight", "2": "weight shared with 0.weight", "4": "in skip"}
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU()))
    broken = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        broken[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^1: cannot quantize .* NaN.*not changed"):
        quantize_model(broken)
    assert all(type(m) is nn.Linear for m in broken)                            # nothing was replaced
