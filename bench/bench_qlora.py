"""QLoRA training step: loralab's NF4 base + adapters vs PEFT on bitsandbytes' Linear4bit, in the same run.

Reference model: LlamaForCausalLM from a config (hidden 512, intermediate 1408, 8 layers, 8 heads, vocab 32000,
random init); every nn.Linear but lm_head in NF4 (blocks of 64, double quantization, fp32 compute); LoRA r=16,
alpha=32, dropout 0.05 on all 7 projections; batch 8 x 128; 2 threads; AdamW.
  loralab   add_lora(model, config, quantize="nf4"), one optimizer step of loralab's own train() (the loss from the last
            hidden state in chunks, never the full logits)
  PEFT      bitsandbytes.nn.Linear4bit layers (quant_type nf4, compress_statistics) under peft.get_peft_model,
            the standard `model(input_ids, labels=...).loss` step
Each variant timed in fresh processes of its own (two each, alternating; medians of the timed steps), as a user
runs it; peak resident memory of each in a fresh process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import TARGETS, reference_model  # noqa: E402
from bench_train import (BATCH, SEQ, _peak_rss_mb, batch, child_json, optimizer, peft_step,  # noqa: E402
                         time_in_processes, train_step)

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS)


def build(kind: str):
    model = reference_model()
    if kind == "loralab":
        from loralab import LoraConfig, add_lora
        return add_lora(model, LoraConfig(**LORA), quantize="nf4").train()
    import bitsandbytes as bnb
    import peft
    for path, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and path != "lm_head":
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=torch.float32,
                                  quant_type="nf4", compress_statistics=True)
            q.load_state_dict(m.state_dict())
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to("cpu"))
    return peft.get_peft_model(model, peft.LoraConfig(**LORA)).train()


def timed_step(kind: str, model, opt, ids: torch.Tensor) -> float:
    """Seconds of one step: loralab's own train() (one optimizer step), PEFT's standard loop."""
    return train_step(model, ids) if kind == "loralab" else peft_step(model, opt, ids)


def _step_times_child(kind: str, steps: int, warmup: int) -> list[float]:
    """In a fresh process: seconds of each of `steps` steps of one variant, after `warmup` steps."""
    torch.set_num_threads(2)
    model = build(kind)
    opt = optimizer(model)
    times = [timed_step(kind, model, opt, batch(i)) for i in range(warmup + steps)]
    return times[warmup:]


def time_steps(steps: int = 8, warmup: int = 3, repeats: int = 2) -> dict[str, float]:
    """Median seconds per step, each variant in fresh processes of its own (bench_train.time_in_processes; one
    shared process would make PEFT's step pay for the other's heap)."""
    return time_in_processes(__file__, ["loralab", "PEFT"], steps, warmup, repeats)


def _child(kind: str) -> dict:
    torch.set_num_threads(2)
    model = build(kind)
    built = _peak_rss_mb()
    opt = optimizer(model)
    for s in range(2):
        timed_step(kind, model, opt, batch(s))
    return {"built_mb": built, "peak_mb": _peak_rss_mb()}


def peak_memory() -> dict[str, dict]:
    out = {}
    for kind in ("loralab", "PEFT"):
        out[kind] = child_json(__file__, "--memory", kind)
    return out


def main() -> str:
    torch.set_num_threads(2)
    med = time_steps()
    mem = peak_memory()
    ratio = med["loralab"] / med["PEFT"]
    mem_ratio = mem["loralab"]["peak_mb"] / mem["PEFT"]["peak_mb"]
    rows = "\n".join(f"| {k} | {t:.3f} | {t / med['PEFT']:.2f}x | {mem[k]['built_mb']:,.0f} | {mem[k]['peak_mb']:,.0f} |"
                     for k, t in med.items())
    return ("## QLoRA training step (reference Llama, NF4 base, LoRA r=16 on all 7 projections, batch "
            f"{BATCH}x{SEQ}, fp32 compute)\n\n"
            "loralab: `add_lora(..., quantize=\"nf4\")` and one optimizer step of its own `train()` (the loss from "
            "the hidden states in chunks); "
            "PEFT: bitsandbytes `Linear4bit` (nf4, double quantization) under `get_peft_model`, "
            "`model(input_ids, labels=...).loss`. Each variant timed in fresh processes of its own (two each, "
            "alternating order; 3 warm-up steps, then 8 timed; the median over all 16); peak RSS (VmHWM) in a "
            "fresh process "
            "after building and after 2 steps.\n\n"
            "| variant | s/step | vs PEFT | built MB | peak MB |\n| --- | ---: | ---: | ---: | ---: |\n" + rows +
            f"\n\nloralab / PEFT + bitsandbytes step time: **{ratio:.2f}x** (target <= 0.80x); peak memory "
            f"**{mem_ratio:.2f}x** (target < 1).\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory":
        print(json.dumps(_child(sys.argv[2])))
    elif len(sys.argv) == 5 and sys.argv[1] == "--time":
        print(json.dumps(_step_times_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    else:
        print(main())
