"""fused_swiglu: the listed SwiGLU MLPs keep g and u only, and training gives the same bits as without it."""

import importlib

import pytest
import torch

from loralab import LoraConfig, add_lora
from loralab.fused import SWIGLU_MLPS, fused_swiglu, swiglu_mlps
from loralab.batch_loss import causal_lm_step_loss
from loralab.trainer import TrainConfig, train

CLASSES = {"LlamaMLP": ("llama", "LlamaConfig", "LlamaForCausalLM"),
           "MistralMLP": ("mistral", "MistralConfig", "MistralForCausalLM"),
           "Qwen2MLP": ("qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
           "Qwen3MLP": ("qwen3", "Qwen3Config", "Qwen3ForCausalLM")}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INTERMEDIATE = 48


def _model(mlp: str, dropout: float):
    module, config_cls, model_cls = CLASSES[mlp]
    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    cfg = getattr(importlib.import_module("transformers"), config_cls)(
        hidden_size=32, intermediate_size=INTERMEDIATE, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, head_dim=8)
    torch.manual_seed(0)
    model = getattr(mod, model_cls)(cfg)
    add_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS,
                               init_lora_weights=False))
    return model.train()


def _loss_and_grads(model, ids, fused: bool):
    torch.manual_seed(7)
    big = []

    def pack(t):
        if t.shape[-1:] == (INTERMEDIATE,) and t.numel() == ids.numel() * INTERMEDIATE:   # (..., I) activations
            big.append(t.shape)
        return t

    with fused_swiglu(model, enabled=fused):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = causal_lm_step_loss(model, ids)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, len(big)


def test_the_list_is_the_tested_classes():
    assert set(SWIGLU_MLPS) == set(CLASSES)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("mlp", list(CLASSES))
def test_same_loss_and_gradients_with_less_kept(mlp, dropout):
    model = _model(mlp, dropout)
    assert len(swiglu_mlps(model)) == 2
    ids = torch.randint(0, 101, (3, 10), generator=torch.Generator().manual_seed(1))
    loss, grads, kept = _loss_and_grads(model, ids, fused=False)
    loss_f, grads_f, kept_f = _loss_and_grads(model, ids, fused=True)
    assert torch.equal(loss, loss_f) and grads.keys() == grads_f.keys() and len(grads) == 2 * 7 * 2
    for name in grads:
        assert torch.equal(grads[name], grads_f[name]), name
    # outside the MLP's own hooks the (..., I) tensors kept are g and u alone: 2 per layer, not 4
    # (p, seen by down's adapter, is inside them and never reaches an outer hook)
    assert kept_f == 2 * 2 and kept >= 4 * 2
    assert all("forward" not in m.__dict__ for m in swiglu_mlps(model))   # restored


def test_not_under_gradient_checkpointing_and_not_on_hooked_modules():
    model = _model("LlamaMLP", 0.0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with fused_swiglu(model) as patched:
        assert patched == []
    model = _model("LlamaMLP", 0.0)
    model.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert len(swiglu_mlps(model)) == 1


def test_train_switches_it_on_and_restores_the_modules(monkeypatch):
    from loralab import fused
    seen = []
    original = fused._forward
    monkeypatch.setattr(fused, "_forward", lambda self, x: seen.append(type(self).__name__) or original(self, x))
    model = _model("LlamaMLP", 0.0)
    ids = torch.randint(0, 101, (4, 10), generator=torch.Generator().manual_seed(2))
    train(model, [{"input_ids": r, "labels": r} for r in ids],
          config=TrainConfig(task="causal-lm", batch_size=4, max_steps=1, progress=False))
    assert seen == ["LlamaMLP", "LlamaMLP"]
    assert all("forward" not in m.__dict__ for m in swiglu_mlps(model))
