"""The `loralab` command: thin argument parsing over the Python API.

Every command takes --json: then stdout carries exactly one JSON object (the command's results) and all
human text goes to stderr, so scripts can rely on stdout.  Errors exit with status 2 and a message that
says what to change (and, with --json, {"error": ...} on stdout).
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "build_parser"]


# ---- commands: each is (add its arguments, run it -> dict) ------------------------------------------------
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps for pretraining and for LoRA")
    p.add_argument("--r", type=int, default=4, help="LoRA rank (default 4)")


def _demo_run(args, say) -> dict:
    from .demo import run_demo
    return run_demo(seed=args.seed, steps=args.steps, r=args.r, say=say)


COMMANDS = {
    # name: (help, add_arguments, run)
    "demo": ("a one-minute tour of the core: attach, count, train, merge, verify", _demo_args, _demo_run),
}


# ---- plumbing ---------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
