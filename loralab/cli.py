"""The `loralab` command: thin argument parsing over the Python API.

Every command takes --json: then stdout carries exactly one JSON object (the command's results) and all
human text goes to stderr, so scripts can rely on stdout.  Errors exit with status 2 and a message that
says what to change (and, with --json, {"error": ...} on stdout).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from .train_cli import _positive_float, _positive_int  # the one copy (shared with `loralab train`)

__all__ = ["main", "build_parser"]


# ---- commands: each is (add its arguments, run it -> dict, or None when it printed its own JSON) ---------
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps for pretraining and for LoRA")
    p.add_argument("--r", type=int, default=4, help="LoRA rank (default 4)")


def _demo_run(args, say) -> dict:
    from .demo import run_demo
    return run_demo(seed=args.seed, steps=args.steps, r=args.r, say=say)


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="local transformers model directory")
    p.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="adapter directory (loralab or PEFT)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="where to write the merged model")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--no-fingerprint-check", action="store_true",
                   help="load even if the base differs from the one the adapter was saved against")
    p.add_argument("--probe-tokens", type=_positive_int, default=16, help="probe sequence length (default 16)")


def _merge_run(args, say) -> dict:
    from .hf import merge_model_dir
    return merge_model_dir(args.model, args.adapter, args.out, overwrite=args.overwrite,
                           check_fingerprint=not args.no_fingerprint_check, probe_tokens=args.probe_tokens, say=say)


def _spirals_args(p: argparse.ArgumentParser) -> None:
    from .reference.spirals import SpiralsConfig as C
    p.add_argument("--seed", type=_nonnegative_int, default=C.seed, help=f"random seed (default {C.seed})")
    p.add_argument("--rotation", type=_finite_float, default=C.rotation,
                   help=f"rotation of the shifted task, radians (default {C.rotation})")
    p.add_argument("--r", type=_positive_int, default=C.r, help=f"LoRA rank (default {C.r})")
    p.add_argument("--lora-layers", type=_int_list, default=C.lora_layers, metavar="1,2,3",
                   help="comma-separated layer numbers to adapt, 1 = first (default: every layer)")
    p.add_argument("--lora-alpha", type=_positive_float, default=C.lora_alpha,
                   help=f"scaling = lora_alpha / r (default {C.lora_alpha})")
    p.add_argument("--noise", type=_nonnegative_float, default=C.noise,
                   help=f"std of the spiral angle noise, radians (default {C.noise})")
    p.add_argument("--n-per-class", type=_positive_int, default=C.n_per_class,
                   help=f"training points per class (default {C.n_per_class})")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=C.optimizer,
                   help=f"'sgd' is the original write-up's plain gradient descent (default {C.optimizer})")
    p.add_argument("--lr", type=_positive_float, default=C.lr, help=f"learning rate, every phase (default {C.lr})")
    p.add_argument("--pretrain-steps", type=_positive_int, default=C.pretrain_steps,
                   help=f"full-batch steps of pretraining (default {C.pretrain_steps})")
    p.add_argument("--adapt-steps", type=_positive_int, default=C.adapt_steps,
                   help=f"full-batch steps of LoRA and of full fine-tuning (default {C.adapt_steps})")
    p.add_argument("--out", default="runs/spirals", metavar="DIR",
                   help="where to write spirals.png (default runs/spirals)")
    p.add_argument("--no-plot", action="store_true", help="skip the figure (and the matplotlib import)")


def _spirals_run(args, say) -> dict:
    from .reference.spirals import SpiralsConfig, run_spirals
    config = SpiralsConfig(seed=args.seed, n_per_class=args.n_per_class, noise=args.noise, rotation=args.rotation,
                           r=args.r, lora_alpha=args.lora_alpha, lora_layers=args.lora_layers,
                           optimizer=args.optimizer, lr=args.lr,
                           pretrain_steps=args.pretrain_steps, adapt_steps=args.adapt_steps)
    return run_spirals(config, out_dir=None if args.no_plot else args.out, say=say).to_dict()


def _energy_args(p: argparse.ArgumentParser) -> None:
    from .reference.energy import DEFAULT_RANKS
    p.add_argument("--d", type=_positive_int, default=256, help="matrix size d (d×d; default 256)")
    p.add_argument("--strong", type=_positive_int, default=8, help="number of strong directions k (default 8)")
    p.add_argument("--scale", type=_finite_float, default=2.0, help="U, V ~ N(0, 1)·scale (default 2.0)")
    p.add_argument("--noise", type=_nonnegative_float, default=0.05, help="noise ~ N(0, 1)·noise (default 0.05)")
    p.add_argument("--seed", type=_nonnegative_int, default=42, help="np.random.seed (default 42)")
    p.add_argument("--ranks", type=_int_list, default=DEFAULT_RANKS,
                   help=f"comma-separated ranks to report (default {','.join(map(str, DEFAULT_RANKS))})")


def _energy_run(args, say) -> dict:
    from .reference.energy import energy_table
    table = energy_table(args.d, args.strong, args.scale, args.noise, args.seed, args.ranks)
    say(f"M = U·V + noise, d={args.d}, k={args.strong}, scale={args.scale}, noise={args.noise}, seed={args.seed}")
    say(f"{'rank':>6}  {'Σσ² energy':>11}  {'Σσ share':>9}")
    for r in args.ranks:
        say(f"{r:>6}  {table['energy_percent'][r]:>10.2f}%  {table['energy_percent_sigma_sum'][r]:>8.2f}%")
    return table


def _explore_args(p: argparse.ArgumentParser) -> None:
    from .explore.server import DEFAULT_PORT
    p.add_argument("--adapter", metavar="ADAPTER_DIR", help="also offer each layer's ΔW = scaling·B·A of this "
                   "adapter (PEFT's format); only this directory is read")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_nonnegative_int, default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser, just print the URL")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other machines can reach (the page has no authentication)")


def _explore_run(args, say) -> None:
    from .explore.server import serve
    serve(args.adapter, host=args.host, port=args.port, open_browser=not args.no_browser,
          allow_remote=args.allow_remote, json_out=args.json, say=say)
    return None  # with --json, serve() already printed {"url": ...} when the server came up


def _train_args(p: argparse.ArgumentParser) -> None:
    from .train_cli import add_arguments
    add_arguments(p)


def _train_run(args, say) -> dict:
    from .train_cli import run_from_args
    return run_from_args(args, say)


COMMANDS = {
    # name: (help, add_arguments, run)
    "train": ("fine-tune a local model with LoRA (no arguments: the bundled MiniLM text-classification job)",
              _train_args, _train_run),
    "demo": ("a one-minute tour of the core: attach, count, train, merge, verify", _demo_args, _demo_run),
    "merge": ("merge an adapter into a local transformers model and save the merged model", _merge_args,
              _merge_run),
    "spirals": ("NumPy reference: pretrain an MLP on spirals, rotate them, adapt with LoRA vs full fine-tuning",
                _spirals_args, _spirals_run),
    "energy": ("cumulative singular-value energy of a low-rank-plus-noise matrix, per rank", _energy_args,
               _energy_run),
    "explore": ("an interactive page on 127.0.0.1: truncate a matrix's SVD (synthetic, random, or an adapter's "
                "layer) with a rank slider", _explore_args, _explore_run),
}


# ---- plumbing ---------------------------------------------------------------------------------------------
def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    """Parse "1,2,4" as (1, 2, 4); every entry must be a positive integer."""
    try:
        return tuple(_positive_int(part.strip()) for part in text.split(","))
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,2,4: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loralab", description="LoRA for PyTorch: build, train, merge, "
                                     "inspect, quantize, serve adapters.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout; human text on stderr")
        add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    human = sys.stderr if args.json else sys.stdout

    def say(*parts) -> None:
        print(*parts, file=human, flush=True)

    try:
        result = COMMANDS[args.command][2](args, say)
    except (ValueError, TypeError, KeyError, FileNotFoundError, RuntimeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"loralab {args.command}: error: {message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": str(message)}))
        return 2
    if args.json and result is not None:  # None: the command printed its one JSON object itself
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
