"""Arguments of `loralab train`, generated from the fields of TrainJob: one source for names, types, defaults
and help.

Field `lora_alpha` is the flag --lora-alpha and the --config key `lora_alpha` (or `lora-alpha`); its metadata
holds the help text and the parser (loralab.cli_args) that reads both the flag and the file's value; a bool
field is an on/off flag.  Precedence: command-line flag > --config file > the bundled recipe (only when
neither --model nor --data is given) > the field's default (TrainConfig's for the training loop).  A --config
file is YAML (.yaml / .yml), TOML (.toml) or JSON (anything else); an unknown key is an error listing the
valid ones, a malformed file an error naming its format and line.

Hugging Face Trainer's spellings are aliases, as flags and as keys: --learning-rate (--lr), --num-train-epochs
(--epochs), --per-device-train-batch-size (--batch-size), --gradient-accumulation-steps (--grad-accum),
--output-dir (--out), --lr-scheduler-type (--schedule); --warmup-ratio, --max-steps, --seed, --bf16 and
--gradient-checkpointing are spelled the same in both.
"""

from __future__ import annotations

import argparse
import difflib
import json
from dataclasses import MISSING, Field, fields
from pathlib import Path

from .train_job import BUNDLED_RECIPE, TrainJob, bundled_job, bundled_model_dir

__all__ = ["add_arguments", "resolve", "read_config", "config_format", "run_from_args", "OPTIONS", "ALIASES"]

OPTIONS: dict[str, Field] = {f.name: f for f in fields(TrainJob)}   # option name -> its TrainJob field
_METAVARS = {"target_list": "NAMES", "name_list": "NAMES", "index_list": "INDICES", "pattern_map": "NAME=N,..."}
ALIASES: dict[str, str] = {alias: f.name for f in OPTIONS.values() for alias in f.metadata["aliases"]}


def _is_flag(f: Field) -> bool:
    return f.metadata["parse"] is None


def _help(f: Field) -> str:
    text = f.metadata["help"]
    if _is_flag(f) or f.default is MISSING or f.default is None:
        return text  # the text says what an absent value means
    default = f.default if isinstance(f.default, str) else f"{f.default:g}" if isinstance(f.default, float) \
        else str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
    return f"{text} (default {default})"


def add_arguments(p: argparse.ArgumentParser) -> None:
    recipe = ", ".join(f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
                       for k, v in BUNDLED_RECIPE.items())
    p.epilog = ("With neither --model nor --data: LoRA-fine-tune the bundled MiniLM-L6 on the bundled travel "
                "dataset, then train the classifier head alone for comparison (about a minute on 2 CPU cores). "
                f"The bundled job uses {recipe} unless given.")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="YAML, TOML or JSON file of option values (keys as below, e.g. lora_alpha, or Hugging Face "
                        "Trainer's learning_rate, num_train_epochs, ...); flags override it")
    for name, f in OPTIONS.items():
        flags = ["--" + n.replace("_", "-") for n in (name, *f.metadata["aliases"])]
        if _is_flag(f):
            p.add_argument(*flags, dest=name, action="store_true", default=None, help=_help(f))
        else:
            choices = f.metadata["choices"]
            shown = "{" + ",".join(str(c).lower() if isinstance(c, bool) else c for c in choices) + "}" \
                if choices else _METAVARS.get(f.metadata["parse"].__name__, name.split("_")[-1].upper())
            p.add_argument(*flags, dest=name, type=f.metadata["parse"], default=None, choices=choices,
                           help=_help(f), metavar=shown)
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


def config_format(path: Path) -> str:
    """"YAML" (.yaml, .yml), "TOML" (.toml) or "JSON" (any other name)."""
    suffix = Path(path).suffix.lower()
    return "YAML" if suffix in (".yaml", ".yml") else "TOML" if suffix == ".toml" else "JSON"


def read_config(path: Path) -> dict:
    """{option name: value} from a YAML, TOML or JSON file (see config_format), each value read by its option's
    parser; keys may use - or _ and Hugging Face Trainer's names (ALIASES)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    raw = _parse_file(path, config_format(path))
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values (such as lr: 2e-4), "
                         f"got {type(raw).__name__}")
    values, given_as = {}, {}
    for key, value in raw.items():
        name = _option_name(path, key)
        if name in values:
            raise ValueError(f"--config {path}: {key!r} and {given_as[name]!r} are the same option; keep one")
        values[name], given_as[name] = _file_value(path, key, value), key
    return values


def _parse_file(path: Path, kind: str):
    """The file's contents; a syntax error names the format and the line (1-based)."""
    text = path.read_text(encoding="utf-8")
    if kind == "YAML":
        import yaml
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e)
            raise ValueError(f"--config {path}{where}: not valid YAML ({what})") from None
    if kind == "TOML":
        import tomllib
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:  # its message ends "(at line L, column C)"
            raise ValueError(f"--config {path}: not valid TOML ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {path}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg}); "
                         f"name a .yaml or .toml file to write YAML or TOML") from None


def _option_name(path: Path, key) -> str:
    name = str(key).replace("-", "_")
    name = ALIASES.get(name, name)
    if name not in OPTIONS:
        close = difflib.get_close_matches(str(key).replace("-", "_"), [*OPTIONS, *ALIASES], n=1)
        raise ValueError(f"--config {path}: unknown option {key!r}" + (f" (did you mean {close[0]!r}?)" if close
                                                                       else "") + f"; valid options: {', '.join(OPTIONS)}")
    return name


def _file_value(path: Path, key: str, value):
    f = OPTIONS[_option_name(path, key)]
    if _is_flag(f):
        if not isinstance(value, bool):
            raise ValueError(f"--config {path}: {key}: expected true or false, got {value!r}")
        return value
    try:
        parsed = f.metadata["parse"](value)
    except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
        raise ValueError(f"--config {path}: {key}: {e}") from None
    if f.metadata["choices"] and not any(parsed == c and type(parsed) is type(c) for c in f.metadata["choices"]):
        raise ValueError(f"--config {path}: {key}={value!r}; choose one of {f.metadata['choices']}")
    return parsed


def run_from_args(args: argparse.Namespace, say) -> dict:
    from .train_run import run_train_job
    return run_train_job(resolve(args), say)
