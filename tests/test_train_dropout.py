"""The adapter dropout used in training: Bernoulli(1 - p) per element of the adapter's input, unbiased, and
the LoRA gradient is the formula's with the drawn mask.

Everything is observed through LoRALinear's public forward.  A probe layer whose base is zero and whose
adapter is the identity (A = I, B = I, scaling 1) outputs exactly dropout(x) = x·keep / kept, so the mask and
the keep probability are read off its output: keep = (out != 0), kept = x / out where kept.
"""

import pytest
import torch

from loralab.layer import LoRALinear


def probe(d: int, p: float) -> LoRALinear:
    base = torch.nn.Linear(d, d, bias=False)
    torch.nn.init.zeros_(base.weight)
    layer = LoRALinear(base)
    layer.add_adapter("default", r=d, lora_alpha=float(d), lora_dropout=p)   # scaling = alpha / r = 1
    with torch.no_grad():
        layer.adapters["default"].lora_A.copy_(torch.eye(d))
        layer.adapters["default"].lora_B.copy_(torch.eye(d))
    return layer.train()


def drawn_mask(layer: LoRALinear, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(keep mask, keep probability) of one training forward of the probe on x (no zeros in x)."""
    with torch.no_grad():
        out = layer(x)
    keep = out != 0
    kept = (x[keep] / out[keep]).mean().item()
    return keep, kept


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_fraction_is_one_minus_p(p):
    torch.manual_seed(0)
    x = torch.ones(4000, 250)  # 10^6 elements: 4 sigma of the keep fraction is < 0.002
    keep, kept = drawn_mask(probe(250, p), x)
    assert kept == pytest.approx(1 - p, abs=1e-5)
    assert keep.float().mean().item() == pytest.approx(kept, abs=0.002)


def test_mask_has_no_structure_across_lanes_rows_or_calls():
    """Neighbouring elements (also within one group of four) are neither biased nor correlated."""
    torch.manual_seed(1)
    layer, x = probe(250, 0.5), torch.ones(4000, 250)
    keep = drawn_mask(layer, x)[0].float()
    lanes = keep.reshape(-1, 4).mean(0)                     # elements 4k, 4k+1, 4k+2, 4k+3
    assert torch.allclose(lanes, torch.full((4,), 0.5), atol=0.004)
    centred = keep - keep.mean()
    neighbours = (centred[:, 1:] * centred[:, :-1]).mean() / centred.var()
    assert abs(neighbours.item()) < 0.005
    again = drawn_mask(layer, x)[0].float()
    assert (keep == again).float().mean().item() == pytest.approx(0.5, abs=0.003)


def test_dropout_is_unbiased_and_matches_torch_dropout_in_mean_and_variance():
    torch.manual_seed(2)
    x, p = torch.randn(64), 0.3
    with torch.no_grad():
        ours = probe(64, p)(x.expand(4000, 64).contiguous())          # 4000 draws of dropout(x)
    theirs = torch.stack([torch.nn.functional.dropout(x, p, True) for _ in range(4000)])
    torch.testing.assert_close(ours.mean(0), x, atol=0.06, rtol=0)
    torch.testing.assert_close(ours.var(0), theirs.var(0), atol=0.15, rtol=0.15)


def test_lora_output_and_gradients_follow_the_formula_with_the_drawn_mask():
    """The same RNG state draws the same mask for an input of the same shape: the probe reads it, the
    reference applies it to y = W0·x + s·B·A·(x·keep / kept) and autograd gives the reference gradients."""
    torch.manual_seed(3)
    layer = LoRALinear(torch.nn.Linear(12, 9))
    layer.add_adapter("default", r=3, lora_alpha=6.0, lora_dropout=0.25)
    a = layer.adapters["default"]
    with torch.no_grad():
        a.lora_B.normal_()
    layer.train()
    x, reader = torch.randn(5, 12), probe(12, 0.25)
    state = torch.get_rng_state()
    layer(x).pow(2).sum().backward()
    torch.set_rng_state(state)                   # the same draw again, read by the probe
    with torch.no_grad():
        dropped = reader(x)                      # x·keep / kept
    assert 0 < (dropped == 0).sum() < x.numel()
    A, B = a.lora_A.detach().clone().requires_grad_(), a.lora_B.detach().clone().requires_grad_()
    ref = layer.base_layer(x).detach() + 2.0 * (dropped @ A.T) @ B.T
    ref.pow(2).sum().backward()
    torch.testing.assert_close(a.lora_A.grad, A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.lora_B.grad, B.grad, rtol=1e-5, atol=1e-5)
    layer.eval()                                 # no dropout outside training
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 2.0 * (x @ a.lora_A.T) @ a.lora_B.T,
                               rtol=1e-5, atol=1e-5)


def test_training_path_keeps_no_dropped_copy_and_equals_autograd_on_the_dropped_input():
    """With dropout in training the layer keeps x itself and the one-byte mask (not x·keep) for backward:
    output, every gradient (x's too) and the global generator's advance equal the plain autograd formula on
    the dropped input."""
    from loralab import functional as LF
    torch.manual_seed(4)
    out0, x0 = torch.randn(2, 7, 9), torch.randn(2, 7, 12)
    A0, B0 = torch.randn(3, 12), torch.randn(9, 3)
    saved = []

    def run(use_function: bool):
        out, x = out0.clone().requires_grad_(), x0.clone().requires_grad_()
        A, B = A0.clone().requires_grad_(), B0.clone().requires_grad_()
        torch.manual_seed(11)
        if use_function:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                y = LF.add_lora_linear(out, x, A, B, 2.0, dropout=0.3, training=True)
        else:
            keep, kept = LF.keep_mask(x, 0.3)
            y = out + (torch.where(keep, x, 0.0) @ A.T * (2.0 / kept)) @ B.T
        after_forward = torch.get_rng_state()
        y.pow(2).sum().backward()
        assert torch.equal(torch.get_rng_state(), after_forward)       # backward draws nothing
        return y.detach(), after_forward, out.grad, x.grad, A.grad, B.grad

    got, ref = run(True), run(False)
    assert torch.equal(got[1], ref[1])                                   # the same draws from the global one
    for a, b in zip(got[:1] + got[2:], ref[:1] + ref[2:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    big = [t for t in saved if t.is_floating_point() and t.numel() >= x0.numel()]
    masks = [t for t in saved if t.dtype == torch.bool]
    assert len(masks) == 1 and masks[0].shape == x0.shape                                 # one mask, its own:
    assert masks[0].data_ptr() != LF.keep_mask(x0, 0.3, reuse=True)[0].data_ptr()        # not the scratch one
    assert len(big) == 1 and big[0].shape == x0.shape and big[0].dtype == x0.dtype       # x, no dropped copy


def test_mask_from_the_scratch_buffers_equals_a_fresh_one_and_reuses_them():
    from loralab import functional as LF
    x = torch.randn(6, 40)
    state = torch.get_rng_state()
    fresh, kept = LF.keep_mask(x, 0.2)
    torch.set_rng_state(state)
    reused, kept2 = LF.keep_mask(x, 0.2, reuse=True)
    assert torch.equal(fresh, reused) and kept == kept2
    ptr = reused.data_ptr()
    assert LF.keep_mask(x[:3], 0.2, reuse=True)[0].data_ptr() == ptr       # no new buffer for a smaller x
