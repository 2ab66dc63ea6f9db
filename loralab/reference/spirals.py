"""The spiral experiment: pretrain an MLP, rotate the task, adapt with LoRA (base frozen) vs full fine-tuning.

Data (the classic three-arm spiral): for class j and t = 0..1 evenly spaced,

    radius = t,   angle = 4·(j + t) + ε,  ε ~ N(0, noise²),   x = radius·(sin angle, cos angle)

and the shifted task is the same points rotated by θ:  x' = R(θ)·x,  R(θ) = [[cos θ, −sin θ], [sin θ, cos θ]].

Why LoRA can solve it exactly: the base's first layer sees W1·x; on the rotated task W1·R(θ)ᵀ·x' = W1·x, so
ΔW1 = W1·(R(θ)ᵀ − I) restores every output.  ΔW1 is (64, 2), so its rank is at most 2 and a rank-r ≥ 2 adapter on
the first layer can represent it.  Full fine-tuning can too, but it overwrites the base (and forgets the original
task); the LoRA base is bit-for-bit unchanged, so dropping the adapter gives the original model back.

What trains:  pretraining and full fine-tuning update every Wᵢ and bᵢ (4,547 numbers for 2-64-64-3);
LoRA updates only Aᵢ (r, in) and Bᵢ (out, r) of the adapted layers (default: all), r·(in + out) each — biases
stay frozen (1,044 numbers at r = 4 on all three layers; 132 for r = 2 on the first layer alone).  All training is full-batch, so a seed fixes every number.

Accuracies are measured on a held-out draw of the same distribution (a separate noise sample); losses are
training cross-entropies.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .lora import lora_scaling
from .mlp import Params, count_params, cross_entropy, init_mlp, init_mlp_lora, mlp_backward, mlp_forward, predict
from .optim import SGD, Adam

__all__ = ["make_spirals", "rotate", "SpiralsConfig", "SpiralsResult", "run_spirals"]


def rotate(x: np.ndarray, angle: float) -> np.ndarray:
    """Points x (N, 2) rotated counter-clockwise by `angle` radians about the origin."""
    c, s = np.cos(angle), np.sin(angle)
    return x @ np.array([[c, -s], [s, c]]).T


def make_spirals(n_per_class: int, noise: float, rng: np.random.Generator, rotation: float = 0.0,
                 n_classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """x (n_classes·n_per_class, 2) float64, y (n_classes·n_per_class,) int in [0, n_classes)."""
    if n_per_class <= 0 or n_classes <= 0:
        raise ValueError(f"n_per_class={n_per_class}, n_classes={n_classes}: both must be positive")
    if not noise >= 0:
        raise ValueError(f"noise={noise}: the angle noise must be >= 0")
    t = np.linspace(0.0, 1.0, n_per_class)
    xs, ys = [], []
    for j in range(n_classes):
        angle = 4.0 * (j + t) + noise * rng.standard_normal(n_per_class)
        xs.append(np.stack([t * np.sin(angle), t * np.cos(angle)], axis=1))
        ys.append(np.full(n_per_class, j))
    return rotate(np.concatenate(xs), rotation), np.concatenate(ys)


@dataclass(frozen=True)
class SpiralsConfig:
    seed: int = 0
    n_per_class: int = 200            # training points per class; the held-out set is another draw of this size
    noise: float = 0.2                # std of the angle noise, radians
    rotation: float = 1.2             # the shifted task: inputs rotated by this many radians
    hidden: tuple[int, ...] = (64, 64)
    r: int = 4                        # LoRA rank
    lora_alpha: float = 8.0           # scaling = lora_alpha / r
    lora_layers: tuple[int, ...] | None = None  # layer numbers to adapt (1 = first); None = every layer
    optimizer: str = "adam"           # "adam", or "sgd" (plain gradient descent, as in the original write-up)
    lr: float = 1e-2                  # for pretraining, LoRA and full fine-tuning alike
    pretrain_steps: int = 1000
    adapt_steps: int = 500            # for LoRA and for full fine-tuning alike

    def __post_init__(self):
        for name in ("n_per_class", "r", "pretrain_steps", "adapt_steps"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if not self.hidden or any(int(h) <= 0 for h in self.hidden):
            raise ValueError(f"hidden={self.hidden}: give at least one positive layer width, e.g. (64, 64)")
        for name in ("noise", "rotation", "lora_alpha", "lr"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)}: must be a finite number")
        if self.noise < 0:
            raise ValueError(f"noise={self.noise}: the angle noise must be >= 0")
        if self.lora_alpha <= 0 or self.lr <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha}, lr={self.lr}: both must be positive")
        n_layers = len(self.hidden) + 1
        if self.lora_layers is not None and (not self.lora_layers
                                             or any(not 1 <= i <= n_layers for i in self.lora_layers)):
            raise ValueError(f"lora_layers={self.lora_layers}: give layer numbers in 1..{n_layers}, or None for all")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer={self.optimizer!r}: choose 'adam' or 'sgd'")


@dataclass
class SpiralsResult:
    base_params: int                  # every W and b of the MLP
    lora_params: int                  # every A and B (biases frozen)
    full_ft_params: int               # what full fine-tuning trains: the whole model
    base_loss: float                  # training cross-entropy after pretraining
    base_acc_original: float          # held-out accuracies, fractions in [0, 1]
    base_acc_rotated: float
    lora_acc_rotated: float
    full_ft_acc_rotated: float
    full_ft_acc_original: float       # what full fine-tuning forgot
    lora_loss: float
    full_ft_loss: float
    base_unchanged: bool              # the frozen base is bit-for-bit what pretraining produced
    target_met: bool                  # base_acc_original >= 95% and lora_acc_rotated within 5 points of it
    seconds: float
    plot: str | None = None
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def run_spirals(config: SpiralsConfig = SpiralsConfig(), out_dir: str | Path | None = None, say=print) -> SpiralsResult:
    """Run the experiment; with `out_dir`, also write decision boundaries to out_dir/spirals.png (when matplotlib
    is installed; without it the result has plot=None and `say` tells how to install it)."""
    start = time.perf_counter()
    data_rng, test_rng, init_rng, lora_rng = (np.random.default_rng(s)
                                              for s in np.random.SeedSequence(config.seed).spawn(4))
    x, y = make_spirals(config.n_per_class, config.noise, data_rng)                 # (N, 2), (N,)
    x_test, y_test = make_spirals(config.n_per_class, config.noise, test_rng)
    x_rot, x_rot_test = rotate(x, config.rotation), rotate(x_test, config.rotation)

    def accuracy(xs, params, lora=None, scaling=1.0) -> float:
        return float((predict(xs, params, lora, scaling) == y_test).mean())

    with _single_blas_thread():
        # 1. pretrain every W, b on the original spirals
        base = init_mlp((2, *config.hidden, 3), init_rng)
        base_loss = _train(base, None, 1.0, x, y, config.pretrain_steps, config)
        frozen = {k: v.copy() for k, v in base.items()}
        # 2. LoRA on the rotated spirals: only A, B train; base stays frozen
        lora = init_mlp_lora(base, config.r, lora_rng, layers=config.lora_layers)
        scaling = lora_scaling(config.r, config.lora_alpha)
        lora_loss = _train(base, lora, scaling, x_rot, y, config.adapt_steps, config)
        # 3. full fine-tuning on the rotated spirals, from the same pretrained weights
        full = {k: v.copy() for k, v in frozen.items()}
        full_ft_loss = _train(full, None, 1.0, x_rot, y, config.adapt_steps, config)

        base_acc_original, lora_acc_rotated = accuracy(x_test, base), accuracy(x_rot_test, base, lora, scaling)
        result = SpiralsResult(
            base_params=count_params(base), lora_params=count_params(lora), full_ft_params=count_params(full),
            base_loss=base_loss, base_acc_original=base_acc_original, base_acc_rotated=accuracy(x_rot_test, base),
            lora_acc_rotated=lora_acc_rotated, full_ft_acc_rotated=accuracy(x_rot_test, full),
            full_ft_acc_original=accuracy(x_test, full), lora_loss=lora_loss, full_ft_loss=full_ft_loss,
            base_unchanged=all(np.array_equal(base[k], frozen[k]) for k in base),
            target_met=base_acc_original >= 0.95 and base_acc_original - lora_acc_rotated <= 0.05,
            seconds=0.0, config=asdict(config))
        _report(result, say)
        if out_dir is not None:
            from .plot import PlotUnavailable, plot_spirals
            try:
                result.plot = str(plot_spirals(Path(out_dir) / "spirals.png", x_test, y_test, config.rotation, base,
                                               lora, scaling, full))
                say(f"decision boundaries: {result.plot}")
            except PlotUnavailable as e:  # the numbers above stand on their own
                say(f"no decision-boundary plot: {e}")
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def _report(res: SpiralsResult, say) -> None:
    cfg = res.config
    say(f"base MLP 2-{'-'.join(map(str, cfg['hidden']))}-3, {res.base_params:,} params: training loss "
        f"{res.base_loss:.3f}, held-out accuracy {res.base_acc_original:.1%} on the original spirals, "
        f"{res.base_acc_rotated:.1%} on spirals rotated by {cfg['rotation']} rad")
    layers = cfg["lora_layers"]
    where = "every layer" if layers is None else f"layer{'s' * (len(layers) > 1)} {','.join(map(str, layers))}"
    say(f"LoRA r={cfg['r']} on {where}, base frozen ({res.lora_params:,} trainable = "
        f"{res.lora_params / res.base_params:.1%} of the model): rotated {res.base_acc_rotated:.1%} -> "
        f"{res.lora_acc_rotated:.1%}  (target, a base >= 95% and LoRA within 5 points of it: "
        f"{'met' if res.target_met else 'NOT met'})")
    say(f"full fine-tuning ({res.full_ft_params:,} trainable): rotated {res.base_acc_rotated:.1%} -> "
        f"{res.full_ft_acc_rotated:.1%}; on the original task it now gets {res.full_ft_acc_original:.1%} "
        f"(LoRA's frozen base still gets {res.base_acc_original:.1%})")


def _train(params: Params, lora: Params | None, scaling: float, x: np.ndarray, y: np.ndarray, steps: int,
           config: SpiralsConfig) -> float:
    """Full-batch training of `lora` if given (params frozen), else of `params`; returns the final training loss."""
    trained = lora if lora is not None else params
    opt = Adam(trained, lr=config.lr) if config.optimizer == "adam" else SGD(trained, lr=config.lr)
    for _ in range(steps):
        logits, cache = mlp_forward(x, params, lora, scaling)
        _, dlogits = cross_entropy(logits, y)
        opt.step(mlp_backward(dlogits, cache))
    return cross_entropy(mlp_forward(x, params, lora, scaling)[0], y)[0]


def _single_blas_thread():
    """The matrices here are small (at most (40000, 64), for the figure): BLAS threads cost more than they
    save, and on a busy machine their spin-waiting makes a run tens of times slower.  threadpoolctl is optional."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
