"""The adapter doctor: what is wrong with an adapter, and how to fix it.

From the factors alone (an InspectReport), one finding per kind of problem, not one per layer:

    untrained       B is all zero: ΔW = 0, the adapter does nothing (B starts at zero; it was never trained)
    nonfinite       NaN/Inf in A or B (a diverged run or a corrupt file)
    near_zero       ‖ΔW‖_F / ‖W0‖_F < NEAR_ZERO (1e-4; needs the base): the update is lost next to W0
    rank_collapse   r ≥ COLLAPSE_MIN_R (4) but the update is about rank one: energy(1) ≥ COLLAPSE_ENERGY (0.9)
                    or effective rank < COLLAPSE_ERANK (1.5); a lower r holds the same update
    rank_above_dims r > min(out, in): ΔW cannot have rank above min(out, in), the extra rank is wasted
    alpha_ratio     the scaling α/r (α/√r with rsLoRA) is far from the usual 1–2 (guidance.SCALING_RANGE)

With a base model and a probe batch of random token ids (probe_model), two output checks:

    no_effect       outputs with and without the adapter are equal (max |Δlogit| ≤ 1e-7 of the output scale)
    merge_mismatch  merged and unmerged outputs differ by more than MERGE_TOLERANCE of the output scale
    load_failed     load_adapter refused the adapter on this base (its message says why)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .guidance import rank_advice, scaling_advice

__all__ = ["training_findings", "Finding", "ProbeResult", "diagnose", "probe_model", "NEAR_ZERO", "COLLAPSE_ENERGY", "COLLAPSE_ERANK",
           "COLLAPSE_MIN_R", "MERGE_TOLERANCE"]

NEAR_ZERO = 1e-4           # ‖ΔW‖/‖W0‖ below this: the update hardly changes the layer
COLLAPSE_ENERGY = 0.9      # energy at rank 1 at or above this ...
COLLAPSE_ERANK = 1.5       # ... or an effective rank below this: the update is ~rank one
COLLAPSE_MIN_R = 4         # only flagged when r is at least this
MERGE_TOLERANCE = {"full": 1e-4, "half": 2e-2}   # of max(1, output scale): fp32/fp64 bases, bf16/fp16 bases
SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    severity: str          # "error" | "warning" | "info"
    module: str | None     # the one module concerned, or None (the adapter, or several modules)
    message: str           # what is wrong and the fix
    code: str = ""         # the kind: "untrained", "nonfinite", ... (see the module docstring)

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity={self.severity!r}; choose one of {SEVERITIES}")

    def to_dict(self) -> dict:
        return {"severity": self.severity, "module": self.module, "message": self.message, "code": self.code}

    def __str__(self) -> str:
        return f"{self.severity}: {self.message}"


@dataclass(frozen=True)
class ProbeResult:
    """Output checks on a probe batch.  error: why the adapter could not be loaded (then the rest is None)."""
    tokens: tuple | None = None          # probe batch shape (batch, seq)
    effect: float | None = None          # max |adapted − base| over the outputs
    merge_gap: float | None = None       # max |merged − unmerged|
    scale: float | None = None           # max |adapted|
    half_precision: bool = False
    error: str | None = None

    def to_dict(self) -> dict:
        return {**self.__dict__, "tokens": None if self.tokens is None else list(self.tokens)}

    def summary(self) -> str:
        if self.error is not None:
            return f"probe: the adapter does not load onto this base: {self.error}"
        return (f"probe {self.tokens[0]}×{self.tokens[1]} random tokens: max |with − without adapter| "
                f"{self.effect:.3e}, max |merged − unmerged| {self.merge_gap:.3e} (output scale {self.scale:.3e})")


def _which(modules: list) -> tuple[str | None, str]:
    """(the module if there is exactly one, a short description of the affected modules)."""
    paths = [m.path for m in modules]
    if len(paths) == 1:
        return paths[0], paths[0]
    return None, f"{len(paths)} modules (e.g. {', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''})"


def diagnose(report, probe: ProbeResult | None = None) -> list[Finding]:
    """Findings for an InspectReport (and the probe checks, if run), most severe first."""
    mods = list(report.modules)
    n = len(mods)
    findings = []
    bad = [m for m in mods if not m.finite]
    if bad:
        module, where = _which(bad)
        counts = sum(m.stats["A"]["nonfinite"] + m.stats["B"]["nonfinite"] for m in bad)
        findings.append(Finding("error", module, f"NaN/Inf in A or B of {where}, {counts} values in all: the "
                                f"adapter is broken. A diverged run leaves NaN: retrain with a lower lr and "
                                f"gradient clipping (max_grad_norm), or re-save it if the file is corrupt.",
                                "nonfinite"))
    good = [m for m in mods if m.finite]
    zero = [m for m in good if m.b_is_zero]
    if zero:
        module, where = _which(zero)
        whole = "every module" if len(zero) == n else where
        findings.append(Finding("error", module, f"B is all zero in {whole}, so ΔW = s·B·A = 0 there and the "
                                f"adapter does nothing: it was never trained (B starts at zero). Check that the "
                                f"LoRA parameters reach the optimizer with lr > 0 and that training ran.", "untrained"))
    live = [m for m in good if not m.b_is_zero]
    findings += _near_zero(live) + _collapse(live) + _configuration(mods)
    if probe is not None:
        findings += _probe_findings(probe)
    elif not report.has_base:
        findings.append(Finding("info", None, "no base model given: pass --base MODEL_DIR to compare ‖ΔW‖ with "
                                "‖W0‖ and to check the outputs (with vs without the adapter, merged vs unmerged).",
                                "no_base"))
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


def _near_zero(live: list) -> list[Finding]:
    small = [m for m in live if m.relative is not None and m.relative < NEAR_ZERO]
    if not small:
        return []
    module, where = _which(small)
    least = min(small, key=lambda m: m.relative)
    return [Finding("warning", module, f"‖ΔW‖/‖W0‖ < {NEAR_ZERO:g} in {where} (smallest {least.relative:.2e} at "
                    f"{least.path}): the update is too small to change these layers. Train longer or with a "
                    f"higher lr (LoRA typically 1e-4–5e-4) or lora_alpha.", "near_zero")]


def _collapse(live: list) -> list[Finding]:
    flat = [m for m in live if m.r >= COLLAPSE_MIN_R and m.energy is not None and
            (m.energy[1] >= COLLAPSE_ENERGY or m.effective_rank < COLLAPSE_ERANK)]
    if not flat:
        return []
    module, where = _which(flat)
    need = max(m.rank_99 for m in flat)
    suggest = 2 ** math.ceil(math.log2(max(need, 1)))
    rs = sorted({m.r for m in flat})
    top = min(m.energy[1] for m in flat)
    fewer = f" with {max(rs) // suggest}× fewer adapter parameters" if max(rs) >= 2 * suggest else ""
    return [Finding("warning", module, f"rank collapse in {where}: the update is about rank one (≥ {top:.0%} of "
                    f"‖ΔW‖² in σ₁, effective rank ≤ {max(m.effective_rank for m in flat):.2f}) while r="
                    f"{'/'.join(map(str, rs))}. r={suggest} holds 99% of it{fewer}; or train longer / with more "
                    f"data if you expected a richer update.", "rank_collapse")]


def _configuration(mods: list) -> list[Finding]:
    """r above a layer's dimensions and a scaling far from 1–2: the training job's own guidance rules."""
    found = [rank_advice({m.path: m.r for m in mods}, {m.path: (m.shape[1], m.shape[0]) for m in mods}),
             scaling_advice({m.path: m.scaling for m in mods})]
    return [Finding("warning", None, str(a), a.rule) for a in found if a is not None]


def training_findings(run_file) -> list[Finding]:
    """The guidance's hyperparameter checks on the run that trained the adapter (`loralab train`'s run.json,
    when there is one): lr, epochs, warmup, dropout far outside the usual recipe, and an adapter that did worse
    than the head-only baseline."""
    import json
    from pathlib import Path

    from .guidance import check_hyperparameters, compare_to_head_only
    path = Path(run_file)
    if not path.is_file():
        return []
    try:
        run = json.loads(path.read_text())
        job = run.get("job") or run.get("options") or {}
        advice = check_hyperparameters(r=job["r"], lora_alpha=float(job["lora_alpha"]), lr=float(job["lr"]),
                                       epochs=job["epochs"], warmup_ratio=float(job["warmup_ratio"]),
                                       lora_dropout=float(job["lora_dropout"]), n_examples=run.get("train_examples"))
    except (ValueError, KeyError, TypeError):
        return []  # not a run record this version wrote: nothing to check
    after, head = run.get("accuracy_after"), run.get("accuracy_head_only")
    if isinstance(after, (int, float)) and isinstance(head, (int, float)):
        advice.append(compare_to_head_only(after, head))
    return [Finding("warning", None, f"{a} ({path.name})", a.rule) for a in advice if a is not None]


def _probe_findings(probe: ProbeResult) -> list[Finding]:
    if probe.error is not None:
        return [Finding("error", None, f"the adapter does not load onto this base: {probe.error}", "load_failed")]
    out = []
    scale = max(probe.scale, 1.0)
    if probe.effect <= 1e-7 * scale:
        out.append(Finding("error", None, f"outputs with and without the adapter are equal (max |difference| "
                           f"{probe.effect:.1e}) on {probe.tokens[0]}×{probe.tokens[1]} random tokens: the adapter "
                           f"changes nothing. Train it (see the other findings).", "no_effect"))
    tolerance = MERGE_TOLERANCE["half" if probe.half_precision else "full"] * scale
    if probe.merge_gap > tolerance:
        out.append(Finding("error", None, f"merged and unmerged outputs differ by {probe.merge_gap:.2e} (tolerance "
                           f"{tolerance:.1e}): merging would change what the model computes. Report it with the "
                           f"adapter and base; keep the adapter unmerged meanwhile.", "merge_mismatch"))
    return out


def probe_model(model: nn.Module, adapter_dir, *, probe_tokens: int = 16, batch: int = 2, seed: int = 0,
                adapter_name: str = "inspect") -> ProbeResult:
    """Load the adapter into `model` (a transformers model taking input_ids), run random token ids through it
    without the adapter, with it, and merged; the model is left with the adapter loaded and unmerged."""
    from .load import load_adapter
    from .inject import disable_lora
    from .merging import merge, unmerge
    from .hf import probe_output
    try:
        load_adapter(model, adapter_dir, adapter_name)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        return ProbeResult(error=str(e.args[0] if isinstance(e, KeyError) and e.args else e))
    vocab = model.get_input_embeddings().num_embeddings
    param = next(model.parameters())
    ids = torch.randint(0, vocab, (batch, probe_tokens), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(param.device)
    with disable_lora(model):
        base = probe_output(model, ids)
    adapted = probe_output(model, ids)
    merge(model, adapter_name)
    try:
        merged = probe_output(model, ids)
    finally:
        with warnings.catch_warnings():  # a half-precision base warns that unmerge is not exact: expected here
            warnings.simplefilter("ignore")
            unmerge(model)
    return ProbeResult(tuple(ids.shape), (adapted - base).abs().max().item(), (merged - adapted).abs().max().item(),
                       adapted.abs().max().item(), param.dtype in (torch.float16, torch.bfloat16))
