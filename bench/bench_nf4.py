"""NF4 quantize / dequantize of a 4096 x 4096 fp32 matrix: loralab vs bitsandbytes (CPU), in one run.

Cases: quantize (blocksize 64), quantize with double quantization, dequantize to fp32, dequantize a
double-quantized weight, dequantize to bf16 (a bf16 weight).  Each round times every case once for both
libraries, alternating which goes first; the figures are medians over ROUNDS, and a case's ratio is the median of
its per-round ratios (drift on the machine hits both alike).  Targets: quantize >= 2x faster than bitsandbytes;
dequantize within 1.5x of its time.  The outputs are checked to be bit-equal first (codes, constants, values).
"""

from __future__ import annotations

import os
import statistics
import time

import torch

ROUNDS = 15
SHAPE = (4096, 4096)


def _cases(w: torch.Tensor):
    import bitsandbytes.functional as bnb

    from loralab.quant import dequantize_nf4, quantize_nf4

    def theirs_q(x, dq):
        return lambda: bnb.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=dq)

    inputs = {"fp32": (w, False), "dq": (w, True), "bf16": (w.bfloat16(), False)}
    ours = {k: quantize_nf4(x, 64, dq) for k, (x, dq) in inputs.items()}
    theirs = {k: theirs_q(x, dq)() for k, (x, dq) in inputs.items()}
    _check_equal(ours, theirs)
    return {
        "quantize": (lambda: quantize_nf4(w, 64), theirs_q(w, False), ("faster", 2.0)),
        "quantize, double quant": (lambda: quantize_nf4(w, 64, True), theirs_q(w, True), ("faster", 2.0)),
        "dequantize to fp32": (lambda: dequantize_nf4(*ours["fp32"]), lambda: bnb.dequantize_4bit(*theirs["fp32"]),
                               ("within", 1.5)),
        "dequantize, double quant": (lambda: dequantize_nf4(*ours["dq"]),
                                     lambda: bnb.dequantize_4bit(*theirs["dq"]), ("within", 1.5)),
        "dequantize to bf16": (lambda: dequantize_nf4(*ours["bf16"]), lambda: bnb.dequantize_4bit(*theirs["bf16"]),
                               ("within", 1.5)),
    }


def _check_equal(ours: dict, theirs: dict) -> None:
    import bitsandbytes.functional as bnb

    from loralab.quant import dequantize_nf4
    for key in ours:
        (packed, state), (ref_packed, ref) = ours[key], theirs[key]
        same = torch.equal(packed, ref_packed.reshape(-1)) and torch.equal(state.absmax, ref.absmax)
        if state.double_quant:
            same = same and torch.equal(state.offset, ref.offset) and torch.equal(state.nested_absmax,
                                                                                     ref.state2.absmax)
        same = same and torch.equal(dequantize_nf4(packed, state), bnb.dequantize_4bit(ref_packed, ref))
        if not same:
            raise AssertionError(f"NF4 outputs differ from bitsandbytes' ({key}); the timings would not compare")


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(rounds: int = ROUNDS) -> dict[str, dict]:
    torch.manual_seed(0)
    w = torch.randn(SHAPE)
    cases = _cases(w)
    times = {name: ([], []) for name in cases}
    for fn_ours, fn_theirs, _ in cases.values():                   # warm up: tables, allocator, compile caches
        fn_ours(), fn_theirs()
    for r in range(rounds):
        for name, (fn_ours, fn_theirs, _) in cases.items():
            order = ((0, fn_ours), (1, fn_theirs)) if r % 2 == 0 else ((1, fn_theirs), (0, fn_ours))
            for i, fn in order:
                times[name][i].append(_time(fn))
    out = {}
    for name, (ours, theirs) in times.items():
        kind, target = cases[name][2]
        ratio = statistics.median(a / b for a, b in zip(ours, theirs))       # loralab time / bitsandbytes time
        ok = (1 / ratio >= target) if kind == "faster" else (ratio <= target)
        out[name] = {"ours_ms": 1e3 * statistics.median(ours), "theirs_ms": 1e3 * statistics.median(theirs),
                     "ratio": ratio, "pass": ok,
                     "target": f">= {target:g}x faster" if kind == "faster" else f"<= {target:g}x the time"}
    return out


def main() -> str:
    load_before = os.getloadavg()[0]
    results = measure()
    load_after = os.getloadavg()[0]
    rows = [f"| {name} | {r['ours_ms']:.1f} ms | {r['theirs_ms']:.1f} ms | {_relative(r)} | {r['target']} | "
            f"{'pass' if r['pass'] else 'FAIL'} |" for name, r in results.items()]
    import bitsandbytes
    return "\n".join([
        "## NF4 quantize / dequantize vs bitsandbytes",
        "",
        f"A {SHAPE[0]}x{SHAPE[1]} fp32 matrix (bf16 for the bf16 case), blocksize 64, NF4; bitsandbytes "
        f"{bitsandbytes.__version__} on CPU. Median of {ROUNDS} interleaved rounds; the ratio is loralab's time over "
        f"bitsandbytes' (median of per-round ratios). Codes, block constants (nested too) and dequantized values "
        f"were checked bit-equal before timing. Load average {load_before:.1f} before, {load_after:.1f} after "
        f"(2 cores).",
        "",
        "Both allocate a fresh output per call, and writing fresh memory is most of the cost: 16,384 page faults for "
        "a 64 MiB fp32 result (about 20 ms here). loralab marks its output for transparent huge pages before writing "
        "it (loralab/quant/parallel.py; Linux with THP `madvise` or `always`), so the same write takes a few hundred "
        f"faults. THP setting here: `{_thp()}`.",
        "",
        "| operation | loralab | bitsandbytes | loralab vs bitsandbytes | target | |",
        "|---|---:|---:|---:|---|---|",
        *rows,
    ])


def _thp() -> str:
    try:
        return open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
    except OSError:
        return "unavailable"


def _relative(r: dict) -> str:
    return f"{1 / r['ratio']:.2f}x faster" if "faster" in r["target"] else f"{r['ratio']:.2f}x the time"


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(main())
