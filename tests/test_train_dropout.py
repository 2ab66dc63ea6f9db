"""The adapter dropout used in training (functional.keep_mask): Bernoulli(1 - p) per element, unbiased, and
the LoRA gradient is the formula's with that mask."""

import pytest
import torch

from loralab.functional import keep_mask as _keep_mask
from loralab.layer import LoRALinear


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_fraction_is_one_minus_p(p):
    torch.manual_seed(0)
    x = torch.empty(4, 1000, 250)  # 10^6 elements: 4 sigma of the keep fraction is < 0.002
    keep, kept = _keep_mask(x, p)
    assert keep.dtype == torch.bool and keep.shape == x.shape
    assert kept == pytest.approx(1 - p, abs=1e-5)
    assert keep.float().mean().item() == pytest.approx(kept, abs=0.002)


def test_mask_has_no_structure_across_lanes_rows_or_calls():
    """Each 64-bit random word gives four lanes; none of them may be biased or correlated."""
    torch.manual_seed(1)
    x = torch.empty(1000, 1000)
    keep = _keep_mask(x, 0.5)[0].float()
    lanes = keep.reshape(-1, 4).mean(0)                     # the four 16-bit lanes of each word
    assert torch.allclose(lanes, torch.full((4,), 0.5), atol=0.004)
    centred = keep - keep.mean()
    neighbours = (centred[:, 1:] * centred[:, :-1]).mean() / centred.var()
    assert abs(neighbours.item()) < 0.005
    again = _keep_mask(x, 0.5)[0].float()
    assert (keep == again).float().mean().item() == pytest.approx(0.5, abs=0.003)


def test_dropout_is_unbiased_and_matches_torch_dropout_in_mean_and_variance():
    torch.manual_seed(2)
    x, p = torch.randn(64), 0.3
    ours = torch.stack([torch.where(k, x, 0.0) / kept for k, kept in (_keep_mask(x, p) for _ in range(4000))])
    theirs = torch.stack([torch.nn.functional.dropout(x, p, True) for _ in range(4000)])
    torch.testing.assert_close(ours.mean(0), x, atol=0.06, rtol=0)
    torch.testing.assert_close(ours.var(0), theirs.var(0), atol=0.15, rtol=0.15)


def test_lora_output_and_gradients_follow_the_formula_with_the_drawn_mask():
    torch.manual_seed(3)
    layer = LoRALinear(torch.nn.Linear(12, 9))
    layer.add_adapter("default", r=3, lora_alpha=6.0, lora_dropout=0.25)
    a = layer.adapters["default"]
    with torch.no_grad():
        a.lora_B.normal_()
    layer.train()
    x = torch.randn(5, 12)
    state = torch.get_rng_state()
    layer(x).pow(2).sum().backward()
    torch.set_rng_state(state)                   # the same draw again, for the reference
    keep, kept = _keep_mask(x, 0.25)
    A, B = a.lora_A.detach().clone().requires_grad_(), a.lora_B.detach().clone().requires_grad_()
    ref = layer.base_layer(x).detach() + 2.0 * ((x * keep / kept) @ A.T) @ B.T
    ref.pow(2).sum().backward()
    torch.testing.assert_close(a.lora_A.grad, A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.lora_B.grad, B.grad, rtol=1e-5, atol=1e-5)
    layer.eval()                                 # no dropout outside training
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 2.0 * (x @ a.lora_A.T) @ a.lora_B.T,
                               rtol=1e-5, atol=1e-5)
