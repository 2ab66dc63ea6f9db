"""The record of a training run: its log file, the best evaluation so far, early stopping, the curves.

`<out>/log.jsonl` holds one JSON object per line, appended as training goes (a reader skips a line torn by
a crash):

    {"kind": "step", "step", "epoch", "loss", "lr", "grad_norm", "examples_per_s", "tokens_per_s", "time"}
    {"kind": "eval", "step", "loss", "accuracy" (classify) | "perplexity" (causal-lm), "best", "time"}

A resumed run first drops the records of the steps it is about to repeat (those after its checkpoint), so
the file describes one run, step by step.  `<out>/curves.png` (matplotlib, Agg) plots the training loss,
the evaluation loss and the evaluation metric, with the best evaluation marked.

Best and early stopping, as pure functions of the evaluations so far (so a resumed run, whose history
holds them, decides exactly as the uninterrupted one): an evaluation is the new best when its metric is
strictly better than every earlier one (loss: lower, accuracy: higher; NaN never is); training stops
early after `patience` evaluations in a row without a new best.  The best trainable state (adapters and
modules to save) is kept in `<out>/checkpoints/best/`: trainable.safetensors + best.json.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import distributed as dd
from .atomic import atomic_directory, atomic_write, atomic_write_text
from .checkpoint import trainable_parameters

__all__ = ["METRICS", "default_metric", "check_metric", "Best", "best_so_far", "RunLog", "RunRecorder", "read_log",
           "save_best", "restore_best", "plot_curves", "prepare_out", "remove_run", "LOG_NAME", "CURVES_NAME",
           "BEST_DIR", "RUN_FILES"]

METRICS = {"loss": "lower", "accuracy": "higher"}   # metric for the best evaluation -> which way is better
LOG_NAME, CURVES_NAME = "log.jsonl", "curves.png"
BEST_DIR = Path("checkpoints") / "best"


def default_metric(task: str) -> str:
    """accuracy for classify, loss for causal-lm."""
    return "accuracy" if task == "classify" else "loss"


def check_metric(metric: str, task: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric_for_best={metric!r} is not supported; choose one of {tuple(METRICS)}")
    if metric == "accuracy" and task != "classify":
        raise ValueError(f"metric_for_best='accuracy' needs task 'classify' (a {task} run has no accuracy); "
                         f"use 'loss'")


@dataclass(frozen=True)
class Best:
    """The best evaluation so far: its step and metric value (None before any finite one), the number of
    evaluations since it, and whether early stopping says to stop."""
    step: int | None
    value: float | None
    since: int
    stop: bool


def best_so_far(evals: list[dict], metric: str, patience: int | None = None) -> Best:
    """The Best of evaluation records [{"step", metric, ...}] in order; patience None: never stop."""
    lower = METRICS[metric] == "lower"
    step = value = None
    since = 0
    for record in evals:
        v = record.get(metric)
        if v is None:
            raise ValueError(f"evaluation at step {record.get('step')} has no {metric!r} (it has "
                             f"{sorted(record)}); choose a metric it reports")
        if math.isfinite(v) and (value is None or (v < value if lower else v > value)):
            step, value, since = record["step"], float(v), 0
        else:
            since += 1
    return Best(step, value, since, patience is not None and since >= patience)


class RunLog:
    """Appends records to `<out>/log.jsonl`.  The first append drops existing records at or after its step
    (what a resumed run repeats), rewriting the file atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._trimmed = False

    def append(self, record: dict) -> None:
        if not self._trimmed:
            self._trimmed = True
            if self.path.is_file():
                kept = [r for r in read_log(self.path) if r.get("step", 0) < record["step"]]
                atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_log(path: str | Path) -> list[dict]:
    """The records of a log.jsonl; a malformed line (a write cut short by a crash) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class RunRecorder:
    """train()'s hooks for one run under `out`: log every step and evaluation, track the best evaluation by
    `metric`, keep the best trainable state (keep_best), and say when to stop (patience).  Only the main
    process writes; every process takes the same decisions (each evaluates the whole held-out set)."""

    def __init__(self, out: str | Path, metric: str, patience: int | None = None, keep_best: bool = True):
        self.out, self.metric, self.patience, self.keep_best = Path(out), metric, patience, keep_best
        self.log = RunLog(self.out / LOG_NAME)
        self.best = Best(None, None, 0, False)
        self._t0 = time.time()

    def on_step(self, record: dict, history) -> None:
        if dd.is_main():
            self.log.append({"kind": "step", **record, "time": round(time.time() - self._t0, 3)})

    def on_eval(self, record: dict, model: nn.Module, history) -> bool:
        """Called after history.evals got `record`; returns True to stop training."""
        self.best = best_so_far(history.evals, self.metric, self.patience)
        is_best = self.best.step == record["step"]
        if dd.is_main():
            if is_best and self.keep_best:
                save_best(self.out / BEST_DIR, model, record["step"], self.metric, self.best.value)
            self.log.append({"kind": "eval", **record, "best": is_best, "time": round(time.time() - self._t0, 3)})
        return self.best.stop


def save_best(directory: Path, model: nn.Module, step: int, metric: str, value: float) -> None:
    """The trainable parameters (by model name) and {"step", "metric", "value"}, replaced atomically."""
    from safetensors.torch import save_file
    params = {n: p.detach().cpu().contiguous().clone() for n, p in trainable_parameters(model).items()}
    with atomic_directory(directory) as tmp:
        atomic_write(tmp / "trainable.safetensors", lambda t: save_file(params, t))
        atomic_write_text(tmp / "best.json", json.dumps({"step": step, "metric": metric, "value": value}) + "\n")


def restore_best(directory: Path, model: nn.Module) -> dict:
    """Copy the kept best state into the model's trainable parameters; returns its best.json."""
    from safetensors.torch import load_file
    directory = Path(directory)
    if not (directory / "best.json").is_file():
        raise FileNotFoundError(f"{directory}: no best state kept (best.json); train with --final last, or "
                                f"re-run without --resume")
    saved = load_file(directory / "trainable.safetensors")
    params = trainable_parameters(model)
    if set(saved) != set(params):
        raise ValueError(f"{directory}: the kept best state holds other parameters than the model's; "
                         f"re-run with --overwrite")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    return json.loads((directory / "best.json").read_text())


def plot_curves(records: list[dict], path: str | Path, metric: str | None = None) -> str | None:
    """Write the training loss (per step), evaluation loss and evaluation metric (accuracy or perplexity)
    of log records to a PNG at `path`, atomically.  Returns None, or a note when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (f"no {Path(path).name}: matplotlib is not installed (pip install 'loralab[plot]'); "
                f"the numbers are in {LOG_NAME}")
    steps = [r for r in records if r.get("kind") == "step"]
    evals = [r for r in records if r.get("kind") == "eval"]
    other = next((m for m in ("accuracy", "perplexity") if evals and m in evals[0]), None)
    fig, axes = plt.subplots(1, 2 if other else 1, figsize=(11 if other else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, label="training loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="held-out loss")
    ax.set(xlabel="optimizer step", ylabel="loss", title="loss")
    best = [r for r in evals if r.get("best")]
    if other:
        ax2 = axes[0][1]
        ax2.plot([r["step"] for r in evals], [r[other] for r in evals], "o-", color="C2")
        ax2.set(xlabel="optimizer step", ylabel=other, title=f"held-out {other}")
    for a in axes[0]:
        if best:
            a.axvline(best[-1]["step"], color="grey", ls="--", lw=1,
                      label=f"best ({metric or 'metric'}) at step {best[-1]['step']}")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return None


RUN_FILES = ("adapter", "checkpoints", "run.json", LOG_NAME, CURVES_NAME)   # what a run writes under --out


def prepare_out(out: str | Path, resume: bool = False, overwrite: bool = False, *, remove: bool = True) -> list[str]:
    """Check that `out` may take a new run: an earlier run's files there are never deleted unless
    overwrite, and then exactly those are removed (anything else in `out` stays); resume continues the run
    in `out`.  Returns the names of the earlier run's files that are (remove=True) or are to be replaced
    (remove=False: check now, remove_run later, once the new run is ready to start)."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found or resume:
        return []
    if not overwrite:
        raise ValueError(f"--out {out} holds an earlier run ({', '.join(found)}); pass --resume to continue it, "
                         f"--overwrite to replace it, or another --out")
    if remove:
        remove_run(out, found)
    return found


def remove_run(out: str | Path, names: list[str]) -> None:
    """Delete the entries `names` (from RUN_FILES) of `out`."""
    import shutil
    for name in names:
        path = Path(out) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
