"""The training loop: AdamW over the trainable parameters (adapters, modules_to_save), nothing else.

One optimizer step, top to bottom:

    lr      warmup (linear from 0 over warmup_ratio · steps) then cosine / linear decay to 0
    data    the step's global batch: batch_size × grad_accum × world_size examples of a seeded
            per-epoch permutation
    loss    Σ cross-entropy over the batch's targets / (number of targets in the global batch), so gradient
            accumulation and data parallelism give the gradient of the one big batch
    step    clip the global gradient norm, AdamW (decoupled weight decay on matrices only)
    save    every save_every steps: a checkpoint to resume from exactly (see checkpoint.py)

LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B learns `loraplus_lr_ratio` times faster than A (B starts at
zero and its useful learning rate is larger).  Losses are computed here, not by the model, so any nn.Module
whose forward takes the batch's inputs and returns logits trains the same way: classify: logits (B, C) vs
labels (B,); causal-lm: logits (B, T, V) vs labels (B, T) shifted by one — for a transformers causal LM whose
logits are lm_head(hidden), from the last hidden state in chunks over the target tokens instead (batch_loss.py,
loss.py: the (B, T, V) logits and their gradient never exist, prompt and padding tokens are never projected).
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import distributed as dd
from .batch_loss import batch_loss_sum, logits_loss_sum, model_logits, target_count
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, trainable_parameters
from .dataset import TASKS, TokenizedData
from .fused import fused_swiglu

__all__ = ["TrainConfig", "train", "evaluate", "lr_at", "History", "seed_everything", "make_optimizer",
           "enable_gradient_checkpointing", "SCHEDULES"]

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class TrainConfig:
    task: str = "classify"               # "classify" (logits (B, C)) or "causal-lm" (logits (B, T, V))
    epochs: int = 3
    max_steps: int | None = None         # stop after this many optimizer steps (default: all epochs)
    batch_size: int = 16                 # examples per micro-batch, per process
    grad_accum: int = 1                  # micro-batches per optimizer step
    lr: float = 2e-4
    weight_decay: float = 0.01           # AdamW, on matrices (not biases / norms)
    warmup_ratio: float = 0.06           # share of the steps spent warming up
    schedule: str = "cosine"             # after warmup: "cosine" | "linear" decay to 0, or "constant"
    max_grad_norm: float | None = 1.0    # clip the global gradient norm (None: no clipping)
    loraplus_lr_ratio: float = 1.0       # lr of lora_B = ratio × lr (LoRA+; 1.0 = plain LoRA)
    bf16: bool = False                   # autocast matmuls to bfloat16 (adapters stay float32)
    gradient_checkpointing: bool = False  # recompute activations in backward (transformers models)
    seed: int = 0
    eval_every: int | None = None        # evaluate on eval_data every N steps (and at the end)
    save_every: int | None = None        # checkpoint every N steps (needs out_dir)
    out_dir: str | None = None           # checkpoints go to out_dir/checkpoints
    resume: bool = False                 # continue from the newest checkpoint in out_dir
    keep_checkpoints: int = 2
    progress: bool = True                # a tqdm bar (rank 0 only)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is not supported; choose one of {TASKS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not supported; choose one of {SCHEDULES}")
        for name in ("epochs", "batch_size", "grad_accum", "keep_checkpoints"):
            _check_int(name, getattr(self, name), "e.g. 1")
        for name in ("max_steps", "eval_every", "save_every"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), "or None")
        for name, hint in (("lr", "e.g. 2e-4"), ("loraplus_lr_ratio", "1.0 turns LoRA+ off, 16 is typical")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number, got {value!r} ({hint})")
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) \
                or not 0 <= self.weight_decay < 1:
            raise ValueError(f"weight_decay must be in [0, 1), got {self.weight_decay!r} (default 0.01)")
        if isinstance(self.warmup_ratio, bool) or not isinstance(self.warmup_ratio, (int, float)) \
                or not 0 <= self.warmup_ratio <= 0.5:
            raise ValueError(f"warmup_ratio must be in [0, 0.5], got {self.warmup_ratio!r} (0.05-0.1 is usual)")
        if self.max_grad_norm is not None and (isinstance(self.max_grad_norm, bool) or
                                               not isinstance(self.max_grad_norm, (int, float)) or
                                               not self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive number or None, got {self.max_grad_norm!r}")
        if (self.save_every or self.resume) and not self.out_dir:
            raise ValueError("save_every / resume need out_dir: the directory that holds the checkpoints")


def _check_int(name: str, value, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r} ({hint})")


@dataclass
class History:
    """Per-step training records and evaluation results; `stopped_early` says training ended early."""
    steps: list = field(default_factory=list)     # {"step", "epoch", "loss", "lr", "grad_norm", ".._per_s"}
    evals: list = field(default_factory=list)     # {"step", "loss", "accuracy" | "perplexity"}
    resumed_from: int | None = None
    checkpoint: str | None = None                 # the newest checkpoint written
    total_steps: int = 0
    stopped_early: bool = False                   # on_eval asked to stop (early stopping)

    def to_dict(self) -> dict:
        return asdict(self)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Learning rate for 0-based optimizer step `step` of `total`: linear warmup, then decay."""
    warmup = round(config.warmup_ratio * total)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    progress = (step - warmup) / max(1, total - warmup)
    if config.schedule == "linear":
        return config.lr * (1.0 - progress)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _as_data(data) -> TokenizedData:
    if isinstance(data, TokenizedData):
        return data
    if not data:
        raise ValueError("the training data is empty; pass at least one example")
    return TokenizedData(list(data))


def make_optimizer(params: dict[str, nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW groups: matrices with weight decay, vectors (biases, norms) without; lora_B at ratio × lr."""
    groups: dict[tuple, list] = {}
    for name, p in params.items():
        ratio = config.loraplus_lr_ratio if name.endswith("lora_B") else 1.0
        decay = config.weight_decay if p.dim() >= 2 else 0.0
        groups.setdefault((ratio, decay), []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr_ratio": r, "weight_decay": wd, "lr": config.lr * r}
                              for (r, wd), ps in groups.items()], lr=config.lr)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sum_dtype(device: torch.device) -> torch.dtype:
    """float64 for the step's loss sum, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _plan(n: int, config: TrainConfig, world: int) -> tuple[int, int]:
    """(steps per epoch, total steps).  A final step with fewer examples than world × grad_accum
    micro-batches is dropped (it could not give every process a micro-batch)."""
    per_step = config.batch_size * config.grad_accum * world
    steps = n // per_step + (1 if n % per_step >= world * config.grad_accum else 0)
    if steps == 0:
        raise ValueError(f"{n} training examples cannot fill one step of {world} process(es) × "
                         f"{config.grad_accum} micro-batch(es); add data or lower grad_accum")
    total = steps * config.epochs
    return steps, min(total, config.max_steps) if config.max_steps else total


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a permutation of range(n) seeded by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def _micro_batches(data: TokenizedData, order: torch.Tensor, position: int, config: TrainConfig,
                   rank: int, world: int) -> tuple[list[dict], int]:
    """This process's micro-batches for step `position` of the epoch whose data order is `order`, and
    the examples in the global batch."""
    per_step = config.batch_size * config.grad_accum * world
    chunk = order[position * per_step:(position + 1) * per_step]
    parts = torch.tensor_split(chunk, world * config.grad_accum)
    mine = [parts[m * world + rank] for m in range(config.grad_accum)]
    return [data.collate(p.tolist()) for p in mine], len(chunk)


def train(model: nn.Module, train_data, eval_data=None, config: TrainConfig | None = None, *,
          on_step=None, on_eval=None) -> History:
    """Train the parameters of `model` that require grad (call add_lora first) and return the History.

    train_data / eval_data: a TokenizedData (see dataset.tokenize) or a list of example dicts.
    Hooks (e.g. run_log.RunRecorder): on_step(record, history) after each step; on_eval(record, model,
    history) after each evaluation, returning True to stop training there (history.stopped_early).
    Runs data-parallel when started by torchrun (see distributed.py); only rank 0 writes files.
    Raises RuntimeError if the loss becomes NaN/Inf (the update is not applied; earlier checkpoints stay).
    Llama-style MLPs keep less for backward while it runs (fused.py; not under gradient checkpointing)."""
    config = config or TrainConfig()
    with fused_swiglu(model, enabled=not config.gradient_checkpointing):
        return _train(model, train_data, eval_data, config, on_step, on_eval)


def _train(model, train_data, eval_data, config: TrainConfig, on_step, on_eval) -> History:
    data, evals = _as_data(train_data), (_as_data(eval_data) if eval_data is not None else None)
    dd.setup()
    rank, world = dd.rank(), dd.world_size()
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters; call add_lora(model, config) first "
                         "(or mark modules_to_save)")
    seed_everything(config.seed + rank)  # dropout differs per rank; the data order comes from config.seed
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if dd.is_sharded(model) and (config.save_every or config.resume):
        raise ValueError("checkpoints of an FSDP-sharded model are not supported: train the adapters with DDP "
                         "(they are small), or set save_every=None and gather the adapters with full_tensor()")
    steps_per_epoch, total = _plan(len(data), config, world)
    optimizer = make_optimizer(params, config)
    history, start = History(total_steps=total), 0
    ckpt_root = Path(config.out_dir) / "checkpoints" if config.out_dir else None
    if config.resume and (found := latest_checkpoint(ckpt_root)) is not None:
        meta = load_checkpoint(found, model, optimizer, rank)
        start, history = meta["step"], History(**meta["history"])
        history.resumed_from, history.total_steps = start, total
    runner = dd.wrap(model)
    device = _device(model)
    bar = _progress(config, total, start)
    model.train()
    order, order_epoch = None, None
    for step in range(start, start if history.stopped_early else total):  # a resumed run that had stopped
        # data order: one seeded permutation per epoch, drawn when the epoch starts (or training resumes)
        epoch, position = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = _epoch_order(len(data), config.seed, epoch), epoch

        # learning rate for this step
        lr = lr_at(step, total, config)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_ratio"]

        # forward / backward over this process's micro-batches; the loss is normalised by the
        # number of targets in the whole global batch so every process and micro-batch weighs the same.
        # Both sums live on the training device (nccl reduces device tensors only) and reach the host once.
        started = time.perf_counter()
        batches, n_examples = _micro_batches(data, order, position, config, rank, world)
        targets = sum(target_count(b["labels"], config.task) for b in batches)
        tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                     for b in batches if "input_ids" in b)
        count, tokens = dd.all_reduce_sum(torch.tensor([float(targets), float(tokens)], device=device)).unbind()
        loss_total = torch.zeros((), dtype=_sum_dtype(device), device=device)
        for i, batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            sync = nullcontext() if i == len(batches) - 1 or runner is model else runner.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    loss = batch_loss_sum(runner, batch, labels, config.task)
                (loss * world / count.clamp(min=1)).backward()  # DDP averages over ranks: undo its 1/world
            loss_total += loss.detach().to(loss_total.dtype)
            # Drop the graph now: its many small nodes, kept alive through the next forward, sit among the
            # freed activations and split them, so that forward takes ~270 MB more (bench/bench_train.py).
            del loss
        loss_value = float(dd.all_reduce_sum(loss_total) / count.clamp(min=1))

        # clip, check, step
        grad_norm = _clip(params.values(), config.max_grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            _close(bar)
            raise RuntimeError(_nan_message(loss_value, grad_norm, step, lr, history))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # log, evaluate, checkpoint
        seconds = time.perf_counter() - started
        record = {"step": step + 1, "epoch": epoch, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                  "examples_per_s": n_examples / seconds, "tokens_per_s": float(tokens) / seconds or None}
        history.steps.append(record)
        if on_step is not None:
            on_step(record, history)
        if bar is not None:
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", ex_s=f"{n_examples / seconds:.0f}")
            bar.update(1)
        last = step + 1 == total
        if evals is not None and ((config.eval_every and (step + 1) % config.eval_every == 0) or last):
            history.stopped_early = _evaluate(model, evals, config, step + 1, history, on_eval) and not last
            model.train()
        if ckpt_root is not None and config.save_every and ((step + 1) % config.save_every == 0 or last
                                                            or history.stopped_early):
            _checkpoint(ckpt_root, model, optimizer, step + 1, config, history)
        if history.stopped_early:
            break
    _close(bar)
    if evals is not None and not history.stopped_early and \
            (not history.evals or history.evals[-1]["step"] != total):  # resumed after the end
        _evaluate(model, evals, config, total, history, on_eval)
    model.eval()
    return history


def _evaluate(model, evals, config: TrainConfig, step: int, history: History, on_eval) -> bool:
    """Evaluate at `step` into history.evals; whether on_eval asks to stop."""
    history.evals.append({"step": step, **evaluate(model, evals, config)})
    return bool(on_eval(history.evals[-1], model, history)) if on_eval is not None else False


def _clip(params, max_norm: float | None) -> float:
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm is None:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))


def _checkpoint(root: Path, model, optimizer, step: int, config: TrainConfig, history: History) -> None:
    rng = dd.gather_rng_states()  # collectives: every rank takes part, rank 0 writes
    cuda_rng = dd.gather_cuda_rng_states()
    if dd.is_main():
        history.checkpoint = str(root / f"step-{step:06d}")
        state = {"step": step, "config": asdict(config), "history": history.to_dict(), "world_size": len(rng)}
        save_checkpoint(root, model, optimizer, state, rng, keep=config.keep_checkpoints, cuda_rng_states=cuda_rng)
    dd.barrier()


def _nan_message(loss: float, grad_norm: float, step: int, lr: float, history: History) -> str:
    what = f"loss became {loss}" if not math.isfinite(loss) else f"the gradient norm became {grad_norm}"
    kept = (f"The last good checkpoint is {history.checkpoint}; resume from it with resume=True (--resume)"
            if history.checkpoint else "No checkpoint was written yet (set save_every to keep one)")
    return (f"{what} at step {step + 1} (lr {lr:.3g}); training stopped before applying that update. {kept}. "
            f"Fixes: lower lr, keep max_grad_norm set, turn bf16 off, or check the data for empty or "
            f"extreme examples.")


@torch.no_grad()
def evaluate(model: nn.Module, data, config: TrainConfig | None = None, batch_size: int | None = None) -> dict:
    """{"loss": mean cross-entropy per target, "accuracy": (classify) share of argmax == label,
    "perplexity": (causal-lm) exp(loss)}."""
    config = config or TrainConfig()
    data = _as_data(data)
    was_training = model.training
    model.eval()
    device, size = _device(model), batch_size or max(config.batch_size, 32)
    loss, count, correct = 0.0, 0, 0
    for start in range(0, len(data), size):
        batch = {k: v.to(device) for k, v in data.collate(range(start, min(start + size, len(data)))).items()}
        labels = batch.pop("labels")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            if config.task == "classify":
                logits = model_logits(model, batch)
                loss += float(logits_loss_sum(logits, labels, config.task))
                correct += int((logits.argmax(-1) == labels).sum())
            else:
                loss += float(batch_loss_sum(model, batch, labels, config.task))
        count += target_count(labels, config.task)
    model.train(was_training)
    out = {"loss": loss / max(count, 1)}
    if config.task == "classify":
        out["accuracy"] = correct / max(count, 1)
    else:
        out["perplexity"] = math.exp(min(out["loss"], 700.0))  # exp(mean cross-entropy per target token)
    return out


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' gradient checkpointing, non-reentrant: the recomputed blocks still send gradients to
    the adapters inside them even though the blocks' inputs (frozen embeddings) need no gradient."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):          # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"gradient_checkpointing=True needs a transformers model (gradient_checkpointing_"
                         f"enable); {type(model).__name__} has none. Wrap its blocks in "
                         f"torch.utils.checkpoint.checkpoint(..., use_reentrant=False) yourself instead")


def _progress(config: TrainConfig, total: int, start: int):
    if not config.progress or not dd.is_main():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional (the [hf] extra): train without a bar
        return None
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _close(bar) -> None:
    if bar is not None:
        bar.close()
