"""One training batch's loss, as the trainer computes it: Σ cross-entropy over the batch's targets.

classify: logits (B, C) vs labels (B,); causal-lm: logits (B, T, V) vs labels (B, T) shifted by one, position t
predicting token t + 1, with IGNORE_INDEX on positions without a target.  For a transformers causal LM whose
logits are lm_head(hidden) the loss comes from the last hidden state in chunks over the target tokens instead
(loss.causal_lm_loss_sum): the same value and gradients, and the (B, T, V) logits never exist.  Sums, not
means: the trainer divides by the number of targets in the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dataset import IGNORE_INDEX
from .loss import causal_lm_loss_sum

__all__ = ["batch_loss_sum", "causal_lm_step_loss", "logits_loss_sum", "model_logits", "target_count"]


def model_logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The logits of model(**inputs): a tensor returned as is, else its .logits (or first element)."""
    out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out[0]


def logits_loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Σ cross-entropy over the targets (not the mean: the caller divides by the global count).
    logits: (B, C) with labels (B,) for classify; (B, T, V) with labels (B, T) for causal-lm."""
    if task == "causal-lm":  # position t predicts token t+1
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def batch_loss_sum(model: nn.Module, inputs: dict, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Σ cross-entropy over one batch's targets.  causal-lm: from the last hidden state in chunks, only on the
    target rows (loss.causal_lm_loss_sum: never the (B, T, V) logits nor their gradient) whenever the model's
    logits are exactly lm_head(hidden); otherwise, and for classify, from the model's logits."""
    if task == "causal-lm":
        found = causal_lm_loss_sum(model, inputs, labels)
        if found is not None:
            return found[0]
    return logits_loss_sum(model_logits(model, inputs), labels, task)


def causal_lm_step_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The mean next-token loss of a batch of token ids (every position a target), as one training step
    computes it: what `model(input_ids, labels=input_ids).loss` gives, the cheap way."""
    return batch_loss_sum(model, {"input_ids": input_ids}, input_ids, "causal-lm") / (input_ids[:, 1:].numel())


def target_count(labels: torch.Tensor, task: str) -> int:
    """The number of targets in labels (B, T) or (B,): positions that are not IGNORE_INDEX."""
    return int(((labels[:, 1:] if task == "causal-lm" else labels) != IGNORE_INDEX).sum())
