"""The `loralab` command: thin argument parsing over the Python API.

Every command takes --json: then stdout carries exactly one JSON object (the command's results) and all
human text goes to stderr, so scripts can rely on stdout.  Errors exit with status 2 and a message that
says what to change (and, with --json, {"error": ...} on stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .cli_args import (checked, finite_float, fraction, int_list, integer, nonnegative_float, nonnegative_int,
                       positive_float, positive_int, target_list)

__all__ = ["main", "build_parser"]


# ---- commands: each is (add its arguments, run it -> dict, or None when it printed its own JSON) ---------
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=integer, default=0, help="random seed (default 0)")
    p.add_argument("--steps", type=integer, default=300, help="optimizer steps for pretraining and for LoRA")
    p.add_argument("--r", type=integer, default=4, help="LoRA rank (default 4)")


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
    p.add_argument("--probe-tokens", type=positive_int, default=16, help="probe sequence length (default 16)")


def _merge_run(args, say) -> dict:
    from .hf import merge_model_dir
    return merge_model_dir(args.model, args.adapter, args.out, overwrite=args.overwrite,
                           check_fingerprint=not args.no_fingerprint_check, probe_tokens=args.probe_tokens, say=say)


def _spirals_args(p: argparse.ArgumentParser) -> None:
    from .reference.spirals import SpiralsConfig as C
    p.add_argument("--seed", type=nonnegative_int, default=C.seed, help=f"random seed (default {C.seed})")
    p.add_argument("--rotation", type=finite_float, default=C.rotation,
                   help=f"rotation of the shifted task, radians (default {C.rotation})")
    p.add_argument("--r", type=positive_int, default=C.r, help=f"LoRA rank (default {C.r})")
    p.add_argument("--lora-layers", type=int_list, default=C.lora_layers, metavar="1,2,3",
                   help="comma-separated layer numbers to adapt, 1 = first (default: every layer)")
    p.add_argument("--lora-alpha", type=positive_float, default=C.lora_alpha,
                   help=f"scaling = lora_alpha / r (default {C.lora_alpha})")
    p.add_argument("--noise", type=nonnegative_float, default=C.noise,
                   help=f"std of the spiral angle noise, radians (default {C.noise})")
    p.add_argument("--n-per-class", type=positive_int, default=C.n_per_class,
                   help=f"training points per class (default {C.n_per_class})")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=C.optimizer,
                   help=f"'sgd' is the original write-up's plain gradient descent (default {C.optimizer})")
    p.add_argument("--lr", type=positive_float, default=C.lr, help=f"learning rate, every phase (default {C.lr})")
    p.add_argument("--pretrain-steps", type=positive_int, default=C.pretrain_steps,
                   help=f"full-batch steps of pretraining (default {C.pretrain_steps})")
    p.add_argument("--adapt-steps", type=positive_int, default=C.adapt_steps,
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
    p.add_argument("--d", type=positive_int, default=256, help="matrix size d (d×d; default 256)")
    p.add_argument("--strong", type=positive_int, default=8, help="number of strong directions k (default 8)")
    p.add_argument("--scale", type=finite_float, default=2.0, help="U, V ~ N(0, 1)·scale (default 2.0)")
    p.add_argument("--noise", type=nonnegative_float, default=0.05, help="noise ~ N(0, 1)·noise (default 0.05)")
    p.add_argument("--seed", type=nonnegative_int, default=42, help="np.random.seed (default 42)")
    p.add_argument("--ranks", type=int_list, default=DEFAULT_RANKS,
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
    p.add_argument("--port", type=nonnegative_int, default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser, just print the URL")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other machines can reach (the page has no authentication)")


def _explore_run(args, say) -> None:
    from .explore.server import serve
    serve(args.adapter, host=args.host, port=args.port, open_browser=not args.no_browser,
          allow_remote=args.allow_remote, json_out=args.json, say=say)
    # Stopped by Ctrl-C with everything written: leave without the interpreter's teardown, during which torch's
    # native thread pools have been seen to abort the process ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve_args(p: argparse.ArgumentParser) -> None:
    from .serve.server import API_KEY_ENV, ServeConfig as C
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="local transformers model directory "
                   "(a causal LM for /v1/completions, or a sequence classifier for /v1/classify)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter to serve as model NAME (repeat for more)")
    p.add_argument("--adapter-dir", action="append", default=[], metavar="ROOT",
                   help="a directory POST /v1/adapters may load adapters from (repeat for more; none: off)")
    p.add_argument("--max-loaded", type=positive_int, default=None, metavar="N",
                   help="adapters resident at once; beyond, the least recently used is unloaded (default: all)")
    p.add_argument("--host", default=C.host, help=f"address to listen on (default {C.host}, this machine only)")
    p.add_argument("--port", type=nonnegative_int, default=C.port, help=f"port (default {C.port}; 0: a free one)")
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default: env {API_KEY_ENV})")
    p.add_argument("--workers", type=positive_int, default=C.workers, help="server processes behind the port")
    p.add_argument("--max-batch", type=positive_int, default=C.max_batch, help=f"rows per forward (default {C.max_batch})")
    p.add_argument("--batch-wait-ms", type=nonnegative_float, default=C.batch_wait_ms,
                   help=f"how long a request waits for others to share its forward (default {C.batch_wait_ms})")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=C.max_prompt_tokens,
                   help=f"longest prompt accepted (default {C.max_prompt_tokens}; longer: 413)")
    p.add_argument("--max-tokens", type=positive_int, default=C.max_tokens,
                   help=f"largest max_tokens accepted (default {C.max_tokens}; larger: 400)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other machines can reach without an API key")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--release-memory", action="store_true",
                   help="let malloc hand freed memory back to the system between batches (default: keep it for "
                        "the next batch, which spares the page faults of taking it back; serve/memory.py)")


def _serve_run(args, say) -> None:
    import os
    from .serve.server import API_KEY_ENV, ServeConfig, parse_adapter_specs, serve
    config = ServeConfig(model=args.model, adapters=parse_adapter_specs(args.adapter),
                         adapter_dirs=tuple(args.adapter_dir), max_loaded=args.max_loaded, host=args.host,
                         port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                         workers=args.workers, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                         max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                         allow_remote=args.allow_remote, threads=args.threads,
                         keep_freed_memory=not args.release_memory)
    serve(config, json_out=args.json, say=say)
    return None  # with --json, serve() printed {"url": ...} when the server came up


def _train_args(p: argparse.ArgumentParser) -> None:
    from .train_cli import add_arguments
    add_arguments(p)


def _train_run(args, say) -> dict:
    from .train_cli import run_from_args
    return run_from_args(args, say)


def _use_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, metavar="ADAPTER_DIR",
                   help="adapter directory written by `loralab train` (<out>/adapter)")
    p.add_argument("--data", required=True, metavar="FILE", help=".jsonl or .csv records, as for training")
    p.add_argument("--model", metavar="MODEL_DIR", default=None,
                   help="local base model directory (default: the one the adapter was trained on)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="examples per batch (default 32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _predict_args(p: argparse.ArgumentParser) -> None:
    _use_args(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=32,
                   help="causal-lm: tokens to generate per prompt at most (default 32)")
    p.add_argument("--temperature", type=nonnegative_float, default=0.0,
                   help="causal-lm: 0 = greedy (default), > 0 samples from softmax(logits / temperature)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="causal-lm: seed of the sampling (default 0)")


def _predict_run(args, say) -> dict:
    from .predict import predict_file
    return predict_file(args.adapter, args.data, args.model, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                        progress=not args.no_progress, say=say)


def _eval_run(args, say) -> dict:
    from .predict import evaluate_file
    return evaluate_file(args.adapter, args.data, args.model, batch_size=args.batch_size,
                         progress=not args.no_progress, say=say)


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="adapter directory (loralab or PEFT format)")
    p.add_argument("--base", metavar="MODEL_DIR", default=None,
                   help="local transformers model the adapter was trained on: adds ‖ΔW‖/‖W0‖ and output checks")
    p.add_argument("--report", metavar="DIR", default=None,
                   help="write a report folder: PNG plots, report.json and index.html")
    p.add_argument("--probe-tokens", type=positive_int, default=16, help="probe sequence length (default 16)")


def _inspect_run(args, say) -> dict:
    from .inspect_adapter import inspect_adapter_dir
    return inspect_adapter_dir(args.adapter, args.base, args.report, probe_tokens=args.probe_tokens, say=say)


def _doctor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="adapter directory (loralab or PEFT format)")
    p.add_argument("--base", metavar="MODEL_DIR", default=None,
                   help="local transformers model the adapter was trained on: adds the output checks")
    p.add_argument("--probe-tokens", type=positive_int, default=16, help="probe sequence length (default 16)")


def _doctor_run(args, say) -> dict:
    from .inspect_adapter import inspect_adapter_dir
    result = inspect_adapter_dir(args.adapter, args.base, probe_tokens=args.probe_tokens, say=say, table=False)
    return {k: result[k] for k in ("adapter", "base", "probe", "findings")}


def _diff_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A_DIR", help="first adapter directory")
    p.add_argument("b", metavar="B_DIR", help="second adapter directory")
    p.add_argument("--k", type=positive_int, default=4, help="top-k singular subspaces to compare (default 4)")


def _diff_run(args, say) -> dict:
    from .inspect_adapter import diff_adapter_dirs
    return diff_adapter_dirs(args.a, args.b, args.k, say=say)


def _estimate_args(p: argparse.ArgumentParser) -> None:
    from .estimate import DTYPE_BYTES, LOOPS, EstimateConfig as C, parse_bytes, parse_count
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--params", type=checked(parse_count), metavar="COUNT",
                       help="parameter count (7e9, 7B, 125M); widths from a Llama-style layout")
    which.add_argument("--model", metavar="DIR|config.json",
                       help="local transformers model directory or config.json (built on the meta device)")
    p.add_argument("--r", type=positive_int, default=C.r, help=f"LoRA rank (default {C.r})")
    p.add_argument("--target-modules", type=target_list, default=C.target_modules, metavar="NAMES",
                   help=f"all-linear or comma-separated names like q_proj,v_proj (default {C.target_modules})")
    p.add_argument("--quant", choices=("nf4",), help="plan QLoRA: the base's Linear weights in NF4")
    p.add_argument("--no-double-quant", action="store_true", help="NF4 absmax in fp32 (4.5 bits, not 4.127)")
    p.add_argument("--batch", type=positive_int, default=C.batch, help=f"sequences per step (default {C.batch})")
    p.add_argument("--seq", type=positive_int, default=C.seq, help=f"tokens per sequence (default {C.seq})")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default=C.dtype,
                   help=f"base weights and activations (default {C.dtype})")
    p.add_argument("--gradient-checkpointing", action="store_true", help="keep only each block's input")
    p.add_argument("--autocast", action="store_true",
                   help="the step runs under torch.autocast(dtype), as `loralab train --bf16` does: the adapter "
                        "path computes in 16 bits (default: loralab's fp32 adapter path)")
    p.add_argument("--lora-dropout", type=fraction, default=C.lora_dropout,
                   help=f"adapter input dropout; > 0 keeps a dropped copy and a mask (default {C.lora_dropout})")
    p.add_argument("--gpu-memory", type=checked(parse_bytes), metavar="SIZE",
                   help="answer 'will it fit': 24GB (10^9 bytes) or 24GiB (2^30)")
    p.add_argument("--variants", type=positive_int, metavar="N",
                   help="N fine-tuned variants: N full copies vs the base + N adapter files")
    p.add_argument("--adapter-dtype", choices=tuple(DTYPE_BYTES), default=C.adapter_dtype,
                   help=f"dtype of the adapter file (default {C.adapter_dtype}, what loralab saves)")
    p.add_argument("--loop", choices=tuple(LOOPS), default=C.loop,
                   help="whose training step the activations are of: loralab (`loralab train`: the causal-LM loss "
                        "in chunks, no (tokens, vocab) logits; fused SwiGLU) or standard (model(input_ids, "
                        f"labels).loss, as with PEFT or the HF Trainer); default {C.loop}")


def _estimate_run(args, say) -> dict:
    from .estimate import EstimateConfig, estimate
    config = EstimateConfig(params=args.params, model=args.model, r=args.r, target_modules=args.target_modules,
                            quant=args.quant, double_quant=not args.no_double_quant, batch=args.batch,
                            seq=args.seq, dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
                            autocast=args.autocast, lora_dropout=args.lora_dropout, gpu_memory=args.gpu_memory,
                            variants=args.variants, adapter_dtype=args.adapter_dtype, loop=args.loop)
    result = estimate(config)
    for line in result.pop("text"):
        say(line)
    return result


def _targets_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_DIR|config.json",
                   help="local transformers model directory or its config.json (built on the meta device)")
    p.add_argument("--r", type=positive_int, default=16, help="LoRA rank for the costs (default 16)")


def _targets_run(args, say) -> dict:
    from .targets import model_shape, targets_report, targets_text
    shape, model = model_shape(args.model)
    report = targets_report(model, shape, args.r)
    for line in targets_text(report):
        say(line)
    return report


COMMANDS = {
    # name: (help, add_arguments, run)
    "train": ("fine-tune a local model with LoRA (no arguments: the bundled MiniLM text-classification job)",
              _train_args, _train_run),
    "predict": ("a trained adapter's predictions for a data file: labels and probabilities, or completions",
                _predict_args, _predict_run),
    "eval": ("a trained adapter's held-out metrics on a data file: loss, accuracy / perplexity", _use_args,
             _eval_run),
    "demo": ("a one-minute tour of the core: attach, count, train, merge, verify", _demo_args, _demo_run),
    "merge": ("merge an adapter into a local transformers model and save the merged model", _merge_args,
              _merge_run),
    "spirals": ("NumPy reference: pretrain an MLP on spirals, rotate them, adapt with LoRA vs full fine-tuning",
                _spirals_args, _spirals_run),
    "energy": ("cumulative singular-value energy of a low-rank-plus-noise matrix, per rank", _energy_args,
               _energy_run),
    "inspect": ("what an adapter did, per module: norms, spectrum, energy, ranks; the adapter doctor; a report",
                _inspect_args, _inspect_run),
    "doctor": ("what is wrong with an adapter and how to fix it (untrained, NaN, rank collapse, scaling, "
               "hyperparameters of the run, output checks with --base)", _doctor_args, _doctor_run),
    "diff": ("compare two adapters per module: cosine of the updates and overlap of their top-k subspaces",
             _diff_args, _diff_run),
    "estimate": ("memory and size planner: full fine-tuning vs LoRA vs QLoRA, adapter files, will it fit",
                 _estimate_args, _estimate_run),
    "targets": ("which modules can take an adapter, and what each choice of target_modules costs",
                _targets_args, _targets_run),
    "serve": ("an OpenAI-style HTTP server for a base model and many adapters, batched together in one forward",
              _serve_args, _serve_run),
    "explore": ("an interactive page on 127.0.0.1: truncate a matrix's SVD (synthetic, random, or an adapter's "
                "layer) with a rank slider", _explore_args, _explore_run),
}


# ---- plumbing ---------------------------------------------------------------------------------------------
def build_parser(commands=None) -> argparse.ArgumentParser:
    """The `loralab` parser.  `commands`: the names whose arguments are added (default: all).  main() adds only
    the command being run, so that e.g. `loralab spirals` imports nothing of torch or training."""
    parser = argparse.ArgumentParser(prog="loralab", description="LoRA for PyTorch: build, train, merge, "
                                     "inspect, quantize, serve adapters.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout; human text on stderr")
        if commands is None or name in commands:
            add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(commands=argv[:1])
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
