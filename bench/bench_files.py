"""Adapter save / load time: loralab vs PEFT on the reference model, in one run.

Reference: LlamaForCausalLM from a config (hidden 512, intermediate 1408, 8 layers, 8 heads, vocab 32000,
random init), LoRA r=16, alpha=32 on all 7 projections: 56 layers, 112 tensors, ~5 MB of fp32 factors.
Save: save_adapter vs PeftModel.save_pretrained.  Load onto an in-memory base (a fresh copy each repeat,
made outside the timer): load_adapter vs PeftModel.from_pretrained.  Median of REPEATS runs.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

REPEATS = 9
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _base():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                        num_attention_heads=8, num_key_value_heads=8, vocab_size=32000,
                                        max_position_embeddings=256)).eval()


def _median_ms(fn, setup=lambda: None) -> float:
    times = []
    for i in range(REPEATS):
        arg = setup()
        start = time.perf_counter()
        fn(i, arg)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> str:
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    from loralab import LoraConfig, add_lora, load_adapter, save_adapter

    warnings.filterwarnings("ignore")
    base = _base()
    ours = add_lora(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                    init_lora_weights=False))
    theirs = get_peft_model(copy.deepcopy(base), PeftLoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                                init_lora_weights=False))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_ours = _median_ms(lambda i, _: save_adapter(ours, tmp / f"ours{i}"))
        save_peft = _median_ms(lambda i, _: theirs.save_pretrained(tmp / f"peft{i}"))
        fresh = lambda: copy.deepcopy(base)  # noqa: E731  (outside the timer)
        load_ours = _median_ms(lambda i, b: load_adapter(b, tmp / "ours0"), fresh)
        load_peft = _median_ms(lambda i, b: PeftModel.from_pretrained(b, tmp / "peft0"), fresh)
        cross = _max_cross_difference(base, tmp / "ours0", tmp / "peft0")
        size = (tmp / "ours0" / "adapter_model.safetensors").stat().st_size
        n_tensors = 2 * sum(1 for _ in ours.modules() if type(_).__name__ == "LoRALinear")
    return "\n".join([
        "## Adapter files: save / load vs PEFT",
        "",
        f"Reference Llama (hidden 512, 8 layers, vocab 32000), LoRA r=16 on all 7 projections: {n_tensors} "
        f"tensors, {size / 1e6:.1f} MB. Median of {REPEATS} runs; load is onto an in-memory base "
        f"(`load_adapter` vs `PeftModel.from_pretrained`), including loralab's strict checks and base "
        f"fingerprint.",
        "",
        "| operation | loralab | PEFT | loralab / PEFT |",
        "|---|---:|---:|---:|",
        f"| save | {save_ours:.1f} ms | {save_peft:.1f} ms | {save_ours / save_peft:.2f}x |",
        f"| load | {load_ours:.1f} ms | {load_peft:.1f} ms | {load_ours / load_peft:.2f}x |",
        "",
        f"Cross-check: each library loads the other's file; max |logit difference| against the original "
        f"adapter = {cross:.1e}.",
    ])


def _max_cross_difference(base, ours_dir: Path, peft_dir: Path) -> float:
    """Ours loaded by PEFT, PEFT's loaded by loralab, both against loralab loading its own file."""
    from peft import PeftModel

    from loralab import load_adapter
    ids = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = load_adapter_model(copy.deepcopy(base), ours_dir, load_adapter)(ids).logits
        a = PeftModel.from_pretrained(copy.deepcopy(base), ours_dir)(ids).logits
        peft_ref = PeftModel.from_pretrained(copy.deepcopy(base), peft_dir)(ids).logits
        b = load_adapter_model(copy.deepcopy(base), peft_dir, load_adapter)(ids).logits
    return max((a - reference).abs().max().item(), (b - peft_ref).abs().max().item())


def load_adapter_model(model, directory, load):
    load(model, directory)
    return model
