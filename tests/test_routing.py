"""adapter_rows: every row of one batch through its own adapter equals running each row alone, gradients too."""

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from loralab import LoraConfig, add_lora, disable_lora, merge, set_adapter
from loralab.inject import lora_layers
from loralab.routing import adapter_rows

ROWS = ["a", None, "b", "a", "c"]


def _model(build, targets, head):
    model = build()
    cfgs = {"a": dict(r=2, lora_alpha=4, target_modules=targets),
            "b": dict(r=5, lora_alpha=3, use_rslora=True, target_modules=targets[:1]),   # fewer layers, other rank
            "c": dict(r=3, lora_alpha=6, target_modules=targets, modules_to_save=[head])}
    for i, (name, cfg) in enumerate(cfgs.items()):
        add_lora(model, LoraConfig(init_lora_weights=False, **cfg), name)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
    for n, p in model.named_parameters():  # every adapter trains (add_lora left only the last one trainable)
        p.requires_grad_(".adapters." in n or ".modules_to_save." in n)
    return model.eval()


def _alone(model, ids, name):
    """Row-by-row reference: the named adapter alone (or the base)."""
    if name is None:
        with disable_lora(model):
            return model(input_ids=ids).logits
    set_adapter(model, name)
    return model(input_ids=ids).logits


CASES = [(tiny_llama, ["q_proj", "v_proj", "embed_tokens", "down_proj"], "lm_head"),
         (tiny_gpt2, ["c_attn", "wte", "c_fc"], "lm_head")]


@pytest.mark.parametrize("build, targets, head", CASES)
def test_each_row_equals_its_adapter_alone(build, targets, head):
    model = _model(build, targets, head)
    ids = torch.randint(0, 101, (len(ROWS), 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = torch.cat([_alone(model, ids[i:i + 1], n) for i, n in enumerate(ROWS)])
        set_adapter(model, "a")
        with adapter_rows(model, ROWS):
            got = model(input_ids=ids).logits
        assert (got - expected).abs().max() <= 1e-6
        assert all(l.rows is None for l in lora_layers(model).values())  # nothing left on the normal path
        torch.testing.assert_close(model(input_ids=ids).logits, _alone(model, ids, "a"), atol=0, rtol=0)
        assert (expected[0] - expected[2]).abs().max() > 1e-2  # the adapters differ


@pytest.mark.parametrize("build, targets, head", CASES)
def test_gradients_equal_separate_runs(build, targets, head):
    model = _model(build, targets, head)
    ids = torch.randint(0, 101, (len(ROWS), 6), generator=torch.Generator().manual_seed(4))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for i, name in enumerate(ROWS):  # reference: each row alone, gradients summed (a base row has none)
        if name is not None:
            _alone(model, ids[i:i + 1], name).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    model.zero_grad()
    with adapter_rows(model, ROWS):
        model(input_ids=ids).logits.square().sum().backward()
    got = {n: p.grad for n, p in params.items() if p.grad is not None}
    assert set(got) == set(expected) and any(".adapters.b." in n for n in got)
    for n in expected:
        scale = expected[n].abs().max().clamp_min(1.0)
        assert (got[n] - expected[n]).abs().max() <= 1e-5 * scale, (n, scale)


def test_refusals():
    model = _model(tiny_llama, ["q_proj", "v_proj"], "lm_head")
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        with adapter_rows(model, ["a", "zz"]):
            pass
    with pytest.raises(ValueError, match="batch of 3 rows under adapter_rows for 2"):
        with adapter_rows(model, ["a", "b"]):
            model(input_ids=torch.zeros(3, 4, dtype=torch.long))
    set_adapter(model, "a")
    merge(model)
    with pytest.raises(RuntimeError, match="before adapter_rows"):
        with adapter_rows(model, ["a", "b"]):
            pass
