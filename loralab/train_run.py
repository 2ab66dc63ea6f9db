"""The run a TrainJob describes (`loralab train`), end to end.

A frozen sentence encoder barely distinguishes "from Oslo to Cairo" from "from Cairo to Oslo", so on the bundled
job a classifier head on top of it stays near 60%; LoRA changes what the encoder computes and gets about 95%.

The run: load -> add_lora -> report -> evaluate -> train (evaluating every --eval-every steps, keeping the best)
-> evaluate -> (classify) the same training with only the classifier head -> save the adapter (PEFT format,
with its tokenizer and labels) -> check merged == unmerged -> run.json.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from . import distributed as dd
from .atomic import atomic_write_text
from .checkpoint import latest_checkpoint
from .run_log import (BEST_DIR, CURVES_NAME, LOG_NAME, RunRecorder, best_so_far, plot_curves, prepare_out,
                      read_log, remove_run, restore_best)
from .analysis import delta_fro_norm
from .base import module_dims
from .guidance import check_hyperparameters, compare_to_head_only
from .dataset import check_records, label_names, read_records, split_records, tokenize
from .trained_adapter import save_trained_adapter
from .hf import HEAD_NAMES, TASK_TYPES, load_local_model
from .inject import add_lora, lora_layers, trainable_report
from .merging import merge, merge_and_unload, unmerge
from .trainer import evaluate, seed_everything, train
from .train_job import TrainJob, bundled_model_dir, job_record, lora_config, train_config

__all__ = ["run_train_job", "factor_stats", "merge_difference"]


def factor_stats(model: nn.Module, adapter_name: str = "default") -> dict:
    """Summary of the adapter factors: mean std of A and B, max |B|, mean ‖ΔW‖_F / ‖W0‖_F over layers."""
    a_std, b_std, b_max, ratio = [], [], 0.0, []
    with torch.no_grad():
        for layer in lora_layers(model).values():
            adapter = layer.adapters[adapter_name]
            a_std.append(float(adapter.lora_A.float().std()))
            b_std.append(float(adapter.lora_B.float().std()))
            b_max = max(b_max, float(adapter.lora_B.abs().max()))
            delta = delta_fro_norm(adapter.lora_A, adapter.lora_B, adapter.scaling)   # from r x r Grams
            ratio.append(delta / float(layer.dense_weight().float().norm()))
    n = max(len(a_std), 1)
    return {"layers": len(a_std), "A_std": sum(a_std) / n, "B_std": sum(b_std) / n, "B_max_abs": b_max,
            "delta_over_W0": sum(ratio) / n}


def _stats_line(label: str, s: dict) -> str:
    return (f"  {label:<18} A std {s['A_std']:.4f}   B std {s['B_std']:.5f}   max|B| {s['B_max_abs']:.5f}   "
            f"mean ‖ΔW‖/‖W0‖ {s['delta_over_W0']:.5f}")


def _head_names(model: nn.Module) -> list[str]:
    names = [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
    if not names:
        raise ValueError(f"cannot find the classification head of {type(model).__name__} (looked for "
                         f"{HEAD_NAMES}); use a *ForSequenceClassification model")
    return names


def _load_data(job: TrainJob, say) -> tuple[list, list, str]:
    """(train records, held-out records, where the held-out records come from)."""
    train_records = read_records(job.data)
    check_records(train_records, job.task, str(job.data))
    if job.eval_data:
        return train_records, read_records(job.eval_data), str(job.eval_data)
    train_records, held = split_records(train_records, 0.1, job.seed)
    say(f"no --eval-data: holding out {len(held)} of {len(train_records) + len(held)} examples "
        f"(seeded 10% split) for evaluation")
    return train_records, held, f"10% of {job.data}"


def _head_only(model_dir: Path, job: TrainJob, labels, train_data, eval_data) -> dict:
    """The same training with the LoRA layers left out: only the classifier head learns."""
    seed_everything(job.seed)  # the same head initialisation as the LoRA run
    model = load_local_model(model_dir, "classify", labels)
    heads = _head_names(model)
    for name, p in model.named_parameters():
        p.requires_grad = name.split(".")[0] in heads
    config = replace(train_config(job), lr=job.head_only_lr, out_dir=None, save_every=None, resume=False,
                     eval_every=None)
    history = train(model, train_data, eval_data, config)
    return {"accuracy": history.evals[-1]["accuracy"], "loss": history.evals[-1]["loss"],
            "trainable_params": trainable_report(model).trainable, "lr": job.head_only_lr}


@torch.no_grad()
def merge_difference(model: nn.Module, data, n: int = 64) -> float:
    """max |logits(unmerged) - logits(merged)| on the first n examples of `data` (a TokenizedData), the batch
    on the model's device; the model is left unmerged, in eval mode.  A quantized (QLoRA) base is never merged
    into: a copy is merged into its dequantized weights instead (merge_and_unload(dequantize=True))."""
    model.eval()
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in data.collate(range(min(n, len(data)))).items()}
    batch.pop("labels")
    before = model(**batch).logits
    if any(getattr(getattr(layer, "base", None), "quant_type", None) for layer in lora_layers(model).values()):
        dense = merge_and_unload(copy.deepcopy(model), dequantize=True)
        return float((before - dense(**batch).logits).abs().max())
    merge(model)
    try:
        after = model(**batch).logits
    finally:
        unmerge(model)
    return float((before - after).abs().max())


def run_train_job(job: TrainJob, say=print) -> dict:
    """Run `loralab train`: load, add LoRA, evaluate, train, evaluate, (classify) the head-only comparison,
    save the adapter, check merged == unmerged, write run.json.  Returns the JSON results."""
    t0 = time.perf_counter()
    task, out = job.task, job.out
    model_dir = job.model or bundled_model_dir()
    dd.setup()  # under torchrun every process runs the job; only rank 0 writes files
    main = dd.is_main()
    replaced = prepare_out(out, job.resume, job.overwrite, remove=False)  # an earlier run is refused first
    say(f"model: {model_dir}\ndata:  {job.data} (task {task})")
    train_records, eval_records, eval_source = _load_data(job, say)
    seed_everything(job.seed)
    labels = label_names(train_records) if task == "classify" else None
    model, tokenizer = load_local_model(model_dir, task, labels, tokenizer=True)
    max_len = min(job.max_length, getattr(model.config, "max_position_embeddings", None) or 10 ** 9)
    train_data = tokenize(train_records, tokenizer, task, labels=labels, max_length=max_len, source=str(job.data))
    eval_data = tokenize(eval_records, tokenizer, task, labels=labels, max_length=max_len, source=eval_source)
    say(f"examples: {len(train_data)} train, {len(eval_data)} held out"
        + (f"; {len(labels)} classes: {', '.join(labels)}" if labels else ""))

    heads = _head_names(model) if task == "classify" else None
    add_lora(model, lora_config(job, heads), quantize=job.quantize)
    report = trainable_report(model)
    targets = job.target_modules if isinstance(job.target_modules, str) else ",".join(job.target_modules)
    say(f"\nLoRA r={job.r} alpha={job.lora_alpha} on {len(lora_layers(model))} layers ({targets})"
        + (f" over a {job.quantize.upper()} base" if job.quantize else "")
        + (f"; trained in full: {', '.join(heads)}" if heads else ""))
    say(str(report))
    advice = check_hyperparameters(r=job.r, lora_alpha=job.lora_alpha, lr=job.lr, epochs=job.epochs,
                                   warmup_ratio=job.warmup_ratio, lora_dropout=job.lora_dropout,
                                   n_examples=len(train_data), model_params=report.total,
                                   module_dims={p: module_dims(m) for p, m in lora_layers(model).items()})
    for a in advice:  # once per setting, with the fix (guidance.py)
        say(f"warning: {a}")
    tconfig = train_config(job)
    stats_before = factor_stats(model)
    before = evaluate(model, eval_data, tconfig)
    say(f"\nadapter factors ({stats_before['layers']} layers; B starts at exactly zero, so ΔW = 0)")
    say(_stats_line("before training", stats_before))
    say(f"\nheld-out before training: {_metric_text(before)}")
    _say_resume(out / "checkpoints", job.resume, say)
    if replaced:  # only now that data and model are loaded: a failing --overwrite run leaves the earlier one
        if main:
            remove_run(out, replaced)
        dd.barrier()
        say(f"--overwrite: removed the earlier run in {out} ({', '.join(replaced)})")
    recorder = RunRecorder(out, job.best_metric, job.early_stopping_patience, keep_best=job.final == "best")
    history = train(model, train_data, eval_data, tconfig, on_step=recorder.on_step, on_eval=recorder.on_eval)
    best, final, restored = _final_adapter(job, model, history, out, say)
    after = evaluate(model, eval_data, tconfig) if restored else history.evals[-1]  # the adapter written
    stats_after = factor_stats(model)
    say("\nadapter factors")
    say(_stats_line("after training", stats_after))
    say(f"held-out after training:  {_metric_text(after)}")

    head_only = None
    if task == "classify" and not job.skip_head_only:
        say(f"\nthe same training with only the classifier head (lr {job.head_only_lr:g}), for comparison:")
        head_only = _head_only(model_dir, job, labels, train_data, eval_data)
        say(f"held-out, head only:      accuracy {head_only['accuracy']:.3f} "
            f"({head_only['trainable_params']:,} trainable params)")
        if (worse := compare_to_head_only(after["accuracy"], head_only["accuracy"])) is not None:
            advice.append(worse)
            say(f"warning: {worse}")

    adapter_dir = out / "adapter"
    final_step = best.step if final == "best" else history.evals[-1]["step"]
    note = None
    if main:
        save_trained_adapter(model, adapter_dir, task=task, tokenizer=tokenizer, labels=labels,
                             base_model=str(model_dir), modules_to_save=heads, task_type=TASK_TYPES[task],
                             extra={"max_length": max_len, "step": final_step, "final": final,
                                    "metric_for_best": job.best_metric, "best_metric": best.value})
        note = plot_curves(read_log(out / LOG_NAME), out / CURVES_NAME, job.best_metric)
    merge_diff = merge_difference(model, eval_data)
    say(f"\nmerged vs unmerged model, max |logit difference| on held-out examples: {merge_diff:.2e}")
    result = {
        "task": task, "model": str(model_dir), "data": str(job.data), "labels": list(labels or []),
        "train_examples": len(train_data), "eval_examples": len(eval_data),
        "trainable_params": report.trainable, "total_params": report.total,
        "loss_before": before["loss"], "loss_after": after["loss"],
        "accuracy_before": before.get("accuracy"), "accuracy_after": after.get("accuracy"),
        "accuracy_head_only": head_only["accuracy"] if head_only else None,
        "factors_before": stats_before, "factors_after": stats_after, "merge_max_abs_diff": merge_diff,
        "steps": history.total_steps, "resumed_from": history.resumed_from,
        "adapter_dir": str(adapter_dir), "run_file": str(out / "run.json"),
        "checkpoint": history.checkpoint, "eval_every": job.eval_every, "metric_for_best": job.best_metric,
        "best_step": best.step, "best_metric": best.value, "final": final, "final_step": final_step,
        "stopped_early": history.stopped_early, "evaluations": len(history.evals),
        "log_file": str(out / LOG_NAME), "curves_file": None if note else str(out / CURVES_NAME),
        "advice": [{"rule": a.rule, "message": a.message, "fix": a.fix} for a in advice],
        "seconds": time.perf_counter() - t0,
    }
    text = json.dumps({**result, "job": job_record(job), "history": history.to_dict()}, indent=1) + "\n"
    if main:
        atomic_write_text(out / "run.json", text)
    say(f"\nwrote\n  adapter (PEFT format)   {adapter_dir}/  (+ tokenizer, labels in {adapter_dir.name}/loralab.json)"
        f"\n  results and history     {out / 'run.json'}\n  per-step log            {out / LOG_NAME}"
        + (f"\n  curves                  {out / CURVES_NAME}" if not note else f"\n  {note}")
        + (f"\n  last checkpoint         {history.checkpoint}/" if history.checkpoint else ""))
    say(f"done in {result['seconds']:.0f} s")
    return result


def _say_resume(root: Path, resume: bool, say) -> None:
    if resume:
        found = latest_checkpoint(root) if root.is_dir() else None
        say(f"resuming from {found}" if found else f"--resume: no checkpoint under {root}; starting from the "
                                                   f"beginning")


def _final_adapter(job: TrainJob, model: nn.Module, history, out: Path, say):
    """(the best evaluation, "best" | "last", restored?): with --final best, the model gets the kept best
    state back when the best evaluation was not the last one."""
    best = best_so_far(history.evals, job.best_metric, job.early_stopping_patience)
    last = history.evals[-1]["step"]
    if history.stopped_early:
        say(f"\nstopped early at step {last} of {history.total_steps}: no better held-out {job.best_metric} in "
            f"{job.early_stopping_patience} evaluations")
    if best.step is None:
        say(f"no evaluation gave a finite {job.best_metric}: the adapter written is the last one")
        return best, "last", False
    n = len(history.evals)
    say(("" if history.stopped_early else "\n") + f"best held-out {job.best_metric} {best.value:.4f} at step "
        f"{best.step} ({n} evaluation{'s' * (n != 1)})")
    if job.final == "best" and best.step != last:
        dd.barrier()  # rank 0 wrote the best state
        kept = json.loads((out / BEST_DIR / "best.json").read_text()) if (out / BEST_DIR / "best.json").is_file() \
            else {"step": None}
        if kept["step"] != best.step:  # e.g. a resumed run on a GPU that did not repeat the killed run's steps
            say(f"{out / BEST_DIR} holds step {kept['step']}, not the best step {best.step}: the adapter written "
                f"is the last one, step {last}")
            return best, "last", False
        restore_best(out / BEST_DIR, model)
        say(f"the adapter written is the best one, step {best.step} (--final last would write step {last})")
        return best, "best", True
    say(f"the adapter written is the {job.final} one, step {best.step if job.final == 'best' else last}")
    return best, job.final, False


def _metric_text(m: dict) -> str:
    acc = f"accuracy {m['accuracy']:.3f}, " if "accuracy" in m else ""
    return f"{acc}loss {m['loss']:.4f}"


