"""A one-minute tour of the core: attach, count, train, merge, verify.

A small MLP is pretrained on a regression task y = f(x); the task then shifts by a low-rank change of the
hidden layer (what LoRA is built for).  With the base frozen, a rank-4 adapter learns the shift; merging
it into the weights gives the same outputs as the unmerged model, and merge_and_unload leaves a plain MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import LoraConfig
from .inject import add_lora, trainable_report
from .layer import LoRALinear
from .merging import merge, merge_and_unload, unmerge

__all__ = ["run_demo"]


def _mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))


def _fit(model: nn.Module, x, y, steps: int, lr: float) -> float:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _mse(model, x, y)


@torch.no_grad()
def _mse(model, x, y) -> float:
    return nn.functional.mse_loss(model(x), y).item()


def run_demo(seed: int = 0, width: int = 128, steps: int = 300, r: int = 4, say=print) -> dict:
    """Run the tour; returns its figures (losses, parameter counts, merge error)."""
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0", "2"])  # checked before any work is done
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(2048, 16, generator=g)
    teacher = _mlp(width)
    y_old = teacher(x).detach()
    with torch.no_grad():  # the new task: the teacher's hidden layer moves by a rank-2 update
        u, v = torch.randn(width, 2, generator=g), torch.randn(2, width, generator=g)
        teacher[2].weight += 0.5 * (u @ v) / width ** 0.5
    y_new = teacher(x).detach()

    model = _mlp(width)
    base_loss = _fit(model, x, y_old, steps, 3e-3)
    say(f"pretrained base: mse on the original task {base_loss:.4f}")
    before = _mse(model, x, y_new)
    say(f"base on the shifted task: mse {before:.4f}")

    add_lora(model, config)
    report = trainable_report(model)
    say(str(report))
    after = _fit(model, x, y_new, steps, 1e-2)
    say(f"after LoRA (r={r}, base frozen): mse {after:.4f}")

    with torch.no_grad():
        unmerged_out = model(x)
        merge(model)
        merged_out = model(x)
        merge_error = (merged_out - unmerged_out).abs().max().item()
        unmerge(model)
        merge_and_unload(model)
    leftover = sum(isinstance(m, LoRALinear) for m in model.modules())
    say(f"merged vs unmerged max |diff|: {merge_error:.2e}; LoRA modules left after merge_and_unload: {leftover}")
    return {"base_mse_original": base_loss, "base_mse_shifted": before, "lora_mse_shifted": after,
            "trainable_params": report.trainable, "total_params": report.total,
            "trainable_percent": report.percent, "merge_max_abs_diff": merge_error,
            "lora_modules_after_unload": leftover}
