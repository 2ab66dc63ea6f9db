"""Tiny served models for the serve tests: a random-weight Llama saved with save_pretrained, N adapters saved
to directories, and the reference answer of one request (set_adapter alone, transformers' own generate)."""

import contextlib

import torch

from loralab import LoraConfig, add_lora, delete_adapter, load_adapter, save_adapter, set_adapter
from loralab.hf import load_local_model

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
VOCAB = 101


def tiny_llama_dir(path, classify: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, eos_token_id=None,
                         pad_token_id=0, num_labels=3)
    cls = LlamaForSequenceClassification if classify else LlamaForCausalLM
    cls(config).eval().save_pretrained(path)
    return path


def save_adapters(model_dir, root, names, classify: bool = False):
    """Adapters of ranks 1-4 with random non-zero factors, saved under root/<name>; {name: directory}."""
    model = load_local_model(model_dir)
    out = {}
    for i, name in enumerate(names):
        extra = dict(modules_to_save=["score"]) if classify and i % 2 else {}
        add_lora(model, LoraConfig(r=1 + i % 4, lora_alpha=2 + i % 3, target_modules=TARGETS,
                                   init_lora_weights=False, **extra), name)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f".{name}." in n:
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)
        out[name] = str(save_adapter(model, root / name, name))
        delete_adapter(model, name)
    return out


def reference_model(model_dir, adapters: dict):
    """A separate model holding every adapter, for answers computed one request at a time."""
    model = load_local_model(model_dir)
    for name, path in adapters.items():
        load_adapter(model, path, name, activate=False)
    return model


def reference_completion(model, name, prompt, max_tokens):
    """Greedy tokens of `prompt` alone through adapter `name` (None: the base): set_adapter, then the whole
    sequence again at every step (no padding, no cache, no routing: nothing the server's batching uses)."""
    from loralab import disable_lora
    ids = list(prompt)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if name is None:
            stack.enter_context(disable_lora(model))
        else:
            set_adapter(model, name)
        for _ in range(max_tokens):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]
