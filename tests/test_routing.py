"""adapter_rows: every row of one batch through its own adapter equals running each row alone, gradients too."""

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from loralab import LoraConfig, add_lora, disable_lora, merge, set_adapter
from loralab.inject import lora_layers
from loralab.routing import adapter_rows, forward_with_adapters

ROWS = ["a", None, "b", "a", "c"]          # any order: the stacked, gathered bank (BGMV)
GROUPED = ["a", "a", None, "b", "c", "c"]   # each adapter's rows contiguous: one matmul pair per segment (SGMV)
EQUAL = ["a", "a", "b", "b", "c", "c"]      # equal runs in the bank's order: the bank itself, one matmul per run
REORDERED = ["c", "c", "c", "a", "a", "a"]  # equal runs in another order: one gathered slot per run


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


@pytest.mark.parametrize("limit", [8, 0])  # grouped rows through the segments (8) or the cached bank (0)
@pytest.mark.parametrize("rows", [ROWS, GROUPED, EQUAL, REORDERED])
@pytest.mark.parametrize("build, targets, head", CASES)
def test_each_row_equals_its_adapter_alone(build, targets, head, rows, limit, monkeypatch):
    from loralab import routing
    monkeypatch.setattr(routing, "INFERENCE_SEGMENTS", limit)
    model = _model(build, targets, head)
    ids = torch.randint(0, 101, (len(rows), 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = torch.cat([_alone(model, ids[i:i + 1], n) for i, n in enumerate(rows)])
        set_adapter(model, "a")
        with adapter_rows(model, rows):
            plans = [l.rows for l in lora_layers(model).values() if not l.embedding]
            assert all((p.segments is not None) == (rows is not ROWS) for p in plans)
            got = model(input_ids=ids).logits
            assert torch.equal(model(input_ids=ids).logits, got)        # the plans' cached rows, reused
        assert (got - expected).abs().max() <= 1e-5   # fp32 summation order differs with the matmul shapes
        assert all(l.rows is None for l in lora_layers(model).values())  # nothing left on the normal path
        torch.testing.assert_close(model(input_ids=ids).logits, _alone(model, ids, "a"), atol=0, rtol=0)
        assert (expected[0] - expected[2]).abs().max() > 1e-2  # the adapters differ


@pytest.mark.parametrize("rows", [ROWS, GROUPED])
@pytest.mark.parametrize("build, targets, head", CASES)
def test_gradients_equal_separate_runs(build, targets, head, rows):
    model = _model(build, targets, head)
    ids = torch.randint(0, 101, (len(rows), 6), generator=torch.Generator().manual_seed(4))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for i, name in enumerate(rows):  # reference: each row alone, gradients summed (a base row has none)
        if name is not None:
            _alone(model, ids[i:i + 1], name).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    model.zero_grad()
    with adapter_rows(model, rows):
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


def test_segments_equal_gathered_bank_and_autograd():
    """The grouped (SGMV) path equals the gathered bank (BGMV) path, values and gradients, heterogeneous ranks."""
    from loralab import functional as LF
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(r, 8, generator=g, requires_grad=True), torch.randn(6, r, generator=g, requires_grad=True))
               for r in (2, 5, 3)]
    scalings = [0.5, 2.0, 1.5]
    slots = [1, 1, -1, 0, 2, 2, 2]
    assert LF.row_segments(slots) == [(0, 2, 1), (3, 4, 0), (4, 7, 2)]
    assert LF.row_segments([0, 1, 0]) is None and LF.row_segments([-1, 0, -1]) == [(1, 2, 0)]
    x = torch.randn(len(slots), 4, 8, generator=g, requires_grad=True)
    out = torch.randn(len(slots), 4, 6, generator=g)
    got = LF.add_lora_linear_segments(out, x, factors, scalings, LF.row_segments(slots))
    A_bank, B_bank = LF.stack_factors(factors)
    expected = out + LF.lora_linear_rows(x, A_bank, B_bank, torch.tensor(scalings), torch.tensor(slots))
    assert (got - expected).abs().max() <= 1e-5
    grads = torch.autograd.grad(got.square().sum(), [x] + [t for f in factors for t in f])
    refs = torch.autograd.grad(expected.square().sum(), [x] + [t for f in factors for t in f])
    assert all((a - b).abs().max() <= 1e-5 * b.abs().max() for a, b in zip(grads, refs))
    with torch.no_grad():  # in place into the base output
        inplace = LF.add_lora_linear_segments(out.clone(), x, factors, scalings, LF.row_segments(slots), inplace=True)
    assert (inplace - expected).abs().max() <= 1e-5
    with torch.no_grad():  # the gathered bank, accumulated in place into the base output
        banked = LF.lora_linear_rows(x, A_bank, B_bank, torch.tensor(scalings), torch.tensor(slots), out=out.clone())
    assert (banked - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("rows", [ROWS, GROUPED])
def test_bf16_base(rows):
    model = _model(tiny_llama, ["q_proj", "v_proj", "down_proj"], "lm_head").to(torch.bfloat16)
    ids = torch.randint(0, 101, (len(rows), 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = torch.cat([_alone(model, ids[i:i + 1], n) for i, n in enumerate(rows)]).float()
        got = model(input_ids=ids, adapter_names=rows).logits.float()
    assert got.dtype == torch.float32 and (got - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_adapter_names_kwarg_forward_and_generate():
    """PEFT's spelling: model(..., adapter_names=...) and generate(..., adapter_names=...) route rows."""
    model = _model(tiny_llama, ["q_proj", "v_proj", "down_proj"], "lm_head")
    ids = torch.randint(1, 101, (len(ROWS), 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        with adapter_rows(model, ROWS):
            expected = model(input_ids=ids).logits
        got = model(input_ids=ids, adapter_names=ROWS).logits
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        torch.testing.assert_close(forward_with_adapters(model, ROWS, input_ids=ids).logits, expected, atol=0, rtol=0)
        assert all(l.rows is None for l in lora_layers(model).values())
        gen = model.generate(input_ids=ids, adapter_names=ROWS, max_new_tokens=4, do_sample=False,
                             attention_mask=torch.ones_like(ids), pad_token_id=0)
        for i, name in enumerate(ROWS):
            one = ids[i:i + 1]
            if name is None:
                with disable_lora(model):
                    alone = model.generate(input_ids=one, max_new_tokens=4, do_sample=False, pad_token_id=0)
            else:
                set_adapter(model, name)
                alone = model.generate(input_ids=one, max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert gen[i].tolist() == alone[0].tolist(), (i, name)
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        model(input_ids=ids[:2], adapter_names=["a", "zz"])
    assert all(l.rows is None for l in lora_layers(model).values())   # a refused call leaves nothing behind
    with torch.no_grad():
        set_adapter(model, "a")
        torch.testing.assert_close(model(input_ids=ids).logits, _alone(model, ids, "a"), atol=0, rtol=0)


def test_bank_cache_reused_and_invalidated():
    """Inference reuses one stacked bank per layer; an in-place update, a load or a delete rebuilds it."""
    from loralab import delete_adapter
    from loralab.routing import layer_bank
    model = _model(tiny_llama, ["q_proj", "v_proj"], "lm_head")
    layer = next(l for l in lora_layers(model).values() if "b" in l.adapters)
    ids = torch.randint(0, 101, (len(ROWS), 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        model(input_ids=ids, adapter_names=ROWS)
        bank = layer_bank(layer)[0]
        model(input_ids=ids, adapter_names=["b", "a", "b", None, "a"])
        assert layer_bank(layer)[0] is bank                          # another adapter set, the same bank
        layer.adapters["b"].lora_B.add_(1.0)                          # as an optimizer step would
        got = model(input_ids=ids, adapter_names=ROWS).logits
        assert layer_bank(layer)[0] is not bank
        expected = torch.cat([_alone(model, ids[i:i + 1], n) for i, n in enumerate(ROWS)])
        assert (got - expected).abs().max() <= 1e-5
        delete_adapter(model, "c")
        rows = [n if n != "c" else None for n in ROWS]
        got = model(input_ids=ids, adapter_names=rows).logits
        assert len(layer_bank(layer)[3]) == 2
        expected = torch.cat([_alone(model, ids[i:i + 1], n) for i, n in enumerate(rows)])
        assert (got - expected).abs().max() <= 1e-5


def test_a_model_that_accepts_adapter_names_pickles_and_copies():
    import copy
    import io
    model = _model(tiny_llama, ["q_proj"], "lm_head")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert clone.generate.model is clone
        ids = torch.randint(0, 101, (2, 4), generator=torch.Generator().manual_seed(8))
        with torch.no_grad():
            torch.testing.assert_close(clone(input_ids=ids, adapter_names=["a", "b"]).logits,
                                       model(input_ids=ids, adapter_names=["a", "b"]).logits)
