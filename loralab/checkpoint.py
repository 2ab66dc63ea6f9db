"""Training checkpoints: everything needed to continue a run exactly, written atomically, no pickle.

A checkpoint is a directory `<out>/checkpoints/step-000040/` holding

    trainable.safetensors   every trainable parameter (adapters A/B, modules_to_save) by its model name
    optimizer.safetensors   the optimizer's per-parameter tensors ("state.<i>.exp_avg", ...) and every
                            rank's RNG states ("rng.cpu.<rank>" uint8; with CUDA also "rng.cuda.<rank>",
                            the state of the device that rank trains on)
    state.json              step and data position, optimizer hyper-parameters (param_groups), the
                            schedule, the TrainConfig and the history so far

It is written into a temporary directory and renamed into place, then `<out>/checkpoints/latest` (a small
text file naming it) is replaced atomically, so a process killed at any moment leaves either the previous
checkpoint or the new one, never a torn one.  The learning-rate schedule is a pure function of the step
and the data order a pure function of (seed, epoch), so the step number is their whole state.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_directory, atomic_write, atomic_write_text

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "trainable_parameters"]

FORMAT = 1
LATEST = "latest"


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of everything that trains, in model order (the optimizer's order too)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (<out>/checkpoints), or None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def save_checkpoint(root: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    rng_states: list[torch.Tensor], keep: int = 2,
                    cuda_rng_states: list[torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step-<state['step']>` under `root` and point `latest` at it; keep the newest
    `keep` checkpoints.  rng_states / cuda_rng_states: each rank's CPU / CUDA RNG state, by rank (see
    distributed.gather_rng_states).  Refuses non-finite parameters, so the last checkpoint is always a
    good one."""
    from safetensors.torch import save_file
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    params = {name: p.detach().cpu().contiguous() for name, p in trainable_parameters(model).items()}
    bad = [n for n, t in params.items() if not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"refusing to checkpoint non-finite parameters ({bad[0]}); the previous checkpoint "
                         f"is kept")
    tensors, groups = _optimizer_tensors(optimizer)
    assert cuda_rng_states is None or len(cuda_rng_states) == len(rng_states), "one CUDA RNG state per rank"
    for r, rng in enumerate(rng_states):
        tensors[f"rng.cpu.{r}"] = rng
    for r, rng in enumerate(cuda_rng_states or ()):
        tensors[f"rng.cuda.{r}"] = rng
    name = f"step-{state['step']:06d}"
    final = root / name
    meta = {"format": FORMAT, **state, "param_names": list(params), "param_groups": groups}
    with atomic_directory(final) as tmp:  # a re-run of the same step after a resume replaces it
        atomic_write(tmp / "trainable.safetensors", lambda t: save_file(params, t))  # written and fsynced
        atomic_write(tmp / "optimizer.safetensors", lambda t: save_file(tensors, t))
        atomic_write_text(tmp / "state.json", json.dumps(meta, indent=1))
    atomic_write_text(root / LATEST, name)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    rank: int = 0) -> dict:
    """Restore trainable parameters, optimizer state and this rank's RNG states from checkpoint `path`;
    returns its state.json.  Everything is checked before anything is restored: on a mismatch (ValueError:
    other parameters or shapes, optimizer groups, number of processes, CUDA or not) the model, optimizer
    and RNGs are left untouched."""
    from safetensors.torch import load_file
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    params = trainable_parameters(model)
    saved = load_file(path / "trainable.safetensors")
    tensors = load_file(path / "optimizer.safetensors")
    _check_parameters(path, params, meta["param_names"], saved)
    optimizer_state = _optimizer_state(tensors, meta["param_groups"], optimizer)
    cpu_rng, cuda_rng = _rng_states(path, tensors, rank)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng)  # the current device: the one this rank trains on
    return meta


def _check_parameters(path: Path, params: dict[str, nn.Parameter], names: list[str], saved: dict) -> None:
    if list(params) != names:
        missing = sorted(set(names) - set(params))[:3]
        extra = sorted(set(params) - set(names))[:3]
        raise ValueError(f"{path}: the checkpoint's trainable parameters differ from the model's (in the "
                         f"checkpoint only: {missing}; in the model only: {extra}); resume with the same "
                         f"model, target_modules and modules_to_save as the run that wrote it")
    for name, p in params.items():
        if saved[name].shape != p.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(saved[name].shape)} in the checkpoint but "
                             f"{tuple(p.shape)} in the model; resume with the same r and model")


def _rng_states(path: Path, tensors: dict, rank: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(this rank's CPU RNG state, its CUDA RNG state or None if the run had no CUDA)."""
    if f"rng.cpu.{rank}" not in tensors:
        raise ValueError(f"{path}: written by a run with fewer processes (no RNG state for rank {rank}); "
                         f"resume with the same number of processes")
    if not any(k.startswith("rng.cuda.") for k in tensors):
        return tensors[f"rng.cpu.{rank}"], None
    if not torch.cuda.is_available():
        raise ValueError(f"{path}: written by a run with CUDA, but this process has none, so its CUDA RNG "
                         f"state (dropout on the GPU) cannot be restored; resume on a machine with CUDA")
    if f"rng.cuda.{rank}" not in tensors:
        raise ValueError(f"{path}: no CUDA RNG state for rank {rank}; resume with the same number of "
                         f"processes as the run that wrote it")
    return tensors[f"rng.cpu.{rank}"], tensors[f"rng.cuda.{rank}"]


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    """(tensors for safetensors, JSON-ready param_groups) from optimizer.state_dict()."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
    return tensors, [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]


def _optimizer_state(tensors: dict, groups: list, optimizer: torch.optim.Optimizer) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    current = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in current] != [len(g["params"]) for g in groups]:
        raise ValueError("the checkpoint's optimizer has different parameter groups than this run's (was "
                         "loraplus_lr_ratio or weight decay changed?); resume with the same TrainConfig")
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in groups]
    return {"state": state, "param_groups": groups}
