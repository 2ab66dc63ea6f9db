"""Hyperparameter guidance: the usual LoRA recipe, and warnings for settings far outside it.

The recipe most write-ups converge on (Hu et al. 2021; Dettmers et al. 2023, QLoRA; the PEFT and
Unsloth guides):
    r        start at 8–16; ΔW = (α/r)·B·A cannot have rank above min(in, out) of a layer
    α        r or 2r, so the scaling α/r is 1–2
    lr       2e-4 (1e-4 above ~33B parameters): 5–10x what full fine-tuning of the same model uses
    targets  all linear layers
    epochs   1–3
    warmup   5–10% of the steps
    dropout  0.05 (0.1 under ~1,000 examples)

`check_hyperparameters` flags only what is far outside (each rule below, at most one line per rule):
    lr >= 1e-2 (diverges) or lr <= 1e-6 (the adapter barely moves); α/r < 0.25 or > 8; r above a layer's
    min(in, out) (one line for all such layers); epochs > 10; warmup_ratio > 0.3; lora_dropout >= 0.3.
`compare_to_head_only` reads the result after training: an adapter that does worse than training the
head alone has not learned what it could, and the usual causes are too few steps or too low an lr.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Advice", "check_hyperparameters", "compare_to_head_only", "recommended_lr", "scaling_advice",
           "rank_advice", "SCALING_RANGE"]

LARGE_MODEL_PARAMS = 33e9
SCALING_RANGE = (0.25, 8.0)   # α/r (α/√r with rsLoRA) outside this is far from the usual 1–2


@dataclass(frozen=True)
class Advice:
    rule: str        # short identifier: "lr_high", "lr_low", "alpha_ratio", "rank_above_dims", ...
    message: str     # what is off, with the numbers
    fix: str         # what to change

    def __str__(self) -> str:
        return f"{self.message}; fix: {self.fix}"


def recommended_lr(model_params: float | None = None) -> float:
    """2e-4, or 1e-4 for models above ~33B parameters."""
    return 1e-4 if model_params is not None and model_params > LARGE_MODEL_PARAMS else 2e-4


def _need(name: str, value, ok: bool, hint: str) -> None:
    if isinstance(value, bool) or not ok:
        raise ValueError(f"{name} must be {hint}, got {value!r}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _validate(r, lora_alpha, lr, epochs, warmup_ratio, lora_dropout, n_examples) -> None:
    _need("r", r, isinstance(r, int) and r > 0, "a positive integer")
    _need("lora_alpha", lora_alpha, _number(lora_alpha) and lora_alpha > 0, "a positive number")
    _need("lr", lr, _number(lr) and lr > 0, "a positive number")
    _need("epochs", epochs, _number(epochs) and epochs > 0, "a positive number")
    _need("warmup_ratio", warmup_ratio, _number(warmup_ratio) and 0 <= warmup_ratio < 1, "in [0, 1)")
    _need("lora_dropout", lora_dropout, _number(lora_dropout) and 0 <= lora_dropout < 1, "in [0, 1)")
    _need("n_examples", n_examples, n_examples is None or (isinstance(n_examples, int) and n_examples >= 0),
          "an integer >= 0 or None")


def rank_advice(ranks: Mapping | int, module_dims: Mapping) -> Advice | None:
    """One line for every layer whose min(in, out) is below its r.  ranks: one r, or {module path: r}."""
    r_of = (lambda p: ranks) if isinstance(ranks, int) else ranks.get
    small = {path: (i, o) for path, (i, o) in module_dims.items() if r_of(path) is not None and r_of(path) > min(i, o)}
    if not small:
        return None
    path, (i, o) = min(small.items(), key=lambda kv: (min(kv[1]), kv[0]))
    smallest, rs = min(i, o), sorted({r_of(p) for p in small})
    return Advice("rank_above_dims",
                  f"r={'/'.join(map(str, rs))} exceeds min(in, out) of {len(small)} of {len(module_dims)} adapted "
                  f"layers (smallest: {path}, {i} -> {o}); ΔW there cannot have rank above {smallest}, so the extra "
                  f"rank is wasted parameters",
                  f"lower r to {smallest} or leave those layers out (exclude_modules, or rank_pattern for them)")


def scaling_advice(scalings: Mapping) -> Advice | None:
    """One line for the modules whose scaling ({module path: α/r, or α/√r with rsLoRA}) is outside
    SCALING_RANGE: too small and the update is lost, too large and training is unstable."""
    lo, hi = SCALING_RANGE
    far = {p: s for p, s in scalings.items() if not lo <= s <= hi}
    if not far:
        return None
    values = ", ".join(f"{v:g}" for v in sorted({round(s, 4) for s in far.values()}))
    where = "every adapted module" if len(far) == len(scalings) else f"{len(far)} of {len(scalings)} adapted modules"
    return Advice("alpha_ratio", f"the scaling α/r = {values} on {where} is far from the usual 1-2 (the effective "
                  f"lr scales with it: too small and the update is lost, too large and training is unstable)",
                  "set lora_alpha to r or 2r (α/√r with use_rslora)")


def check_hyperparameters(*, r: int, lora_alpha: float, lr: float, epochs: float, warmup_ratio: float,
                          lora_dropout: float, n_examples: int | None, module_dims: Mapping | None = None,
                          model_params: float | None = None) -> list[Advice]:
    """Advice for settings far outside the usual recipe (empty when nothing is far off).

    module_dims: {module path: (in_features, out_features)} of the adapted layers, for the rank check.
    model_params: the base model's size, for the lr recommendation (1e-4 above ~33B)."""
    _validate(r, lora_alpha, lr, epochs, warmup_ratio, lora_dropout, n_examples)
    good_lr = recommended_lr(model_params)
    advice = []
    if lr >= 1e-2:
        advice.append(Advice("lr_high", f"lr={lr:g} is far above LoRA's usual {good_lr:g}; training is likely to "
                             f"diverge or forget the base model", f"use --lr {good_lr:g}"))
    elif lr <= 1e-6:
        advice.append(Advice("lr_low", f"lr={lr:g} is far below LoRA's usual {good_lr:g}: the adapter will barely "
                             f"move (LoRA wants 5-10x the lr of a full fine-tune)", f"use --lr {good_lr:g}"))
    ratio = lora_alpha / r
    if not SCALING_RANGE[0] <= ratio <= SCALING_RANGE[1]:
        advice.append(Advice("alpha_ratio", f"lora_alpha/r = {lora_alpha:g}/{r} = {ratio:g} scales the update far "
                             f"from the usual 1-2 (the effective lr scales with it)",
                             f"use --lora-alpha {r} or {2 * r} (alpha = r or 2r)"))
    if module_dims:
        found = rank_advice(r, module_dims)
        if found:
            advice.append(found)
    if epochs > 10:
        advice.append(Advice("epochs_many", f"epochs={epochs:g} is far above the usual 1-3; the adapter may "
                             f"memorise the training set", "use --epochs 3 and watch the held-out loss"))
    if warmup_ratio > 0.3:
        advice.append(Advice("warmup_long", f"warmup_ratio={warmup_ratio:g} spends {warmup_ratio:.0%} of training "
                             f"below the peak lr (usual: 5-10%)", "use --warmup-ratio 0.06"))
    if lora_dropout >= 0.3:
        usual = 0.1 if n_examples is not None and n_examples < 1000 else 0.05
        advice.append(Advice("dropout_high", f"lora_dropout={lora_dropout:g} is far above the usual {usual:g}"
                             + (f" for {n_examples:,} examples" if n_examples is not None else ""),
                             f"use --lora-dropout {usual:g}"))
    return advice


def compare_to_head_only(lora_metric: float, head_metric: float, *, higher_is_better: bool = True) -> Advice | None:
    """Advice when the adapter did worse than training only the head (e.g. held-out accuracies), else None."""
    for name, value in (("lora_metric", lora_metric), ("head_metric", head_metric)):
        _need(name, value, isinstance(value, (int, float)), "a number")
    if math.isnan(lora_metric):
        return Advice("lora_diverged", "the adapter's metric is NaN: training diverged",
                      "lower --lr (2e-4 is usual) and check the data for empty or broken examples")
    worse = lora_metric < head_metric if higher_is_better else lora_metric > head_metric
    if not worse:
        return None
    return Advice("lora_below_head_only",
                  f"the adapter did worse than training the head alone ({lora_metric:.4g} vs {head_metric:.4g}): "
                  f"it has not learned what it could",
                  "train longer (more --epochs), raise --lr (LoRA usually wants 5-10x a full fine-tune's), or "
                  "try LoRA+ with --loraplus-lr-ratio 16")
