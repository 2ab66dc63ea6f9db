"""Shared fixtures: tiny transformers models built from configs (random weights, no downloads)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from hypothesis import settings

torch.set_num_threads(min(2, torch.get_num_threads()))
# no per-example time limit: a busy or slower machine must not turn a correct property into a failure
settings.register_profile("loralab", deadline=None)
settings.load_profile("loralab")


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    return BertModel(BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                vocab_size=101, max_position_embeddings=64)).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64)).eval()


@pytest.fixture
def ids():
    return torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(1))
