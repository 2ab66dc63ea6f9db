"""PEFT's exact outputs, or a refusal by name, on many architectures and configs.

Tiny random-weight builds of real transformers architectures (encoder-only, decoder-only with tied and untied
heads, fused qkv layers, scaled embeddings, encoder-decoder, vision) and the custom models of PEFT's own
tests/test_custom_models.py LoRA cases.  For each (architecture, config):

  * the same modules get an adapter, the same modules are trained in full, the same parameter count trains;
  * PEFT -> loralab: a "trained" PEFT adapter, saved by PEFT, loads into loralab with PEFT's outputs, unmerged
    and merged (fp32, <= 1e-5);
  * loralab -> PEFT: a "trained" loralab adapter saved with plain save_adapter(model, dir) loads into PEFT with
    loralab's outputs, and into loralab again with the same outputs; merged == unmerged.

"Trained" = every parameter that requires grad moved by noise, which is what training changes.
"""

import copy
import warnings

import peft
import pytest
import torch
import transformers as T
from torch import nn
from transformers.pytorch_utils import Conv1D

from loralab import LoraConfig, add_lora, load_adapter, merge, save_adapter, trainable_report
from loralab.inject import lora_layers
from loralab.saved import saved_modules

ATOL = 1e-5


# ---- architectures ----------------------------------------------------------------------------------------
def _hf(cls, config_cls, **kw):
    def build():
        torch.manual_seed(0)
        return cls(config_cls(**kw)).eval()
    return build


class MLP(nn.Module):
    """PEFT's custom-model MLP: lin0 (10 -> 20), relu, dropout, lin1 (20 -> 2), log-softmax."""

    def __init__(self):
        super().__init__()
        self.lin0, self.drop, self.lin1 = nn.Linear(10, 20), nn.Dropout(0.5), nn.Linear(20, 2)

    def forward(self, X):
        return torch.log_softmax(self.lin1(self.drop(torch.relu(self.lin0(X.float())))), -1)


class EmbConv1D(nn.Module):
    """PEFT's custom-model EmbConv1D: an embedding and a GPT-2 Conv1D."""

    def __init__(self):
        super().__init__()
        self.emb, self.conv1d, self.lin0 = nn.Embedding(100, 5), Conv1D(1, 5), nn.Linear(10, 2)

    def forward(self, X):
        return torch.log_softmax(self.lin0(torch.relu(self.conv1d(self.emb(X))).flatten(1)), -1)


class Conv2dModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d, self.lin0 = nn.Conv2d(5, 10, 3), nn.Linear(10, 2)

    def forward(self, X):
        return self.lin0(torch.relu(self.conv2d(X.float().reshape(-1, 5, 3, 3))).flatten(1))


def _custom(cls):
    def build():
        torch.manual_seed(0)
        return cls().eval()
    return build


_SMALL = dict(num_hidden_layers=2, num_attention_heads=2, vocab_size=61, max_position_embeddings=40)
ARCHS = {
    "llama": _hf(T.LlamaForCausalLM, T.LlamaConfig, hidden_size=16, intermediate_size=24, num_key_value_heads=1,
                 **_SMALL),
    "gpt2": _hf(T.GPT2LMHeadModel, T.GPT2Config, n_embd=16, n_layer=2, n_head=2, vocab_size=61, n_positions=40),
    "gemma": _hf(T.GemmaForCausalLM, T.GemmaConfig, hidden_size=16, intermediate_size=24, num_key_value_heads=1,
                 head_dim=8, **_SMALL),
    "phi3": _hf(T.Phi3ForCausalLM, T.Phi3Config, hidden_size=16, intermediate_size=24, num_key_value_heads=2,
                pad_token_id=0, **_SMALL),
    "bert": _hf(T.BertForSequenceClassification, T.BertConfig, hidden_size=16, intermediate_size=24, num_labels=3,
                initializer_range=0.2,
                **_SMALL),
    "roberta": _hf(T.RobertaForSequenceClassification, T.RobertaConfig, hidden_size=16, intermediate_size=24,
                   num_labels=3, initializer_range=0.2, **_SMALL),
    "t5": _hf(T.T5ForConditionalGeneration, T.T5Config, d_model=16, d_ff=24, d_kv=8, num_layers=2, num_heads=2,
              vocab_size=61, decoder_start_token_id=0),
    "bart": _hf(T.BartForConditionalGeneration, T.BartConfig, d_model=16, encoder_ffn_dim=24, decoder_ffn_dim=24,
                encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                vocab_size=61, max_position_embeddings=40, scale_embedding=True),
    "vit": _hf(T.ViTForImageClassification, T.ViTConfig, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
               num_attention_heads=2, image_size=8, patch_size=4, num_labels=3),
    "mlp": _custom(MLP),
    "embconv1d": _custom(EmbConv1D),
}


def _inputs(arch: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if arch == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g)}
    if arch == "mlp":
        return {"X": torch.randn(3, 10, generator=g)}
    if arch == "embconv1d":
        return {"X": torch.randint(0, 100, (3, 10), generator=g)}
    ids = {"input_ids": torch.randint(1, 61, (2, 7), generator=g)}
    if arch in ("t5", "bart"):
        ids["decoder_input_ids"] = torch.randint(1, 61, (2, 5), generator=g)
    return ids


def _out(model, arch):
    with torch.no_grad():
        out = model(**_inputs(arch))
    return out if isinstance(out, torch.Tensor) else out.logits


# ---- the grid ---------------------------------------------------------------------------------------------
# (id, arch, LoraConfig kwargs, merged_like_peft).  merged_like_peft=False: PEFT merges an embedding adapter
# into a tensor the output head shares, so PEFT's merged model differs from its unmerged one; loralab unties first.
CASES = [
    ("llama-qv", "llama", dict(target_modules=["q_proj", "v_proj"]), True),
    ("llama-regex", "llama", dict(target_modules=r".*\.(q|v)_proj"), True),
    ("llama-all-linear-patterns-rslora", "llama", dict(target_modules="all-linear", use_rslora=True,
                                                       rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3}), True),
    ("llama-layers-pattern", "llama", dict(target_modules=["q_proj", "k_proj"], layers_to_transform=[1],
                                           layers_pattern="layers"), True),
    ("llama-exact-path-ignores-layers", "llama", dict(target_modules=["q_proj", "model.layers.0.mlp.up_proj"],
                                                      layers_to_transform=[1]), True),
    ("llama-exclude", "llama", dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]), True),
    ("llama-embedding-and-lm-head", "llama", dict(target_modules=["embed_tokens", "lm_head", "q_proj"]), True),
    ("llama-head-to-save", "llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), True),
    ("gpt2-conv1d", "gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True), True),
    ("gpt2-all-linear", "gpt2", dict(target_modules="all-linear"), True),
    ("gpt2-tied-embedding", "gpt2", dict(target_modules=["c_attn", "wte"], fan_in_fan_out=True), False),
    ("gpt2-tied-head-to-save", "gpt2", dict(target_modules=["c_attn"], modules_to_save=["lm_head"]), True),
    ("gpt2-bias-all", "gpt2", dict(target_modules=["c_fc"], bias="all"), True),
    ("gpt2-bias-lora-only-dropout", "gpt2", dict(target_modules=["c_attn"], bias="lora_only", lora_dropout=0.1), True),
    ("gemma-scaled-embedding", "gemma", dict(target_modules=["embed_tokens", "q_proj"]), False),
    ("gemma-tied-head-to-save", "gemma", dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), True),
    ("gemma-embedding-to-save", "gemma", dict(target_modules=["v_proj"], modules_to_save=["embed_tokens"]), True),
    ("phi3-fused", "phi3", dict(target_modules=["qkv_proj", "gate_up_proj"], rank_pattern={"gate_up_proj": 2}), True),
    ("phi3-all-linear", "phi3", dict(target_modules="all-linear", lora_alpha=16), True),
    ("bert-head-bias-all", "bert", dict(target_modules=["query", "value"], modules_to_save=["classifier"],
                                        bias="all"), True),
    ("bert-all-linear-lora-only", "bert", dict(target_modules="all-linear", bias="lora_only"), True),
    ("bert-one-layer", "bert", dict(target_modules=["query", "key"], layers_to_transform=[0]), True),
    ("bert-seq-cls-task", "bert", dict(target_modules=["query", "value"], task_type="SEQ_CLS"), True),
    ("roberta-head-contains-targets", "roberta", dict(target_modules=["query", "value", "dense"],
                                                      modules_to_save=["classifier"]), True),
    ("roberta-seq-cls-all-linear", "roberta", dict(target_modules="all-linear", task_type="SEQ_CLS"), True),
    ("t5-reads-wo-weight", "t5", dict(target_modules=["q", "v", "wo"]), True),
    ("t5-two-numbered-segments", "t5", dict(target_modules=["q", "k", "wi"], layers_to_transform=[1],
                                            layers_pattern="block"), True),
    ("t5-default-layer-rule", "t5", dict(target_modules=["q", "k", "wi"], layers_to_transform=[0]), True),
    ("t5-all-linear", "t5", dict(target_modules="all-linear", r=2), True),
    ("bart-qv-head", "bart", dict(target_modules=["q_proj", "v_proj", "fc1"], modules_to_save=["lm_head"]), True),
    ("vit-qv-classifier", "vit", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]), True),
    ("vit-all-linear", "vit", dict(target_modules="all-linear", use_rslora=True), True),
    # PEFT's tests/test_custom_models.py LoRA cases (the Linear / Embedding / Conv1D ones)
    ("Vanilla MLP 1 LoRA", "mlp", dict(target_modules="lin0"), True),
    ("Vanilla MLP 2 LoRA", "mlp", dict(target_modules=["lin0"]), True),
    ("Vanilla MLP 3 LoRA", "mlp", dict(target_modules=["lin1"]), True),
    ("Vanilla MLP 4 LoRA", "mlp", dict(target_modules=["lin0", "lin1"]), True),
    ("Vanilla MLP 5 LoRA", "mlp", dict(target_modules=["lin0"], modules_to_save=["lin1"]), True),
    ("Vanilla MLP 6 LoRA", "mlp", dict(target_modules=["lin0"], lora_alpha=4, lora_dropout=0.1), True),
    ("Embedding + transformers Conv1D 1 LoRA", "embconv1d", dict(target_modules=["conv1d"]), True),
    ("Embedding + transformers Conv1D 2 LoRA", "embconv1d", dict(target_modules=["emb"]), True),
    ("Embedding + transformers Conv1D 3 LoRA", "embconv1d", dict(target_modules=["emb", "conv1d"]), True),
]
IDS = [c[0] for c in CASES]


def _cfg(kw):
    return dict(r=kw.get("r", 4), lora_alpha=kw.get("lora_alpha", 8), **{k: v for k, v in kw.items()
                                                                         if k not in ("r", "lora_alpha")})


def _perturb(model, seed: int) -> None:
    """Stand-in for training: move every parameter that trains."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _peft_model(arch, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(ARCHS[arch](), peft.LoraConfig(**_cfg(kw)))


def _peft_adapted(model) -> set[str]:
    prefix = "base_model.model."
    return {n.removeprefix(prefix) for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def _peft_saved(model) -> set[str]:
    prefix = "base_model.model."
    return {n.removeprefix(prefix) for n, m in model.named_modules()
            if isinstance(m, peft.utils.other.ModulesToSaveWrapper)}


def _peft_load(arch, directory):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(ARCHS[arch](), directory).eval()
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message)]
    assert not bad, bad
    return model


def _peft_trainable(model) -> int:
    # PEFT also marks the frozen original of a module to save as trainable under bias="all" (its bias gets no
    # gradient while the copy computes the output); loralab leaves the original frozen.
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "original_module" not in n)


@pytest.mark.parametrize("case, arch, kw, _", CASES, ids=IDS)
def test_same_modules_adapted_saved_and_trained(case, arch, kw, _):
    theirs = _peft_model(arch, kw)
    ours = add_lora(ARCHS[arch](), LoraConfig(**_cfg(kw)))
    assert set(lora_layers(ours)) == _peft_adapted(theirs)
    assert set(saved_modules(ours)) == _peft_saved(theirs)
    assert trainable_report(ours).trainable == _peft_trainable(theirs)


@pytest.mark.parametrize("case, arch, kw, merged_like_peft", CASES, ids=IDS)
def test_peft_file_loads_into_loralab_with_peft_outputs(case, arch, kw, merged_like_peft, tmp_path):
    theirs = _peft_model(arch, kw)
    _perturb(theirs, seed=1)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = ARCHS[arch]()
    base = _out(ours, arch)
    load_adapter(ours, tmp_path)
    expected = _out(theirs, arch)
    assert (expected - base).abs().max() > 1e-3  # the adapter matters
    got = _out(ours, arch)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(_out(ours, arch), got, atol=0, rtol=0)  # eval() stays eval: no dropout
    assert set(lora_layers(ours)) == _peft_adapted(theirs)
    merge(ours)
    torch.testing.assert_close(_out(ours, arch), expected, atol=ATOL, rtol=0)  # merged == unmerged
    if merged_like_peft:
        theirs.merge_adapter()
        torch.testing.assert_close(_out(ours, arch), _out(theirs, arch), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case, arch, kw, merged_like_peft", CASES, ids=IDS)
def test_loralab_file_loads_into_peft_and_loralab(case, arch, kw, merged_like_peft, tmp_path):
    ours = add_lora(ARCHS[arch](), LoraConfig(**_cfg(kw)))
    _perturb(ours, seed=2)
    ours.eval()
    save_adapter(ours, tmp_path)  # no repeat of modules_to_save / bias: the model remembers them
    expected = _out(ours, arch)
    assert (expected - _out(ARCHS[arch](), arch)).abs().max() > 1e-3
    theirs = _peft_load(arch, tmp_path)
    torch.testing.assert_close(_out(theirs, arch), expected, atol=ATOL, rtol=0)
    assert _peft_adapted(theirs) == set(lora_layers(ours))
    again = ARCHS[arch]()
    load_adapter(again, tmp_path)
    torch.testing.assert_close(_out(again, arch), expected, atol=ATOL, rtol=0)
    merge(ours)
    torch.testing.assert_close(_out(ours, arch), expected, atol=ATOL, rtol=0)


# ---- refusals by name ------------------------------------------------------------------------------------
REFUSED = [
    ("Vanilla MLP 7 LoRA with DoRA", "mlp", dict(target_modules=["lin0"], use_dora=True), "use_dora"),
    ("Vanilla MLP 1 LoRA with lora_b bias", "mlp", dict(target_modules=["lin0", "lin1"], lora_bias=True), "lora_bias"),
    ("MLP 1 using nn.Parameter LoRA", "mlp", dict(target_parameters=["lin0.weight"]), "target_parameters"),
    ("Conv2d 1 LoRA", "conv2d", dict(target_modules=["conv2d"]), "Conv2d"),
    ("Embedding + transformers Conv1D 1 LoRA trainable_tokens", "embconv1d",
     dict(target_modules=["conv1d"], trainable_token_indices={"emb": [0, 10]}), "trainable_token_indices"),
]
ARCHS["conv2d"] = _custom(Conv2dModel)


@pytest.mark.parametrize("case, arch, kw, name", REFUSED, ids=[c[0] for c in REFUSED])
def test_what_loralab_cannot_reproduce_is_refused_by_name_both_ways(case, arch, kw, name, tmp_path):
    theirs = _peft_model(arch, kw)
    theirs.save_pretrained(tmp_path)
    model = ARCHS[arch]()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises((ValueError, TypeError), match=name):
        load_adapter(model, tmp_path)
    assert not lora_layers(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises((ValueError, TypeError), match=name):
        add_lora(ARCHS[arch](), LoraConfig(**_cfg(kw)))
