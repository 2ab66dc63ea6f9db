"""The activation model against the bytes autograd really keeps for backward (saved-tensor hooks)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loralab import LoraConfig, add_lora
from loralab.activations import activation_memory, block_bytes_per_token
from loralab.targets import llama_like_shape, select, shape_of

_LAYOUT = llama_like_shape(1e9)


def storage_recorder(model):
    """(record(t), seen {storage pointer: bytes}): every distinct storage recorded once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def record(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t
    return record, seen


def saved_bytes(model, ids, labels=True) -> int:
    """Bytes of every distinct storage autograd saves during one forward pass (parameters excluded)."""
    record, seen = storage_recorder(model)
    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        model(input_ids=ids, labels=ids) if labels else model(input_ids=ids)
    return sum(seen.values())


def _llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000)                      # grouped-query attention
    model = LlamaForCausalLM(config).to(dtype)
    return model, shape_of(model, source="t", hidden=64, heads=4, kv_hidden=32, layers=2, vocab=1000)


CASES = [  # (dtype, autocast, target_modules or None = full fine-tuning, lora_dropout, checkpointing)
    (torch.float32, False, None, 0.0, False), (torch.float32, False, None, 0.0, True),
    (torch.float32, False, "all-linear", 0.0, False), (torch.float32, False, ["q_proj", "v_proj"], 0.1, False),
    (torch.float32, False, ["down_proj", "o_proj"], 0.0, False), (torch.float32, False, "all-linear", 0.0, True),
    (torch.bfloat16, False, None, 0.0, False), (torch.bfloat16, False, "all-linear", 0.0, False),
    (torch.bfloat16, False, "all-linear", 0.1, False), (torch.bfloat16, False, ["down_proj", "o_proj"], 0.1, False),
    (torch.bfloat16, False, r".*\.1\.self_attn\.v_proj", 0.0, False), (torch.bfloat16, False, "all-linear", 0.0, True),
    (torch.bfloat16, True, "all-linear", 0.0, False), (torch.bfloat16, True, ["q_proj", "v_proj"], 0.1, False),
    (torch.bfloat16, True, ["down_proj", "o_proj"], 0.0, False),
]


@pytest.mark.parametrize("dtype, autocast, targets, dropout, checkpointing", CASES)
def test_saved_bytes_are_exact_for_a_llama(dtype, autocast, targets, dropout, checkpointing):
    model, shape = _llama(dtype)
    adapted = select(model, shape, targets) if targets else ()
    if targets:
        add_lora(model, LoraConfig(r=8, target_modules=targets, lora_dropout=dropout))
    else:
        model.requires_grad_(True)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 1000, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        measured = saved_bytes(model, ids)
    est = activation_memory(shape, batch=3, seq=32, act_bytes=2 if dtype == torch.bfloat16 else 4,
                            full=targets is None, adapted=adapted, r=8, lora_dropout=dropout,
                            gradient_checkpointing=checkpointing, autocast=autocast)
    assert est.saved == measured
    assert est.total == est.saved + est.at_backward + est.recompute
    assert (est.recompute > 0) == checkpointing


def loralab_step_saved_bytes(model, ids, monkeypatch) -> tuple[int, bool]:
    """saved_bytes of `loralab train`'s causal-LM step: the chunked loss, SwiGLU MLPs fused.  fused.py
    installs its own saved-tensor hooks inside down_proj, and only the innermost hooks see a tensor, so its
    hooks are composed with the recorder here: what its pack keeps (a tensor, or g and u) is recorded too.
    Returns (bytes, whether fused.py switched any MLP)."""
    from loralab.batch_loss import batch_loss_sum
    from loralab.fused import fused_swiglu
    record, seen = storage_recorder(model)
    outer = torch.autograd.graph.saved_tensors_hooks

    class Recorded(outer):
        def __init__(self, pack, unpack):
            def recorded_pack(t):
                kept = pack(t)
                for x in (kept[:2] if isinstance(kept, tuple) else (kept,)):
                    record(x)
                return kept
            super().__init__(recorded_pack, unpack)

    with outer(record, lambda t: t), fused_swiglu(model) as fused:
        monkeypatch.setattr(torch.autograd.graph, "saved_tensors_hooks", Recorded)
        batch_loss_sum(model, {"input_ids": ids}, ids, "causal-lm")
    return sum(seen.values()), bool(fused)


LORA_CASES = [c for c in CASES if c[2] is not None] + [(torch.float32, False, ["down_proj"], 0.0, False),
                                                      (torch.bfloat16, True, ["down_proj"], 0.1, False)]


@pytest.mark.parametrize("dtype, autocast, targets, dropout, checkpointing", LORA_CASES)
def test_saved_bytes_are_exact_for_loralab_trains_step(dtype, autocast, targets, dropout, checkpointing,
                                                       monkeypatch):
    from loralab.loss import chunk_rows
    model, shape = _llama(dtype)
    adapted = select(model, shape, targets)
    add_lora(model, LoraConfig(r=8, target_modules=targets, lora_dropout=dropout))
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 1000, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        measured, fused = loralab_step_saved_bytes(model, ids, monkeypatch)
    kw = dict(batch=3, seq=32, act_bytes=2 if dtype == torch.bfloat16 else 4, adapted=adapted, r=8,
              lora_dropout=dropout, gradient_checkpointing=checkpointing, autocast=autocast)
    est = activation_memory(shape, loss="chunked", loss_chunk_rows=chunk_rows(1000), fused_mlp=True, **kw)
    assert fused != checkpointing
    assert est.saved == measured
    standard = activation_memory(shape, **kw)
    assert est.saved < standard.saved
    assert est.at_backward == 3 * 31 * 1000 * (kw["act_bytes"] + 4 + (2 if dtype == torch.bfloat16 else 0))


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_other_architectures_are_a_close_lower_bound(arch):
    """LayerNorm + GELU models (dropout off, exact GELU): the same terms land within 10% below."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=64,
                                           resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, activation_function="gelu"))
    else:
        model = BertModel(BertConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=1000, max_position_embeddings=64,
                                     hidden_dropout_prob=0, attention_probs_dropout_prob=0))
    vocab = 1000 if arch == "gpt2" else 0
    shape = shape_of(model, source="t", hidden=64, heads=4, kv_hidden=64, layers=2, vocab=vocab)
    adapted = select(model, shape, "all-linear")
    add_lora(model, LoraConfig(r=8, target_modules="all-linear"))
    model.train()
    measured = saved_bytes(model, torch.randint(0, 1000, (2, 32)), labels=bool(vocab))
    est = activation_memory(shape, batch=2, seq=32, act_bytes=4, adapted=adapted, r=8).saved
    assert 0.9 * measured <= est <= measured


def test_llama_7b_block_terms_by_hand():
    """Per token per block, bf16, all seven projections at r=16 on loralab's fp32 adapter path."""
    shape, model = llama_like_shape(7e9)
    block0 = [c for c in select(model, shape, "all-linear") if c.layer == 0]
    h, f = 4096, 11008
    terms = block_bytes_per_token(shape, 2, full=False, adapted=block0, r=16)
    assert terms == {"norms": 2 * (4 * h + 4), "attention": 2 * 4 * h + 4 * 32, "mlp": 2 * 3 * f,
                     "linear_inputs": 0, "adapters": 7 * 4 * 16 + 4 * (6 * h + f)}
    full = block_bytes_per_token(shape, 2, full=True)
    assert full["linear_inputs"] == 2 * (2 * h + f) and full["norms"] == 2 * (4 * h + 4) + 2 * 2 * h


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 4096), st.sampled_from([1, 8, 64]), st.booleans(), st.booleans(),
       st.sampled_from(["all-linear", ["q_proj", "v_proj"], ["down_proj"]]))
def test_activation_properties(batch, seq, r, autocast, dropout, targets):
    """Kept bytes grow linearly with the batch; checkpointing never costs more; a block keeps more for full
    fine-tuning than for LoRA on a 16-bit autocast path."""
    shape, model = _LAYOUT
    chosen = select(model, shape, targets)
    kw = dict(seq=seq, act_bytes=2, adapted=chosen, r=r, lora_dropout=0.05 if dropout else 0.0, autocast=autocast)
    one, two = activation_memory(shape, batch=1, **kw), activation_memory(shape, batch=2, **kw)
    more = activation_memory(shape, batch=batch, **kw)
    per_sequence, fixed = two.saved - one.saved, 2 * one.saved - two.saved   # rope tables, copies of A and B
    assert more.saved == fixed + batch * per_sequence and fixed >= 0
    assert activation_memory(shape, batch=batch, gradient_checkpointing=True, **kw).total <= more.total
    full = activation_memory(shape, batch=batch, seq=seq, act_bytes=2, full=True)
    if autocast and not dropout:
        assert full.per_token_per_block > more.per_token_per_block
