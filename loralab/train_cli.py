"""Arguments of `loralab train`, generated from the fields of TrainJob: one source for names, types, defaults
and help.

Field `lora_alpha` is the flag --lora-alpha and the --config key `lora_alpha` (or `lora-alpha`); its metadata
holds the help text and the parser (loralab.cli_args) that reads both the flag and the file's value; a bool
field is an on/off flag.  Precedence: command-line flag > --config file > the bundled recipe (only when
neither --model nor --data is given) > the field's default (TrainConfig's for the training loop).  A --config
file is JSON or TOML; an unknown key is an error listing the valid ones.
"""

from __future__ import annotations

import argparse
import difflib
import json
from dataclasses import MISSING, Field, fields
from pathlib import Path

from .train_job import BUNDLED_RECIPE, TrainJob, bundled_job, bundled_model_dir

__all__ = ["add_arguments", "resolve", "read_config", "run_from_args", "OPTIONS"]

OPTIONS: dict[str, Field] = {f.name: f for f in fields(TrainJob)}   # option name -> its TrainJob field


def _is_flag(f: Field) -> bool:
    return isinstance(f.default, bool)


def _help(f: Field) -> str:
    text = f.metadata["help"]
    if _is_flag(f) or f.default is MISSING or f.default is None:
        return text  # the text says what an absent value means
    default = f.default if isinstance(f.default, str) else f"{f.default:g}" if isinstance(f.default, float) \
        else str(f.default)
    return f"{text} (default {default})"


def add_arguments(p: argparse.ArgumentParser) -> None:
    recipe = ", ".join(f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
                       for k, v in BUNDLED_RECIPE.items())
    p.epilog = ("With neither --model nor --data: LoRA-fine-tune the bundled MiniLM-L6 on the bundled travel "
                "dataset, then train the classifier head alone for comparison (about a minute on 2 CPU cores). "
                f"The bundled job uses {recipe} unless given.")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="JSON or TOML file of option values (keys as below, e.g. lora_alpha); flags override it")
    for name, f in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if _is_flag(f):
            p.add_argument(flag, action="store_true", default=None, help=_help(f))
        else:
            choices = f.metadata["choices"]
            p.add_argument(flag, type=f.metadata["parse"], default=None, choices=choices, help=_help(f),
                           metavar=None if choices else name.split("_")[-1].upper())
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


def resolve(args: argparse.Namespace) -> TrainJob:
    """The job from flags, --config file, bundled recipe and defaults (see the module docstring)."""
    given = {name: value for name in OPTIONS if (value := getattr(args, name, None)) is not None}
    values = {**(read_config(args.config) if getattr(args, "config", None) else {}), **given}
    if "model" not in values and "data" not in values:
        return bundled_job(**values)
    if "data" not in values:
        raise ValueError("--model was given without --data: pass the training file (.jsonl or .csv)")
    values.setdefault("model", bundled_model_dir())
    return TrainJob(**values)


def read_config(path: Path) -> dict:
    """{option name: value} from a JSON or TOML file, each value read by its option's parser."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
    try:
        if kind == "TOML":
            import tomllib
            raw = tomllib.loads(path.read_text())
        else:
            raw = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"--config {path}: not valid {kind} ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path}: expected an object of option values, got {type(raw).__name__}")
    return {key.replace("-", "_"): _file_value(path, key, value) for key, value in raw.items()}


def _file_value(path: Path, key: str, value):
    f = OPTIONS.get(key.replace("-", "_"))
    if f is None:
        raise ValueError(f"--config {path}: unknown option {key!r}; valid options: {', '.join(OPTIONS)}")
    if _is_flag(f):
        if not isinstance(value, bool):
            raise ValueError(f"--config {path}: {key}: expected true or false, got {value!r}")
        return value
    try:
        parsed = f.metadata["parse"](value)
    except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
        raise ValueError(f"--config {path}: {key}: {e}") from None
    if f.metadata["choices"] and parsed not in f.metadata["choices"]:
        raise ValueError(f"--config {path}: {key}={value!r}; choose one of {f.metadata['choices']}")
    return parsed


def run_from_args(args: argparse.Namespace, say) -> dict:
    from .train_job import run_train_job
    return run_train_job(resolve(args), say)
