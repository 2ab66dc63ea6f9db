"""A NumPy-only LoRA reference: layers with hand-written backward passes, a tiny MLP, Adam, the spiral experiment.

    y = x·Wᵀ + b + (α/r)·(x·Aᵀ)·Bᵀ        A: (r, in)   B: (out, r)   W, b frozen

This package imports numpy only (matplotlib lazily, for the figure; threadpoolctl if present, to keep BLAS on
one thread for these small matrices) and never torch: it is what the PyTorch layers are checked against, and
what a learner can read line by line.

    lora.py      linear and LoRA layers: forward -> (out, cache), backward(dout, cache) -> grads
    mlp.py       a ReLU MLP, plain or LoRA-wrapped; softmax cross-entropy
    optim.py     Adam and SGD over dicts of arrays
    spirals.py   the spiral data set and the pretrain / rotate / adapt experiment
    plot.py      the decision-boundary figure
    energy.py    cumulative singular-value energy of a low-rank-plus-noise matrix
"""

from .energy import cumulative_energy, energy_table, low_rank_plus_noise
from .lora import init_lora, linear_backward, linear_forward, lora_backward, lora_forward, lora_scaling
from .mlp import count_params, cross_entropy, init_mlp, init_mlp_lora, mlp_backward, mlp_forward, predict
from .optim import SGD, Adam
from .spirals import SpiralsConfig, SpiralsResult, make_spirals, rotate, run_spirals

__all__ = [
    "linear_forward", "linear_backward", "lora_forward", "lora_backward", "init_lora", "lora_scaling",
    "init_mlp", "init_mlp_lora", "mlp_forward", "mlp_backward", "cross_entropy", "predict", "count_params",
    "Adam", "SGD", "make_spirals", "rotate", "SpiralsConfig", "SpiralsResult", "run_spirals",
    "low_rank_plus_noise", "cumulative_energy", "energy_table",
]
