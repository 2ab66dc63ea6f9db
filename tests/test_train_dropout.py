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
