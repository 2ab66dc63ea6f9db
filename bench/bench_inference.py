"""Inference overhead of an adapter over the plain base model, loralab vs PEFT in the same run.

Reference model: LlamaForCausalLM from a config (hidden 512, intermediate 1408, 8 layers, 8 heads,
vocab 32000, random init); LoRA r=16, alpha=32 on all 7 projections; batch 8 x 128; fp32; 2 threads.
Variants are timed round-robin (one forward each per round) so drift on the machine hits all alike; each
variant's ratio to the base is taken within a round, and the figure is the median of those ratios.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def reference_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def _nonzero_b(model, names=("lora_B",)):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in names):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def build_variants():
    import peft
    from loralab import LoraConfig, add_lora, merge
    base = reference_model()
    ours = add_lora(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)).eval()
    _nonzero_b(ours)
    ours_merged = merge(copy.deepcopy(ours))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32,
                                                                      target_modules=TARGETS)).eval()
    _nonzero_b(theirs)
    theirs_merged = copy.deepcopy(theirs)
    theirs_merged.merge_adapter()
    return {"base": base, "loralab unmerged": ours, "loralab merged": ours_merged,
            "PEFT unmerged": theirs, "PEFT merged": theirs_merged}


def time_forwards(models: dict, ids: torch.Tensor, rounds: int = 25, warmup: int = 2) -> dict[str, list[float]]:
    """{variant: [seconds per round]}; the first model is the reference the others are divided by."""
    times = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(warmup + rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(input_ids=ids)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


def median_ratio(times: list[float], reference: list[float]) -> float:
    return statistics.median(t / r for t, r in zip(times, reference))


def main() -> str:
    torch.set_num_threads(2)
    models = build_variants()
    ids = torch.randint(0, 32000, (8, 128), generator=torch.Generator().manual_seed(0))
    times = time_forwards(models, ids)
    ratio = {name: median_ratio(t, times["base"]) for name, t in times.items()}
    base_ms = statistics.median(times["base"])
    rows = "\n".join(f"| {name} | {statistics.median(t) * 1000:.0f} | {statistics.median(t) / base_ms:.3f}x | "
                     f"{ratio[name]:.3f}x |" for name, t in times.items())
    ours_vs_peft = median_ratio(times["loralab unmerged"], times["PEFT unmerged"])
    return ("## Inference overhead (forward pass, reference Llama, batch 8x128, fp32)\n\n"
            f"{len(times['base'])} rounds. Two views of the same runs: the ratio of median times, and the median "
            "over rounds of (variant / base in the same round).\n\n"
            "| variant | median ms | median / base median | median per-round ratio |\n| --- | ---: | ---: | ---: |\n"
            + rows +
            f"\n\nUnmerged adapter overhead (per-round ratio): loralab {100 * (ratio['loralab unmerged'] - 1):+.1f}% vs PEFT "
            f"{100 * (ratio['PEFT unmerged'] - 1):+.1f}% (loralab / PEFT forward time {ours_vs_peft:.3f}x). "
            "Target: unmerged <= 1.04x base, merged = base.\n\n"
            "Run-to-run spread of these ratios on a 2-core machine is about ±5%, so differences smaller than "
            "that are not resolved by one run.\n")


if __name__ == "__main__":
    print(main())
