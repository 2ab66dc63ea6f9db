"""Inspect an adapter, and compare two: what each module's update ΔW = s·B·A is, read from the file alone.

Per module (A: (r, in), B: (out, r), s = α/r or α/√r), all from the factors (loralab.analysis, float64):

    ‖ΔW‖_F                 = |s|·sqrt(Σ (BᵀB) ⊙ (A·Aᵀ))
    ‖ΔW‖_F / ‖W0‖_F        how large the update is next to the frozen weight (needs the base model)
    σ₁ ≥ … ≥ σ_k           the singular values of ΔW (QR of A and B, SVD of the r×r core), k = min(r, out, in)
    energy(k)              Σ_{i≤k} σᵢ² / Σσᵢ² at k = 1, 2, 4, … ≤ r; rank_99 = the smallest k holding 99%
    effective / stable rank  exp(entropy of σ/Σσ)  /  Σσ² / σ₁²
    A, B statistics        mean, std, max |.|, fraction of zeros, count of NaN/Inf

diff, per module present in both adapters (same (out, in)):

    cosine                 ⟨ΔW_a, ΔW_b⟩_F / (‖ΔW_a‖_F·‖ΔW_b‖_F)   (1 = same update up to scale, 0 = orthogonal)
    left / right overlap   ‖U_a,kᵀ·U_b,k‖²_F / k and the same for V: do they write to (read from) the same
                           top-k directions, whatever their scale; k is capped at each update's numerical rank

The adapter directory is PEFT's format (adapter_model.safetensors + adapter_config.json, see loralab.adapter_file);
reading it needs no model.  The doctor (loralab.doctor) and the report folder (loralab.report) build on
InspectReport.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter_file import read_factors
from .analysis import (delta_cosine, delta_fro_norm, effective_rank, energy, factor_stats, factor_svd,
                       rank_for_energy, stable_rank, subspace_overlap)

__all__ = ["inspect_factors", "InspectReport", "ModuleReport", "diff_factors", "DiffReport", "ModuleDiff",
           "split_layer", "energy_ranks", "inspect_adapter_dir", "diff_adapter_dirs"]

# ---- reading (no model needed) ----------------------------------------------------------------------------
def split_layer(path: str) -> tuple[int | None, str]:
    """(layer index, module name) from a module path: the first all-digit component is the layer and what
    follows is the name.  "model.layers.3.self_attn.q_proj" -> (3, "self_attn.q_proj"); no number -> (None, path)."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i + 1 < len(parts):
            return int(part), ".".join(parts[i + 1:])
    return None, path


def energy_ranks(r: int) -> list[int]:
    """1, 2, 4, 8, … up to r."""
    return [2 ** i for i in range(int(math.log2(r)) + 1)] if r >= 1 else []


# ---- one adapter ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModuleReport:
    """One module's update.  Spectral fields are None when A or B holds NaN/Inf (finite is False)."""
    path: str
    shape: tuple[int, int]            # ΔW: (out, in)
    r: int
    scaling: float
    finite: bool
    delta_norm: float | None          # ‖ΔW‖_F
    base_norm: float | None           # ‖W0‖_F (with a base)
    relative: float | None            # ‖ΔW‖_F / ‖W0‖_F
    singular_values: tuple | None     # σ₁ ≥ … ≥ σ_k
    energy: dict | None               # {k: Σ_{i≤k}σ²/Σσ²} at k = 1, 2, 4, … ≤ r
    effective_rank: float | None
    stable_rank: float | None
    rank_99: int | None               # smallest k with energy(k) ≥ 0.99 (0 if ΔW = 0)
    stats: dict                       # factor_stats(A, B)

    @property
    def layer(self) -> int | None:
        return split_layer(self.path)[0]

    @property
    def name(self) -> str:
        return split_layer(self.path)[1]

    @property
    def b_is_zero(self) -> bool:
        return self.stats["B"]["zero_fraction"] == 1.0

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(shape=list(self.shape), layer=self.layer, name=self.name,
                 singular_values=None if self.singular_values is None else list(self.singular_values),
                 energy=None if self.energy is None else {str(k): v for k, v in self.energy.items()})
        return d


@dataclass(frozen=True)
class InspectReport:
    modules: tuple            # ModuleReport, in file order
    has_base: bool

    def to_dict(self) -> dict:
        return {"has_base": self.has_base, "module_count": len(self.modules),
                "modules": [m.to_dict() for m in self.modules]}

    def table(self) -> str:
        """One line per module: shape, r, scaling, ‖ΔW‖, ‖ΔW‖/‖W0‖, energy at rank 1, ranks."""
        width = max([len(m.path) for m in self.modules] + [6])
        head = (f"{'module':<{width}}  {'out×in':>11}  {'r':>3}  {'scale':>6}  {'‖ΔW‖_F':>9}  {'/‖W0‖':>9}  "
                f"{'E(1)':>5}  {'erank':>5}  {'srank':>5}  {'r99':>3}")
        lines = [head, "-" * len(head)]
        for m in self.modules:
            def num(v, fmt):
                return format(v, fmt) if v is not None else "-"
            e1 = m.energy.get(1) if m.energy else None
            lines.append(f"{m.path:<{width}}  {f'{m.shape[0]}×{m.shape[1]}':>11}  {m.r:>3}  {m.scaling:>6.3g}  "
                         f"{num(m.delta_norm, '9.3e') if m.finite else 'NaN/Inf':>9}  {num(m.relative, '9.2e'):>9}  "
                         f"{num(e1, '5.3f'):>5}  {num(m.effective_rank, '5.2f'):>5}  "
                         f"{num(m.stable_rank, '5.2f'):>5}  {num(m.rank_99, 'd'):>3}")
        return "\n".join(lines)


def _base_norm(path: str, W0: torch.Tensor, shape: tuple[int, int]) -> float:
    if tuple(W0.shape) not in (shape, shape[::-1]):
        raise ValueError(f"{path}: the base weight is {tuple(W0.shape)} but the adapter's update is "
                         f"{shape[0]}×{shape[1]}; this adapter was trained on another base model")
    return torch.linalg.vector_norm(W0.detach().to(torch.float64)).item()


def _module_report(path: str, A: torch.Tensor, B: torch.Tensor, scaling: float, W0) -> ModuleReport:
    shape = (B.shape[0], A.shape[1])
    stats = factor_stats(A, B)
    base = None if W0 is None else _base_norm(path, W0, shape)
    if stats["A"]["nonfinite"] or stats["B"]["nonfinite"]:
        return ModuleReport(path, shape, A.shape[0], scaling, False, None, base, None, None, None, None, None,
                            None, stats)
    U, S, Vh = factor_svd(A, B, scaling)
    norm = delta_fro_norm(A, B, scaling)
    relative = None if base is None else (norm / base if base > 0 else math.inf)
    return ModuleReport(path, shape, A.shape[0], float(scaling), True, norm, base, relative, tuple(S.tolist()),
                        energy(S, energy_ranks(A.shape[0])), effective_rank(S), stable_rank(S), rank_for_energy(S),
                        stats)


def inspect_factors(factors: dict, base_weights: dict | None = None) -> InspectReport:
    """factors: {path: (A (r, in), B (out, r), scaling)};  base_weights: {path: W0 (out, in) or (in, out)} or
    None (only its Frobenius norm is used, so GPT-2 Conv1D and embedding orientations are accepted).
    Never raises on NaN/Inf factors: those modules are reported with finite=False for the doctor to flag."""
    if base_weights is not None:
        missing = [p for p in factors if p not in base_weights]
        if missing:
            raise ValueError(f"the base has no weight for {len(missing)} adapted modules (e.g. {missing[0]}); "
                             f"this adapter was trained on another model")
    modules = tuple(_module_report(p, A, B, s, None if base_weights is None else base_weights[p])
                    for p, (A, B, s) in factors.items())
    return InspectReport(modules, base_weights is not None)


# ---- two adapters -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModuleDiff:
    path: str
    shape: tuple[int, int]
    norm_a: float | None
    norm_b: float | None
    cosine: float | None              # None when either update is zero or non-finite
    k: int                            # subspace size compared (0: nothing to compare)
    left_overlap: float | None        # ‖U_a,kᵀ·U_b,k‖²_F / k
    right_overlap: float | None       # ‖V_a,kᵀ·V_b,k‖²_F / k

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class DiffReport:
    modules: tuple                    # ModuleDiff for paths in both, same shape
    only_a: tuple
    only_b: tuple
    mismatched: tuple                 # paths in both whose (out, in) differ: different base models
    k: int

    def to_dict(self) -> dict:
        cos = [m.cosine for m in self.modules if m.cosine is not None]
        return {"k": self.k, "common": len(self.modules), "mean_cosine": sum(cos) / len(cos) if cos else None,
                "modules": [m.to_dict() for m in self.modules], "only_a": list(self.only_a),
                "only_b": list(self.only_b), "mismatched": list(self.mismatched)}

    def table(self) -> str:
        width = max([len(m.path) for m in self.modules] + [6])
        head = f"{'module':<{width}}  {'‖ΔW_a‖':>9}  {'‖ΔW_b‖':>9}  {'cosine':>7}  {'k':>2}  {'left':>5}  {'right':>5}"
        lines = [head, "-" * len(head)]
        for m in self.modules:
            def num(v, fmt):
                return format(v, fmt) if v is not None else "-"
            lines.append(f"{m.path:<{width}}  {num(m.norm_a, '9.3e'):>9}  {num(m.norm_b, '9.3e'):>9}  "
                         f"{num(m.cosine, '7.3f'):>7}  {m.k:>2}  {num(m.left_overlap, '5.3f'):>5}  "
                         f"{num(m.right_overlap, '5.3f'):>5}")
        for label, paths in (("only in A", self.only_a), ("only in B", self.only_b),
                             ("different shapes", self.mismatched)):
            if paths:
                more = ", ..." if len(paths) > 4 else ""
                lines.append(f"{label}: {len(paths)} modules ({', '.join(paths[:4])}{more})")
        return "\n".join(lines)


def _numerical_rank(S: torch.Tensor) -> int:
    return int((S > 1e-10 * S[0]).sum().item()) if S.numel() and S[0] > 0 else 0


def _module_diff(path: str, fa, fb, k: int) -> ModuleDiff:
    shape = (fa[1].shape[0], fa[0].shape[1])
    if not all(torch.isfinite(t).all() for t in (*fa[:2], *fb[:2])):
        return ModuleDiff(path, shape, None, None, None, 0, None, None)
    (Ua, Sa, Vha), (Ub, Sb, Vhb) = factor_svd(*fa), factor_svd(*fb)
    na, nb = delta_fro_norm(*fa), delta_fro_norm(*fb)
    kk = min(k, _numerical_rank(Sa), _numerical_rank(Sb))
    if kk == 0:
        return ModuleDiff(path, shape, na, nb, None, 0, None, None)
    return ModuleDiff(path, shape, na, nb, delta_cosine(fa, fb), kk, subspace_overlap(Ua, Ub, kk),
                      subspace_overlap(Vha.T, Vhb.T, kk))


def diff_factors(a: dict, b: dict, k: int = 4) -> DiffReport:
    """Compare two adapters' factors ({path: (A, B, scaling)}) module by module; k: top-k subspaces."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}: the subspace size must be an integer ≥ 1 (e.g. 4)")
    common = [p for p in a if p in b]
    same = [p for p in common if (a[p][1].shape[0], a[p][0].shape[1]) == (b[p][1].shape[0], b[p][0].shape[1])]
    return DiffReport(tuple(_module_diff(p, a[p], b[p], k) for p in same),
                      tuple(p for p in a if p not in b), tuple(p for p in b if p not in a),
                      tuple(p for p in common if p not in same), k)


# ---- directories (what the CLI calls) ---------------------------------------------------------------------
def inspect_adapter_dir(adapter_dir, base_dir=None, report_dir=None, *, probe_tokens: int = 16, seed: int = 0,
                        say=None, table: bool = True) -> dict:
    """Inspect `adapter_dir`; with `base_dir` (a local transformers model) add ‖ΔW‖/‖W0‖ and the output checks;
    with `report_dir` write the report folder.  Prints the table (unless table=False) and the doctor's
    findings with `say`; a `run.json` of `loralab train` next to the adapter adds the hyperparameter checks."""
    from .doctor import diagnose, probe_model, training_findings
    say = say or (lambda *a: None)
    factors = read_factors(adapter_dir, allow_nonfinite=True)
    base_weights, probe, model = None, None, None
    if base_dir is not None:
        model = _load_base(base_dir, adapter_dir)
        base_weights = _model_weights(model, factors)
    report = inspect_factors(factors, base_weights)
    if model is not None:  # after the norms are taken: the probe loads and merges the adapter into the model
        probe = probe_model(model, adapter_dir, probe_tokens=probe_tokens, seed=seed)
    findings = diagnose(report, probe) + training_findings(Path(adapter_dir).parent / "run.json")
    say(f"adapter {adapter_dir}: {len(report.modules)} modules" + (f", base {base_dir}" if base_dir else ""))
    if table:
        say(report.table())
    if probe is not None:
        say(probe.summary())
    say("doctor: " + ("no problems found" if not findings else f"{len(findings)} findings"))
    for f in findings:
        say(f"  {f}")
    result = {"adapter": str(adapter_dir), "base": None if base_dir is None else str(base_dir),
              **report.to_dict(), "probe": None if probe is None else probe.to_dict(),
              "findings": [f.to_dict() for f in findings]}
    if report_dir is not None:
        from .report import write_report
        result["report"] = write_report(report, findings, report_dir, probe=probe, title=str(adapter_dir), say=say)
    return result


def _load_base(base_dir, adapter_dir):
    """The base model in the form the adapter was trained on: adapter_config.json's task_type picks the task
    (SEQ_CLS: a sequence classifier with as many labels as the saved head has rows, as PEFT does; CAUSAL_LM:
    a causal LM); otherwise the class the base's config.json names (loralab.hf.load_local_model)."""
    from .hf import HEAD_NAMES, TASK_TYPES, load_local_model
    task_type = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("task_type")
    task = next((t for t, peft_type in TASK_TYPES.items() if peft_type == task_type), None)
    labels = None
    if task == "classify":
        from safetensors import safe_open
        head = re.compile(rf"\.({'|'.join(HEAD_NAMES)})(\.out_proj)?\.weight$")
        with safe_open(Path(adapter_dir) / "adapter_model.safetensors", framework="pt") as f:
            rows = [f.get_slice(k).get_shape()[0] for k in f.keys() if head.search(k)]
        labels = rows[0] if rows else None  # the saved head replaces the base's, whatever its size
    return load_local_model(base_dir, task, labels)


def _model_weights(model, factors: dict) -> dict:
    """{path: the base module's weight} for each adapted path (KeyError-free: a missing module is reported)."""
    weights, missing = {}, []
    for path in factors:
        try:
            weights[path] = model.get_submodule(path).weight
        except AttributeError:
            missing.append(path)
    if missing:
        raise ValueError(f"the base model has no module {missing[0]} (and {len(missing) - 1} more adapted paths); "
                         f"this adapter was trained on another model")
    return weights


def diff_adapter_dirs(a_dir, b_dir, k: int = 4, say=None) -> dict:
    """diff_factors of two adapter directories, with the table printed by `say`."""
    say = say or (lambda *a: None)
    report = diff_factors(read_factors(a_dir, allow_nonfinite=True), read_factors(b_dir, allow_nonfinite=True), k)
    say(f"A = {a_dir}\nB = {b_dir}")
    say(report.table())
    return {"a": str(a_dir), "b": str(b_dir), **report.to_dict()}
