"""loralab.loss: the chunked linear cross-entropy against F.cross_entropy on full logits, and the
causal-LM loss from hidden states against the logits path (values and gradients)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from loralab import LoraConfig, add_lora
from loralab.batch_loss import logits_loss_sum
from loralab.loss import PLAIN_HEAD_MODELS, causal_lm_loss_sum, chunk_rows, linear_cross_entropy

from conftest import tiny_gpt2, tiny_llama


def _inputs(n, h, v, *, dtype=torch.float64, bias=False, weight_grad=False, ignore=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=dtype) * 0.5).requires_grad_(weight_grad)
    b = (torch.randn(v, generator=g, dtype=dtype) * 0.5).requires_grad_(weight_grad) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[list(ignore)] = -100
    return hidden, weight, b, targets


def _both(hidden, weight, bias, targets, reduction="sum", **kw):
    """(loss, grads) of linear_cross_entropy and of F.cross_entropy on the full logits."""
    wrt = [x for x in (hidden, weight, bias) if x is not None and x.requires_grad]
    ours = linear_cross_entropy(hidden, weight, targets, bias=bias, reduction=reduction, **kw)
    ref = F.cross_entropy(F.linear(hidden, weight, bias).float() if hidden.dtype != torch.float64
                          else F.linear(hidden, weight, bias), targets, reduction=reduction)
    return (ours, torch.autograd.grad(ours, wrt)), (ref, torch.autograd.grad(ref, wrt))


@pytest.mark.parametrize("chunk", [1, 3, 5, 13, 64])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("bias, weight_grad", [(False, False), (True, False), (False, True), (True, True)])
def test_matches_full_logits_float64(chunk, reduction, bias, weight_grad):
    x = _inputs(13, 6, 11, bias=bias, weight_grad=weight_grad, ignore=(0, 4, 5))
    (loss, grads), (ref, ref_grads) = _both(*x, reduction=reduction, chunk_size=chunk)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert len(grads) == 1 + 2 * weight_grad if bias else 1 + weight_grad
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), h=st.integers(1, 8), v=st.integers(1, 30), chunk=st.integers(1, 50),
       ignored=st.sets(st.integers(0, 39)), reduction=st.sampled_from(["sum", "mean"]), bias=st.booleans(),
       weight_grad=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_property_matches_full_logits(n, h, v, chunk, ignored, reduction, bias, weight_grad, seed):
    ignore = [i for i in ignored if i < n]
    x = _inputs(n, h, v, bias=bias, weight_grad=weight_grad, ignore=ignore, seed=seed)
    (loss, grads), (ref, ref_grads) = _both(*x, reduction=reduction, chunk_size=chunk)
    if reduction == "mean" and len(ignore) == n:   # F.cross_entropy: 0/0 = NaN; ours: 0 with zero gradients
        assert loss.item() == 0.0 and all(not g.any() for g in grads)
        return
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradcheck():
    hidden, weight, bias, targets = _inputs(5, 3, 4, bias=True, weight_grad=True, ignore=(2,))
    for reduction in ("sum", "mean"):
        assert torch.autograd.gradcheck(
            lambda h, w, b: linear_cross_entropy(h, w, targets, bias=b, chunk_size=2, reduction=reduction),
            (hidden, weight, bias))


def test_float32_matches_at_realistic_vocabulary():
    x = _inputs(70, 32, 3000, dtype=torch.float32, bias=True, weight_grad=True, ignore=range(0, 70, 9))
    (loss, grads), (ref, ref_grads) = _both(*x, chunk_size=16)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_in_place_log_softmax_on_cpu_is_bit_equal():
    """_chunked writes the log-softmax over the logits in place on CPU: this torch must give the same bits."""
    z = torch.randn(37, 5003, generator=torch.Generator().manual_seed(0)) * 4
    ref = torch.log_softmax(z, dim=1)
    torch.log_softmax(z, dim=1, dtype=torch.float32, out=z)
    assert torch.equal(z, ref)


def test_backward_scales_by_the_incoming_gradient():
    hidden, weight, _, targets = _inputs(9, 4, 6, weight_grad=True)
    (2.5 * linear_cross_entropy(hidden, weight, targets, chunk_size=4)).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (2.5 * F.cross_entropy(hidden @ weight.T, targets, reduction="sum")).backward()
    torch.testing.assert_close(grads, (hidden.grad, weight.grad), rtol=1e-12, atol=1e-12)


def test_bf16_autocast_close_to_float32_and_equal_to_autocast_logits():
    hidden, weight, _, targets = _inputs(40, 16, 500, dtype=torch.float32, ignore=(1, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, weight, targets, chunk_size=7)
        logits = F.linear(hidden, weight)              # what lm_head(hidden) gives under the same autocast
    assert ours.dtype == torch.float32 and logits.dtype == torch.bfloat16
    ref = F.cross_entropy(logits.float(), targets, reduction="sum")
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    grad, = torch.autograd.grad(ours, hidden)
    ref_grad, = torch.autograd.grad(ref, hidden)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-6)
    exact = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    assert abs(ours.item() - exact.item()) < 1e-2 * exact.item()


def test_half_precision_inputs_give_half_gradients_and_a_float32_loss():
    hidden, weight, bias, targets = _inputs(20, 8, 50, dtype=torch.bfloat16, bias=True, weight_grad=True)
    loss = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=6)
    assert loss.dtype == torch.float32
    loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == bias.grad.dtype == torch.bfloat16
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (hidden, weight, bias))
    ref = F.cross_entropy(F.linear(h64, w64, b64), targets, reduction="sum")
    ref.backward()
    assert abs(loss.item() - ref.item()) < 2e-2 * ref.item()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=0, atol=2e-2)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=0, atol=5e-2)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_all_targets_ignored_gives_zero_loss_and_zero_gradients(reduction):
    hidden, weight, bias, targets = _inputs(5, 4, 6, bias=True, weight_grad=True, ignore=range(5))
    loss = linear_cross_entropy(hidden, weight, targets, bias=bias, reduction=reduction)
    loss.backward()
    assert loss.item() == 0.0
    assert not hidden.grad.any() and not weight.grad.any() and not bias.grad.any()


def test_without_autograd_only_the_value():
    hidden, weight, _, targets = _inputs(11, 4, 9, ignore=(3,))
    ref = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=0)


def test_default_chunk_targets_a_fixed_logit_budget():
    assert chunk_rows(32000) == 262 and chunk_rows(256000) == 64 and chunk_rows(10) > 100000


@pytest.mark.parametrize("call, error, fragment", [
    (lambda h, w, t: linear_cross_entropy(h, w.float(), t), TypeError, "share one floating dtype"),
    (lambda h, w, t: linear_cross_entropy(h[None], w, t), ValueError, "flatten"),
    (lambda h, w, t: linear_cross_entropy(h, w, t[:-1]), ValueError, "one per hidden row"),
    (lambda h, w, t: linear_cross_entropy(h, w, t.float()), ValueError, "integer class ids"),
    (lambda h, w, t: linear_cross_entropy(h, w, t + 6), ValueError, "class ids in [0, 6)"),
    (lambda h, w, t: linear_cross_entropy(h, w, t, bias=torch.zeros(5, dtype=h.dtype)), ValueError, "bias"),
    (lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=0), ValueError, "chunk_size"),
    (lambda h, w, t: linear_cross_entropy(h, w, t, reduction="none"), ValueError, "reduction"),
])
def test_errors_name_the_problem(call, error, fragment):
    hidden, weight, _, targets = _inputs(4, 3, 6)
    with pytest.raises(error, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        call(hidden, weight, targets)


# ---- causal language models --------------------------------------------------------------------------

def _batch(vocab=101, seed=1):
    """Two sequences: a 3-token prompt without loss on the first, right padding on the second."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 6:] = -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def _logits_path(model, inputs, labels):
    return logits_loss_sum(model(**inputs).logits, labels, "causal-lm"), int((labels[:, 1:] != -100).sum())


def _trainable_grads(model, loss):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return dict(zip([n for n, _ in named], torch.autograd.grad(loss, [p for _, p in named])))


@pytest.mark.parametrize("make, lora", [
    (tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")),
    (tiny_gpt2, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"])),
    (tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])),
])
def test_causal_lm_loss_equals_the_logits_path_with_lora_gradients(make, lora):
    model = add_lora(make(), lora).train()
    with torch.no_grad():  # B = 0 at init would make every A gradient zero
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.1)
    inputs, labels = _batch()
    torch.manual_seed(5)  # GPT-2 trains with dropout: both paths must draw the same masks
    found = causal_lm_loss_sum(model, inputs, labels)
    assert found is not None
    loss, count = found
    torch.manual_seed(5)
    ref, ref_count = _logits_path(model, inputs, labels)
    assert count == ref_count == 6 + 5
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    grads, ref_grads = _trainable_grads(model, loss), _trainable_grads(model, ref)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_causal_lm_loss_under_bf16_autocast_equals_the_autocast_logits_path():
    model = tiny_llama()
    inputs, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = causal_lm_loss_sum(model, inputs, labels)
        ref, _ = _logits_path(model, inputs, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=0)


def _tiny(cls_name):
    import transformers
    common = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, head_dim=8, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    special = {
        "GPT2LMHeadModel": ("gpt2", dict(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        "GPTBigCodeForCausalLM": ("gpt_bigcode", dict(vocab_size=101, n_embd=32, n_layer=2, n_head=4,
                                                      n_positions=64)),
        "GPTNeoXForCausalLM": ("gpt_neox", dict(vocab_size=101, hidden_size=32, intermediate_size=48,
                                                num_hidden_layers=2, num_attention_heads=4)),
        "OPTForCausalLM": ("opt", dict(vocab_size=101, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                       num_attention_heads=4, word_embed_proj_dim=16, max_position_embeddings=64)),
    }
    model_type, kwargs = special.get(cls_name, (None, common))
    cls = getattr(transformers, cls_name)
    config = transformers.AutoConfig.for_model(model_type or cls.config_class.model_type, **kwargs)
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.mark.parametrize("cls_name", sorted(PLAIN_HEAD_MODELS))
def test_every_listed_architecture_equals_its_logits_path(cls_name):
    model = _tiny(cls_name)
    inputs, labels = _batch()
    found = causal_lm_loss_sum(model, inputs, labels)
    assert found is not None, cls_name
    ref, count = _logits_path(model, inputs, labels)
    torch.testing.assert_close(found[0], ref, rtol=1e-5, atol=0)
    assert found[1] == count


def test_falls_back_when_the_logits_are_soft_capped():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           final_logit_softcapping=30.0))
    assert causal_lm_loss_sum(model, *_batch()) is None


def test_falls_back_for_a_capped_config_on_a_listed_class():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    assert causal_lm_loss_sum(model, *_batch()) is None


def test_falls_back_for_a_lora_wrapped_head():
    model = add_lora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    assert causal_lm_loss_sum(model, *_batch()) is None


def test_falls_back_for_subclasses_hooks_other_modules_and_head_level_inputs():
    from transformers import LlamaForCausalLM

    class Custom(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    inputs, labels = _batch()
    custom = Custom(tiny_llama().config)
    assert causal_lm_loss_sum(custom, inputs, labels) is None
    hooked = tiny_llama()
    hooked.lm_head.register_forward_hook(lambda module, args, out: out * 2)
    assert causal_lm_loss_sum(hooked, inputs, labels) is None
    assert causal_lm_loss_sum(nn.Linear(4, 4), inputs, labels) is None
    assert causal_lm_loss_sum(tiny_llama(), {**inputs, "labels": labels}, labels) is None
    assert causal_lm_loss_sum(tiny_llama(), {**inputs, "logits_to_keep": 1}, labels) is None


def test_labels_of_the_wrong_shape_are_refused():
    inputs, labels = _batch()
    with pytest.raises(ValueError, match="labels"):
        causal_lm_loss_sum(tiny_llama(), inputs, labels[:, :-1])


def test_an_adapted_model_takes_the_chunked_path_and_adapter_names_fall_back():
    """add_lora installs the adapter_names hooks on every model; they must not switch the chunked loss off
    (train() would silently compute the full logits), and a call that names adapters per row goes through
    the model's own forward."""
    from loralab.routing import ROW_HOOKS
    model = add_lora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert set(model._forward_pre_hooks.values()) & set(ROW_HOOKS)          # the hooks are there
    inputs, labels = _batch()
    assert causal_lm_loss_sum(model, inputs, labels) is not None
    names = ["default"] * labels.shape[0]
    assert causal_lm_loss_sum(model, {**inputs, "adapter_names": names}, labels) is None
    model.register_forward_pre_hook(lambda module, args: None)                # any other hook: fall back
    assert causal_lm_loss_sum(model, inputs, labels) is None
